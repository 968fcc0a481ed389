"""Shared pytest setup. Keep this file small: add only what several test modules need."""
import os

import torch

# Without a GPU, Triton kernels run in Triton's NumPy interpreter. Triton reads TRITON_INTERPRET
# when a kernel is decorated, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
