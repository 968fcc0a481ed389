// AVX-512 tile kernel of sparse24_linear (layout in sparseq/sparse_formats.h), for the CPUs that
// have it; same contract as the AVX2 one (sparse_kernels.h), and the same walk: every stored value
// is one FMA per zmm against its x_tiles row, the weight broadcast from memory, in tiles up to 64
// x rows wide (a 128-row batch streams the weight twice instead of four times). Decode (few rows)
// stays on the AVX2 kernel.
#include <algorithm>

#include "avx512_common.h"
#include "sparse_avx2.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;
using namespace avx512;

// Tile rows, one K block at a time across all rows (see store_partials): a row reads about half of
// its block's tile rows, so the block (kBlockBytes of the tile) is sized to stay in L1 (48 KiB on
// these cores; at M=128 a 32 KiB block ran 1.05-1.1x faster than a 16 KiB one).
template <int kVectors>
SPARSEQ_AVX512 void sparse24_tile_rows(const Sparse24Problem& p, int64_t m0, int64_t n_begin, int64_t n_end,
                                       float* partial, float* values_f32) {
  constexpr int kWidth = 16 * kVectors;
  constexpr int64_t kBlockBytes = 32 * 1024;
  constexpr int64_t kBlockGroups = kBlockBytes / (4 * kWidth * sizeof(float));
  static_assert(2 * kBlockGroups <= kTileValueScratch, "a block's widened values must fit values_f32");
  using Accumulators = TileAccumulators512<kVectors>;
  constexpr int kSets = Accumulators::kSets;
  const float* tile = p.x.x_tiles + m0 * p.x.k_pad;
  const int64_t groups = p.groups, meta_bytes = (groups + 1) / 2;
  for (int64_t g0 = 0; g0 < groups; g0 += kBlockGroups) {
    const int64_t g1 = std::min(groups, g0 + kBlockGroups);
    const int64_t bytes = value_bytes(p.value_type);
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (n + kPrefetchRows < n_end) {
        const int64_t ahead = n + kPrefetchRows;
        prefetch_bytes(static_cast<const char*>(p.values) + (ahead * 2 * groups + 2 * g0) * bytes,
                       2 * (g1 - g0) * bytes);
        prefetch_bytes(p.meta + ahead * meta_bytes + g0 / 2, (g1 - g0 + 1) / 2);
      }
      const uint8_t* meta = p.meta + n * meta_bytes;
      const int64_t value_begin = n * 2 * groups + 2 * g0;
      const float* w = static_cast<const float*>(p.values) + value_begin;
      if (p.value_type != ValueType::kFloat32) {
        widen_values(p.values, p.value_type, value_begin, 2 * (g1 - g0), values_f32);
        w = values_f32;
      }
      w -= 2 * g0;  // indexed by group below
      float* row_partial = partial + (n - n_begin) * kWidth;
      Accumulators acc;
      acc.zero();
      // A meta byte covers 2 groups = 8 columns and 4 stored values, one per accumulator set.
      int64_t g = g0;
      for (; g + 2 <= g1; g += 2) {
        const uint32_t bits = meta[g / 2];
        const float* x8 = tile + 4 * g * kWidth;
        acc.fma(0, w + 2 * g, x8 + (bits & 3) * kWidth);
        acc.fma(1, w + 2 * g + 1, x8 + ((bits >> 2) & 3) * kWidth);
        acc.fma(2 % kSets, w + 2 * g + 2, x8 + (4 + ((bits >> 4) & 3)) * kWidth);
        acc.fma(3 % kSets, w + 2 * g + 3, x8 + (4 + (bits >> 6)) * kWidth);
      }
      if (g < g1) {  // the odd last group
        const uint32_t bits = meta[g / 2];
        acc.fma(0, w + 2 * g, tile + (4 * g + (bits & 3)) * kWidth);
        acc.fma(1, w + 2 * g + 1, tile + (4 * g + ((bits >> 2) & 3)) * kWidth);
      }
      acc.add_to(row_partial, g0 == 0);
    }
  }
  store_partials(p.epilogue, partial, kWidth, n_begin, n_end, m0, std::min<int64_t>(p.x.m - m0, kWidth));
}

}  // namespace

void sparse24_tile_rows_avx512(const Sparse24Problem& p, int64_t m0, int64_t width, int64_t n_begin,
                               int64_t n_end, float* partial, float* values_f32) {
  switch (width) {
    case kTileWidthXLarge: return sparse24_tile_rows<4>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthLarge: return sparse24_tile_rows<2>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthMedium: return sparse24_tile_rows<1>(p, m0, n_begin, n_end, partial, values_f32);
    default: return sparse24_tile_rows_avx2(p, m0, width, n_begin, n_end, partial, values_f32);
  }
}

}  // namespace sparseq::cpu
