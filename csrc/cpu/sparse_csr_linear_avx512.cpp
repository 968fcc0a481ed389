// AVX-512 kernels of sparse_csr_linear (layout in sparseq/sparse_formats.h), for the CPUs that
// have it; same contracts as the AVX2 ones (sparse_kernels.h), which they share the row checks and
// column expansion with. Decode (one x row): 16 nonzeros per FMA, their x entries fetched by one
// vgatherdps (fast on the Intel cores that have AVX-512, unlike the AMD ones the AVX2 kernel
// avoids it on; 1.1-1.2x the AVX2 kernel). Tiles: one FMA per zmm per nonzero, the weight
// broadcast from memory, and tiles up to 128 x rows wide so that a 128-row batch streams the
// weight once.
#include <algorithm>

#include "avx512_common.h"
#include "sparse_tile_walks.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;
using namespace avx512;

template <ValueType kValues>
SPARSEQ_AVX512 bool csr_decode_row(const CsrProblem& p, int64_t n, int32_t* columns, float* result) {
  if (!row_segments_valid(p, n)) return false;
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t start = ptr[0], count = ptr[p.segments] - start;
  avx512::expand_columns(p, n, 0, p.segments, columns);
  const float* x = p.x.x_rows;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 32 <= count; e += 32) {
    prefetch_stream(p, start + e);
    prefetch_stream(p, start + e + 16);
    const __m512 x0 = _mm512_i32gather_ps(_mm512_loadu_si512(columns + e), x, 4);
    const __m512 x1 = _mm512_i32gather_ps(_mm512_loadu_si512(columns + e + 16), x, 4);
    acc0 = _mm512_fmadd_ps(load16_values(p.values, kValues, start + e), x0, acc0);
    acc1 = _mm512_fmadd_ps(load16_values(p.values, kValues, start + e + 16), x1, acc1);
  }
  for (; e < count; e += 16) {
    const __mmask16 k = first_lanes(count - e);
    const __m512 xs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, _mm512_maskz_loadu_epi32(k, columns + e), x, 4);
    acc0 = _mm512_fmadd_ps(load16_values(p.values, kValues, start + e, count - e), xs, acc0);
  }
  result[0] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  return true;
}

template <ValueType kValues>
SPARSEQ_AVX512 bool csr_decode_rows(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns) {
  return for_row_blocks(p.epilogue, n_begin, n_end, 0, 1, [&](int64_t n, float* result) SPARSEQ_AVX512 {
    return csr_decode_row<kValues>(p, n, columns, result);
  });
}

// Tile rows. 16 and 32 wide, and at 64 wide for rows sparser than 85%, each whole row at once:
// the tile (at most 1 MiB) stays in L2, and neither K blocks (16 KiB in L1 at width 16) nor
// prefetching the tile rows of nonzeros ahead ran faster here. Denser rows at 64 wide, and every
// row at 128 wide (a 2 MiB tile), walk K one 256-column segment (a 64 or 128 KiB block of the
// tile) at a time across all rows, keeping partial sums in `partial`: M=128, 70% zeros, 1.2x
// faster than whole rows at 64 wide; 90% zeros, 1.2x faster at 128 wide than two 64-wide tiles.
template <int kVectors>
SPARSEQ_AVX512 bool csr_tile_rows(const CsrProblem& p, int64_t m0, int64_t n_begin, int64_t n_end, float* partial,
                                  int32_t* columns, float* values_f32) {
  constexpr int kWidth = 16 * kVectors;
  for (int64_t n = n_begin; n < n_end; ++n)
    if (!row_segments_valid(p, n)) return false;
  const float* tile = p.x.x_tiles + m0 * p.x.k_pad;
  const int64_t m_count = std::min<int64_t>(p.x.m - m0, kWidth);
  if (kVectors == 8 || (kVectors == 4 && csr_block_segments(p) < p.segments)) {
    for (int64_t s = 0; s < p.segments; ++s)
      for (int64_t n = n_begin; n < n_end; ++n) {
        if (n + kPrefetchRows < n_end) prefetch_row_entries(p, n + kPrefetchRows, s, s + 1);
        TileAccumulators512<kVectors> acc;
        acc.zero();
        csr_row_walk<kWidth, false>(p, n, s, s + 1, tile, columns, values_f32, acc);
        acc.add_to(partial + (n - n_begin) * kWidth, s == 0);
      }
    store_partials(p.epilogue, partial, kWidth, n_begin, n_end, m0, m_count);
    return true;
  }
  return for_row_blocks(p.epilogue, n_begin, n_end, m0, m_count, [&](int64_t n, float* result) SPARSEQ_AVX512 {
    TileAccumulators512<kVectors> acc;
    acc.zero();
    csr_row_walk<kWidth, false>(p, n, 0, p.segments, tile, columns, values_f32, acc);
    acc.reduce_to(result);
    return true;
  });
}

}  // namespace

bool csr_decode_rows_avx512(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns) {
  switch (p.value_type) {
    case ValueType::kBFloat16: return csr_decode_rows<ValueType::kBFloat16>(p, n_begin, n_end, columns);
    case ValueType::kFloat16: return csr_decode_rows<ValueType::kFloat16>(p, n_begin, n_end, columns);
    case ValueType::kInt8: return csr_decode_rows<ValueType::kInt8>(p, n_begin, n_end, columns);
    default: return csr_decode_rows<ValueType::kFloat32>(p, n_begin, n_end, columns);
  }
}

bool csr_tile_rows_avx512(const CsrProblem& p, int64_t m0, int64_t width, int64_t n_begin, int64_t n_end,
                          float* partial, int32_t* columns, float* values_f32) {
  switch (width) {
    case kTileWidthXXLarge: return csr_tile_rows<8>(p, m0, n_begin, n_end, partial, columns, values_f32);
    case kTileWidthXLarge: return csr_tile_rows<4>(p, m0, n_begin, n_end, partial, columns, values_f32);
    case kTileWidthLarge: return csr_tile_rows<2>(p, m0, n_begin, n_end, partial, columns, values_f32);
    case kTileWidthMedium: return csr_tile_rows<1>(p, m0, n_begin, n_end, partial, columns, values_f32);
    default: return csr_tile_rows_avx2(p, m0, width, n_begin, n_end, partial, columns, values_f32);
  }
}

}  // namespace sparseq::cpu
