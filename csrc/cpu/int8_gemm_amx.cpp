// AMX-INT8 core of int8_gemm and int8_linear, for the CPUs that have it (Sapphire Rapids and later
// Xeons). One tdpbusd multiplies a 16-row x 64-byte u8 tile by a tile of 16 K-quads x 16 columns
// of s8 into 16 x 16 int32, 16384 multiply-adds where vpdpbusd does 64. The n16k4 packed weight
// already is that B layout (a block's K-quads are contiguous 64-byte rows), so weights load as
// they are. Exact like vpdpbusd: activations in the offset form, corrected by the shared epilogue
// in its 16-column form (per-column operands loaded once per block: at K = 384, where the
// epilogue weighs as much as the multiplies, 1.1-1.2x faster than the 8-column form).
// The caller pads the activation operand (gemm_activation_layout): rows to a multiple of 16 and
// lda to a multiple of 64, zero filled, so that every A tile reads inside it.
// No torch headers here (see int8_kernels.h).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int8_kernels.h"
#include "sparseq/cpu_features.h"

#if SPARSEQ_AMX_COMPILER
#include "int8_epilogue_avx512.h"

#define SPARSEQ_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

namespace sparseq::cpu {
namespace {

using namespace avx512_epilogue;

// Palette 1: tiles 0..3 accumulate C ([row tile][column block] = 2 x 2 of 16 x 16 int32), 4..5
// hold A (two 16-row tiles), 6..7 hold B (two 16-column blocks); every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTileRows = 16;
constexpr int64_t kQuadsPerStep = 16;  // K-quads per tdpbusd: 64 values of K
constexpr int64_t kBlockBytes = kQuadsPerStep * 64;

SPARSEQ_AMX void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

// MT (1, 2) row tiles from m0 x NT (1, 2) column blocks from nb0, over all of K, then the epilogue.
// b_tail holds the last, partial K step of blocks nb0 and nb0 + 1 zero padded (when k_quads is
// not a multiple of 16), so that no tile reads past a block's K-quads.
template <int MT, int NT>
SPARSEQ_AMX void tile_block(const GemmProblem& p, int64_t m0, int64_t nb0, const int8_t* b_tail) {
  _tile_zero(0);
  if constexpr (NT == 2) _tile_zero(1);
  if constexpr (MT == 2) _tile_zero(2);
  if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  const int64_t nb_stride = p.k_quads * 64;
  const int64_t full_steps = p.k_quads / kQuadsPerStep;
  const int64_t steps = full_steps + (p.k_quads % kQuadsPerStep != 0 ? 1 : 0);
  const uint8_t* a = p.a_u + m0 * p.lda;
  const int8_t* b = p.w_packed + nb0 * nb_stride;
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* b0 = s < full_steps ? b + s * kBlockBytes : b_tail;
    const int8_t* b1 = s < full_steps ? b0 + nb_stride : b_tail + kBlockBytes;
    _tile_loadd(4, a + s * 64, p.lda);
    if constexpr (MT == 2) _tile_loadd(5, a + kTileRows * p.lda + s * 64, p.lda);
    _tile_loadd(6, b0, 64);
    if constexpr (NT == 2) _tile_loadd(7, b1, 64);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbusd(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbusd(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t c[4][kTileRows][16];
  _tile_stored(0, c[0], 64);
  if constexpr (NT == 2) _tile_stored(1, c[1], 64);
  if constexpr (MT == 2) _tile_stored(2, c[2], 64);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c[3], 64);
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t n0 = (nb0 + nt) * 16;
    if (n0 >= p.n) break;  // the padding block of an odd N
    const ColumnBlock columns = load_column_block(p, n0, static_cast<int>(std::min<int64_t>(16, p.n - n0)));
    for (int mt = 0; mt < MT; ++mt)
      for (int64_t r = 0; r < kTileRows && m0 + mt * kTileRows + r < p.m; ++r)  // not the padding rows
        store_row16(p, columns, m0 + mt * kTileRows + r, n0, _mm512_load_si512(c[mt * 2 + nt][r]));
  }
}

}  // namespace

SPARSEQ_AMX bool gemm_tiles_amx(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                                int64_t nb_end) {
  load_tile_config();
  const int64_t tail_quads = p.k_quads % kQuadsPerStep, tail_start = p.k_quads - tail_quads;
  alignas(64) int8_t b_tail[2 * kBlockBytes];
  // A pair of column blocks (their K panel, 2 x K bytes, stays in L1) over every row of the
  // chunk (sized by run_gemm to stay in L2), 32 rows at a time.
  for (int64_t nb = nb_begin; nb < nb_end; nb += 2) {
    const int blocks = nb + 1 < nb_end ? 2 : 1;
    if (tail_quads != 0) {
      std::memset(b_tail, 0, sizeof(b_tail));
      for (int j = 0; j < blocks; ++j)
        std::memcpy(b_tail + j * kBlockBytes, p.w_packed + (nb + j) * p.k_quads * 64 + tail_start * 64,
                    static_cast<size_t>(tail_quads * 64));
    }
    for (int64_t m = m_begin; m < m_end; m += 2 * kTileRows) {
      const bool two_rows = m_end - m > kTileRows;
      if (two_rows && blocks == 2) tile_block<2, 2>(p, m, nb, b_tail);
      else if (two_rows) tile_block<2, 1>(p, m, nb, b_tail);
      else if (blocks == 2) tile_block<1, 2>(p, m, nb, b_tail);
      else tile_block<1, 1>(p, m, nb, b_tail);
    }
  }
  _tile_release();
  return true;
}

}  // namespace sparseq::cpu

#else  // a compiler without AMX: cpu_has_amx_int8() is false, so this never runs

namespace sparseq::cpu {
bool gemm_tiles_amx(const GemmProblem&, int64_t, int64_t, int64_t, int64_t) { return false; }
}  // namespace sparseq::cpu

#endif
