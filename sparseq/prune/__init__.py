"""Pruning passes: zero weights by a criterion (magnitude, Wanda, SparseGPT, ...) in patterns the sparse kernels run fast."""
from .structured import structured  # noqa: E402
