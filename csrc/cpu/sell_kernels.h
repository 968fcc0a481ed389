#pragma once
// Raw-pointer interface of the sliced-ELL W8A8 CPU kernels, shared by the op file
// (sparse_sell_int8_linear.cpp, which includes torch) and its AVX-512 and AVX2 files (which must
// not; see int8_kernels.h). Layout: sparseq/sparse_formats.h.
#include <cstdint>

#include "int8_kernels.h"
#include "sparseq/sparse_formats.h"

namespace sparseq::cpu {

// acc[m, n] = sum over row n's entries e of (xu[m, 64 b + col_offsets[e]] - act_offset) * values[e],
// then out = float(acc) * (x_scale[m] * w_scale[n]) + bias[n] in out_type.
struct SellInt8Problem {
  const uint8_t* xu = nullptr;  // [m, ldx] offset-form activations q + act_offset; ldx >= 64 * blocks
  const uint8_t* xd = nullptr;  // AVX2 kernel only: xu's quarters XORed (sell_xor_quarters_avx2)
  int64_t ldx = 0;
  int32_t act_offset = 0;
  const int32_t* block_step_ptr = nullptr;  // [slices * blocks + 1]; ends checked by the op, the rest here
  const uint64_t* step_masks = nullptr;     // [steps]
  int64_t steps = 0;
  const int32_t* slice_ptr = nullptr;  // [slices + 1]; ends checked by the op
  const uint8_t* col_offsets = nullptr;
  const int8_t* values = nullptr;
  int64_t nnz = 0;
  int64_t blocks = 0;
  int64_t k = 0;
  int64_t m = 0;
  int64_t n = 0;
  const float* x_scale = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;  // may be nullptr
  void* c_out = nullptr;        // [m, ldc] of out_type
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
};

// Checks that slice s's block pointers ascend inside [0, steps], and gives its entries
// [*e_begin, *e_end), checked to lie inside [0, nnz].
inline bool sell_slice_ranges(const SellInt8Problem& p, int64_t s, int64_t* e_begin, int64_t* e_end) {
  const int32_t* ptr = p.block_step_ptr + s * p.blocks;
  if (ptr[0] < 0 || ptr[p.blocks] > p.steps) return false;
  for (int64_t b = 0; b < p.blocks; ++b)
    if (ptr[b + 1] < ptr[b]) return false;
  *e_begin = p.slice_ptr[s];
  *e_end = p.slice_ptr[s + 1];
  return 0 <= *e_begin && *e_begin <= *e_end && *e_end <= p.nnz;
}

// Mask bits of the lanes of slice s that belong to rows past n: a valid weight sets none.
inline uint64_t sell_foreign_lanes(const SellInt8Problem& p, int64_t s) {
  const int64_t rows = p.n - s * kSellSlice;
  return rows >= kSellSlice ? 0 : ~uint64_t{0} << (4 * rows);
}

// Columns of block b that exist (64, or fewer in the last block): offsets must stay below this.
inline int64_t sell_block_width(const SellInt8Problem& p, int64_t b) {
  return p.k - b * kSellBlock < kSellBlock ? p.k - b * kSellBlock : kSellBlock;
}

// Output rows [m_begin, m_end) of slices [s_begin, s_end). Returns false when the weight is
// inconsistent there (outputs then unspecified; nothing is read out of bounds).
bool sell_int8_slices_avx512(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin,
                             int64_t s_end);
// The same on AVX2; reads p.xd, not p.xu.
bool sell_int8_slices_avx2(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin,
                           int64_t s_end);
// xd [m, ldx] from xu: in every 64-byte block, quarter 0 as is and quarter q (16 bytes) XOR
// quarter q - 1, the tables of the AVX2 kernel's lookup.
void sell_xor_quarters_avx2(const uint8_t* xu, int64_t m, int64_t ldx, uint8_t* xd);

}  // namespace sparseq::cpu
