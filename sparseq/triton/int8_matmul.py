"""Triton int8 GEMM and W8A8 linear (int8 x int8 -> int32 tl.dot, fused dequantization).

int8_gemm(a, b):      a int8 [M,K] @ b int8 [N,K].T -> int32 [M,N], exact for every int8 value.
int8_linear(x, ...):  per-row activation quantization (bit-exact with sparseq._ref.quantize_per_row),
                      then the int8 GEMM reading the weight straight from its n16k4 packed layout,
                      then acc * (x_scale[m] * w_scale[n]) + bias[n] stored in x's dtype.

The same kernels run on a GPU and in Triton's NumPy interpreter (TRITON_INTERPRET=1, read when
this module is imported). Where the two disagree, the choice is made here at import time:
  * rounding half to even: libdevice.rint on the GPU (one cvt.rni); the interpreter cannot call
    libdevice, so it adds and subtracts 1.5 * 2^23, which rounds half to even in IEEE fp32 and is
    exact for |v| < 2^22 (quantized values are at most 127). The trick is not used on the GPU
    because the compiler may contract the multiply before it into an FMA, changing the rounding.
  * fp32 -> bf16: the interpreter truncates instead of rounding to nearest even, so there the
    epilogue rounds with integer arithmetic; the GPU uses the native conversion.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import interpreter_enabled


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads TRITON_INTERPRET through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return interpreter_enabled()


INTERPRET = _interpreting()

@triton.jit
def _rint_libdevice(v):
    return libdevice.rint(v)


@triton.jit
def _rint_magic(v):
    # 1.5 * 2^23: after the add the fp32 ulp is 1, so the add itself rounds half to even.
    magic = 12582912.0
    return (v + magic) - magic


@triton.jit
def _bf16_rtne(v):
    # fp32 -> bf16 rounding half to even on the bit pattern (NaN is not expected here).
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


if INTERPRET:
    _round_half_even = _rint_magic
else:
    _round_half_even = _rint_libdevice


# --------------------------------------------------------------------------------------------
# Per-row activation quantization
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm, qmax,
                          BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)

    running = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    # Counts NaN/Inf entries: tl.maximum may drop a NaN, and such a row must come out NaN.
    nonfinite = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        running = tl.maximum(running, tl.abs(x))
        nonfinite += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    finite = tl.sum(nonfinite, axis=1) == 0
    absmax = tl.max(running, axis=1)
    absmax = tl.where(finite & (absmax > 0.0), absmax, 1.0)
    # IEEE divisions: a plain `/` on fp32 may lower to an approximate division on the GPU.
    inv = tl.math.div_rn(tl.full((BLOCK_ROWS,), qmax, tl.float32), absmax)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(x * inv[:, None])
        q = tl.minimum(tl.maximum(q, -qmax), qmax)
        q = tl.where(finite[:, None], q, 0.0)
        tl.store(q_rows + (k0 + cols)[None, :], q.to(tl.int8), mask=mask)
    scale = tl.math.div_rn(absmax, tl.full((BLOCK_ROWS,), qmax, tl.float32))
    tl.store(scale_ptr + rows, tl.where(finite, scale, float("nan")), mask=row_ok)


def quantize_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of sparseq._ref.quantize_per_row: (q int8 [M,K], scale float32 [M]), bit-exact."""
    _check_device(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(1.0 / qmax)
    # The interpreter pays per program, so there one program takes many rows.
    block_rows = 32 if INTERPRET else 1
    block_k = min(triton.next_power_of_2(k), 128 if INTERPRET else 2048)
    _quantize_rows_kernel[(triton.cdiv(m, block_rows),)](
        x, q, scale, m, k, x.stride(0), q.stride(0), float(qmax),
        BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=4)
    return q, scale


# --------------------------------------------------------------------------------------------
# int8 GEMM with optional packed weight and fused dequantization
# --------------------------------------------------------------------------------------------

# BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
if INTERPRET:
    # One small config: tiles still cross M, N and K boundaries on the test shapes.
    TILES = [(32, 32, 64, 4, 1)]
else:
    # H100 candidates: small-M (decode) tiles stream the weight with long K steps, large-M tiles
    # reuse it from shared memory. int8 MMA wants BLOCK_K a multiple of 32.
    TILES = [
        (16, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
        (32, 64, 256, 4, 4),
        (32, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 4, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
    ]


def configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in TILES]


def autotune_enabled() -> bool:
    """SPARSEQ_TRITON_AUTOTUNE=0 skips benchmarking and takes heuristic_config() (read per call)."""
    return os.environ.get("SPARSEQ_TRITON_AUTOTUNE", "1") != "0"


def heuristic_config(m: int) -> triton.Config:
    """The tile used without autotuning: the smallest BLOCK_M that covers M, widest N tile."""
    candidates = configs()
    fitting = [c for c in candidates if c.kwargs["BLOCK_M"] >= min(m, 128)]
    pool = fitting or candidates
    smallest_m = min(c.kwargs["BLOCK_M"] for c in pool)
    return max((c for c in pool if c.kwargs["BLOCK_M"] == smallest_m),
               key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], c.num_warps))


def _prune_configs(candidates, named_args, **kwargs):
    # Tiles far larger than the problem only waste time while tuning.
    m_bucket = named_args["M_BUCKET"]
    fitting = [c for c in candidates if c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    return fitting or candidates[:1]


def _m_bucket(m: int) -> int:
    # M changes call to call (batch x tokens); tune once per power of two, not per value.
    return min(triton.next_power_of_2(max(m, 1)), 4096)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, x_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    B_PACKED: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_BIT_RTNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if B_PACKED:
        # W[n, k] sits at ((n//16)*KQ + k//4)*64 + (n%16)*4 + k%4; the padding of the packed
        # tensor is only reached where A is masked to zero (k >= K) or C is not stored (n >= N).
        kq_total = (K + 3) // 4
        b_n = (offs_n // 16).to(tl.int64) * kq_total * 64 + (offs_n % 16) * 4
        b_ptrs = b_ptr + b_n[None, :] + (offs_k // 4)[:, None] * 64 + (offs_k % 4)[:, None]
        b_step = (BLOCK_K // 4) * 64
        # Reading whole 16-row blocks keeps every load inside the packed tensor.
        mask_b_n = offs_n < ((N + 15) // 16) * 16
    else:
        b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
        b_step = BLOCK_K * stride_bk
        mask_b_n = mask_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0)
        if B_PACKED:
            # Whole K-quads: the 4-byte groups stay vector loads for any K (bytes past K meet
            # zeros in A).
            b_k_ok = offs_k // 4 < kq_total - k0 // 4
        else:
            b_k_ok = k_ok
        b = tl.load(b_ptrs, mask=b_k_ok[:, None] & mask_b_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += b_step

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if DEQUANT:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        # Same operation order as sparseq._ref.dequant_epilogue.
        out = acc.to(tl.float32) * (x_scale[:, None] * w_scale[None, :])
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out = out + bias[None, :]
        if USE_BIT_RTNE_BF16 and c_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(c_ptrs, _bf16_rtne(out), mask=c_mask)
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


# Two tuners over one kernel so the plain GEMM and the packed linear keep separate choices.
_TUNE_KEY = ["M_BUCKET", "N", "K"]
_gemm_tuned = triton.autotune(configs=configs(), key=_TUNE_KEY,
                              prune_configs_by={"early_config_prune": _prune_configs})(_int8_matmul_kernel)
_linear_tuned = triton.autotune(configs=configs(), key=_TUNE_KEY,
                                prune_configs_by={"early_config_prune": _prune_configs})(_int8_matmul_kernel)


def _launch(tuned, m: int, n: int, *args, config: triton.Config | None = None, **kwargs) -> None:
    """Run the GEMM kernel with the tuner's choice, or with `config` / the heuristic tile."""
    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    if config is None and autotune_enabled():
        tuned[grid](*args, **kwargs)
        return
    config = config or heuristic_config(m)
    _int8_matmul_kernel[grid](*args, **kwargs, **config.kwargs,
                              num_warps=config.num_warps, num_stages=config.num_stages)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(f"sparseq's Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                       f"triton is imported, for CPU tensors); got a tensor on {t.device}")


def int8_gemm(a: torch.Tensor, b: torch.Tensor, *, config: triton.Config | None = None) -> torch.Tensor:
    """a int8 [M,K] @ b int8 [N,K].T -> int32 [M,N], exact (inputs validated by sparseq.ops).

    config: force one tile configuration (tests run every tuned config through this)."""
    _check_device(a)
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    _launch(
        _gemm_tuned, m, n, a, b, c, None, None, None,
        m, n, k, _m_bucket(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        B_PACKED=False, DEQUANT=False, HAS_BIAS=False, USE_BIT_RTNE_BF16=INTERPRET, config=config,
    )
    return c


def int8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, act_qmax: int, *,
                config: triton.Config | None = None) -> torch.Tensor:
    """W8A8 dynamic linear on an n16k4-packed weight; inputs validated by sparseq.ops.

    x float [M,K] (fp32/bf16/fp16), w_packed int8 [ceil(N/16), ceil(K/4), 16, 4], w_scale fp32 [N],
    bias float [N] or None -> [M,N] in x.dtype. config: as in int8_gemm.
    """
    _check_device(x)
    m, k = x.shape
    n = w_scale.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    q, x_scale = quantize_rows(x, act_qmax)
    w_packed = w_packed.contiguous()
    w_scale = w_scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if k == 0:  # empty dot product: only the bias remains
        out.zero_()
        return out if bias is None else out.add_(bias.to(x.dtype))
    _launch(
        _linear_tuned, m, n, q, w_packed, out, x_scale, w_scale, bias,
        m, n, k, _m_bucket(m),
        q.stride(0), q.stride(1), 0, 0, out.stride(0), out.stride(1),
        B_PACKED=True, DEQUANT=True, HAS_BIAS=bias is not None, USE_BIT_RTNE_BF16=INTERPRET,
        config=config,
    )
    return out
