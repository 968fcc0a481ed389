#pragma once
// Raw-pointer interface of the block-sparse (BSR) and 2:4 W8A8 CPU kernels, shared by the op
// files (bsr_linear.cpp, sparse24_int8_linear.cpp, which include torch) and their AVX2 files
// (which must not; see int8_kernels.h).
#include <cstdint>

#include "int8_kernels.h"
#include "sparse_kernels.h"  // ValueType

namespace sparseq::cpu {

// out[m, n] = sum over stored blocks (i, j) of row i = n / bh of
//             sum_c x[m, j*bw + c] * values[blk, n % bh, c]   (* w_scale[n] if int8) + bias[n].
struct BsrProblem {
  const int32_t* block_row_ptr = nullptr;  // [nb + 1]; contents unchecked by the caller
  const int32_t* block_col_idx = nullptr;  // [nnzb];   contents unchecked by the caller
  int64_t nnzb = 0;
  const void* values = nullptr;  // [nnzb, bh, bw]
  ValueType value_type = ValueType::kFloat32;
  int64_t bh = 1, bw = 1;
  int64_t nb = 0;  // block rows
  int64_t kb = 0;  // block columns: a stored column index must be < kb
  int64_t n = 0;   // out_features (<= nb * bh)
  int64_t m = 0;
  // Activations as fp32, zero padded so that a whole block of columns can always be read:
  // row-major x [m, ldx] (ldx >= kb * bw), used by the few-row kernels, or transposed in tiles
  // of kBsrMTile rows, xt [ceil(m / kBsrMTile), kb * bw, kBsrMTile] (padding zeros), used by the
  // many-row kernels: a tile's activations are contiguous, so they stay in L2 while a chunk of
  // block rows passes over them.
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* xt = nullptr;
  const float* w_scale = nullptr;  // int8 values only
  const float* bias = nullptr;     // may be nullptr
  void* c_out = nullptr;           // [m, ldc] of out_type
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
};

// Rows of x below this count take the row-major (few-row) kernels, others the transposed ones.
constexpr int64_t kBsrTransposedMinRows = 8;
constexpr int64_t kBsrMTile = 16;

// Whether bsr_rows_avx2 has a row-major kernel for this block shape (else it reads xt).
bool bsr_avx2_has_row_major_kernel(int64_t bh, int64_t bw);

// The stored blocks [*begin, *end) of block row r, after checking what the kernels are about to
// read: 0 <= block_row_ptr[r] <= block_row_ptr[r + 1] <= nnzb and every column index in [0, kb).
inline bool bsr_block_row(const BsrProblem& p, int64_t r, int64_t* begin, int64_t* end) {
  const int64_t b = p.block_row_ptr[r], e = p.block_row_ptr[r + 1];
  if (b < 0 || b > e || e > p.nnzb) return false;
  for (int64_t blk = b; blk < e; ++blk)
    if (static_cast<uint32_t>(p.block_col_idx[blk]) >= static_cast<uint64_t>(p.kb)) return false;
  *begin = b;
  *end = e;
  return true;
}

// Computes all m rows of outputs for block rows [r_begin, r_end): with p.x when m is below
// kBsrTransposedMinRows and the shape has a row-major kernel, else with p.xt. Returns false if
// bsr_block_row rejects one of these block rows (their outputs are then unspecified; nothing
// is read out of bounds).
bool bsr_rows_avx2(const BsrProblem& p, int64_t r_begin, int64_t r_end);

// The 2:4 W8A8 integer dot: acc[m, n] = sum_g sum_j q[m, 4g + idx_j(n, g)] * values[n, 2g + j]
// (layout in sparse_formats.h), then the epilogue of sparse24_int8_linear:
// out = float(acc) * (x_scale[m] * w_scale[n]) + bias[n] in out_type.
struct Sparse24Int8Problem {
  const int8_t* q = nullptr;  // [m, ldq], ldq >= 4 * groups, zero padded
  int64_t ldq = 0;
  const int8_t* values = nullptr;  // [n, 2 * groups]
  const uint8_t* meta = nullptr;   // [n, (groups + 1) / 2]
  int64_t groups = 0;
  int64_t m = 0;
  int64_t n = 0;
  const float* x_scale = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  void* c_out = nullptr;
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
};

// Output rows [m_begin, m_end) x output columns [n_begin, n_end).
void sparse24_int8_tiles_avx2(const Sparse24Int8Problem& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                              int64_t n_end);

}  // namespace sparseq::cpu
