"""Drop-in int8 replacements for nn.Linear.

Int8Linear             W8A8 dynamic: activations quantized per row at run time, int8 GEMM.
Int8WeightOnlyLinear   W8A16 / W8A32: int8 weight, float activations.

The weight is quantized and packed once, in from_dense(), into registered buffers (w_packed,
w_scale, w_rowsum, bias), so state_dict() carries the packed form and .to(device) moves it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..formats import PackedInt8Weight
from ._frozen import FrozenLinearBase

_ACT_QMAX = {8: 127, 7: 63}


class _PackedInt8Linear(FrozenLinearBase):
    """Buffers, packing, shape handling and conversions shared by the int8 linear layers.

    Subclasses define _linear_2d(x2d), the op call on a contiguous [M, in_features] input.
    """

    _FP32_BUFFERS = ("w_scale", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device | str] = None, backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, backend)
        # A packed all-zero weight: buffers of the right shapes for load_state_dict to fill.
        empty = PackedInt8Weight.from_int8(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("w_packed", empty.packed)
        self.register_buffer("w_scale", empty.scale)
        self.register_buffer("w_rowsum", empty.rowsum)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device)
                             if bias else None)

    @classmethod
    def _from_linear(cls, linear: nn.Module, **kwargs):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{cls.__name__}.from_dense: the {type(linear).__name__} is not "
                             "initialized yet; run one forward pass first")
        packed = PackedInt8Weight.pack(linear.weight)  # raises on NaN / Inf
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, **kwargs)
        layer.w_packed.copy_(packed.packed)
        layer.w_scale.copy_(packed.scale)
        layer.w_rowsum.copy_(packed.rowsum)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def packed_weight(self) -> PackedInt8Weight:
        return PackedInt8Weight(self.w_packed, self.w_scale, self.w_rowsum,
                                self.in_features, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.packed_weight().unpack()

    def to_dense(self) -> nn.Linear:
        """An fp32 nn.Linear holding the dequantized weight (and the bias), on this layer's device."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.w_scale.device)
        with torch.no_grad():
            linear.weight.copy_(self.packed_weight().unpack())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _extra_repr_options(self) -> str:
        return ""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{self._extra_repr_options()}, "
                f"backend={self.backend or 'auto'}, packed_bytes={self.packed_weight().nbytes}")


class Int8Linear(_PackedInt8Linear):
    """W8A8 dynamic linear: per-output-channel int8 weight, per-row int8 activations.

    act_bits=8 quantizes activations to [-127, 127]; act_bits=7 to [-63, 63] (fbgemm's
    "reduce_range"). act_bits="auto" (the default) picks per call by device: 7 on the CPU, where
    AVX2 without VNNI multiplies 7-bit unsigned by int8 exactly at full rate but needs an extra
    sign operation per product for 8 bits (about 1.4x slower), and 8 elsewhere. Same call
    signature as nn.Linear: any leading dims, float32 / bfloat16 / float16 input, output in the
    input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act_bits: int | str = "auto", device: Optional[torch.device | str] = None,
                 backend: Optional[str] = None) -> None:
        if act_bits != "auto" and act_bits not in _ACT_QMAX:
            raise ValueError(f"act_bits must be 8, 7 or 'auto', got {act_bits!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, backend=backend)
        self.act_bits = act_bits

    @classmethod
    def from_dense(cls, linear: nn.Linear, act_bits: int | str = "auto",
                   backend: Optional[str] = None) -> "Int8Linear":
        """Quantize and pack ``linear``'s weight (per output channel, symmetric, int8)."""
        return cls._from_linear(linear, act_bits=act_bits, backend=backend)

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # one dict, not four nn.Module.__getattr__ calls per forward
        return ops.int8_linear(x2d, buffers["w_packed"], buffers["w_scale"], buffers["w_rowsum"], buffers["bias"],
                               act_qmax=_ACT_QMAX[self.act_bits_for(x2d.device)], backend=self.backend,
                               weight_checked=True)

    def act_bits_for(self, device: torch.device) -> int:
        """The activation bits a call on ``device`` uses (resolves act_bits="auto")."""
        if self.act_bits != "auto":
            return self.act_bits
        return 7 if device.type == "cpu" else 8

    def _extra_repr_options(self) -> str:
        return f", act_bits={self.act_bits}"


class Int8WeightOnlyLinear(_PackedInt8Linear):
    """Weight-only int8 linear (W8A16 / W8A32): int8 per-channel weight, float activations.

    Holds the same buffers as Int8Linear (w_rowsum included, unused here), so a state_dict
    of either loads into the other.
    """

    @classmethod
    def from_dense(cls, linear: nn.Linear, backend: Optional[str] = None) -> "Int8WeightOnlyLinear":
        """Quantize and pack ``linear``'s weight (per output channel, symmetric, int8)."""
        return cls._from_linear(linear, backend=backend)

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        return ops.int8_weight_only_linear(x2d, buffers["w_packed"], buffers["w_scale"], buffers["bias"],
                                           backend=self.backend, weight_checked=True)
