#pragma once
// AVX2 helpers shared by the sparse kernels (sparse_csr_linear_avx2.cpp, sparse24_linear_avx2.cpp):
// widening stored values to fp32, the tile kernels' FMA step, and the epilogue that turns a block
// of results (8 output rows x up to 16 activation rows) into stores along x's rows.
#include "avx2_common.h"
#include "sparse_kernels.h"

namespace sparseq::cpu::avx2 {

// Exactly 8 stored values from index e, widened to fp32 (int8 codes unscaled).
SPARSEQ_AVX2 inline __m256 load8_values(const void* values, ValueType t, int64_t e) {
  if (t == ValueType::kInt8) {
    __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + e));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
  }
  return load8_as_float(values, static_cast<OutType>(t), e);
}

SPARSEQ_AVX2 inline float value_as_float(const void* values, ValueType t, int64_t e) {
  if (t == ValueType::kInt8) return static_cast<float>(static_cast<const int8_t*>(values)[e]);
  return load1_as_float(values, static_cast<OutType>(t), e);
}

// dst[i] = values[begin + i] as fp32, i < count; reads nothing past begin + count.
SPARSEQ_AVX2 inline void widen_values(const void* values, ValueType t, int64_t begin, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8_values(values, t, begin + i));
  for (; i < count; ++i) dst[i] = value_as_float(values, t, begin + i);
}

// The first `count` (0..8) values from index e, widened, zeros after them; reads only those.
SPARSEQ_AVX2 inline __m256 load_values_tail(const void* values, ValueType t, int64_t e, int count) {
  alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  widen_values(values, t, e, count, tail);
  return _mm256_load_ps(tail);
}

SPARSEQ_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Results of up to 8 consecutive output rows n0.. for up to kTileWidthXXLarge activation rows m0..:
// block[j][i] = acc of (m0 + i, n0 + j). Stored transposed, 8 outputs of one x row at a time.
struct ResultBlock {
  alignas(32) float acc[8][kTileWidthXXLarge];
};

SPARSEQ_AVX2 inline void store_result_block(const SparseEpilogue& ep, const ResultBlock& block, int64_t n0,
                                            int n_count, int64_t m0, int64_t m_count) {
  const __m256i mask = first_lanes_mask(n_count);
  const __m256 scale = ep.w_scale != nullptr ? _mm256_maskload_ps(ep.w_scale + n0, mask) : _mm256_set1_ps(1.0f);
  const __m256 bias = ep.bias != nullptr ? _mm256_maskload_ps(ep.bias + n0, mask) : _mm256_setzero_ps();
  const int64_t out_bytes = ep.out_type == OutType::kFloat32 ? 4 : 2;
  // 8 x 8 transposes rather than a vgatherdps per x row (microcoded and slow on AMD cores).
  for (int64_t i0 = 0; i0 < m_count; i0 += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = j < n_count ? _mm256_load_ps(&block.acc[j][i0]) : _mm256_setzero_ps();
    transpose8x8(r);
    const int64_t rows = m_count - i0 < 8 ? m_count - i0 : 8;
    for (int64_t q = 0; q < rows; ++q) {
      __m256 out = r[q];
      if (ep.w_scale != nullptr) out = _mm256_mul_ps(out, scale);
      if (ep.bias != nullptr) out = _mm256_add_ps(out, bias);
      char* row = static_cast<char*>(ep.out) + (m0 + i0 + q) * ep.ldc * out_bytes;
      store8_float_as(row, ep.out_type, n0, out, n_count);
    }
  }
}

// Accumulators of one output row against one x tile: kSets independent sets (the FMA chains of
// consecutive nonzeros interleave, hiding FMA latency) of kVectors ymm (tile width 8 * kVectors).
template <int kVectors, int kSetCount>
struct TileAccumulators {
  static constexpr int kSets = kSetCount;
  static constexpr bool kOwnExpansion = false;  // the walks expand columns with avx2::expand_columns
  __m256 v[kSets][kVectors];

  SPARSEQ_AVX2 void zero() {
    for (int s = 0; s < kSets; ++s)
      for (int t = 0; t < kVectors; ++t) v[s][t] = _mm256_setzero_ps();
  }
  // acc[set] += value * x_tiles row (x_row points at that row of the tile).
  SPARSEQ_AVX2 void fma(int set, const float* value, const float* x_row) {
    const __m256 w = _mm256_broadcast_ss(value);
    for (int t = 0; t < kVectors; ++t) v[set][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x_row + 8 * t), v[set][t]);
  }
  // Sums the sets into `out` (tile width floats).
  SPARSEQ_AVX2 void reduce_to(float* out) const { add_to(out, true); }
  // out = (first ? 0 : out) + the sets' sum: continues the partial sums of earlier K blocks.
  SPARSEQ_AVX2 void add_to(float* out, bool first) const {
    for (int t = 0; t < kVectors; ++t) {
      __m256 sum = first ? v[0][t] : _mm256_add_ps(_mm256_loadu_ps(out + 8 * t), v[0][t]);
      for (int s = 1; s < kSets; ++s) sum = _mm256_add_ps(sum, v[s][t]);
      _mm256_storeu_ps(out + 8 * t, sum);
    }
  }
};

// Runs row_kernel(n, acc_out) for every output row of [n_begin, n_end) in blocks of 8 and stores
// the blocks; row_kernel writes the row's tile results (width floats) and returns false on a
// malformed layout (then this returns false at once).
template <typename RowKernel>
SPARSEQ_AVX2 inline bool for_row_blocks(const SparseEpilogue& ep, int64_t n_begin, int64_t n_end, int64_t m0,
                                        int64_t m_count, const RowKernel& row_kernel) {
  ResultBlock block;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 8) {
    const int count = static_cast<int>(n_end - n0 < 8 ? n_end - n0 : 8);
    for (int j = 0; j < count; ++j)
      if (!row_kernel(n0 + j, block.acc[j])) return false;
    store_result_block(ep, block, n0, count, m0, m_count);
  }
  return true;
}

// Rows a tile kernel prefetches ahead: its K-block walk jumps from row to row, which the hardware
// prefetchers (they stop at 4 KiB pages) do not follow.
constexpr int64_t kPrefetchRows = 4;

// Always inlined: GCC 12 drops the prefetches of a plain inline helper called from an
// always_inline walk (sparse_tile_walks.h); forced inline they stay.
inline __attribute__((always_inline)) void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// The tile kernels walk K in blocks (whose part of the x tile stays in L1 or L2) over all their
// output rows, keeping each row's partial sums in `partial` [rows][width]; this stores them
// through the epilogue at the end.

SPARSEQ_AVX2 inline void store_partials(const SparseEpilogue& ep, const float* partial, int64_t width,
                                        int64_t n_begin, int64_t n_end, int64_t m0, int64_t m_count) {
  for_row_blocks(ep, n_begin, n_end, m0, m_count, [&](int64_t n, float* result) {
    for (int64_t i = 0; i < width; ++i) result[i] = partial[(n - n_begin) * width + i];
    return true;
  });
}

}  // namespace sparseq::cpu::avx2
