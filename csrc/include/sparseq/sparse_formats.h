#pragma once
// The sparse weight layouts every sparse kernel reads (CPU, CUDA, Triton); sparseq/formats.py
// builds them and documents them at length. W is [N, K]; values are float32 / bfloat16 / float16,
// or int8 codes with a per-output-channel w_scale float32 [N] (W = code * w_scale[n]).
//
// SparseCSR:   S = ceil(K / 256) segments per row (at least 1); segment (n, s) holds the entries
//              of row n in columns [256 s, 256 s + 256): [seg_ptr[n S + s], seg_ptr[n S + s + 1]).
//              seg_ptr int32 [N S + 1]; col_offsets uint8 [nnz] = column - 256 s; values [nnz].
//              Why segments: a 1-byte column offset halves the index bytes of int16 indices, and
//              a segment is the K-block a kernel keeps in cache.
// Sparse24:    at most 2 nonzeros per group of 4 columns; Kp = ceil(K/4)*4, G = Kp/4 groups.
//              values [N, Kp/2] (values[n, 2g+j] = W[n, 4g + idx_j]), meta uint8 [N, ceil(G/2)]:
//              nibble idx_0 | idx_1 << 2 (idx_0 < idx_1), low nibble = even group.
// BlockSparse: blocks (bh, bw); NB = ceil(N/bh) block rows, KB = ceil(K/bw) block columns;
//              block_row_ptr int32 [NB + 1], block_col_idx int32 [nnz_blocks] (ascending within a
//              block row), values [nnz_blocks, bh, bw]; padding rows/columns hold zeros.
// SlicedEll:   int8 only. Slices of 16 rows, blocks of 64 columns (B = ceil(K / 64), at least 1);
//              slice s, block b holds steps [block_step_ptr[s B + b], block_step_ptr[s B + b + 1]).
//              A step is 64 byte lanes, lanes 4r..4r+3 for the slice's row r; step_masks int64
//              [steps] marks the lanes in use, and its entries are the next popcount(mask) of
//              col_offsets uint8 (column - 64 b) and values int8, in lane order. slice_ptr int32
//              [slices + 1] gives each slice's first entry. Why: a whole step is one byte
//              permute of a 64-byte row of x (no gather) and one vpdpbusd into 16 row sums.
#include <cstdint>

namespace sparseq {

constexpr int64_t kCsrSegment = 256;

inline int64_t csr_segments(int64_t k) { return k <= 0 ? 1 : (k + kCsrSegment - 1) / kCsrSegment; }
inline int64_t sparse24_groups(int64_t k) { return (k + 3) / 4; }

constexpr int64_t kSellSlice = 16;
constexpr int64_t kSellBlock = 64;
inline int64_t sell_blocks(int64_t k) { return k <= 0 ? 1 : (k + kSellBlock - 1) / kSellBlock; }
inline int64_t sell_slices(int64_t n) { return (n + kSellSlice - 1) / kSellSlice; }

}  // namespace sparseq
