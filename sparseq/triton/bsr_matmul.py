"""Triton block-sparse (BSR) linear: out = x @ W.T (* w_scale) + bias, empty blocks skipped.

bsr_linear(x, block_row_ptr, block_col_idx, values, w_scale, bias, out_features) has the contract
of sparseq._ref.bsr_linear (layout: sparseq.formats.BlockSparseWeight). One program computes a
[BLOCK_M, bh] tile of the output: one M tile times one block row. It walks that block row's stored
blocks, loading x[m0:m0+BLOCK_M, col*bw : col*bw+bw] and the [bh, bw] value block, so the work is
proportional to the stored blocks only. Block sides are padded to powers of two inside the kernel
(masked loads), so any block shape runs.

Two inner products:
  * tl.dot (tensor cores) when both padded block sides are >= 16, tl.dot's smallest operand side.
    Operands go to x's dtype when the values are the same dtype or int8 codes (|code| <= 128 is
    exact in bf16/fp16); mixed float dtypes go to fp32 with input_precision="ieee" (no TF32:
    the reference accumulates exact fp32 products). The interpreter's bf16 tl.dot is wrong, so
    there every operand is fp32.
  * broadcast multiply + sum otherwise (small blocks: 1x8, 4x4, 8x8 ...), in fp32 on CUDA
    cores, over chunks of the block's columns small enough that BLOCK_M * bh * chunk <= 8192
    products are live at once (no register spills).

Bad indices never read out of bounds: a block row whose pointers are not 0 <= start <= end <= nnz
is skipped and a column index outside [0, KB) loads nothing; either sets an error flag that
bsr_linear turns into a ValueError after the kernel (one 8-byte device-to-host read, a sync;
check_indices=False skips it for weights already validated, e.g. by BlockSparseWeight).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_matmul import INTERPRET, _bf16_rtne, _check_device, _m_bucket, autotune_enabled

FMA_LIVE_VALUES = 8192

# BLOCK_M, num_warps, num_stages
if INTERPRET:
    # One config; BLOCK_M=32 still puts M=33 across two tiles and M=17 in a partial one.
    TILES = [(32, 4, 1)]
else:
    # H100/H200 candidates: small BLOCK_M for decode-sized M, deeper pipelines to hide the latency
    # of the indirect (column-index dependent) x loads. For large M the kernel is bound by reading
    # x from L2 (each x element feeds only bh outputs per load); BLOCK_M = 256 halves the
    # re-reads of the values, the other, smaller traffic.
    TILES = [
        (16, 4, 3), (16, 4, 4), (16, 2, 4),
        (32, 4, 3), (32, 4, 4),
        (64, 4, 3), (64, 4, 4), (64, 8, 3),
        (128, 4, 3), (128, 4, 5), (128, 8, 3), (128, 8, 4),
        (256, 4, 3), (256, 8, 3), (256, 8, 4),
    ]


def configs() -> list:
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in TILES]


def heuristic_config(m: int) -> triton.Config:
    """The tile used without autotuning: the smallest BLOCK_M that covers min(M, 128)."""
    candidates = configs()
    fitting = [c for c in candidates if c.kwargs["BLOCK_M"] >= min(m, 128)] or candidates
    smallest_m = min(c.kwargs["BLOCK_M"] for c in fitting)
    return next(c for c in fitting if c.kwargs["BLOCK_M"] == smallest_m)


def _prune_configs(candidates, named_args, **kwargs):
    # Tiles far larger than the problem only waste time while tuning; the CUDA-core path has no
    # async copies to pipeline, so there num_stages would only multiply the compilations.
    m_bucket = named_args["M_BUCKET"]
    fitting = [c for c in candidates if c.kwargs["BLOCK_M"] <= max(16, m_bucket)] or candidates[:1]
    if kwargs.get("USE_DOT", True):
        return fitting
    one_per_shape = {}
    for c in fitting:
        one_per_shape.setdefault((c.kwargs["BLOCK_M"], c.num_warps), c)
    return list(one_per_shape.values())


def _k_chunk(args) -> int:
    # Columns of a block multiplied per step (a power of two): the whole block for tl.dot; on
    # the CUDA-core path few enough that the [BLOCK_M, bh, chunk] product stays in registers.
    if args["USE_DOT"]:
        return args["BW_P"]
    per_column = args["BLOCK_M"] * args["BH_P"]
    return max(1, min(args["BW_P"], FMA_LIVE_VALUES // per_column))


@triton.jit(do_not_specialize=["M_BUCKET", "NNZB"])
def _bsr_linear_kernel(
    x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, w_scale_ptr, bias_ptr, out_ptr, error_ptr,
    M, N, K, NB, KB, NNZB, M_BUCKET, stride_xm, stride_om,
    BH: tl.constexpr, BW: tl.constexpr, BH_P: tl.constexpr, BW_P: tl.constexpr,
    PADDED_BLOCK: tl.constexpr, EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, K_CHUNK: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_BIT_RTNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Block rows vary fastest: neighbouring programs share x's row strip, which then stays in L2.
    pid = tl.program_id(0)
    block_row = pid % NB
    pid_m = pid // NB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_h = tl.arange(0, BH_P)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    start = tl.load(row_ptr_ptr + block_row)
    end = tl.load(row_ptr_ptr + block_row + 1)
    row_ok = (start >= 0) & (start <= end) & (end <= NNZB)
    # int64 so the value offsets e * bh * bw cannot wrap.
    start = tl.where(row_ok, start, 0).to(tl.int64)
    end = tl.where(row_ok, end, 0).to(tl.int64)
    bad_columns = 0

    acc = tl.zeros((BLOCK_M, BH_P), dtype=tl.float32)
    for e in range(start, end):
        col = tl.load(col_idx_ptr + e)
        col_ok = (col >= 0) & (col < KB)
        bad_columns += (~col_ok).to(tl.int32)
        block = values_ptr + e * (BH * BW)
        # One step on the tensor-core path (K_CHUNK = padded bw), several on the CUDA-core one.
        for c0 in tl.static_range(0, BW_P, K_CHUNK):
            offs_w = c0 + tl.arange(0, K_CHUNK)
            k = col * BW + offs_w
            # A mask the compiler sees as constant along k keeps the x loads vectorized and
            # pipelined (cp.async); a per-element k mask would make them scalar.
            if EVEN_K:
                x_mask = mask_m[:, None] & col_ok
            else:
                x_mask = mask_m[:, None] & ((offs_w < BW) & (k < K) & col_ok)[None, :]
            x_tile = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)
            w_ptrs = block + offs_h[:, None] * BW + offs_w[None, :]
            if PADDED_BLOCK:
                w_tile = tl.load(w_ptrs, mask=(offs_h < BH)[:, None] & (offs_w < BW)[None, :], other=0.0)
            else:
                w_tile = tl.load(w_ptrs)
            if USE_DOT:
                acc = tl.dot(x_tile.to(DOT_DTYPE), tl.trans(w_tile.to(DOT_DTYPE)), acc, input_precision="ieee")
            else:
                acc += tl.sum(x_tile.to(tl.float32)[:, None, :] * w_tile.to(tl.float32)[None, :, :], axis=2)

    # Masked scalar stores: only programs that met a bad index write, all the same flag.
    tl.store(error_ptr, 1, mask=~row_ok)
    tl.store(error_ptr + 1, 1, mask=bad_columns > 0)

    offs_n = block_row * BH + offs_h
    mask_n = (offs_h < BH) & (offs_n < N)
    # Same operation order as sparseq._ref._epilogue.
    if HAS_SCALE:
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if USE_BIT_RTNE_BF16 and out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptrs, _bf16_rtne(acc), mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_kernel = triton.heuristics({"K_CHUNK": _k_chunk})(_bsr_linear_kernel)
_tuned = triton.autotune(configs=configs(), key=["M_BUCKET", "N", "K", "BH", "BW", "DOT_DTYPE"],
                         prune_configs_by={"early_config_prune": _prune_configs})(_kernel)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def uses_tensor_cores(block: tuple[int, int]) -> bool:
    """Whether blocks of this shape take the tl.dot path (both sides padded to >= 16)."""
    return all(triton.next_power_of_2(side) >= 16 for side in block)


def dot_dtype(x_dtype: torch.dtype, values_dtype: torch.dtype) -> torch.dtype:
    """The dtype both tl.dot operands are converted to: exact for every value of either input."""
    if INTERPRET:
        return torch.float32
    if values_dtype == x_dtype or values_dtype == torch.int8:
        return x_dtype
    return torch.float32


def launch_constants(x_dtype: torch.dtype, values_dtype: torch.dtype, block: tuple[int, int],
                     in_features: int, has_bias: bool) -> dict:
    """The kernel's constexpr arguments (all but the tile config) for one problem."""
    bh, bw = block
    bh_p, bw_p = triton.next_power_of_2(bh), triton.next_power_of_2(bw)
    return dict(BH=bh, BW=bw, BH_P=bh_p, BW_P=bw_p, PADDED_BLOCK=(bh, bw) != (bh_p, bw_p),
                EVEN_K=bw == bw_p and in_features % bw == 0,
                USE_DOT=uses_tensor_cores(block), DOT_DTYPE=_TL_DTYPES[dot_dtype(x_dtype, values_dtype)],
                HAS_SCALE=values_dtype == torch.int8, HAS_BIAS=has_bias, USE_BIT_RTNE_BF16=INTERPRET)


def bsr_linear(x: torch.Tensor, block_row_ptr: torch.Tensor, block_col_idx: torch.Tensor,
               values: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
               out_features: int, *, check_indices: bool = True,
               config: triton.Config | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (* w_scale) + bias for a BlockSparseWeight's tensors -> [M, out_features]
    in x's dtype. Shapes and dtypes are validated by sparseq.ops.bsr_linear; index contents here.

    check_indices=False skips reading the kernel's error flag (no host sync); bad indices then
    still read nothing out of bounds but give a wrong answer instead of an error.
    config: force one tile configuration (tests run every tuned config through this)."""
    _check_device(x)
    x = x.contiguous()
    values = values.contiguous()
    m, k = x.shape
    nnzb, bh, bw = values.shape
    nb = block_row_ptr.numel() - 1
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    error = torch.zeros(2, dtype=torch.int32, device=x.device)
    args = (x, block_row_ptr.contiguous(), block_col_idx.contiguous(), values,
            None if w_scale is None else w_scale.contiguous(), None if bias is None else bias.contiguous(),
            out, error, m, out_features, k, nb, -(-k // bw), nnzb, _m_bucket(m), x.stride(0), out.stride(0))
    meta = launch_constants(x.dtype, values.dtype, (bh, bw), k, bias is not None)

    def grid(kernel_meta):
        return (nb * triton.cdiv(m, kernel_meta["BLOCK_M"]),)

    if config is None and autotune_enabled():
        _tuned[grid](*args, **meta)
    else:
        config = config or heuristic_config(m)
        _kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if check_indices:
        bad_rows, bad_columns = error.tolist()
        if bad_rows:
            raise ValueError(f"block_row_ptr must be nondecreasing within [0, nnz_blocks={nnzb}]")
        if bad_columns:
            raise ValueError(f"block_col_idx holds a block column outside [0, {-(-k // bw)}) "
                             f"(in_features={k}, block width {bw})")
    return out
