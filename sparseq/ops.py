"""The only Python door to sparseq's kernels.

Each function validates its inputs (clear Python errors, never a crash), then runs one backend:
  "auto"      the compiled kernel for the tensor's device when available, else the reference
  "cpu"/"cuda" the compiled kernel (error if it is not built for that device)
  "triton"    the Triton kernel (GPU, or TRITON_INTERPRET=1)
  "reference" the pure-PyTorch reference in sparseq._ref

The linear ops take weight_checked=True from callers whose weight tensors were validated already
(the sparseq.nn layers: their buffers are checked when built or loaded): when the compiled kernel
runs, the Python checks of the weight tensors are then skipped, because the kernel's C++ checks
(csrc/include/sparseq/checks.h) refuse a wrong dtype, shape, device or layout anyway. The
activation x is always checked here, and every other backend always gets the full Python checks.
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


def _probe_cpu_int8_full_rate_bits() -> int:
    if HAS_EXT:
        from . import _C

        if _C.cpu_features().get("vnni_kernels_enabled", False):
            return 8
    return 7


# Read once at import (torch.compile cannot trace the extension's feature query).
_CPU_INT8_FULL_RATE_BITS = _probe_cpu_int8_full_rate_bits()


def cpu_has_sell_kernel() -> bool:
    """Whether this CPU runs sparse_sell_int8_linear's fast kernel (AVX-512 VBMI2 + VNNI; off with
    SPARSEQ_DISABLE_AVX512 / SPARSEQ_DISABLE_VNNI). Elsewhere the op runs its AVX2 kernel (a
    portable loop without AVX2), and float activations (SparseInt8Linear's act_bits=None) are
    faster."""
    if not HAS_EXT:
        return False
    from . import _C

    return bool(_C.cpu_features().get("vbmi2_kernels_enabled", False))


def cpu_int8_full_rate_bits() -> int:
    """The activation bits the CPU int8 core multiplies at full rate: 8 with AVX-512 VNNI
    (vpdpbusd is exact for every u8 x s8), else 7 (AVX2's vpmaddubsw is exact at full rate only
    for 7-bit unsigned activations; 8 bits need an extra sign operation per product). Read once,
    at import, from the CPU's features and SPARSEQ_DISABLE_VNNI / SPARSEQ_DISABLE_AVX512."""
    return _CPU_INT8_FULL_RATE_BITS


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None or backend == "auto":  # the layers' per-call case first: it is on the hot path
        return "ext" if ext_supports(device) else "reference"
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


def _kernel_checks_weights(weight_checked: bool, backend: Optional[str], x: torch.Tensor) -> bool:
    """Whether the Python checks of the weight tensors may be skipped: the caller vouches for them
    and the compiled kernel, which checks them again in C++, is the backend that runs."""
    return weight_checked and _resolve_backend(backend, x.device) == "ext"


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
                activation: str = "none", *, in_features: Optional[int] = None, backend: Optional[str] = None,
                weight_checked: bool = False) -> torch.Tensor:
    """W8A8 dynamic linear: per-row symmetric activation quantization to [-act_qmax, act_qmax],
    int8 GEMM with the n16k4-packed weight, dequantization and bias, fused. x is [M, K];
    pass in_features to have K checked exactly (the packed shape only knows ceil(K/4)).
    activation="gelu" applies GELU (erf form) to the output inside the kernel's epilogue (the
    CPU and CUDA kernels; the Triton one applies it after its matmul).
    weight_checked=True: see the module docstring."""
    _check_activation(x, in_features)
    if act_qmax in (63, 127) and _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.int8_linear.default(x.contiguous(), w_packed, w_scale, w_rowsum, bias, act_qmax,
                                                     activation)
    _check_packed(x, w_packed, w_scale, bias)
    if act_qmax not in (63, 127):
        raise ValueError(f"act_qmax must be 127 (8-bit activations) or 63 (7-bit), got {act_qmax}")
    _ref.check_fused_activation(activation)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.int8_linear(x.contiguous(), w_packed.contiguous(), w_scale.contiguous(),
                                             w_rowsum.contiguous(), _contiguous_or_none(bias), act_qmax, activation)
    if which == "triton":
        from .triton import int8_matmul

        out = int8_matmul.int8_linear(x.contiguous(), w_packed, w_scale, bias, act_qmax)
        return out if activation == "none" else torch.nn.functional.gelu(out.float()).to(out.dtype)
    return _ref.int8_linear(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation)


def int8_linear_static(x: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       w_rowsum: torch.Tensor, bias: Optional[torch.Tensor] = None, act_qmax: int = 127,
                       activation: str = "none", *, in_features: Optional[int] = None,
                       backend: Optional[str] = None, weight_checked: bool = False) -> torch.Tensor:
    """W8A8 static linear: every row of x [M, K] quantized with the one calibrated activation
    scale s = x_scale[0] (x_scale: float32 [1] on x's device, so no host sync),
    q = clamp(round_half_even(x * (1/s)), -act_qmax, act_qmax), then int8_linear's GEMM,
    dequantization and bias. Rows holding NaN/Inf, and all rows when s is not a usable positive
    finite scale, give NaN outputs. Pass in_features to have K checked exactly. activation as
    for int8_linear.
    weight_checked=True: see the module docstring (x_scale counts as a weight tensor)."""
    _check_activation(x, in_features)
    if act_qmax in (63, 127) and _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.int8_linear_static.default(x.contiguous(), x_scale, w_packed, w_scale, w_rowsum,
                                                            bias, act_qmax, activation)
    _check_packed(x, w_packed, w_scale, bias)
    if (not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32
            or tuple(x_scale.shape) != (1,)):
        got = f"{x_scale.dtype} {tuple(x_scale.shape)}" if isinstance(x_scale, torch.Tensor) else type(x_scale).__name__
        raise ValueError(f"x_scale must be a float32 tensor of shape (1,), got {got}")
    if x_scale.device != x.device:
        raise ValueError(f"x_scale is on {x_scale.device} but x is on {x.device}")
    if act_qmax not in (63, 127):
        raise ValueError(f"act_qmax must be 127 (8-bit activations) or 63 (7-bit), got {act_qmax}")
    _ref.check_fused_activation(activation)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.int8_linear_static(x.contiguous(), x_scale, w_packed.contiguous(),
                                                    w_scale.contiguous(), w_rowsum.contiguous(),
                                                    _contiguous_or_none(bias), act_qmax, activation)
    if which == "triton":
        raise ValueError("int8_linear_static has no Triton kernel; use backend='auto', 'cpu' or 'cuda'")
    return _ref.int8_linear_static(x, x_scale, w_packed, w_scale, w_rowsum, bias, act_qmax, activation)


def int8_weight_only_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, in_features: Optional[int] = None,
                            backend: Optional[str] = None, weight_checked: bool = False) -> torch.Tensor:
    """Weight-only int8 linear (W8A16/W8A32): float x [M,K] times the dequantized packed weight.
    weight_checked=True: see the module docstring."""
    _check_activation(x, in_features)
    if _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.int8_weight_only_linear.default(x.contiguous(), w_packed, w_scale, bias)
    _check_packed(x, w_packed, w_scale, bias)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.int8_weight_only_linear(x.contiguous(), w_packed.contiguous(),
                                                         w_scale.contiguous(), _contiguous_or_none(bias))
    if which == "triton":
        raise ValueError("int8_weight_only_linear has no Triton kernel; use backend='auto' or 'cuda'")
    return _ref.int8_weight_only_linear(x, w_packed, w_scale, bias)


# ----------------------------------------------------------------------------------------------
# Sparse linears (layouts: sparseq/formats.py, csrc/include/sparseq/sparse_formats.h)
# ----------------------------------------------------------------------------------------------

_SPARSE_VALUE_DTYPES = _FLOAT_DTYPES + (torch.int8,)


def _check_index(t: torch.Tensor, dtype: torch.dtype, name: str, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_sparse_values(x: torch.Tensor, values: torch.Tensor, w_scale: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], n: int) -> None:
    if not isinstance(values, torch.Tensor) or values.dtype not in _SPARSE_VALUE_DTYPES:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"sparse values must be float32, bfloat16, float16 or int8, got {got}")
    if values.device != x.device:
        raise ValueError(f"values are on {values.device} but x is on {x.device}")
    if values.dtype == torch.int8:
        if (not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32
                or tuple(w_scale.shape) != (n,)):
            got = None if w_scale is None else f"{w_scale.dtype} {tuple(w_scale.shape)}"
            raise ValueError(f"int8 sparse values need w_scale, a float32 vector of shape ({n},), got {got}")
        if w_scale.device != x.device:
            raise ValueError(f"w_scale is on {w_scale.device} but x is on {x.device}")
    elif w_scale is not None:
        raise ValueError(f"w_scale is only for int8 values; these values are {values.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or not bias.is_floating_point():
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a float vector of shape ({n},), got {got}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def sparse_csr_linear(x: torch.Tensor, seg_ptr: torch.Tensor, col_offsets: torch.Tensor,
                      values: torch.Tensor, w_scale: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, *, in_features: Optional[int] = None,
                      backend: Optional[str] = None, weight_checked: bool = False) -> torch.Tensor:
    """x [M, K] @ W.T + bias for an unstructured SparseCSRWeight (segmented CSR, uint8 offsets).
    weight_checked=True: see the module docstring."""
    _check_activation(x, in_features)
    if _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.sparse_csr_linear.default(x.contiguous(), seg_ptr, col_offsets, values,
                                                           w_scale, bias)
    _check_index(seg_ptr, torch.int32, "seg_ptr", x)
    _check_index(col_offsets, torch.uint8, "col_offsets", x)
    segments = _ref.csr_segments(x.shape[1])
    if (seg_ptr.numel() - 1) % segments or seg_ptr.numel() < 1:
        raise ValueError(f"seg_ptr has {seg_ptr.numel()} entries; for K={x.shape[1]} it must hold "
                         f"N*{segments}+1 (one pointer per 256-column segment of every row, plus the end)")
    n = (seg_ptr.numel() - 1) // segments
    if values.dim() != 1 or values.numel() != col_offsets.numel():
        raise ValueError(f"values must be 1-D with one entry per column offset ({col_offsets.numel()}), "
                         f"got shape {tuple(values.shape)}")
    _check_sparse_values(x, values, w_scale, bias, n)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.sparse_csr_linear(x.contiguous(), seg_ptr.contiguous(), col_offsets.contiguous(),
                                                   values.contiguous(), _contiguous_or_none(w_scale),
                                                   _contiguous_or_none(bias))
    if which == "triton":
        raise ValueError("sparse_csr_linear has no Triton kernel; use backend='auto', 'cpu' or 'cuda'")
    return _ref.sparse_csr_linear(x, seg_ptr, col_offsets, values, w_scale, bias)


def _check_sparse24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> int:
    groups = -(-x.shape[1] // 4)
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != 2 * groups:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"2:4 values must be [N, {2 * groups}] for K={x.shape[1]}, got {got}")
    n = values.shape[0]
    if (not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8
            or tuple(meta.shape) != (n, -(-groups // 2))):
        got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(f"2:4 meta must be uint8 of shape ({n}, {-(-groups // 2)}), got {got}")
    if meta.device != x.device:
        raise ValueError(f"meta is on {meta.device} but x is on {x.device}")
    return n


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                    in_features: Optional[int] = None, backend: Optional[str] = None,
                    weight_checked: bool = False) -> torch.Tensor:
    """x [M, K] @ W.T + bias for a 2:4 Sparse24Weight (float activations; int8 codes dequantized
    with w_scale in the epilogue). weight_checked=True: see the module docstring."""
    _check_activation(x, in_features)
    if _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.sparse24_linear.default(x.contiguous(), values, meta, w_scale, bias)
    n = _check_sparse24(x, values, meta)
    _check_sparse_values(x, values, w_scale, bias, n)
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.sparse24_linear(x.contiguous(), values.contiguous(), meta.contiguous(),
                                                 _contiguous_or_none(w_scale), _contiguous_or_none(bias))
    if which == "triton":
        raise ValueError("sparse24_linear has no Triton kernel; use backend='auto', 'cpu' or 'cuda'")
    return _ref.sparse24_linear(x, values, meta, w_scale, bias)


def sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, act_qmax: int = 127, *,
                         in_features: Optional[int] = None, backend: Optional[str] = None,
                         weight_checked: bool = False) -> torch.Tensor:
    """W8A8 dynamic linear on a 2:4 int8 weight: activations quantized per row like int8_linear,
    exact integer dot with the codes, dequantization and bias. weight_checked=True: see the
    module docstring."""
    _check_activation(x, in_features)
    if act_qmax in (63, 127) and _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.sparse24_int8_linear.default(x.contiguous(), values, meta, w_scale, bias,
                                                              act_qmax)
    n = _check_sparse24(x, values, meta)
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8:
        raise TypeError(f"sparse24_int8_linear needs int8 values, got {getattr(values, 'dtype', type(values))}")
    _check_sparse_values(x, values, w_scale, bias, n)
    if act_qmax not in (63, 127):
        raise ValueError(f"act_qmax must be 127 (8-bit activations) or 63 (7-bit), got {act_qmax}")
    which = _resolve_backend(backend, x.device)
    if which == "ext":
        return torch.ops.sparseq.sparse24_int8_linear(x.contiguous(), values.contiguous(), meta.contiguous(),
                                                      w_scale.contiguous(), _contiguous_or_none(bias), act_qmax)
    if which == "triton":
        raise ValueError("sparse24_int8_linear has no Triton kernel; use backend='auto', 'cpu' or 'cuda'")
    return _ref.sparse24_int8_linear(x, values, meta, w_scale, bias, act_qmax)


def sparse_sell_int8_linear(x: torch.Tensor, block_step_ptr: torch.Tensor, step_masks: torch.Tensor,
                            slice_ptr: torch.Tensor, col_offsets: torch.Tensor, values: torch.Tensor,
                            w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, act_qmax: int = 127, *,
                            in_features: Optional[int] = None, backend: Optional[str] = None,
                            weight_checked: bool = False) -> torch.Tensor:
    """W8A8 dynamic linear on a SlicedEllInt8Weight's tensors (N = len(w_scale)): activations
    quantized per row like int8_linear, exact integer dots, dequantization and bias. Fast on CPUs
    with AVX-512 VBMI2 and VNNI; an AVX2 kernel (slower than float activations from M=16) or,
    without AVX2, a portable loop elsewhere. weight_checked=True: see the module docstring."""
    _check_activation(x, in_features)
    if act_qmax in (63, 127) and _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.sparse_sell_int8_linear.default(x.contiguous(), block_step_ptr, step_masks, slice_ptr,
                                                                 col_offsets, values, w_scale, bias, act_qmax)
    for name, t, dtype in (("block_step_ptr", block_step_ptr, torch.int32), ("step_masks", step_masks, torch.int64),
                           ("slice_ptr", slice_ptr, torch.int32), ("col_offsets", col_offsets, torch.uint8)):
        _check_index(t, dtype, name, x)
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int8:
        raise TypeError(f"sparse_sell_int8_linear needs int8 values, got {getattr(values, 'dtype', type(values))}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        got = f"{w_scale.dtype} {tuple(w_scale.shape)}" if isinstance(w_scale, torch.Tensor) else type(w_scale).__name__
        raise TypeError(f"w_scale must be a float32 vector [N], got {got}")
    n, k = w_scale.shape[0], x.shape[1]
    slices, blocks = -(-n // _ref.SELL_SLICE), _ref.sell_blocks(k)
    if block_step_ptr.numel() != slices * blocks + 1 or slice_ptr.numel() != slices + 1:
        raise ValueError(f"sliced-ELL pointers for N={n}, K={k} must hold {slices * blocks + 1} (block_step_ptr) "
                         f"and {slices + 1} (slice_ptr) entries, got {block_step_ptr.numel()} and {slice_ptr.numel()}")
    if values.dim() != 1 or values.numel() != col_offsets.numel():
        raise ValueError(f"values must be 1-D with one entry per column offset ({col_offsets.numel()}), "
                         f"got shape {tuple(values.shape)}")
    _check_sparse_values(x, values, w_scale, bias, n)
    if act_qmax not in (63, 127):
        raise ValueError(f"act_qmax must be 127 (8-bit activations) or 63 (7-bit), got {act_qmax}")
    which = _resolve_backend(backend, x.device)
    if which == "ext":  # the kernels check the pointers, masks and offsets as they read them
        return torch.ops.sparseq.sparse_sell_int8_linear(
            x.contiguous(), block_step_ptr.contiguous(), step_masks.contiguous(), slice_ptr.contiguous(),
            col_offsets.contiguous(), values.contiguous(), w_scale.contiguous(), _contiguous_or_none(bias), act_qmax)
    if which == "triton":
        raise ValueError("sparse_sell_int8_linear has no Triton kernel; use backend='auto', 'cpu' or 'cuda'")
    from .formats import SlicedEllInt8Weight

    # The reference trusts the contents, so check them all first, with the format's clear errors.
    SlicedEllInt8Weight(block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale, k, n)
    return _ref.sparse_sell_int8_linear(x, block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale,
                                        bias, act_qmax)


def bsr_linear(x: torch.Tensor, block_row_ptr: torch.Tensor, block_col_idx: torch.Tensor,
               values: torch.Tensor, w_scale: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, *, out_features: int,
               in_features: Optional[int] = None, backend: Optional[str] = None,
               indices_validated: bool = False, weight_checked: bool = False) -> torch.Tensor:
    """x [M, K] @ W.T + bias for a BlockSparseWeight (blocks [bh, bw], empty blocks skipped).

    indices_validated=True (the layers pass it: their BlockSparseWeight was validated when built
    or loaded) spares the Triton kernel its host sync on the bad-index flag; bad indices are then
    still never read out of bounds, but their blocks are dropped instead of raising.
    weight_checked=True: see the module docstring (GPUs run Triton here, so it applies on CPUs)."""
    _check_activation(x, in_features)
    if x.device.type == "cpu" and _kernel_checks_weights(weight_checked, backend, x):
        return torch.ops.sparseq.bsr_linear.default(x.contiguous(), block_row_ptr, block_col_idx, values, w_scale,
                                                    bias, out_features)
    _check_index(block_row_ptr, torch.int32, "block_row_ptr", x)
    _check_index(block_col_idx, torch.int32, "block_col_idx", x)
    if (not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[0] != block_col_idx.numel()
            or values.shape[1] < 1 or values.shape[2] < 1):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"BSR values must be [nnz_blocks={block_col_idx.numel()}, bh, bw], got {got}")
    bh = values.shape[1]
    if not isinstance(out_features, int) or out_features < 0 or block_row_ptr.numel() != -(-out_features // bh) + 1:
        raise ValueError(f"block_row_ptr has {block_row_ptr.numel()} entries; out_features={out_features} "
                         f"with bh={bh} needs {-(-out_features // bh) + 1}")
    _check_sparse_values(x, values, w_scale, bias, out_features)
    which = _resolve_backend(backend, x.device)
    if which == "ext" and x.device.type == "cuda":
        # On GPUs block sparsity is Triton's (there is no CUDA kernel for it): "auto" takes it there.
        if backend == "cuda":
            raise ValueError("bsr_linear has no CUDA kernel; use backend='triton' (or 'auto')")
        from .triton import is_available

        which = "triton" if is_available() else "reference"
    if which == "ext":
        return torch.ops.sparseq.bsr_linear(x.contiguous(), block_row_ptr.contiguous(), block_col_idx.contiguous(),
                                            values.contiguous(), _contiguous_or_none(w_scale),
                                            _contiguous_or_none(bias), out_features)
    if which == "triton":
        from .triton import bsr_matmul

        return bsr_matmul.bsr_linear(x.contiguous(), block_row_ptr.contiguous(), block_col_idx.contiguous(),
                                     values.contiguous(), _contiguous_or_none(w_scale),
                                     _contiguous_or_none(bias), out_features,
                                     check_indices=not indices_validated)
    return _ref.bsr_linear(x, block_row_ptr, block_col_idx, values, w_scale, bias, out_features)


if HAS_EXT:
    # Shapes and dtypes only, so torch.compile / torch.export trace through the kernels. These are
    # also the ops' Meta kernels, which the dispatcher picks when any argument is a meta tensor:
    # a meta weight beside a real x would then return an uninitialized real tensor, silently.
    def _same_device_as_x(x, *tensors):
        for t in tensors:
            if t is not None and t.device != x.device:
                raise RuntimeError(f"sparseq: every tensor must be on x's device ({x.device}), got one on {t.device}")

    @torch.library.register_fake("sparseq::int8_gemm")
    def _int8_gemm_fake(a, b):
        _same_device_as_x(a, b)
        return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("sparseq::int8_linear")
    def _int8_linear_fake(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation="none"):
        _same_device_as_x(x, w_packed, w_scale, w_rowsum, bias)
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparseq::int8_linear_static")
    def _int8_linear_static_fake(x, x_scale, w_packed, w_scale, w_rowsum, bias, act_qmax, activation="none"):
        _same_device_as_x(x, x_scale, w_packed, w_scale, w_rowsum, bias)
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparseq::int8_weight_only_linear")
    def _int8_weight_only_linear_fake(x, w_packed, w_scale, bias):
        _same_device_as_x(x, w_packed, w_scale, bias)
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparseq::sparse_csr_linear")
    def _sparse_csr_linear_fake(x, seg_ptr, col_offsets, values, w_scale, bias):
        _same_device_as_x(x, seg_ptr, col_offsets, values, w_scale, bias)
        n = (seg_ptr.shape[0] - 1) // _ref.csr_segments(x.shape[1])
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("sparseq::sparse24_linear")
    def _sparse24_linear_fake(x, values, meta, w_scale, bias):
        _same_device_as_x(x, values, meta, w_scale, bias)
        return x.new_empty((x.shape[0], values.shape[0]))

    @torch.library.register_fake("sparseq::sparse24_int8_linear")
    def _sparse24_int8_linear_fake(x, values, meta, w_scale, bias, act_qmax):
        _same_device_as_x(x, values, meta, w_scale, bias)
        return x.new_empty((x.shape[0], values.shape[0]))

    @torch.library.register_fake("sparseq::sparse_sell_int8_linear")
    def _sparse_sell_int8_linear_fake(x, block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale, bias,
                                      act_qmax):
        _same_device_as_x(x, block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale, bias)
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparseq::bsr_linear")
    def _bsr_linear_fake(x, block_row_ptr, block_col_idx, values, w_scale, bias, out_features):
        _same_device_as_x(x, block_row_ptr, block_col_idx, values, w_scale, bias)
        return x.new_empty((x.shape[0], out_features))
