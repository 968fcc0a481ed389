"""Quantization passes over whole models."""
from .quantize import SCHEMES, quantize_

__all__ = ["SCHEMES", "quantize_"]
