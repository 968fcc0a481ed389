#pragma once
// Raw-pointer interface of the sparse linear kernels (sparse_csr_linear, sparse24_linear), shared
// by the op files (which include torch) and the AVX2 files (which must not). Layouts: see
// sparseq/sparse_formats.h.
#include <cstdint>

#include "int8_kernels.h"
#include "sparseq/sparse_formats.h"

namespace sparseq::cpu {

// Element type of stored sparse values; kInt8 codes are scaled by w_scale[n] in the epilogue.
enum class ValueType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

inline int64_t value_bytes(ValueType t) {
  return t == ValueType::kFloat32 ? 4 : t == ValueType::kInt8 ? 1 : 2;
}

// Every kernel reads fp32 activations in one of two forms, both zero padded to k_pad columns so
// no index of a well-formed layout (uint8 offset inside its segment, 2-bit position inside its
// group) can read outside them:
//   rows:  x_rows [m, k_pad] row-major (few-row "decode" kernels: gather / permute from a row);
//   tiles: x_tiles, the transpose cut into column tiles of 8, 16 or 32 rows of x: the tile of rows
//          m0 .. m0 + width - 1 (m0 a multiple of 8) lives at x_tiles + m0 * k_pad as
//          [k_pad][width], rows past m zero. Every nonzero w[n, k] then costs one broadcast and
//          width / 8 FMAs against the contiguous x_tiles row k (the many-row kernels).
struct SparseActivations {
  const float* x_rows = nullptr;
  const float* x_tiles = nullptr;
  int64_t k_pad = 0;
  int64_t m = 0;
};

// out[m, n] = acc * w_scale[n] (int8 values only) + bias[n], stored as out_type (row stride ldc).
struct SparseEpilogue {
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
};

struct CsrProblem {
  const int32_t* seg_ptr = nullptr;  // [n * segments + 1], contents unchecked on entry
  const uint8_t* col_offsets = nullptr;
  const void* values = nullptr;
  ValueType value_type = ValueType::kFloat32;
  int64_t nnz = 0;
  int64_t n = 0;
  int64_t segments = 0;
  SparseActivations x;
  SparseEpilogue epilogue;
};

struct Sparse24Problem {
  const void* values = nullptr;  // [n, 2 * groups]
  const uint8_t* meta = nullptr;  // [n, (groups + 1) / 2]
  ValueType value_type = ValueType::kFloat32;
  int64_t n = 0;
  int64_t groups = 0;
  SparseActivations x;
  SparseEpilogue epilogue;
};

// Column padding the kernels need: CSR reads whole 256-column segments; the 2:4 decode kernel
// reads 16 columns (4 groups) at a time.
inline int64_t csr_k_pad(int64_t segments) { return segments * kCsrSegment; }
inline int64_t sparse24_k_pad(int64_t groups) { return (groups + 3) / 4 * 16; }

// A segment of a well-formed layout holds at most 256 entries (strictly increasing offsets).
constexpr int64_t kMaxSegmentEntries = 256;

// The segment walk of the column expansions (avx2:: and avx512::expand_columns): calls
// widen(out, e, first_column) for row n's segments [s0, s1), kStep entries at a time from each
// segment's first entry e, out pointing at entry e's place in columns[0 ..) (the row's entries
// from segment s0 on). Every segment takes at least one step, so one without entries costs no
// branch; a step's excess lanes are overwritten by the next segment or fall into the caller's
// spare entries. Always inlined, so that widen inlines into the caller's ISA.
template <int kStep, class Widen>
inline __attribute__((always_inline)) void for_segment_steps(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1,
                                                             int32_t* columns, const Widen& widen) {
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t start = ptr[s0];
  for (int64_t s = s0; s < s1; ++s) {
    const int32_t first_column = static_cast<int32_t>(s * kCsrSegment);
    const int64_t first = ptr[s], count = ptr[s + 1] - first;
    int32_t* out = columns + (first - start);
    int64_t i = 0;
    do {
      widen(out + i, first + i, first_column);
      i += kStep;
    } while (i < count);
  }
}

// Up to this many rows of x the decode kernels (x_rows) run; above it the tile kernels (x_tiles).
constexpr int64_t kCsrDecodeMaxRows = 1;
constexpr int64_t kSparse24DecodeMaxRows = 4;

// Tile widths (rows of x per tile) the tile kernels accept.
constexpr int64_t kTileWidthSmall = 8;
constexpr int64_t kTileWidthMedium = 16;
constexpr int64_t kTileWidthLarge = 32;
constexpr int64_t kTileWidthXLarge = 64;    // AVX-512 kernels only (see tile_width_max)
constexpr int64_t kTileWidthXXLarge = 128;  // AVX-512 kernels only

// Widest tile the AVX2 kernels take, and the AVX-512 ones: a wider tile means fewer passes over
// the weight and fewer decodes of each stored value per FMA. 64 rows x 4096 columns x 4 bytes =
// 1 MiB fits the 2 MiB L2 of the AVX-512 Xeons whole (M=128, 70% zeros: 64 wide ran 1.15x faster
// than 32 wide). 128-row tiles (2 MiB) are walked in K blocks: at M=128, 4096x4096, they ran a
// 90%-sparse CSR weight 1.15-1.2x faster than two 64-row tiles, a 2:4 one as fast, and a
// 70%-sparse one 1.1x slower, so the CSR kernel takes them only for sparse rows
// (csr_tile_width_max).
inline int64_t tile_width_max(bool avx512) { return avx512 ? kTileWidthXXLarge : kTileWidthLarge; }

// Fraction of the weight's entries stored.
inline double csr_density(const CsrProblem& p) {
  return static_cast<double>(p.nnz) / static_cast<double>(p.n * p.segments * kCsrSegment);
}

// Below this density a row touches few rows of the x tile: the CSR tile kernels walk whole rows
// up to 64 wide (csr_block_segments) and the AVX-512 one takes 128-row tiles (csr_tile_width_max);
// denser weights walk K blocks and stop at 64-row tiles.
constexpr double kCsrSparseDensity = 0.15;

inline int64_t csr_tile_width_max(const CsrProblem& p, bool avx512) {
  return avx512 && csr_density(p) >= kCsrSparseDensity ? kTileWidthXLarge : tile_width_max(avx512);
}

// Output rows [n_begin, n_end). The CSR kernels return false when they meet a malformed seg_ptr
// (negative, decreasing, past nnz, or a segment of more than 256 entries); the outputs of that
// range are then unspecified, and nothing outside the inputs was read.
// Scratch: `columns` k_pad + 32 int32 (a row's absolute columns).
bool csr_decode_rows_avx2(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns);
// Tile [m0, m0 + width), width one of kTileWidth*. Scratch: `partial` holds
// (n_end - n_begin) * width floats; `columns` as for csr_decode_rows_avx2, `values_f32` k_pad floats
// (2:4: kTileValueScratch floats).
constexpr int64_t kTileValueScratch = 256;
bool csr_tile_rows_avx2(const CsrProblem& p, int64_t m0, int64_t width, int64_t n_begin, int64_t n_end,
                        float* partial, int32_t* columns, float* values_f32);

// The x_tiles tile of rows m0 .. m0 + width - 1 (width 8, 16, 32 or 64; m0 < m) of x [m, k] (row
// stride ldx, fp32 / bf16 / fp16 as x_type), also the BSR kernels' xt tile:
// tile[c * width + i] = float(x[m0 + i, c]) for m0 + i < m and c < k, 0 for the rest of
// [k_pad][width] (k_pad >= k). Bit-exact: a widening and a transpose only.
void transpose_to_tile_avx2(const void* x, OutType x_type, int64_t ldx, int64_t m, int64_t k, int64_t m0,
                            int64_t width, int64_t k_pad, float* tile);

// The same contracts on AVX-512 (sparse_csr_linear_avx512.cpp): tile widths 16, 32 and 64 (width 8
// runs the AVX2 kernel); `partial` holds (n_end - n_begin) * width floats.
bool csr_decode_rows_avx512(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns);
bool csr_tile_rows_avx512(const CsrProblem& p, int64_t m0, int64_t width, int64_t n_begin, int64_t n_end,
                          float* partial, int32_t* columns, float* values_f32);

void sparse24_decode_rows_avx2(const Sparse24Problem& p, int64_t n_begin, int64_t n_end);
void sparse24_tile_rows_avx2(const Sparse24Problem& p, int64_t m0, int64_t width, int64_t n_begin,
                             int64_t n_end, float* partial, float* values_f32);
// Tile widths 16, 32 and 64 on AVX-512 (sparse24_linear_avx512.cpp); width 8 runs the AVX2 kernel.
void sparse24_tile_rows_avx512(const Sparse24Problem& p, int64_t m0, int64_t width, int64_t n_begin,
                               int64_t n_end, float* partial, float* values_f32);

}  // namespace sparseq::cpu
