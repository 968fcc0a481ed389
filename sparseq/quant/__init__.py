"""Quantization passes over whole models."""
from .calibrate import calibrate
from .metrics import sqnr_db
from .observers import MinMaxObserver, MSEObserver, Observer, PercentileObserver
from .qat import QAT_SCHEMES, EmaAbsMaxObserver, QATLinear, prepare_qat  # noqa: F401
from .quantize import SCHEMES, quantize_
from .sensitivity import SensitivityReport, pow2_scale_cost, quantized_sqnr_db, sensitivity
from .smooth_quant import SmoothQuantReport, smooth_quant
