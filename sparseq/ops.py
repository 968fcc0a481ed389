"""The only Python door to sparseq's kernels.

Each function validates its inputs (clear Python errors, never a crash), then runs one backend:
  "auto"      the compiled kernel for the tensor's device when available, else the reference
  "cpu"/"cuda" the compiled kernel (error if it is not built for that device)
  "triton"    the Triton kernel (GPU, or TRITON_INTERPRET=1)
  "reference" the pure-PyTorch reference in sparseq._ref
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import HAS_EXT, _ref

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ext_supports(device: torch.device) -> bool:
    """Whether the compiled extension has kernels for this device."""
    if not HAS_EXT:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        from . import _C

        return bool(_C.with_cuda) and _cuda_capability(device.index) >= (8, 0)
    return False


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: Optional[int]) -> tuple[int, int]:
    # The CUDA kernels use sm_80 instructions (cp.async, int8 mma.sync): older GPUs take the
    # reference path under backend="auto" instead of an error.
    return torch.cuda.get_device_capability(index)


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "ext" if ext_supports(device) else "reference"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} but the tensors are on {device}")
        if not ext_supports(device):
            raise RuntimeError(f"sparseq's compiled {backend} kernels are not available in this build")
        return "ext"
    return backend


def _check_int8_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise TypeError(f"{name} must be int8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_activation(x: torch.Tensor, in_features: Optional[int]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    # The n16k4 layout pads K to a multiple of 4, so only the caller knows K exactly.
    if in_features is not None and x.shape[1] != in_features:
        raise ValueError(f"x has K={x.shape[1]} features but the weight expects in_features={in_features}")


def _check_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> None:
    n = w_scale.shape[0] if w_scale.dim() == 1 else -1
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise TypeError(f"w_scale must be a float32 vector [N], got {w_scale.dtype} {tuple(w_scale.shape)}")
    expect = _ref.packed_shape(n, x.shape[1])
    if w_packed.dtype != torch.int8 or tuple(w_packed.shape) != expect:
        raise ValueError(f"w_packed must be int8 of shape {expect} for N={n}, K={x.shape[1]}, "
                         f"got {w_packed.dtype} {tuple(w_packed.shape)}")
    for name, t in (("w_packed", w_packed), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float vector of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")


def _contiguous_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def int8_gemm(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Exact int8 GEMM: a int8 [M,K] @ b int8 [N,K].T -> int32 [M,N] (every int8 value, -128 too)."""
    _check_int8_2d(a, "a")
    _check_int8_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is [M,K]={tuple(a.shape)} and b is [N,K]={tuple(b.shape)}: K differs")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    which = _resolve_backend(backend, a.device)
    if which == "ext":
        return torch.ops.sparseq.int8_gemm(a.contiguous(), b.contiguous())
    if which == "triton":
        from .triton import int8_matmul

        return int8_matmul.int8_gemm(a.contiguous(), b.contiguous())
    return _ref.int8_gemm(a, b)


def int8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                w_rowsum: torch.Tensor, bias: Optional[torch.Tensor] = None, act_qmax: int = 127,
                *, in_features: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W8A8 dynamic linear: per-row symmetric activation quantization to [-act_qmax, act_qmax],
    int8 GEMM with the n16k4-packed weight, dequantization and bias, fused. x is [M, K];
    pass in_features to have K checked exactly (the packed shape only knows ceil(K/4))."""
    _check_activation(x, in_features)
    _check_packed(x, w_packed, w_scale, bias)
    if act_qmax not in (63, 127):
        raise ValueError(f"act_qmax must be 127 (8-bit activations) or 63 (7-bit), got {act_qmax}")
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.int8_linear(x.contiguous(), w_packed.contiguous(), w_scale.contiguous(),
                                             w_rowsum.contiguous(), _contiguous_or_none(bias), act_qmax)
    if which == "triton":
        from .triton import int8_matmul

        return int8_matmul.int8_linear(x.contiguous(), w_packed, w_scale, bias, act_qmax)
    return _ref.int8_linear(x, w_packed, w_scale, w_rowsum, bias, act_qmax)


def int8_weight_only_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, in_features: Optional[int] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Weight-only int8 linear (W8A16/W8A32): float x [M,K] times the dequantized packed weight."""
    _check_activation(x, in_features)
    _check_packed(x, w_packed, w_scale, bias)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.int8_weight_only_linear(x.contiguous(), w_packed.contiguous(),
                                                         w_scale.contiguous(), _contiguous_or_none(bias))
    if which == "triton":
        raise ValueError("int8_weight_only_linear has no Triton kernel; use backend='auto' or 'cuda'")
    return _ref.int8_weight_only_linear(x, w_packed, w_scale, bias)


if HAS_EXT:
    # Shapes and dtypes only, so torch.compile / torch.export trace through the kernels.
    @torch.library.register_fake("sparseq::int8_gemm")
    def _int8_gemm_fake(a, b):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("sparseq::int8_linear")
    def _int8_linear_fake(x, w_packed, w_scale, w_rowsum, bias, act_qmax):
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparseq::int8_weight_only_linear")
    def _int8_weight_only_linear_fake(x, w_packed, w_scale, bias):
        return x.new_empty((x.shape[0], w_scale.shape[0]))
