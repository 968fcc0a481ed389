// AVX-512 tile kernel of sparse24_linear (layout in sparseq/sparse_formats.h), for the CPUs that
// have it; same contract as the AVX2 one (sparse_kernels.h), and the same walk: every stored value
// is one FMA per zmm against its x_tiles row, the weight broadcast from memory, in tiles up to 128
// x rows wide (a 128-row batch streams the weight once). Decode (few rows) stays on the AVX2
// kernel.
#include "avx512_common.h"
#include "sparse_tile_walks.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;
using namespace avx512;

// Tile rows through the shared walk, in K blocks of 32 KiB of the tile (L1 is 48 KiB on these
// cores; at M=128 32 KiB blocks ran 1.05-1.1x faster than 16 KiB ones).
template <int kVectors>
SPARSEQ_AVX512 void sparse24_tile_rows(const Sparse24Problem& p, int64_t m0, int64_t n_begin, int64_t n_end,
                                       float* partial, float* values_f32) {
  constexpr int kWidth = 16 * kVectors;
  constexpr int64_t kBlockGroups = 32 * 1024 / (4 * kWidth * sizeof(float));
  static_assert(2 * kBlockGroups <= kTileValueScratch, "a block's widened values must fit values_f32");
  static_assert(kBlockGroups % 2 == 0, "a block must start on a meta byte (2 groups)");
  sparse24_tile_walk<kWidth, TileAccumulators512<kVectors>>(p, m0, n_begin, n_end, kBlockGroups, partial,
                                                            values_f32);
}

}  // namespace

void sparse24_tile_rows_avx512(const Sparse24Problem& p, int64_t m0, int64_t width, int64_t n_begin,
                               int64_t n_end, float* partial, float* values_f32) {
  switch (width) {
    case kTileWidthXXLarge: return sparse24_tile_rows<8>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthXLarge: return sparse24_tile_rows<4>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthLarge: return sparse24_tile_rows<2>(p, m0, n_begin, n_end, partial, values_f32);
    case kTileWidthMedium: return sparse24_tile_rows<1>(p, m0, n_begin, n_end, partial, values_f32);
    default: return sparse24_tile_rows_avx2(p, m0, width, n_begin, n_end, partial, values_f32);
  }
}

}  // namespace sparseq::cpu
