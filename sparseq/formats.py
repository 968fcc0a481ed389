"""Packed weight formats: small dataclasses with pack() / unpack() / nbytes.

PackedInt8Weight is the int8 per-output-channel format every int8 kernel reads (CPU AVX2,
CUDA, Triton): the n16k4 layout described in csrc/include/sparseq/packed_int8.h.

The sparse formats (SparseCSRWeight, Sparse24Weight, BlockSparseWeight, and the int8-only
SlicedEllInt8Weight) store exactly the zeros already in a weight: unpack() returns the masked
weight bit for bit (after the cast to the stored value dtype), or, with int8=True, the
dequantized per-output-channel int8 weight q[n, k] * scale[n] with the same sparsity structure. Their reference matmuls live in _ref.py
and read the packed tensors directly, so they exercise each format's indexing.
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


def pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each (positive, finite) float32 value: 2^ceil(log2(t)), exact."""
    mantissa, exponent = torch.frexp(t.float())  # t = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(mantissa), exponent)


def _quantize_per_channel(weight: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K] in [-127, 127], scale float32 [N]).

    pow2_scales rounds each scale up to a power of two (q = round(W * 2^p), so dequantization is
    a shift); rounding up keeps |W| / scale <= 127, so nothing clips. Zeros stay zeros, so every
    sparse format keeps its structure when quantized.
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    if pow2_scales:
        scale = pow2_ceil(scale)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


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
    def pack(cls, weight: torch.Tensor, pow2_scales: bool = False) -> "PackedInt8Weight":
        """Quantize a float weight [N, K] per output channel and pack it once; pow2_scales rounds
        every scale up to a power of two."""
        _check_weight(weight)
        return cls.from_int8(*_quantize_per_channel(weight, pow2_scales))

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
        return _nbytes(self.packed, self.scale, self.rowsum)


# ----------------------------------------------------------------------------------------------
# Sparse formats
# ----------------------------------------------------------------------------------------------

FLOAT_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns per CSR segment: an entry stores its column as a uint8 offset inside its segment
# (csrc/include/sparseq/sparse_formats.h).
CSR_SEGMENT = _ref.CSR_SEGMENT
csr_segments = _ref.csr_segments


def _value_dtype(weight: torch.Tensor, dtype: torch.dtype | None, int8: bool) -> torch.dtype:
    if int8:
        if dtype is not None:
            raise ValueError("pass either dtype= (float values) or int8=True, not both")
        return torch.int8
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in FLOAT_VALUE_DTYPES:
        raise TypeError(f"value dtype must be one of float32, bfloat16, float16 (or int8=True), got {dtype}")
    return dtype


def _stored_values(weight: torch.Tensor, dtype: torch.dtype | None,
                   int8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [N, K] matrix whose nonzeros are stored (cast or quantized) and the int8 scale."""
    value_dtype = _value_dtype(weight, dtype, int8)
    if int8:
        return _quantize_per_channel(weight)
    return weight.detach().to(value_dtype), None


def _check_scale(scale: torch.Tensor | None, values: torch.Tensor, n: int) -> None:
    if values.dtype == torch.int8:
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.shape != (n,):
            got = None if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
            raise ValueError(f"int8 values need a float32 per-output-channel scale of shape ({n},), got {got}")
        if scale.device != values.device:
            raise ValueError(f"scale is on {scale.device} but values are on {values.device}")
    elif values.dtype in FLOAT_VALUE_DTYPES:
        if scale is not None:
            raise ValueError(f"{values.dtype} values take no scale (scale is only for int8 values)")
    else:
        raise TypeError(f"values must be float32, bfloat16, float16 or int8, got {values.dtype}")


def _dequantize(values: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    out = values.float()
    if scale is not None:
        out = out * scale[rows].view(-1, *([1] * (values.dim() - 1)))
    return out


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_compressed_index(ptr: torch.Tensor, idx: torch.Tensor, rows: int, cols: int,
                            what: str, index_dtype: torch.dtype, row_name: str = "row") -> None:
    """Validate a compressed-row index: ptr int32 [rows+1] from 0 to len(idx), nondecreasing;
    idx of index_dtype in [0, cols), strictly increasing within each row."""
    if ptr.dtype != torch.int32 or ptr.shape != (rows + 1,):
        raise ValueError(f"{what} {row_name} pointers must be int32 of shape ({rows + 1},), "
                         f"got {ptr.dtype} {tuple(ptr.shape)}")
    if idx.dtype != index_dtype or idx.dim() != 1:
        raise ValueError(f"{what} column indices must be a 1-D {index_dtype} tensor, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    if ptr.device != idx.device:
        raise ValueError(f"{row_name} pointers are on {ptr.device} but column indices are on {idx.device}")
    nnz = idx.numel()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
        raise ValueError(f"{what} {row_name} pointers must start at 0 and end at {nnz} (the number of "
                         f"stored entries), got {int(ptr[0])} and {int(ptr[-1])}")
    if rows and bool((ptr[1:] < ptr[:-1]).any()):
        row = int(torch.nonzero(ptr[1:] < ptr[:-1])[0])
        raise ValueError(f"{what} {row_name} pointers decrease at {row_name} {row}")
    if nnz == 0:
        return
    i = idx.to(torch.int64)
    if bool(((i < 0) | (i >= cols)).any()):
        pos = int(torch.nonzero((i < 0) | (i >= cols))[0])
        raise ValueError(f"{what} column index {int(i[pos])} at entry {pos} is out of range [0, {cols})")
    continues_row = torch.ones(nnz, dtype=torch.bool, device=idx.device)
    continues_row[ptr[:-1].to(torch.int64).clamp(max=nnz - 1)] = False
    bad = continues_row[1:] & (i[1:] <= i[:-1])
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0]) + 1
        row = int(torch.searchsorted(ptr, torch.tensor(pos, dtype=torch.int32, device=ptr.device),
                                     right=True)) - 1
        raise ValueError(f"{what} column indices of {row_name} {row} are not strictly increasing "
                         f"(entry {pos}: {int(i[pos - 1])} then {int(i[pos])})")


@dataclass
class SparseCSRWeight:
    """Unstructured sparse weight W [N, K] in compressed rows split into 256-column segments.

    Row n is cut into S = ceil(K/256) segments; segment (n, s) covers columns 256*s .. 256*s+255.
    seg_ptr int32 [N*S + 1]: the entries of segment (n, s) are [seg_ptr[n*S+s], seg_ptr[n*S+s+1]),
      so row n's entries are [seg_ptr[n*S], seg_ptr[(n+1)*S]).
    col_offsets uint8 [nnz]: column - 256*s, strictly increasing within a segment. One byte per
      index instead of two or four keeps a 90%-sparse fp32 layer near 13% of its dense bytes
      (int8 values: ~5.5%), and the segments double as the K-blocks the kernels tile by.
    values [nnz]: float32 / bfloat16 / float16, or int8 codes with scale float32 [N] so that
      W[n, k] = values * scale[n].
    Exactly the nonzeros of the float weight are stored (an int8 code may round to 0).
    """

    seg_ptr: torch.Tensor
    col_offsets: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor | None
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def pack(cls, weight: torch.Tensor, dtype: torch.dtype | None = None,
             int8: bool = False) -> "SparseCSRWeight":
        """Store the nonzeros of a float weight [N, K]; dtype defaults to the weight's own."""
        _check_weight(weight)
        stored, scale = _stored_values(weight, dtype, int8)
        n, k = weight.shape
        segments = csr_segments(k)
        if n * segments >= 2**31 or int((weight != 0).sum()) >= 2**31:
            raise ValueError(f"a [{n}, {k}] weight has too many segments or nonzeros for int32 pointers")
        rows, cols = (weight.detach() != 0).nonzero(as_tuple=True)  # row-major: columns ascend
        counts = torch.bincount(rows * segments + cols // CSR_SEGMENT, minlength=n * segments)
        seg_ptr = torch.zeros(n * segments + 1, dtype=torch.int32, device=weight.device)
        seg_ptr[1:] = counts.cumsum(0)
        return cls(seg_ptr, (cols % CSR_SEGMENT).to(torch.uint8), stored[rows, cols].contiguous(),
                   scale, k, n)

    @property
    def segments(self) -> int:
        return csr_segments(self.in_features)

    def validate(self) -> None:
        """Raise ValueError/TypeError unless the tensors form a consistent CSR weight."""
        n, k, segments = self.out_features, self.in_features, self.segments
        _check_compressed_index(self.seg_ptr, self.col_offsets, n * segments, CSR_SEGMENT, "CSR",
                                torch.uint8, row_name="segment")
        if self.values.dim() != 1 or self.values.numel() != self.col_offsets.numel():
            raise ValueError(f"values must be 1-D with one entry per column offset "
                             f"({self.col_offsets.numel()}), got shape {tuple(self.values.shape)}")
        if self.values.device != self.col_offsets.device:
            raise ValueError(f"values are on {self.values.device} but indices on {self.col_offsets.device}")
        _check_scale(self.scale, self.values, n)
        if self.nnz and k % CSR_SEGMENT:
            columns = self.columns()
            if bool((columns >= k).any()):
                pos = int(torch.nonzero(columns >= k)[0])
                raise ValueError(f"CSR entry {pos} lands in column {int(columns[pos])}, beyond "
                                 f"in_features={k}")

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def rows(self) -> torch.Tensor:
        """int64 [nnz]: the output row of every entry."""
        counts = (self.seg_ptr[1:] - self.seg_ptr[:-1]).to(torch.int64)
        segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return segment // self.segments

    def columns(self) -> torch.Tensor:
        """int64 [nnz]: the absolute column of every entry."""
        return _ref.csr_columns(self.seg_ptr, self.col_offsets, self.segments)

    def unpack(self) -> torch.Tensor:
        """Dense float32 [N, K] (the masked weight, dequantized when int8)."""
        n, k = self.out_features, self.in_features
        rows = self.rows()
        dense = torch.zeros(n, k, dtype=torch.float32, device=self.values.device)
        dense[rows, self.columns()] = _dequantize(self.values, self.scale, rows)
        return dense

    @property
    def nbytes(self) -> int:
        return _nbytes(self.seg_ptr, self.col_offsets, self.values, self.scale)


def _padded(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if w.shape == (n, k):
        return w
    out = w.new_zeros(n, k)
    out[:w.shape[0], :w.shape[1]] = w
    return out


@dataclass
class Sparse24Weight:
    """2:4 semi-structured weight W [N, K]: in every group of 4 consecutive columns of a row
    (k = 4g .. 4g+3) at most 2 entries are nonzero.

    K is zero-padded to Kp = ceil(K/4)*4 (padding keeps the pattern 2:4); G = Kp/4 groups per row.
    values [N, Kp/2]: values[n, 2g + j] = W[n, 4g + idx_j(n, g)], j = 0, 1, in float32 / bfloat16 /
      float16, or int8 codes with scale float32 [N] (W = values * scale[n]).
    meta uint8 [N, ceil(G/2)]: group g's two 2-bit positions idx_0 < idx_1 form the nibble
      idx_0 | idx_1 << 2, held in the low nibble of meta[n, g // 2] for even g and the high
      nibble for odd g (an odd G leaves the last high nibble 0).
    A group with fewer than 2 nonzeros stores 0 at the unused slot(s), whose positions are the
    smallest positions not holding a nonzero, so idx_0 < idx_1 always holds.

    This plain row-major layout is also what the CUDA mma.sp kernels read, unconverted: the
    nibble order (idx_0 in the low bits, even group in the low nibble) is the instruction's
    metadata order, so each lane's 32-bit metadata word is two 16-bit (m16n8k32, bf16/fp16) or
    one 32-bit (m16n8k64, int8) little-endian load from these bytes
    (csrc/cuda/sparse24_mma_layout.h). Kernels need idx_0 < idx_1 in every group, which pack()
    guarantees and validate() checks.
    """

    values: torch.Tensor
    meta: torch.Tensor
    scale: torch.Tensor | None
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        self.validate()

    @property
    def groups(self) -> int:
        return -(-self.in_features // 4)

    @classmethod
    def pack(cls, weight: torch.Tensor, dtype: torch.dtype | None = None,
             int8: bool = False) -> "Sparse24Weight":
        _check_weight(weight)
        n, k = weight.shape
        groups = -(-k // 4)
        nonzero = _padded(weight.detach() != 0, n, groups * 4).view(n, groups, 4)
        counts = nonzero.sum(dim=2)
        if bool((counts > 2).any()):
            row, g = (int(v) for v in torch.nonzero(counts > 2)[0])
            raise ValueError(
                f"weight is not 2:4 sparse: row {row}, columns {4 * g}..{min(4 * g + 3, k - 1)} hold "
                f"{int(counts[row, g])} nonzeros (at most 2 of every 4 consecutive columns may be nonzero)")
        stored, scale = _stored_values(weight, dtype, int8)
        stored = _padded(stored, n, groups * 4).view(n, groups, 4)
        position = torch.arange(4, device=weight.device)
        # Nonzero positions sort first, then the smallest free ones; keep two, in ascending order.
        key = torch.where(nonzero, position, position + 4)
        idx = key.sort(dim=2).values[..., :2].remainder(4).sort(dim=2).values
        values = stored.gather(2, idx).reshape(n, groups * 2)
        nibbles = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
        if groups % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(n, 1)], dim=1)
        meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return cls(values.contiguous(), meta.contiguous(), scale, k, n)

    def positions(self) -> torch.Tensor:
        """int64 [N, G, 2]: the two in-group positions of every group, decoded from meta."""
        n, g = self.out_features, self.groups
        m = self.meta.to(torch.int64)
        nibbles = torch.stack([m & 0xF, m >> 4], dim=2).reshape(n, 2 * m.shape[1])[:, :g]
        return torch.stack([nibbles & 3, nibbles >> 2], dim=2)

    def columns(self) -> torch.Tensor:
        """int64 [N, Kp/2]: the absolute column of every stored value (may be >= K in padding)."""
        group_start = 4 * torch.arange(self.groups, device=self.meta.device)
        return (self.positions() + group_start[None, :, None]).reshape(self.out_features, 2 * self.groups)

    def validate(self) -> None:
        n, k, g = self.out_features, self.in_features, self.groups
        if self.values.shape != (n, 2 * g):
            raise ValueError(f"values must have shape ({n}, {2 * g}) for a [{n}, {k}] weight, "
                             f"got {tuple(self.values.shape)}")
        if self.meta.dtype != torch.uint8 or self.meta.shape != (n, -(-g // 2)):
            raise ValueError(f"meta must be uint8 of shape ({n}, {-(-g // 2)}), "
                             f"got {self.meta.dtype} {tuple(self.meta.shape)}")
        if self.meta.device != self.values.device:
            raise ValueError(f"meta is on {self.meta.device} but values on {self.values.device}")
        _check_scale(self.scale, self.values, n)
        if g % 2 and n and bool((self.meta[:, -1] >> 4).any()):
            raise ValueError("the unused high nibble after the last (odd) group of meta must be 0")
        idx = self.positions()
        if bool((idx[..., 0] >= idx[..., 1]).any()):
            row, grp = (int(v) for v in torch.nonzero(idx[..., 0] >= idx[..., 1])[0])
            raise ValueError(f"meta of row {row}, group {grp} (columns {4 * grp}..{4 * grp + 3}) holds "
                             f"positions {tuple(idx[row, grp].tolist())}; they must be strictly increasing")
        in_padding = (self.columns() >= k) & (self.values != 0)
        if bool(in_padding.any()):
            row = int(torch.nonzero(in_padding)[0, 0])
            raise ValueError(f"row {row} stores a nonzero value at a padding column >= in_features={k}")

    def unpack(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        dense = torch.zeros(n, 4 * self.groups, dtype=torch.float32, device=self.values.device)
        rows = torch.arange(n, device=self.values.device)
        dense.scatter_(1, self.columns(), _dequantize(self.values, self.scale, rows))
        return dense[:, :k].contiguous()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values, self.meta, self.scale)


@dataclass
class BlockSparseWeight:
    """Block sparse weight (BSR) W [N, K] with blocks of shape (bh, bw).

    W is zero-padded to [NB*bh, KB*bw], NB = ceil(N/bh), KB = ceil(K/bw); block (i, j) covers
    rows i*bh .. i*bh+bh-1 and columns j*bw .. j*bw+bw-1 and is stored iff it holds a nonzero.
    block_row_ptr int32 [NB+1]; block_col_idx int32 [nnz_blocks] (one index per bh*bw values, so
    its width hardly matters), strictly increasing within a block row; values [nnz_blocks, bh, bw] in float32 / bfloat16 / float16, or
    int8 codes with a per-output-channel scale float32 [N] (W[n, k] = code * scale[n]).
    Zero entries inside a stored block are stored as 0; padding entries must be 0.
    """

    block_row_ptr: torch.Tensor
    block_col_idx: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor | None
    block: tuple[int, int]
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        self.block = tuple(self.block)
        self.validate()

    @staticmethod
    def _check_block(block) -> tuple[int, int]:
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"block must be a pair of positive ints (bh, bw), got {block!r}")
        return int(block[0]), int(block[1])

    @classmethod
    def pack(cls, weight: torch.Tensor, block: tuple[int, int], dtype: torch.dtype | None = None,
             int8: bool = False) -> "BlockSparseWeight":
        _check_weight(weight)
        bh, bw = cls._check_block(block)
        n, k = weight.shape
        nb, kb = -(-n // bh), -(-k // bw)
        stored, scale = _stored_values(weight, dtype, int8)
        blocks = _padded(stored, nb * bh, kb * bw).view(nb, bh, kb, bw).transpose(1, 2)
        present = _padded(weight.detach() != 0, nb * bh, kb * bw).view(nb, bh, kb, bw).any(dim=3).any(dim=1)
        brow, bcol = present.nonzero(as_tuple=True)
        row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device=weight.device)
        row_ptr[1:] = present.sum(dim=1).cumsum(0)
        return cls(row_ptr, bcol.to(torch.int32), blocks[brow, bcol].contiguous(),
                   scale, (bh, bw), k, n)

    def validate(self) -> None:
        bh, bw = self._check_block(self.block)
        n, k = self.out_features, self.in_features
        nb, kb = -(-n // bh), -(-k // bw)
        _check_compressed_index(self.block_row_ptr, self.block_col_idx, nb, kb, "BSR", torch.int32,
                                row_name="block row")
        if self.values.shape != (self.block_col_idx.numel(), bh, bw):
            raise ValueError(f"values must have shape ({self.block_col_idx.numel()}, {bh}, {bw}), "
                             f"got {tuple(self.values.shape)}")
        if self.values.device != self.block_col_idx.device:
            raise ValueError(f"values are on {self.values.device} but indices on {self.block_col_idx.device}")
        _check_scale(self.scale, self.values, n)
        if (n % bh or k % bw) and self.values.numel():
            rows = self._block_rows()[:, None, None] * bh + torch.arange(bh, device=self.values.device)[:, None]
            cols = self.block_col_idx.to(torch.int64)[:, None, None] * bw + torch.arange(bw, device=self.values.device)
            if bool(((self.values != 0) & ((rows >= n) | (cols >= k))).any()):
                raise ValueError("a stored block holds a nonzero value in the padding beyond the weight's shape")

    def _block_rows(self) -> torch.Tensor:
        counts = (self.block_row_ptr[1:] - self.block_row_ptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    def unpack(self) -> torch.Tensor:
        bh, bw = self.block
        n, k = self.out_features, self.in_features
        nb, kb = -(-n // bh), -(-k // bw)
        blocks = torch.zeros(nb, kb, bh, bw, dtype=torch.float32, device=self.values.device)
        blocks[self._block_rows(), self.block_col_idx.to(torch.int64)] = self.values.float()
        dense = blocks.transpose(1, 2).reshape(nb * bh, kb * bw)[:n, :k]
        if self.scale is not None:
            dense = dense * self.scale[:, None]
        return dense.contiguous()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.block_row_ptr, self.block_col_idx, self.values, self.scale)


BLOCK_CANDIDATES = ((1, 4), (1, 8), (4, 1), (4, 4), (8, 8), (16, 16), (32, 32))


SELL_SLICE, SELL_BLOCK, SELL_SLOTS = _ref.SELL_SLICE, _ref.SELL_BLOCK, _ref.SELL_SLOTS
sell_blocks = _ref.sell_blocks


@dataclass
class SlicedEllInt8Weight:
    """Unstructured sparse int8 weight W [N, K] in sliced ELLPACK steps, for W8A8 kernels that
    look activations up with a byte permute (vpermb) instead of gathering them.

    Rows go in slices of 16 (slice s: rows 16 s .. 16 s + 15) and columns in blocks of 64 (block b:
    columns 64 b .. 64 b + 63). Slice s, block b has T = ceil(c / 4) steps, c being the most entries
    any of its 16 rows has in the block. A step is 64 byte lanes: lanes 4 r .. 4 r + 3 hold up to 4
    entries of the slice's row r, so one int32 lane of a 16-lane dot product sums them.
    block_step_ptr int32 [S_slices * B + 1]: steps of (s, b) are [ptr[s B + b], ptr[s B + b + 1]).
    step_masks int64 [steps]: bit l set when lane l holds an entry (padding lanes store nothing).
    col_offsets uint8 [nnz] (column - 64 b, < 64) and values int8 [nnz]: the entries, step after
      step, and within a step by ascending lane: a kernel expands them into lanes with the mask.
    slice_ptr int32 [S_slices + 1]: the entries of slice s are [slice_ptr[s], slice_ptr[s + 1]).
    scale float32 [N]: W[n, k] = values * scale[n].
    Only the mask bits mark padding, so a 90%-sparse layer takes ~5.7% of its dense fp32 bytes
    (int8 CSR: ~5.4%). Exactly the nonzeros of the float weight are stored.
    """

    block_step_ptr: torch.Tensor
    step_masks: torch.Tensor
    slice_ptr: torch.Tensor
    col_offsets: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def pack(cls, weight: torch.Tensor) -> "SlicedEllInt8Weight":
        """Quantize a float weight [N, K] per output channel and store its nonzeros."""
        _check_weight(weight)
        q, scale = _quantize_per_channel(weight)
        n, k = weight.shape
        blocks, slices = sell_blocks(k), -(-n // SELL_SLICE)
        rows, cols = (weight.detach() != 0).nonzero(as_tuple=True)  # row-major: columns ascend
        if slices * blocks >= 2**31 or rows.numel() >= 2**31:
            raise ValueError(f"a [{n}, {k}] weight has too many blocks or nonzeros for int32 pointers")
        device = weight.device
        row_block = rows * blocks + cols // SELL_BLOCK
        counts = torch.bincount(row_block, minlength=n * blocks)
        rank = torch.arange(rows.numel(), device=device) - (counts.cumsum(0) - counts)[row_block]
        longest = torch.zeros(slices * SELL_SLICE * blocks, dtype=torch.int64, device=device)
        longest[:n * blocks] = counts
        steps = (longest.view(slices, SELL_SLICE, blocks).amax(dim=1) + SELL_SLOTS - 1) // SELL_SLOTS
        block_step_ptr = torch.zeros(slices * blocks + 1, dtype=torch.int32, device=device)
        block_step_ptr[1:] = steps.flatten().cumsum(0)
        slice_block = (rows // SELL_SLICE) * blocks + cols // SELL_BLOCK
        step = block_step_ptr[slice_block].to(torch.int64) + rank // SELL_SLOTS
        lane = (rows % SELL_SLICE) * SELL_SLOTS + rank % SELL_SLOTS
        order = torch.argsort(step * 64 + lane)
        masks = torch.zeros(int(block_step_ptr[-1]), dtype=torch.int64, device=device)
        masks.index_add_(0, step, torch.ones_like(lane) << lane)  # distinct lanes: the sum is the OR
        slice_ptr = torch.zeros(slices + 1, dtype=torch.int32, device=device)
        slice_ptr[1:] = torch.bincount(rows // SELL_SLICE, minlength=slices).cumsum(0)
        return cls(block_step_ptr, masks, slice_ptr, (cols % SELL_BLOCK)[order].to(torch.uint8),
                   q[rows, cols][order].contiguous(), scale, k, n)

    @property
    def blocks(self) -> int:
        return sell_blocks(self.in_features)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def validate(self) -> None:
        """Raise ValueError unless the tensors form a consistent SlicedEllInt8Weight."""
        n, k, blocks = self.out_features, self.in_features, self.blocks
        slices = -(-n // SELL_SLICE)
        ptr, masks, slice_ptr = self.block_step_ptr, self.step_masks, self.slice_ptr
        for name, t, dtype in (("block_step_ptr", ptr, torch.int32), ("step_masks", masks, torch.int64),
                               ("slice_ptr", slice_ptr, torch.int32), ("col_offsets", self.col_offsets, torch.uint8),
                               ("values", self.values, torch.int8)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"sliced-ELL {name} must be a 1-D {dtype} tensor, got {got}")
            if t.device != self.values.device:
                raise ValueError(f"sliced-ELL {name} is on {t.device} but values are on {self.values.device}")
        _check_scale(self.scale, self.values, n)
        if ptr.numel() != slices * blocks + 1 or slice_ptr.numel() != slices + 1:
            raise ValueError(f"sliced-ELL pointers for N={n}, K={k} must hold {slices * blocks + 1} (block_step_ptr) "
                             f"and {slices + 1} (slice_ptr) entries, got {ptr.numel()} and {slice_ptr.numel()}")
        nnz = self.nnz
        if self.col_offsets.numel() != nnz:
            raise ValueError(f"sliced-ELL col_offsets ({self.col_offsets.numel()}) and values ({nnz}) differ in length")
        for name, p, end in (("block_step_ptr", ptr, masks.numel()), ("slice_ptr", slice_ptr, nnz)):
            if int(p[0]) != 0 or int(p[-1]) != end:
                raise ValueError(f"sliced-ELL {name} must start at 0 and end at {end}, got {int(p[0])} and {int(p[-1])}")
            if bool((p[1:] < p[:-1]).any()):
                raise ValueError(f"sliced-ELL {name} decreases at entry {int(torch.nonzero(p[1:] < p[:-1])[0])}")
        # The mask bits are decoded once: they give the per-slice counts here and the coordinates below.
        slice_block, lane = _ref.sell_entry_lanes(ptr, masks)
        per_slice = torch.bincount(slice_block // blocks, minlength=slices)
        if not torch.equal(per_slice, (slice_ptr[1:] - slice_ptr[:-1]).to(torch.int64)):
            bad = int(torch.nonzero(per_slice != (slice_ptr[1:] - slice_ptr[:-1]))[0])
            raise ValueError(f"sliced-ELL slice {bad}: its step masks mark {int(per_slice[bad])} entries but "
                             f"slice_ptr gives it {int(slice_ptr[bad + 1] - slice_ptr[bad])}")
        if nnz == 0:
            return
        if bool((self.col_offsets >= SELL_BLOCK).any()):
            pos = int(torch.nonzero(self.col_offsets >= SELL_BLOCK)[0])
            raise ValueError(f"sliced-ELL column offset {int(self.col_offsets[pos])} at entry {pos} is not below "
                             f"the block width {SELL_BLOCK}")
        rows, columns = _ref.sell_lane_coordinates(slice_block, lane, self.col_offsets, blocks)
        for what, index, limit in (("row", rows, n), ("column", columns, k)):
            if bool((index >= limit).any()):
                pos = int(torch.nonzero(index >= limit)[0])
                raise ValueError(f"sliced-ELL entry {pos} lands in {what} {int(index[pos])}, beyond "
                                 f"{'out' if what == 'row' else 'in'}_features={limit}")
        flat = torch.sort(rows * k + columns).values
        if bool((flat[1:] == flat[:-1]).any()):
            pos = int(torch.nonzero(flat[1:] == flat[:-1])[0])
            raise ValueError(f"sliced-ELL stores row {int(flat[pos]) // k}, column {int(flat[pos]) % k} twice")

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (rows, columns) of every entry, in storage order."""
        return _ref.sell_entry_coordinates(self.block_step_ptr, self.step_masks, self.col_offsets, self.blocks)

    def unpack(self) -> torch.Tensor:
        """Dense float32 [N, K]: the dequantized masked weight."""
        rows, columns = self.coordinates()
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.values.device)
        dense[rows, columns] = _dequantize(self.values, self.scale, rows)
        return dense

    @property
    def nbytes(self) -> int:
        return _nbytes(self.block_step_ptr, self.step_masks, self.slice_ptr, self.col_offsets, self.values, self.scale)


def detect_pattern(weight: torch.Tensor,
                   blocks: tuple[tuple[int, int], ...] = BLOCK_CANDIDATES) -> dict:
    """Describe a weight's zeros for choosing a sparse format.

    Returns {"shape", "nnz", "sparsity" (fraction of zeros), "is_2_4", "blocks"}, where "blocks"
    lists every candidate block shape as {"block", "stored_blocks", "fill"}, best first: fill is
    nonzeros / entries stored by a BSR of that block shape (padding included; 0.0 when nothing
    is stored), ties broken toward larger blocks.
    """
    _check_weight(weight)
    n, k = weight.shape
    nonzero = weight.detach() != 0
    nnz = int(nonzero.sum())
    groups = -(-k // 4)
    is_2_4 = bool((_padded(nonzero, n, groups * 4).view(n, groups, 4).sum(dim=2) <= 2).all())
    candidates = []
    for block in blocks:
        bh, bw = BlockSparseWeight._check_block(block)
        nb, kb = -(-n // bh), -(-k // bw)
        stored = int(_padded(nonzero, nb * bh, kb * bw).view(nb, bh, kb, bw).any(dim=3).any(dim=1).sum())
        candidates.append({"block": (bh, bw), "stored_blocks": stored,
                           "fill": nnz / (stored * bh * bw) if stored else 0.0})
    candidates.sort(key=lambda c: (-c["fill"], -c["block"][0] * c["block"][1]))
    return {"shape": (n, k), "nnz": nnz, "sparsity": 1.0 - nnz / weight.numel() if weight.numel() else 0.0,
            "is_2_4": is_2_4, "blocks": candidates}
