"""Quantization passes over whole models."""
from .metrics import sqnr_db
from .quantize import SCHEMES, quantize_

__all__ = ["SCHEMES", "quantize_", "sqnr_db"]
