// AVX2 kernels of sparse_csr_linear (segmented CSR, uint8 column offsets; layout in
// sparseq/sparse_formats.h). Decode (one x row): a row's absolute columns are expanded once,
// then 8 nonzeros at a time gather x and FMA with the widened values. Tiles (many x rows): every
// nonzero is one broadcast + FMAs against the x_tiles row of its column, which lies inside the
// current 256-column segment (256 x 64 bytes of a 16-wide tile: L1/L2 resident).
#include "sparse_avx2.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// Checks the segment pointers of row n (0 <= start <= ... <= end <= nnz, at most 256 entries per
// segment) before anything is read through them.
inline bool row_segments_valid(const CsrProblem& p, int64_t n) {
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  if (ptr[0] < 0) return false;
  for (int64_t s = 0; s < p.segments; ++s) {
    const int64_t count = static_cast<int64_t>(ptr[s + 1]) - ptr[s];
    if (count < 0 || count > kMaxSegmentEntries || ptr[s + 1] > p.nnz) return false;
  }
  return true;
}

// 8 column offsets from index e, zero extended to int32; reads nothing past nnz.
SPARSEQ_AVX2 inline __m256i load8_offsets(const CsrProblem& p, int64_t e) {
  if (e + 8 <= p.nnz) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.col_offsets + e)));
  }
  alignas(16) uint8_t tail[16] = {};
  for (int64_t i = 0; e + i < p.nnz; ++i) tail[i] = p.col_offsets[e + i];
  return _mm256_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}

// Writes row n's absolute columns to columns[0 .. count) (8-wide stores may write up to 7 past)
// and returns count.
SPARSEQ_AVX2 inline int64_t expand_row_columns(const CsrProblem& p, int64_t n, int32_t* columns) {
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t start = ptr[0];
  for (int64_t s = 0; s < p.segments; ++s) {
    const __m256i base = _mm256_set1_epi32(static_cast<int32_t>(s * kCsrSegment));
    for (int64_t e = ptr[s]; e < ptr[s + 1]; e += 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(columns + (e - start)),
                          _mm256_add_epi32(load8_offsets(p, e), base));
    }
  }
  return ptr[p.segments] - start;
}

bool csr_decode_row(const CsrProblem& p, int64_t n, int32_t* columns, float* result) SPARSEQ_AVX2;
bool csr_decode_row(const CsrProblem& p, int64_t n, int32_t* columns, float* result) {
  if (!row_segments_valid(p, n)) return false;
  const int64_t count = expand_row_columns(p, n, columns);
  const int64_t start = p.seg_ptr[n * p.segments];
  const float* x = p.x.x_rows;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i idx0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + i));
    const __m256i idx1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + i + 8));
    acc0 = _mm256_fmadd_ps(load8_values(p.values, p.value_type, start + i), _mm256_i32gather_ps(x, idx0, 4), acc0);
    acc1 = _mm256_fmadd_ps(load8_values(p.values, p.value_type, start + i + 8), _mm256_i32gather_ps(x, idx1, 4),
                           acc1);
  }
  for (; i < count; i += 8) {
    const int lanes = static_cast<int>(count - i < 8 ? count - i : 8);
    const __m256i mask = first_lanes_mask(lanes);
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + i));
    const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, idx, _mm256_castsi256_ps(mask), 4);
    const __m256 w = lanes == 8 ? load8_values(p.values, p.value_type, start + i)
                                : load_values_tail(p.values, p.value_type, start + i, lanes);
    acc0 = _mm256_fmadd_ps(w, xv, acc0);
  }
  result[0] = horizontal_sum(_mm256_add_ps(acc0, acc1));
  return true;
}

// One output row against one tile: acc over the row's segments, reduced into result.
template <int kVectors>
bool csr_tile_row(const CsrProblem& p, const float* tile, int64_t n, float* values_f32, float* result) SPARSEQ_AVX2;
template <int kVectors>
bool csr_tile_row(const CsrProblem& p, const float* tile, int64_t n, float* values_f32, float* result) {
  constexpr int kWidth = 8 * kVectors;
  constexpr int kSets = 4;
  if (!row_segments_valid(p, n)) return false;
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t start = ptr[0];
  const float* values = static_cast<const float*>(p.values) + start;
  if (p.value_type != ValueType::kFloat32) {
    widen_values(p.values, p.value_type, start, ptr[p.segments] - start, values_f32);
    values = values_f32;
  }
  TileAccumulators<kVectors, kSets> acc;
  acc.zero();
  for (int64_t s = 0; s < p.segments; ++s) {
    const float* segment = tile + s * kCsrSegment * kWidth;
    const uint8_t* offsets = p.col_offsets + ptr[s];
    const float* w = values + (ptr[s] - start);
    const int64_t count = ptr[s + 1] - ptr[s];
    int64_t e = 0;
    for (; e + kSets <= count; e += kSets)
      for (int set = 0; set < kSets; ++set) acc.fma(set, w + e + set, segment + offsets[e + set] * kWidth);
    for (; e < count; ++e) acc.fma(0, w + e, segment + offsets[e] * kWidth);
  }
  acc.reduce_to(result);
  return true;
}

template <int kVectors>
bool csr_tile_rows(const CsrProblem& p, int64_t m0, int64_t n_begin, int64_t n_end, float* values_f32) SPARSEQ_AVX2;
template <int kVectors>
bool csr_tile_rows(const CsrProblem& p, int64_t m0, int64_t n_begin, int64_t n_end, float* values_f32) {
  const float* tile = p.x.x_tiles + m0 * p.x.k_pad;
  const int64_t m_count = p.x.m - m0 < 8 * kVectors ? p.x.m - m0 : 8 * kVectors;
  return for_row_blocks(p.epilogue, n_begin, n_end, m0, m_count, [&](int64_t n, float* result) SPARSEQ_AVX2 {
    return csr_tile_row<kVectors>(p, tile, n, values_f32, result);
  });
}

}  // namespace

bool csr_decode_rows_avx2(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns) {
  return for_row_blocks(p.epilogue, n_begin, n_end, 0, 1, [&](int64_t n, float* result) SPARSEQ_AVX2 {
    return csr_decode_row(p, n, columns, result);
  });
}

bool csr_tile_rows_avx2(const CsrProblem& p, int64_t m0, int64_t width, int64_t n_begin, int64_t n_end,
                        float* values_f32) {
  return width == kTileWidthLarge ? csr_tile_rows<2>(p, m0, n_begin, n_end, values_f32)
                                  : csr_tile_rows<1>(p, m0, n_begin, n_end, values_f32);
}

}  // namespace sparseq::cpu
