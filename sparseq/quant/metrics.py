"""How close a quantized model's outputs stay to the original's."""
from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - approx)^2),
    computed in float64 (inf when they are equal)."""
    reference, approx = reference.detach().double(), approx.detach().double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()
