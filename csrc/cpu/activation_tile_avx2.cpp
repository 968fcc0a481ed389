// AVX2 transpose of activation rows into one zero-padded [k_pad][width] tile, the layout of the
// sparse tile kernels' x_tiles and of the BSR kernels' xt (see transpose_to_tile_avx2).
// 8x8 blocks: 8 rows x 8 columns are loaded (widened from bf16 / fp16 exactly), transposed in
// registers with unpack / shuffle / permute2f128, and stored as 8 lanes of 8 tile rows.
#include "avx2_common.h"
#include "sparse_kernels.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// The 8 x 8 block at columns c.. of the first `rows` of row_bytes (the other rows zero),
// transposed into tile rows c .. c + columns - 1 at lanes i0 .. i0 + 7. Only columns
// c .. c + readable - 1 of a row are read (fewer than 8 only in the last block of columns).
template <OutType kType>
SPARSEQ_AVX2 inline void transpose_block(const char* const* row_bytes, int rows, int64_t c, int readable,
                                         float* tile, int64_t width, int64_t i0, int columns) {
  __m256 r[8];
  for (int j = 0; j < 8; ++j) {
    if (j >= rows || readable <= 0) {
      r[j] = _mm256_setzero_ps();
    } else if (readable >= 8) {
      r[j] = load8_as_float(row_bytes[j], kType, c);
    } else {
      alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int q = 0; q < readable; ++q) tail[q] = load1_as_float(row_bytes[j], kType, c + q);
      r[j] = _mm256_load_ps(tail);
    }
  }
  transpose8x8(r);
  for (int j = 0; j < columns; ++j) _mm256_storeu_ps(tile + (c + j) * width + i0, r[j]);
}

// All 8 rows present and 8 columns read: the hot case, without a choice per row.
template <OutType kType>
SPARSEQ_AVX2 inline void transpose_full_block(const char* const* row_bytes, int64_t c, float* tile, int64_t width,
                                              int64_t i0) {
  __m256 r[8];
  for (int j = 0; j < 8; ++j) r[j] = load8_as_float(row_bytes[j], kType, c);
  transpose8x8(r);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(tile + (c + j) * width + i0, r[j]);
}

template <OutType kType>
SPARSEQ_AVX2 void transpose_to_tile(const void* x, int64_t ldx, int64_t m, int64_t k, int64_t m0, int64_t width,
                                    int64_t k_pad, float* tile) {
  constexpr int64_t kBytes = kType == OutType::kFloat32 ? 4 : 2;
  const char* rows_bytes[kTileWidthXXLarge];
  const int64_t present = m - m0 < width ? m - m0 : width;
  for (int64_t i = 0; i < present; ++i) rows_bytes[i] = static_cast<const char*>(x) + (m0 + i) * ldx * kBytes;
  const auto rows_in_group = [present](int64_t i0) {
    return static_cast<int>(present - i0 < 0 ? 0 : present - i0 < 8 ? present - i0 : 8);
  };
  const int64_t k_full = k / 8 * 8;
  // Column blocks outermost: each writes 8 whole tile rows (8 * width floats, contiguous).
  for (int64_t c = 0; c < k_full; c += 8)
    for (int64_t i0 = 0; i0 < width; i0 += 8) {
      const int rows = rows_in_group(i0);
      if (rows == 8) {
        transpose_full_block<kType>(rows_bytes + i0, c, tile, width, i0);
      } else {
        transpose_block<kType>(rows_bytes + i0, rows, c, 8, tile, width, i0, 8);
      }
    }
  // The last partial block of columns: reads stop at k, stores at k_pad.
  const int64_t tail_columns = k_pad - k_full < 8 ? k_pad - k_full : 8;
  if (tail_columns > 0)
    for (int64_t i0 = 0; i0 < width; i0 += 8)
      transpose_block<kType>(rows_bytes + i0, rows_in_group(i0), k_full, static_cast<int>(k - k_full), tile, width,
                             i0, static_cast<int>(tail_columns));
  const int64_t zero_from = k_full + tail_columns;
  for (float* z = tile + zero_from * width; z < tile + k_pad * width; z += 8) _mm256_storeu_ps(z, _mm256_setzero_ps());
}

}  // namespace

void transpose_to_tile_avx2(const void* x, OutType x_type, int64_t ldx, int64_t m, int64_t k, int64_t m0,
                            int64_t width, int64_t k_pad, float* tile) {
  switch (x_type) {
    case OutType::kBFloat16: return transpose_to_tile<OutType::kBFloat16>(x, ldx, m, k, m0, width, k_pad, tile);
    case OutType::kFloat16: return transpose_to_tile<OutType::kFloat16>(x, ldx, m, k, m0, width, k_pad, tile);
    default: return transpose_to_tile<OutType::kFloat32>(x, ldx, m, k, m0, width, k_pad, tile);
  }
}

}  // namespace sparseq::cpu
