"""sparseq: sparse and int8 kernels as drop-in PyTorch layers.

The compiled extension (sparseq._C) registers the torch.ops.sparseq.* kernels. Without it
(no compiler at install time, an incompatible torch, or SPARSEQ_SKIP_EXT=1) every op runs its
pure-PyTorch reference from sparseq._ref, and this is logged once.
"""
from __future__ import annotations

import logging
import os

import torch  # noqa: F401  (the extension links against libtorch: load it first)

__version__ = "0.1.0"

logger = logging.getLogger("sparseq")

HAS_EXT = False
EXT_ERROR: str | None = None

if os.environ.get("SPARSEQ_SKIP_EXT", "0") not in ("", "0"):
    EXT_ERROR = "disabled by SPARSEQ_SKIP_EXT"
else:
    try:
        from . import _C  # noqa: F401

        HAS_EXT = True
    except ImportError as exc:  # no build, or built against another torch
        EXT_ERROR = str(exc)

if not HAS_EXT:
    logger.warning("sparseq: compiled kernels unavailable (%s); using the pure-PyTorch reference path",
                   EXT_ERROR)

from . import ops  # noqa: E402,F401
from .formats import PackedInt8Weight  # noqa: E402,F401
from .sparsify import sparsify_  # noqa: E402,F401
from .compression import compress  # noqa: E402,F401
from .serialization import inspect_file, load, save  # noqa: E402,F401

__all__ = ["ops", "PackedInt8Weight", "sparsify_", "compress", "save", "load", "inspect_file", "HAS_EXT",
           "__version__"]
