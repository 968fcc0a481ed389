"""Triton kernels for sparseq (optional: sparseq imports and runs without triton installed).

Nothing here imports triton at package import time; sparseq.ops imports the kernel modules
(e.g. sparseq.triton.int8_matmul) only when backend="triton" is asked for.
"""
from __future__ import annotations

import importlib.util
import os


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its NumPy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Whether the Triton backend can run here: triton is installed and there is a CUDA GPU,
    or the Triton interpreter is switched on (TRITON_INTERPRET=1, CPU tensors allowed)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreter_enabled():
        return True
    import torch

    return torch.cuda.is_available()


__all__ = ["is_available", "interpreter_enabled"]
