// AVX2 kernels of sparse_csr_linear (segmented CSR, uint8 column offsets; layout in
// sparseq/sparse_formats.h). Both first expand a row's (or row block's) absolute columns once.
// Decode (one x row): 8 nonzeros per vector FMA, the x entries fetched by scalar loads (see
// load8_at). Tiles (many x rows): every nonzero is one broadcast + FMAs against the x_tiles row of
// its column; 90%-sparse rows run whole, denser ones in K blocks of 4 segments over a row chunk.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "sparse_tile_walks.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// x[columns[0..8)] as one vector, from scalar loads merged with vinsertps: vgatherdps is
// microcoded and several times slower on the AMD cores this was tuned on, and one vector FMA per 8
// nonzeros leaves the load ports to x (a scalar FMA per nonzero needs 3 loads each). Two columns
// come from one 64-bit load.
SPARSEQ_AVX2 inline __m256 load8_at(const float* x, const int32_t* columns) {
  uint64_t p0, p1, p2, p3;
  std::memcpy(&p0, columns, 8);
  std::memcpy(&p1, columns + 2, 8);
  std::memcpy(&p2, columns + 4, 8);
  std::memcpy(&p3, columns + 6, 8);
  const uint64_t pair[4] = {p0, p1, p2, p3};
  auto at = [&](int j) SPARSEQ_AVX2 {
    return _mm_load_ss(x + static_cast<uint32_t>(j % 2 ? pair[j / 2] >> 32 : pair[j / 2]));
  };
  __m128 low = at(0), high = at(4);
  low = _mm_insert_ps(low, at(1), 0x10);
  high = _mm_insert_ps(high, at(5), 0x10);
  low = _mm_insert_ps(low, at(2), 0x20);
  high = _mm_insert_ps(high, at(6), 0x20);
  low = _mm_insert_ps(low, at(3), 0x30);
  high = _mm_insert_ps(high, at(7), 0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
}

// One x row (16 KiB at K=4096, in L1). Values are widened in the loop (kValues fixed per call).
template <ValueType kValues>
SPARSEQ_AVX2 bool csr_decode_row(const CsrProblem& p, int64_t n, int32_t* columns, float* result) {
  if (!row_segments_valid(p, n)) return false;
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t start = ptr[0], count = ptr[p.segments] - start;
  expand_columns(p, n, 0, p.segments, columns);
  const float* x = p.x.x_rows;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    prefetch_stream(p, start + e);
    acc0 = _mm256_fmadd_ps(load8_values(p.values, kValues, start + e), load8_at(x, columns + e), acc0);
    acc1 = _mm256_fmadd_ps(load8_values(p.values, kValues, start + e + 8), load8_at(x, columns + e + 8), acc1);
  }
  if (e + 8 <= count) {
    acc0 = _mm256_fmadd_ps(load8_values(p.values, kValues, start + e), load8_at(x, columns + e), acc0);
    e += 8;
  }
  float tail = 0.0f;
  for (; e < count; ++e) tail = std::fma(value_as_float(p.values, kValues, start + e), x[columns[e]], tail);
  result[0] = horizontal_sum(_mm256_add_ps(acc0, acc1)) + tail;
  return true;
}

template <ValueType kValues>
SPARSEQ_AVX2 bool csr_decode_rows(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns) {
  return for_row_blocks(p.epilogue, n_begin, n_end, 0, 1, [&](int64_t n, float* result) SPARSEQ_AVX2 {
    return csr_decode_row<kValues>(p, n, columns, result);
  });
}

// Tile rows, K block by K block across all rows (see store_partials).
template <int kVectors>
SPARSEQ_AVX2 bool csr_tile_rows(const CsrProblem& p, int64_t m0, int64_t n_begin, int64_t n_end, float* partial,
                                int32_t* columns, float* values_f32) {
  constexpr int kWidth = 8 * kVectors;
  using Accumulators = TileAccumulators<kVectors, kVectors == 4 ? 2 : 4>;  // 8 independent FMA chains
  for (int64_t n = n_begin; n < n_end; ++n)
    if (!row_segments_valid(p, n)) return false;
  const float* tile = p.x.x_tiles + m0 * p.x.k_pad;
  const int64_t block_segments = csr_block_segments(p);
  for (int64_t s0 = 0; s0 < p.segments; s0 += block_segments) {
    const int64_t s1 = std::min(p.segments, s0 + block_segments);
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (s1 - s0 < p.segments && n + kPrefetchRows < n_end) prefetch_row_entries(p, n + kPrefetchRows, s0, s1);
      Accumulators acc;
      acc.zero();
      csr_row_walk<kWidth, kVectors == 4>(p, n, s0, s1, tile, columns, values_f32, acc);
      acc.add_to(partial + (n - n_begin) * kWidth, s0 == 0);
    }
  }
  store_partials(p.epilogue, partial, kWidth, n_begin, n_end, m0, std::min<int64_t>(p.x.m - m0, kWidth));
  return true;
}

}  // namespace

bool csr_decode_rows_avx2(const CsrProblem& p, int64_t n_begin, int64_t n_end, int32_t* columns) {
  switch (p.value_type) {
    case ValueType::kBFloat16: return csr_decode_rows<ValueType::kBFloat16>(p, n_begin, n_end, columns);
    case ValueType::kFloat16: return csr_decode_rows<ValueType::kFloat16>(p, n_begin, n_end, columns);
    case ValueType::kInt8: return csr_decode_rows<ValueType::kInt8>(p, n_begin, n_end, columns);
    default: return csr_decode_rows<ValueType::kFloat32>(p, n_begin, n_end, columns);
  }
}

bool csr_tile_rows_avx2(const CsrProblem& p, int64_t m0, int64_t width, int64_t n_begin, int64_t n_end,
                        float* partial, int32_t* columns, float* values_f32) {
  switch (width) {
    case kTileWidthLarge: return csr_tile_rows<4>(p, m0, n_begin, n_end, partial, columns, values_f32);
    case kTileWidthMedium: return csr_tile_rows<2>(p, m0, n_begin, n_end, partial, columns, values_f32);
    default: return csr_tile_rows<1>(p, m0, n_begin, n_end, partial, columns, values_f32);
  }
}

}  // namespace sparseq::cpu
