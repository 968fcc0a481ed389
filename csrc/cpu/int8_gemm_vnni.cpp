// AVX-512 VNNI core of int8_gemm and int8_linear, for CPUs that have it (Ice Lake and later
// Xeons, Zen 4 and later). vpdpbusd multiplies u8 by s8 and adds each group of four products to
// an int32 lane without saturating, so one instruction does what the AVX2 core needs three for,
// and it is exact for every u8 x s8 pair: the activation side is always the offset form
// (a_u = q + a_offset, any u8), corrected by a_offset * w_rowsum in the shared epilogue.
// The n16k4 packed weight needs no change: one K-quad of a 16-column block is one 64-byte zmm.
// No torch headers here (see int8_kernels.h).
#include <algorithm>
#include <cstdint>

#include "int8_epilogue_avx2.h"

#define SPARSEQ_AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace sparseq::cpu {
namespace {

using namespace avx2;

// MR rows x NB 16-column blocks, over every K-quad; the epilogue runs on 8-column halves so it
// rounds exactly as the AVX2 core does. Accumulators: MR * NB zmm (of 32), plus NB weight vectors
// and one broadcast.
template <int MR, int NB>
SPARSEQ_AVX512_VNNI void tile(const GemmProblem& p, int64_t m0, int64_t nb0) {
  __m512i acc[MR][NB];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
  const int64_t lda = p.lda;
  const uint8_t* au = p.a_u + m0 * lda;
  const int64_t nb_stride = p.k_quads * 64;
  const int8_t* wb = p.w_packed + nb0 * nb_stride;
  for (int64_t q = 0; q < p.k_quads; ++q) {
    __m512i w[NB];
    #pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const int8_t* src = wb + j * nb_stride + q * 64;
      // Decode-sized tiles stream the weight once: fetch ahead of the hardware prefetcher.
      if (MR <= 2) _mm_prefetch(reinterpret_cast<const char*>(src + 1024), _MM_HINT_T0);
      w[j] = _mm512_loadu_si512(src);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(load_u32(au + r * lda + 4 * q)));
      #pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], a, w[j]);
    }
  }
  // Through memory, so that no accumulator is ever addressed in the loop above (GCC then keeps
  // them all in registers instead of spilling them every iteration).
  alignas(64) int32_t sums[MR][NB][16];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_store_si512(sums[r][j], acc[r][j]);
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NB; ++j) {
      for (int h = 0; h < 2; ++h) {
        const int64_t n0 = (nb0 + j) * 16 + h * 8;
        const int64_t left = p.n - n0;
        if (left <= 0) break;
        store_acc8(p, m0 + r, n0, left >= 8 ? 8 : static_cast<int>(left),
                   _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[r][j] + 8 * h)));
      }
    }
  }
}

constexpr int kRowsPerTile = 6;   // 6 x 4 = 24 accumulators
constexpr int kBlocksPerTile = 4;  // 64 output columns

template <int NB>
SPARSEQ_AVX512_VNNI void tile_rows(const GemmProblem& p, int rows, int64_t m0, int64_t nb0) {
  switch (rows) {
    case 6: return tile<6, NB>(p, m0, nb0);
    case 5: return tile<5, NB>(p, m0, nb0);
    case 4: return tile<4, NB>(p, m0, nb0);
    case 3: return tile<3, NB>(p, m0, nb0);
    case 2: return tile<2, NB>(p, m0, nb0);
    default: return tile<1, NB>(p, m0, nb0);
  }
}

SPARSEQ_AVX512_VNNI void tile_any(const GemmProblem& p, int rows, int blocks, int64_t m0, int64_t nb0) {
  switch (blocks) {
    case 4: return tile_rows<4>(p, rows, m0, nb0);
    case 3: return tile_rows<3>(p, rows, m0, nb0);
    case 2: return tile_rows<2>(p, rows, m0, nb0);
    default: return tile_rows<1>(p, rows, m0, nb0);
  }
}

}  // namespace

bool gemm_tiles_avx512_vnni(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                            int64_t nb_end) {
  // One panel of up to 4 column blocks at a time, run over every row of the chunk while it is
  // in L1/L2 (the chunk's rows were sized by run_gemm to stay in L2).
  for (int64_t nb = nb_begin; nb < nb_end; nb += kBlocksPerTile) {
    const int blocks = static_cast<int>(std::min<int64_t>(kBlocksPerTile, nb_end - nb));
    for (int64_t m = m_begin; m < m_end; m += kRowsPerTile) {
      tile_any(p, static_cast<int>(std::min<int64_t>(kRowsPerTile, m_end - m)), blocks, m, nb);
    }
  }
  return true;
}

}  // namespace sparseq::cpu
