"""Drop-in int8 replacements for nn.Linear.

Int8Linear             W8A8 dynamic: activations quantized per row at run time, int8 GEMM.
Int8StaticLinear       W8A8 static: activations quantized with one calibrated scale, int8 GEMM.
Int8WeightOnlyLinear   W8A16 / W8A32: int8 weight, float activations.

Every from_dense takes pow2_scales=True to round the weight scales (and Int8StaticLinear's
activation scale) up to powers of two, so dequantization is a shift, as fixed-point hardware wants.

The weight is quantized and packed once, in from_dense(), into registered buffers (w_packed,
w_scale, w_rowsum, bias), so state_dict() carries the packed form and .to(device) moves it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ref, ops
from ..formats import PackedInt8Weight, pow2_ceil
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
    def _from_linear(cls, linear: nn.Module, pow2_scales: bool = False, **kwargs):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{cls.__name__}.from_dense: the {type(linear).__name__} is not "
                             "initialized yet; run one forward pass first")
        packed = PackedInt8Weight.pack(linear.weight, pow2_scales=pow2_scales)  # raises on NaN / Inf
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


class _W8A8Linear(_PackedInt8Linear):
    """What the two W8A8 layers share: an output activation fused into the kernel's epilogue.

    activation="gelu" makes the layer compute GELU(linear(x)) in one pass (the erf form, to
    within 3e-7 of torch's), so a following nn.GELU can go (sparseq.quant.fuse_gelu_ does this);
    "none" (the default) is the plain linear. to_dense() gives the linear part only.
    """

    activation = "none"

    def _set_activation(self, activation: str) -> None:
        _ref.check_fused_activation(activation)
        self.activation = activation

    # Subclasses define _w8a8(x2d, activation): their op call with the given fused activation.

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        return self._w8a8(x2d, self.activation)

    def _pre_activation_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        return self._w8a8(x2d, "none")

    def _output_activation(self, out: torch.Tensor) -> torch.Tensor:
        return F.gelu(out) if self.activation == "gelu" else out

    def _activation_repr(self) -> str:
        return "" if self.activation == "none" else f", activation={self.activation}"


class FusedActivation(nn.Identity):
    """What stands where an activation module was once sparseq.quant.fuse_gelu_ folded it into
    the preceding W8A8 layer's kernel: passes its input through; ``activation`` names what the
    layer before it now applies (sparseq.load uses it to fuse a skeleton the same way)."""

    def __init__(self, activation: str = "gelu") -> None:
        super().__init__()
        _ref.check_fused_activation(activation)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{self.activation} fused into the layer before"


class Int8Linear(_W8A8Linear):
    """W8A8 dynamic linear: per-output-channel int8 weight, per-row int8 activations.

    act_bits=8 quantizes activations to [-127, 127]; act_bits=7 to [-63, 63] (fbgemm's
    "reduce_range"). act_bits="auto" (the default) picks per call by device: on the CPU the bits
    its int8 core multiplies at full rate (sparseq.ops.cpu_int8_full_rate_bits: 8 with AVX-512
    VNNI; 7 on AVX2 without VNNI, which needs an extra sign operation per product for 8 bits,
    about 1.4x slower), and 8 elsewhere. Same call
    signature as nn.Linear: any leading dims, float32 / bfloat16 / float16 input, output in the
    input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act_bits: int | str = "auto", activation: str = "none",
                 device: Optional[torch.device | str] = None, backend: Optional[str] = None) -> None:
        if act_bits != "auto" and act_bits not in _ACT_QMAX:
            raise ValueError(f"act_bits must be 8, 7 or 'auto', got {act_bits!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, backend=backend)
        self.act_bits = act_bits
        self._set_activation(activation)

    @classmethod
    def from_dense(cls, linear: nn.Linear, act_bits: int | str = "auto", pow2_scales: bool = False,
                   activation: str = "none", backend: Optional[str] = None) -> "Int8Linear":
        """Quantize and pack ``linear``'s weight (per output channel, symmetric, int8; with
        pow2_scales the scales are rounded up to powers of two). activation: see _W8A8Linear."""
        return cls._from_linear(linear, pow2_scales=pow2_scales, act_bits=act_bits, activation=activation,
                                backend=backend)

    def _w8a8(self, x2d: torch.Tensor, activation: str) -> torch.Tensor:
        buffers = self._buffers  # one dict, not four nn.Module.__getattr__ calls per forward
        return ops.int8_linear(x2d, buffers["w_packed"], buffers["w_scale"], buffers["w_rowsum"], buffers["bias"],
                               act_qmax=_ACT_QMAX[self.act_bits_for(x2d.device)], activation=activation,
                               backend=self.backend, weight_checked=True)

    def act_bits_for(self, device: torch.device) -> int:
        """The activation bits a call on ``device`` uses (resolves act_bits="auto")."""
        if self.act_bits != "auto":
            return self.act_bits
        return ops.cpu_int8_full_rate_bits() if device.type == "cpu" else 8

    def _extra_repr_options(self) -> str:
        return f", act_bits={self.act_bits}{self._activation_repr()}"


class Int8StaticLinear(_W8A8Linear):
    """W8A8 static linear: per-output-channel int8 weight, activations quantized with one
    calibrated per-tensor scale, x_q = clamp(round(x / x_scale), -qmax, qmax).

    x_scale is a float32 buffer of shape [1] (in the state_dict, read by the kernel on the
    device). act_bits (8: qmax 127, the default; 7: qmax 63, faster on AVX2 CPUs without VNNI)
    is fixed at construction, because the calibrated scale is chosen for that qmax. Same call
    signature as nn.Linear.
    """

    _FP32_BUFFERS = _PackedInt8Linear._FP32_BUFFERS + ("x_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8,
                 activation: str = "none", device: Optional[torch.device | str] = None,
                 backend: Optional[str] = None) -> None:
        if act_bits not in _ACT_QMAX:
            raise ValueError(f"act_bits must be 8 or 7 for static activations, got {act_bits!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, backend=backend)
        self.act_bits = act_bits
        self._set_activation(activation)
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32, device=device))

    @classmethod
    def from_dense(cls, linear: nn.Linear, x_scale: Optional[float] = None, act_bits: int = 8,
                   pow2_scales: bool = False, activation: str = "none",
                   backend: Optional[str] = None) -> "Int8StaticLinear":
        """Quantize and pack ``linear``'s weight and fix the activation scale.

        x_scale: the activation scale (x_q = round(x / x_scale)); by default
        ``linear.act_observer.scale(qmax)``, the observer sparseq.quant.calibrate (or QAT) left.
        act_bits: 8 or 7. pow2_scales: round the weight scales and x_scale up to powers of two.
        """
        if act_bits not in _ACT_QMAX:
            raise ValueError(f"act_bits must be 8 or 7 for static activations, got {act_bits!r}")
        if x_scale is None:
            observer = getattr(linear, "act_observer", None)
            if observer is None:
                raise ValueError(f"this {type(linear).__name__} has no act_observer, so its static "
                                 "activation scale is unknown: run sparseq.quant.calibrate first "
                                 "(or pass x_scale=)")
            x_scale = observer.scale(_ACT_QMAX[act_bits])
        x_scale = float(x_scale)
        if not (math.isfinite(x_scale) and x_scale > 0 and math.isfinite(1.0 / x_scale)):
            raise ValueError(f"x_scale must be a positive finite float, got {x_scale}")
        layer = cls._from_linear(linear, pow2_scales=pow2_scales, act_bits=act_bits, activation=activation,
                                 backend=backend)
        layer.x_scale.fill_(x_scale)
        if pow2_scales:
            layer.x_scale.copy_(pow2_ceil(layer.x_scale))
        return layer

    def _w8a8(self, x2d: torch.Tensor, activation: str) -> torch.Tensor:
        buffers = self._buffers
        return ops.int8_linear_static(x2d, buffers["x_scale"], buffers["w_packed"], buffers["w_scale"],
                                      buffers["w_rowsum"], buffers["bias"], act_qmax=_ACT_QMAX[self.act_bits],
                                      activation=activation, backend=self.backend, weight_checked=True)

    def _extra_repr_options(self) -> str:
        return f", act_bits={self.act_bits}{self._activation_repr()}, x_scale={self.x_scale.item():.6g}"


class Int8WeightOnlyLinear(_PackedInt8Linear):
    """Weight-only int8 linear (W8A16 / W8A32): int8 per-channel weight, float activations.

    Holds the same buffers as Int8Linear (w_rowsum included, unused here), so a state_dict
    of either loads into the other.
    """

    @classmethod
    def from_dense(cls, linear: nn.Linear, pow2_scales: bool = False,
                   backend: Optional[str] = None) -> "Int8WeightOnlyLinear":
        """Quantize and pack ``linear``'s weight (per output channel, symmetric, int8; with
        pow2_scales the scales are rounded up to powers of two)."""
        return cls._from_linear(linear, pow2_scales=pow2_scales, backend=backend)

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        return ops.int8_weight_only_linear(x2d, buffers["w_packed"], buffers["w_scale"], buffers["bias"],
                                           backend=self.backend, weight_checked=True)
