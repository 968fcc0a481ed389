"""Quantization passes over whole models."""
from .calibrate import calibrate
from .metrics import sqnr_db
from .observers import MinMaxObserver, MSEObserver, Observer, PercentileObserver
from .qat import QAT_SCHEMES, EmaAbsMaxObserver, QATLinear, prepare_qat
from .quantize import SCHEMES, fuse_gelu_, quantize_, quantize_embeddings_
from .sensitivity import SensitivityReport, pow2_scale_cost, quantized_sqnr_db, sensitivity
from .smooth_quant import SmoothQuantReport, smooth_quant

__all__ = ["calibrate", "sqnr_db", "MinMaxObserver", "MSEObserver", "Observer", "PercentileObserver",
           "QAT_SCHEMES", "EmaAbsMaxObserver", "QATLinear", "prepare_qat", "SCHEMES", "quantize_", "fuse_gelu_",
           "quantize_embeddings_",
           "SensitivityReport", "pow2_scale_cost", "quantized_sqnr_db", "sensitivity",
           "SmoothQuantReport", "smooth_quant"]
