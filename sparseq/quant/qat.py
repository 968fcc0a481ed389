"""Quantization-aware training: fake-quantized nn.Linear layers that train, then convert.

prepare_qat(model, scheme) swaps every nn.Linear for a QATLinear that keeps the same weight and
bias Parameters (optimizers, masks attached to them and state_dict keep working) and, in its
forward, rounds the weight and the input onto exactly the int8 grids sparseq's kernels use:

  weight      per output channel, symmetric, scale = absmax / 127 (PackedInt8Weight.pack)
  "w8a8"      input per row, scale = absmax / qmax, q = round(x * (qmax / absmax))
              (_ref.quantize_per_row, which every int8 kernel follows)
  "w8a8_static" input per tensor with the scale of a running (EMA) absmax, q = round(x / scale)
              clamped to [-qmax, qmax]; the range is the layer's ``act_observer``
  "w8a16"     weight only

Gradients use the straight-through estimator (Bengio et al. 2013): round() passes the gradient
through unchanged, clamp() keeps its true gradient, zero outside [-qmax, qmax] (the "clipped
STE" of torch.ao's FakeQuantize). Per-channel weight and per-row input scales come from the
absmax, so nothing is ever clipped there and their STE is the identity; the static input range
clips, so inputs beyond it get no gradient. Scales are treated as constants.

After training, sparseq.quant.quantize_(model, scheme) swaps the QATLinears (they are
nn.Linears) for the real int8 layers, which pack the trained float weight with the same
rounding the fake quantizer used.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ref, ops
from ..convert import swap_modules
from ..formats import _quantize_per_channel, pow2_ceil
from ..nn.int8_linear import _ACT_QMAX
from .quantize import KEEP_AS_LINEAR

QAT_SCHEMES = ("w8a8", "w8a8_static", "w8a16")


class _StraightThrough(torch.autograd.Function):
    """Forward: the already-quantized tensor, exactly. Backward: the incoming gradient, zeroed
    where ``inside`` is False (None: nowhere)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor, inside: Optional[torch.Tensor]):
        ctx.save_for_backward(inside if inside is not None else torch.empty(0))
        ctx.clipped = inside is not None
        ctx.input_dtype = x.dtype
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        if ctx.clipped:
            grad = grad * inside.to(grad.dtype)
        return grad.to(ctx.input_dtype), None, None


def fake_quantize_weight(weight: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """``weight`` [N, K] rounded onto its per-output-channel symmetric int8 grid and dequantized
    (float32), bit for bit what PackedInt8Weight.pack(weight).unpack() holds; with
    pow2_scales=True each channel's scale is first rounded up to a power of two. Identity STE."""
    q, scale = _quantize_per_channel(weight, pow2_scales)
    return _StraightThrough.apply(weight, q.float() * scale[:, None], None)


def fake_quantize_per_row(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """``x`` [..., K] rounded per row onto [-qmax, qmax] * absmax / qmax and dequantized
    (float32), with exactly the steps of the int8 kernels' activation quantizer. Identity STE."""
    rows = x.detach().reshape(-1, x.shape[-1])
    q, scale = _ref.quantize_per_row(rows, qmax)
    return _StraightThrough.apply(x, (q.float() * scale[:, None]).reshape(x.shape), None)


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``x`` rounded onto [-qmax, qmax] * scale (one scale for the tensor), q = round(x * (1/scale))
    in fp32 as the static kernel computes it (_ref.quantize_static), and dequantized (float32).
    Clipped STE: no gradient where |q| would exceed qmax."""
    inverse = torch.ones_like(scale, dtype=torch.float32) / scale.float()
    scaled = x.detach().float() * inverse
    inside = scaled.abs() <= qmax
    return _StraightThrough.apply(x, scaled.round().clamp_(-qmax, qmax) * scale, inside)


class EmaAbsMaxObserver(nn.Module):
    """A running (exponential moving average) absmax of a layer's inputs, as a per-tensor scale.

    observe(x) folds in one batch: absmax <- decay * absmax + (1 - decay) * max|x| (the first
    batch sets it). scale(qmax) -> float is the per-tensor activation scale (x_q = round(x /
    scale)): absmax / qmax, rounded up to a power of two when pow2_scales. The state is in
    buffers, so it travels with state_dict.
    """

    def __init__(self, decay: float = 0.9, pow2_scales: bool = False,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.pow2_scales = pow2_scales
        self.register_buffer("absmax", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold the absmax of ``x``'s finite values into the running range."""
        values = x.detach().float().abs()
        batch_absmax = torch.where(torch.isfinite(values), values, torch.zeros_like(values)).amax()
        if self.batches.item() == 0:
            self.absmax.copy_(batch_absmax)
        else:
            self.absmax.mul_(self.decay).add_(batch_absmax * (1 - self.decay))
        self.batches += 1

    def scale_tensor(self, qmax: int) -> torch.Tensor:
        """scale(qmax) as a 0-d float32 tensor on the observer's device (no host sync)."""
        if self.batches.item() == 0:
            raise RuntimeError("the activation observer has seen no data yet: run a forward pass "
                               "(training or calibration batches) first")
        scale = torch.where(self.absmax > 0, self.absmax / qmax, torch.ones_like(self.absmax))
        return pow2_ceil(scale) if self.pow2_scales else scale

    def scale(self, qmax: int) -> float:
        """The per-tensor activation scale for quantizing to [-qmax, qmax]: x_q = round(x / scale)."""
        return float(self.scale_tensor(qmax))

    def extra_repr(self) -> str:
        return f"decay={self.decay}, pow2_scales={self.pow2_scales}"


class QATLinear(nn.Linear):
    """An nn.Linear whose forward fake-quantizes its weight (and, for "w8a8"/"w8a8_static", its
    input) as sparseq's int8 layers will; see this module's docstring for the grids and the STE.

    Build it with QATLinear.from_linear (prepare_qat does), which shares the Linear's
    Parameters. act_bits: 8 (qmax 127), 7 (qmax 63) or "auto" (on the CPU the bits its int8
    core runs at full rate, sparseq.ops.cpu_int8_full_rate_bits; 8 elsewhere; resolved per call
    from the input's device, as Int8Linear's "auto" is). The output is
    computed in float32 (as the int8 kernels' epilogue is) and returned in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scheme: str = "w8a8", act_bits: Union[int, str] = "auto", pow2_scales: bool = False,
                 ema_decay: float = 0.9, device=None, dtype=None) -> None:
        _check_options(scheme, act_bits)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scheme = scheme
        self.act_bits = act_bits
        self.pow2_scales = pow2_scales
        if scheme == "w8a8_static":
            observer_device = None if device is None or torch.device(device).type == "meta" else device
            self.act_observer = EmaAbsMaxObserver(ema_decay, pow2_scales, device=observer_device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "w8a8", act_bits: Union[int, str] = "auto",
                    pow2_scales: bool = False, ema_decay: float = 0.9) -> "QATLinear":
        """A QATLinear holding ``linear``'s own weight and bias Parameters (not copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"the {type(linear).__name__} is not initialized yet; run one forward "
                             "pass before prepare_qat")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    scheme=scheme, act_bits=act_bits, pow2_scales=pow2_scales, ema_decay=ema_decay,
                    device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        if scheme == "w8a8_static":
            layer.act_observer.to(linear.weight.device)
        layer.train(linear.training)
        return layer

    def act_qmax_for(self, device: torch.device) -> int:
        """The activation qmax a call on ``device`` uses (resolves act_bits="auto")."""
        bits = self.act_bits if self.act_bits != "auto" else (ops.cpu_int8_full_rate_bits() if device.type == "cpu" else 8)
        return _ACT_QMAX[bits]

    def fake_quant_weight(self) -> torch.Tensor:
        """The weight as the int8 layer will hold it (dequantized, float32), with STE gradients."""
        return fake_quantize_weight(self.weight, self.pow2_scales)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the int8 layer will see it (dequantized, float32; x itself for w8a16).
        For "w8a8_static" in training mode (or before any observation) this also updates the
        observed range."""
        if self.scheme == "w8a16":
            return x
        qmax = self.act_qmax_for(x.device)
        if self.scheme == "w8a8":
            return fake_quantize_per_row(x, qmax)
        if self.training or self.act_observer.batches.item() == 0:
            self.act_observer.observe(x)
        return fake_quantize_per_tensor(x, self.act_observer.scale_tensor(qmax), qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        out = F.linear(self.fake_quant_input(x).float(), self.fake_quant_weight(), bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scheme={self.scheme}, act_bits={self.act_bits}, "
                f"pow2_scales={self.pow2_scales}")


def _check_options(scheme: str, act_bits) -> None:
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"unknown QAT scheme {scheme!r}; choose one of {QAT_SCHEMES}")
    if act_bits != "auto" and act_bits not in _ACT_QMAX:
        raise ValueError(f"act_bits must be 8, 7 or 'auto', got {act_bits!r}")


def prepare_qat(model: nn.Module, scheme: str = "w8a8",
                targets: Union[Type[nn.Linear], Tuple[Type[nn.Linear], ...]] = (nn.Linear,),
                skip: Iterable[str] = (), pow2_scales: bool = False,
                act_bits: Union[int, str] = "auto", ema_decay: float = 0.9) -> nn.Module:
    """Swap the nn.Linear layers of ``model`` for fake-quantized QATLinears, in place; return it.

    scheme: "w8a8" (dynamic per-row int8 inputs), "w8a8_static" (per-tensor input scale from a
      running absmax, exposed as each layer's ``act_observer``) or "w8a16" (weight only): the
      quantize_ scheme the trained model is meant for.
    targets: the nn.Linear classes to swap (nn.Linear and its subclasses by default; only
      nn.Linear subclasses can be fake-quantized).
    skip: fnmatch patterns on module names to leave alone, with everything under them (as in
      quantize_).
    pow2_scales: round the weight scales (and the static input scale) up to powers of two;
      per-row dynamic input scales are computed by the kernels at run time and stay free.
    act_bits: 8, 7 or "auto": what the converted layer will use — for "w8a8", Int8Linear's
      "auto" (7 on the CPU, 8 on a GPU); for "w8a8_static", "auto" means 8, Int8StaticLinear's
      default. Pass the same value to quantize_ if you set it.
    ema_decay: the running-range decay of "w8a8_static" (the first batch sets the range).
    The layers keep their Parameters, so an optimizer built before (or after) this call trains
    them, and masks attached to those Parameters keep holding. Layers already QATLinear and
    nn.MultiheadAttention's out_proj (which quantize_ also keeps in float) are left alone.
    Every argument and layer is checked before anything is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("prepare_qat swaps submodules in place and cannot replace the model itself; "
                         "use QATLinear.from_linear(linear) for a single layer")
    _check_options(scheme, act_bits)
    if scheme == "w8a8_static" and act_bits == "auto":
        act_bits = 8  # Int8StaticLinear fixes its bits when built, 8 unless told otherwise
    if isinstance(targets, type):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, type) and issubclass(t, nn.Linear) for t in targets):
        raise TypeError(f"targets must be nn.Linear classes (QAT fake-quantizes linear layers), "
                        f"got {targets!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)

    planned = {}

    def plan(module: nn.Module, fqn: str) -> None:
        if isinstance(module, targets) and not isinstance(module, (QATLinear,) + KEEP_AS_LINEAR):
            planned[id(module)] = QATLinear.from_linear(module, scheme, act_bits, pow2_scales, ema_decay)

    # Build every replacement first (that is where a bad layer raises), then swap.
    swap_modules(model, plan, skip=skip)
    if not planned:
        raise ValueError(f"prepare_qat found no layers to prepare in {type(model).__name__} "
                         f"(targets={[t.__name__ for t in targets]}, skip={list(skip)})")
    swap_modules(model, lambda module, fqn: planned.get(id(module)), skip=skip)
    return model
