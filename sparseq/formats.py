"""Packed weight formats: small dataclasses with pack() / unpack() / nbytes.

PackedInt8Weight is the int8 per-output-channel format every int8 kernel reads (CPU AVX2,
CUDA, Triton): the n16k4 layout described in csrc/include/sparseq/packed_int8.h.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ref


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be floating point, got {w.dtype}")
    if w.numel() and not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; cannot quantize it")


@dataclass
class PackedInt8Weight:
    """Symmetric per-output-channel int8 weight, W ~= q[n, k] * scale[n], q in [-127, 127].

    packed: int8 [ceil(N/16), ceil(K/4), 16, 4]; scale: float32 [N]; rowsum: int32 [N] = sum_k q[n,k].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    rowsum: torch.Tensor
    in_features: int
    out_features: int

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "PackedInt8Weight":
        """Quantize a float weight [N, K] per output channel and pack it once."""
        _check_weight(weight)
        w = weight.detach().float()
        absmax = w.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls.from_int8(q, scale)

    @classmethod
    def from_int8(cls, q: torch.Tensor, scale: torch.Tensor) -> "PackedInt8Weight":
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"scale must have shape ({q.shape[0]},), got {tuple(scale.shape)}")
        n, k = q.shape
        return cls(_ref.pack_n16k4(q), scale.float().contiguous(),
                   q.to(torch.int32).sum(dim=1).to(torch.int32), k, n)

    def unpack_int8(self) -> torch.Tensor:
        return _ref.unpack_n16k4(self.packed, self.out_features, self.in_features)

    def unpack(self) -> torch.Tensor:
        """Dequantized float32 weight [N, K]."""
        return self.unpack_int8().float() * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.rowsum))
