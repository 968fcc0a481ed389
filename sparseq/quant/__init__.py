"""Quantization passes over whole models."""
from .metrics import sqnr_db
from .qat import QAT_SCHEMES, EmaAbsMaxObserver, QATLinear, prepare_qat  # noqa: F401
from .quantize import SCHEMES, quantize_

__all__ = ["SCHEMES", "quantize_", "sqnr_db"]
