// AVX2 kernels of sparse24_linear (2:4 values + 2-bit positions; layout in
// sparseq/sparse_formats.h). Decode (few x rows): 4 groups = 8 stored values per step; their 8
// positions are the 16 bits of two meta bytes in lane order, so one variable shift turns them into
// vpermps indices that pick the 8 x entries from the group's 16 contiguous columns. Tiles (many x
// rows): the same engine as CSR, each stored value one broadcast + FMAs against its x_tiles row.
#include <algorithm>

#include "sparse_tile_walks.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// 8 stored values of 4 groups and the x entries they meet: lane j holds group j/2's position
// j%2, i.e. bits 2j..2j+1 of the 16 meta bits; even groups sit in x's first 8 columns, odd ones
// in the next 8.
SPARSEQ_AVX2 inline __m256i positions_of(uint32_t meta16) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i group_column = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(meta16)), shifts),
                                       _mm256_set1_epi32(3));
  return _mm256_add_epi32(pos, group_column);
}

SPARSEQ_AVX2 inline __m256 pick_x(const float* x16, __m256i positions) {
  const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x16), positions);
  const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x16 + 8), positions);
  return _mm256_blend_ps(low, high, 0xF0);
}

template <int kRows>
SPARSEQ_AVX2 void sparse24_decode_row(const Sparse24Problem& p, int64_t n, float* result) {
  const int64_t groups = p.groups, meta_bytes = (groups + 1) / 2;
  const uint8_t* meta = p.meta + n * meta_bytes;
  const int64_t value_base = n * 2 * groups;
  const int64_t k_pad = p.x.k_pad;
  // Two chains per x row hide the FMA latency (one row has one FMA per 8 values otherwise).
  __m256 acc[kRows], acc_odd[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = acc_odd[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256i positions = positions_of(meta[g / 2] | static_cast<uint32_t>(meta[g / 2 + 1]) << 8);
    const __m256i positions_odd = positions_of(meta[g / 2 + 2] | static_cast<uint32_t>(meta[g / 2 + 3]) << 8);
    const __m256 w = load8_values(p.values, p.value_type, value_base + 2 * g);
    const __m256 w_odd = load8_values(p.values, p.value_type, value_base + 2 * g + 8);
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(w, pick_x(p.x.x_rows + r * k_pad + 4 * g, positions), acc[r]);
      acc_odd[r] = _mm256_fmadd_ps(w_odd, pick_x(p.x.x_rows + r * k_pad + 4 * g + 16, positions_odd), acc_odd[r]);
    }
  }
  if (g + 4 <= groups) {
    const __m256i positions = positions_of(meta[g / 2] | static_cast<uint32_t>(meta[g / 2 + 1]) << 8);
    const __m256 w = load8_values(p.values, p.value_type, value_base + 2 * g);
    for (int r = 0; r < kRows; ++r)
      acc[r] = _mm256_fmadd_ps(w, pick_x(p.x.x_rows + r * k_pad + 4 * g, positions), acc[r]);
    g += 4;
  }
  if (g < groups) {
    // 1..3 groups left: their meta bytes and values only; x is zero padded to whole 16 columns.
    const int left = static_cast<int>(groups - g);
    uint32_t meta16 = meta[g / 2];
    if (left == 3) meta16 |= static_cast<uint32_t>(meta[g / 2 + 1]) << 8;
    const __m256i positions = positions_of(meta16);
    const __m256 w = load_values_tail(p.values, p.value_type, value_base + 2 * g, 2 * left);
    for (int r = 0; r < kRows; ++r)
      acc[r] = _mm256_fmadd_ps(w, pick_x(p.x.x_rows + r * k_pad + 4 * g, positions), acc[r]);
  }
  for (int r = 0; r < kRows; ++r) result[r] = horizontal_sum(_mm256_add_ps(acc[r], acc_odd[r]));
}

template <int kRows>
SPARSEQ_AVX2 void sparse24_decode_rows(const Sparse24Problem& p, int64_t n_begin, int64_t n_end) {
  for_row_blocks(p.epilogue, n_begin, n_end, 0, kRows, [&](int64_t n, float* result) SPARSEQ_AVX2 {
    sparse24_decode_row<kRows>(p, n, result);
    return true;
  });
}

// Tile rows through the shared walk, in K blocks of 16 KiB of the tile (L1 of the Zen 3 cores).
template <int kVectors>
SPARSEQ_AVX2 void sparse24_tile_rows(const Sparse24Problem& p, int64_t m0, int64_t n_begin, int64_t n_end,
                                     float* partial, float* values_f32) {
  constexpr int kWidth = 8 * kVectors;
  constexpr int64_t kBlockGroups = 16 * 1024 / (4 * kWidth * sizeof(float));
  static_assert(2 * kBlockGroups <= kTileValueScratch, "a block's widened values must fit values_f32");
  static_assert(kBlockGroups % 2 == 0, "a block must start on a meta byte (2 groups)");
  using Accumulators = TileAccumulators<kVectors, kVectors == 4 ? 2 : 4>;  // 8 independent FMA chains
  sparse24_tile_walk<kWidth, Accumulators>(p, m0, n_begin, n_end, kBlockGroups, partial, values_f32);
}

}  // namespace

void sparse24_decode_rows_avx2(const Sparse24Problem& p, int64_t n_begin, int64_t n_end) {
  switch (p.x.m) {
    case 1: return sparse24_decode_rows<1>(p, n_begin, n_end);
    case 2: return sparse24_decode_rows<2>(p, n_begin, n_end);
    case 3: return sparse24_decode_rows<3>(p, n_begin, n_end);
    default: return sparse24_decode_rows<4>(p, n_begin, n_end);
  }
}

void sparse24_tile_rows_avx2(const Sparse24Problem& p, int64_t m0, int64_t width, int64_t n_begin,
                             int64_t n_end, float* partial, float* values_f32) {
  switch (width) {
    case kTileWidthLarge: return sparse24_tile_rows<4>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthMedium: return sparse24_tile_rows<2>(p, m0, n_begin, n_end, partial, values_f32);
    default: return sparse24_tile_rows<1>(p, m0, n_begin, n_end, partial, values_f32);
  }
}

}  // namespace sparseq::cpu
