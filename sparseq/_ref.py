"""Pure-PyTorch references for every sparseq op.

They define what each kernel must compute (the tests' oracle) and are the fallback when the
compiled extension is absent. Integer results are exact; float results follow the same steps
as the kernels (fp32 accumulation of exact int32 sums, then scales, then bias).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_N = 16
PACK_K = 4


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M,K] @ b int8 [N,K].T -> int32 [M,N], exact."""
    # float64 products and sums of int8 values are exact while K * 2^14 < 2^53, and float64
    # matmul runs on every device (CUDA has no int64 matmul); the result fits int32 for K < 2^17.
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """Shape of the n16k4 layout of an [n, k] weight (see csrc/include/sparseq/packed_int8.h)."""
    return (-(-n // PACK_N), -(-k // PACK_K), PACK_N, PACK_K)


def pack_n16k4(w: torch.Tensor) -> torch.Tensor:
    """int8 [N,K] -> n16k4 layout [ceil(N/16), ceil(K/4), 16, 4]."""
    n, k = w.shape
    nb, kq = packed_shape(n, k)[:2]
    padded = torch.zeros(nb * PACK_N, kq * PACK_K, dtype=w.dtype, device=w.device)
    padded[:n, :k] = w
    return padded.view(nb, PACK_N, kq, PACK_K).permute(0, 2, 1, 3).contiguous()


def unpack_n16k4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_n16k4: n16k4 layout -> int8 [n, k]."""
    nb, kq = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nb * PACK_N, kq * PACK_K)[:n, :k].contiguous()


def _quantize_rows(xf: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, finite: torch.Tensor,
                   qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = clamp(round_half_even(xf * inv), -qmax, qmax) as int8, scale per row; the rows where
    ``finite`` is False get q = 0 and scale NaN, so their outputs are NaN rather than silently
    finite. inv and scale broadcast against [M, 1] and [M]."""
    q = torch.round(xf * inv).clamp_(-qmax, qmax)
    q = torch.where(finite[:, None], q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def quantize_per_row(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: q = round_half_even(x * (qmax / absmax)) in [-qmax, qmax].

    Returns (q int8 [M,K], scale float32 [M]) with x ~= q * scale[:, None]. A row of zeros gets
    scale 1 and q = 0. A row holding NaN or +-Inf gets q = 0 and scale NaN, so its outputs are
    NaN rather than silently finite. Every kernel quantizes activations with exactly these steps.
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=1)
    finite = torch.isfinite(absmax)
    absmax = torch.where(finite & (absmax > 0), absmax, torch.ones_like(absmax))
    inv = torch.full_like(absmax, float(qmax)) / absmax
    return _quantize_rows(xf, inv[:, None], absmax / qmax, finite, qmax)


def static_inverse_scale(x_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv, usable) for int8_linear_static's scale s (fp32 [1]): inv = 1.0f / s in fp32, and
    whether s is positive and finite with a finite inverse."""
    s = x_scale.float().reshape(1)
    inv = torch.ones_like(s) / s
    usable = (s > 0) & torch.isfinite(s) & torch.isfinite(inv)
    return inv, usable


def quantize_static(x: torch.Tensor, x_scale: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization with one given scale s = x_scale[0] (fp32 [1]):
    q = clamp(round_half_even(x * (1.0f / s)), -qmax, qmax), all in fp32.

    Returns (q int8 [M,K], scale float32 [M]) with scale[m] = s, except rows holding NaN/Inf, and
    every row when s is not positive and finite or 1/s overflows: q = 0 and scale NaN there.
    """
    xf = x.float()
    inv, usable = static_inverse_scale(x_scale)
    finite = torch.isfinite(xf).all(dim=1) & usable
    scale = x_scale.float().reshape(1).expand(xf.shape[0])
    return _quantize_rows(xf, inv, scale, finite, qmax)


FUSED_ACTIVATIONS = ("none", "gelu")


def check_fused_activation(activation: str) -> None:
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f'activation must be "none" or "gelu", got {activation!r}')


def dequant_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, activation: str = "none") -> torch.Tensor:
    out = acc.float() * (x_scale[:, None] * w_scale[None, :])
    if bias is not None:
        out = out + bias.float()
    if activation == "gelu":
        out = F.gelu(out)
    return out.to(out_dtype)


def int8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                w_rowsum: torch.Tensor, bias: torch.Tensor | None, act_qmax: int,
                activation: str = "none") -> torch.Tensor:
    """W8A8 dynamic linear on an n16k4-packed weight; see csrc/ops.cpp for the contract."""
    check_fused_activation(activation)
    n, k = w_scale.shape[0], x.shape[1]
    q, x_scale = quantize_per_row(x, act_qmax)
    acc = int8_gemm(q, unpack_n16k4(w_packed, n, k))
    return dequant_epilogue(acc, x_scale, w_scale, bias, x.dtype, activation)


def int8_linear_static(x: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       w_rowsum: torch.Tensor, bias: torch.Tensor | None, act_qmax: int,
                       activation: str = "none") -> torch.Tensor:
    """W8A8 static linear (one calibrated activation scale); see csrc/ops.cpp for the contract."""
    check_fused_activation(activation)
    n, k = w_scale.shape[0], x.shape[1]
    q, row_scale = quantize_static(x, x_scale, act_qmax)
    acc = int8_gemm(q, unpack_n16k4(w_packed, n, k))
    return dequant_epilogue(acc, row_scale, w_scale, bias, x.dtype, activation)


def int8_weight_only_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    n, k = w_scale.shape[0], x.shape[1]
    w = unpack_n16k4(w_packed, n, k).float() * w_scale[:, None]
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Sparse weight formats (sparseq/formats.py). Each computes x [M, K] @ W.T in float32 straight
# from the packed tensors, dequantizing int8 codes with the per-output-channel scale, and
# returns x.dtype. Work is chunked over output rows so a 4096 x 4096 weight at M = 512 does not
# materialize an [M, nnz] gather at once.
# ----------------------------------------------------------------------------------------------

_GATHER_BUDGET = 1 << 24  # float32 elements per chunk


def _row_chunks(entries_per_row: float, rows: int, m: int):
    step = max(1, int(_GATHER_BUDGET // max(1.0, entries_per_row * max(m, 1))))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _epilogue(out: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
              x: torch.Tensor) -> torch.Tensor:
    """fp32 accumulator -> per-output-channel scale (int8 codes) -> bias -> x.dtype."""
    if scale is not None:
        out = out * scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


CSR_SEGMENT = 256


def csr_segments(in_features: int) -> int:
    """Segments per row of a SparseCSRWeight: ceil(K / 256), at least 1."""
    return max(1, -(-in_features // CSR_SEGMENT))


def csr_columns(seg_ptr: torch.Tensor, col_offsets: torch.Tensor, segments: int) -> torch.Tensor:
    """int64 [nnz]: absolute columns of a SparseCSRWeight's entries (segment start + offset)."""
    counts = (seg_ptr[1:] - seg_ptr[:-1]).to(torch.int64)
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    return (segment % segments) * CSR_SEGMENT + col_offsets.to(torch.int64)


def sparse_csr_linear(x: torch.Tensor, seg_ptr: torch.Tensor, col_offsets: torch.Tensor,
                      values: torch.Tensor, w_scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T + bias for a SparseCSRWeight's tensors:
    out[m, n] = sum over row n's entries e of x[m, column(e)] * values[e] (* w_scale[n])."""
    xf = x.float()
    m, k = xf.shape
    segments = csr_segments(k)
    n = (seg_ptr.numel() - 1) // segments
    out = xf.new_zeros(m, n)
    row_ptr = seg_ptr[::segments]
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    columns = csr_columns(seg_ptr, col_offsets, segments)
    for r0, r1 in _row_chunks(values.numel() / max(n, 1), n, m):
        e0, e1 = int(row_ptr[r0]), int(row_ptr[r1])
        rows = torch.repeat_interleave(torch.arange(r0, r1, device=x.device), counts[r0:r1])
        products = xf[:, columns[e0:e1]] * values[e0:e1].float()
        out.index_add_(1, rows, products)
    return _epilogue(out, w_scale, bias, x)


def _sparse24_dot(xf: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """sum over each row's stored values of value * the x entry its 2-bit position selects,
    in xf's dtype (float32 for float weights, float64 for exact integer sums)."""
    m, k = xf.shape
    n, half = values.shape
    groups = half // 2
    xg = xf.new_zeros(m, groups * 4)
    xg[:, :k] = xf
    xg = xg.view(m, groups, 4)
    codes = meta.to(torch.int64)
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(n, 2 * codes.shape[1])[:, :groups]
    out = xf.new_zeros(m, n)
    group_index = torch.arange(groups, device=xf.device)[None, :]
    for r0, r1 in _row_chunks(half, n, m):
        for slot, position in enumerate((nibbles[r0:r1] & 3, nibbles[r0:r1] >> 2)):
            picked = xg[:, group_index, position]  # x entries picked per (row, group): [M, rows, G]
            out[:, r0:r1] += (picked * values[r0:r1, slot::2].to(xf.dtype)).sum(dim=2)
    return out


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T + bias for a Sparse24Weight's tensors: each stored value meets the x entry
    its 2-bit position selects inside its group of 4 columns (layout in Sparse24Weight)."""
    return _epilogue(_sparse24_dot(x.float(), values, meta), w_scale, bias, x)


def sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, act_qmax: int) -> torch.Tensor:
    """W8A8 dynamic linear on a 2:4 int8 weight: x quantized per row exactly as int8_linear does,
    an exact integer dot with the stored codes, then acc * x_scale[m] * w_scale[n] + bias."""
    q, x_scale = quantize_per_row(x, act_qmax)
    # float64 sums of int8 x int8 products are exact for K < 2^39; the result fits int32.
    acc = _sparse24_dot(q.to(torch.float64), values, meta).to(torch.int32)
    return dequant_epilogue(acc, x_scale, w_scale, bias, x.dtype)


SELL_SLICE = 16   # output rows per slice: one int32 lane each in a 16-lane step
SELL_BLOCK = 64   # columns per block: a step's column offsets index one 64-byte row of x
SELL_SLOTS = 4    # entries per row per step: the 4 bytes an int32 lane's dot product sums


def sell_blocks(in_features: int) -> int:
    """Column blocks per slice of a SlicedEllInt8Weight: ceil(K / 64), at least 1."""
    return max(1, -(-in_features // SELL_BLOCK))


def sell_entry_lanes(block_step_ptr: torch.Tensor, step_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (slice_block, lane) of a SlicedEllInt8Weight's entries, in storage order: step by
    step, and within a step by ascending lane (bit) of its mask; slice_block = slice * B + block."""
    counts = (block_step_ptr[1:] - block_step_ptr[:-1]).to(torch.int64)
    step_block = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    lanes = torch.arange(64, device=step_masks.device)
    bits = ((step_masks.to(torch.int64)[:, None] >> lanes) & 1).bool()  # bit 63 survives the sign
    step, lane = bits.nonzero(as_tuple=True)
    return step_block[step], lane


def sell_lane_coordinates(slice_block: torch.Tensor, lane: torch.Tensor, col_offsets: torch.Tensor,
                          blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (rows, columns) of the entries sell_entry_lanes located: lane l of slice s holds
    row 16 s + l // 4."""
    rows = (slice_block // blocks) * SELL_SLICE + lane // SELL_SLOTS
    columns = (slice_block % blocks) * SELL_BLOCK + col_offsets.to(torch.int64)
    return rows, columns


def sell_entry_coordinates(block_step_ptr: torch.Tensor, step_masks: torch.Tensor, col_offsets: torch.Tensor,
                           blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (rows, columns) of a SlicedEllInt8Weight's entries, in storage order."""
    return sell_lane_coordinates(*sell_entry_lanes(block_step_ptr, step_masks), col_offsets, blocks)


def sparse_sell_int8_linear(x: torch.Tensor, block_step_ptr: torch.Tensor, step_masks: torch.Tensor,
                            slice_ptr: torch.Tensor, col_offsets: torch.Tensor, values: torch.Tensor,
                            w_scale: torch.Tensor, bias: torch.Tensor | None, act_qmax: int) -> torch.Tensor:
    """W8A8 dynamic linear on a SlicedEllInt8Weight's tensors: x quantized per row exactly as
    int8_linear does, an exact integer dot of each row's entries, then
    acc * x_scale[m] * w_scale[n] + bias. (slice_ptr only helps kernels start a slice mid-way.)"""
    q, x_scale = quantize_per_row(x, act_qmax)
    m, k = x.shape
    rows, columns = sell_entry_coordinates(block_step_ptr, step_masks, col_offsets, sell_blocks(k))
    qd = q.to(torch.float64)
    acc = qd.new_zeros(m, w_scale.numel())
    # float64 sums of int8 x int8 products are exact (far below 2^53); the result fits int32.
    chunk = max(1, _GATHER_BUDGET // max(m, 1))
    for e0 in range(0, values.numel(), chunk):
        e1 = min(values.numel(), e0 + chunk)
        acc.index_add_(1, rows[e0:e1], qd[:, columns[e0:e1]] * values[e0:e1].to(torch.float64))
    return dequant_epilogue(acc.to(torch.int32), x_scale, w_scale, bias, x.dtype)


def bsr_linear(x: torch.Tensor, block_row_ptr: torch.Tensor, block_col_idx: torch.Tensor,
               values: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
               out_features: int) -> torch.Tensor:
    """x [M, K] @ W.T + bias for a BlockSparseWeight's tensors: every stored block (i, j) is a
    dense [bh, bw] product of x's columns j*bw.. with output rows i*bh.., the rest is skipped."""
    xf = x.float()
    m, k = xf.shape
    nnzb, bh, bw = values.shape
    nb = block_row_ptr.numel() - 1
    kb = -(-k // bw)
    xb = torch.zeros(m, kb * bw, dtype=torch.float32, device=x.device)
    xb[:, :k] = xf
    xb = xb.view(m, kb, bw)
    out = xf.new_zeros(m, nb, bh)
    counts = (block_row_ptr[1:] - block_row_ptr[:-1]).to(torch.int64)
    for r0, r1 in _row_chunks(nnzb * bh * bw / max(nb, 1), nb, m):
        e0, e1 = int(block_row_ptr[r0]), int(block_row_ptr[r1])
        rows = torch.repeat_interleave(torch.arange(r0, r1, device=x.device), counts[r0:r1])
        x_blocks = xb[:, block_col_idx[e0:e1].to(torch.int64)]          # [M, blocks, bw]
        products = torch.einsum("mjb,jhb->mjh", x_blocks, values[e0:e1].float())
        out.index_add_(1, rows, products)
    return _epilogue(out.reshape(m, nb * bh)[:, :out_features], w_scale, bias, x)
