"""Drop-in layers backed by sparseq's kernels."""
from .int8_linear import Int8Linear, Int8WeightOnlyLinear

__all__ = ["Int8Linear", "Int8WeightOnlyLinear"]
