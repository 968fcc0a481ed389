// AVX2 micro-kernels of int8_weight_only_linear. Few rows: stream the int8 weight once,
// widening each byte to fp32 on the fly (the job is reading the weight at memory bandwidth).
// Many rows: dequantize one 16-column weight panel into an L2-resident fp32 buffer, then run a
// 6x16 fp32 FMA micro-kernel over all rows. The few-row stream has an AVX-512 twin
// (gemv_block_avx512), used when WeightOnlyProblem::avx512 says the CPU has it. No torch headers
// here (see int8_kernels.h).
#include "avx2_common.h"
#include "avx512_common.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// Bias add, dtype conversion and store of 16 outputs (two vectors) of row m, block nb.
SPARSEQ_AVX2 inline void store_block(const WeightOnlyProblem& p, int64_t m, int64_t nb, __m256 lo, __m256 hi) {
  #pragma GCC unroll 16
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = nb * 16 + h * 8;
    const int64_t left = p.n - n0;
    if (left <= 0) return;
    const int count = left >= 8 ? 8 : static_cast<int>(left);
    __m256 v = h == 0 ? lo : hi;
    if (p.bias != nullptr) v = _mm256_add_ps(v, load8_floats_masked(p.bias + n0, count));
    store8_float_as(p.c_out, p.out_type, m * p.ldc + n0, v, count);
  }
}

// Folds the quads of gemv_block's accumulators, scales and stores the 16 outputs of row m, block nb.
SPARSEQ_AVX2 inline void finish_gemv_block(const WeightOnlyProblem& p, int64_t m, int64_t nb, const __m256* acc) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 out[2];
  #pragma GCC unroll 16
  for (int h = 0; h < 2; ++h) {
    const __m256* a = acc + 4 * h;
    __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    // sums = [o0 o2 o4 o6 | o1 o3 o5 o7] -> o0..o7
    out[h] = _mm256_permutevar8x32_ps(sums, order);
    const int64_t n0 = nb * 16 + h * 8;
    const int64_t left = p.n - n0;
    const int count = left >= 8 ? 8 : (left > 0 ? static_cast<int>(left) : 0);
    out[h] = _mm256_mul_ps(out[h], load8_floats_masked(p.w_scale + n0, count));
  }
  store_block(p, m, nb, out[0], out[1]);
}

// One row x 16 outputs over all of K. acc[c] holds outputs 2c (low 128 bits) and 2c+1 (high),
// one partial sum per k of the quad; a horizontal reduction at the end folds the quads.
SPARSEQ_AVX2 void gemv_block(const WeightOnlyProblem& p, int64_t m, int64_t nb) {
  __m256 acc[8];
  #pragma GCC unroll 16
  for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
  const float* x = p.x + m * p.ldx;
  const int8_t* w = p.w_packed + nb * p.k_quads * 64;
  for (int64_t q = 0; q < p.k_quads; ++q) {
    const __m256 xq = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * q));
    const int8_t* wq = w + q * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wq + 2048), _MM_HINT_T0);
    #pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wq + 8 * c));
      acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), xq, acc[c]);
    }
  }
  finish_gemv_block(p, m, nb, acc);
}

// gemv_block on AVX-512: 16 bytes (4 columns x 4 k) widen into one zmm, so a quad costs 4 widen +
// FMA steps instead of 8, and the stream is no longer bound by them (M=1, 4096x4096, cache-hot:
// 0.37-0.42 -> 0.32-0.33 ms, 3.3-3.5x -> 3.9-4.3x fp32). Each lane sums the same products in the
// same order as gemv_block's, so the results are identical.
SPARSEQ_AVX512 void gemv_block_avx512(const WeightOnlyProblem& p, int64_t m, int64_t nb) {
  __m512 acc[4];
  for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
  const float* x = p.x + m * p.ldx;
  const int8_t* w = p.w_packed + nb * p.k_quads * 64;
  for (int64_t q = 0; q < p.k_quads; ++q) {
    const __m512 xq = _mm512_broadcast_f32x4(_mm_loadu_ps(x + 4 * q));
    const int8_t* wq = w + q * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wq + 2048), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 16 * j));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), xq, acc[j]);
    }
  }
  __m256 halves[8];  // gemv_block's layout: halves[c] holds columns 2c and 2c+1
  for (int j = 0; j < 4; ++j) {
    halves[2 * j] = _mm512_extractf32x8_ps(acc[j], 0);
    halves[2 * j + 1] = _mm512_extractf32x8_ps(acc[j], 1);
  }
  finish_gemv_block(p, m, nb, halves);
}

// K slice of the dequantized panel: 256 k x 16 fp32 = 16 KiB stays in L1 while every row tile
// of the chunk runs over it; partial sums wait in a small [rows, 16] buffer between slices.
constexpr int64_t kPanelQuads = 64;

// Dequantizes quads [q_begin, q_end) of block nb into panel[k][16] (k-major, 16 outputs
// contiguous), scale folded in.
SPARSEQ_AVX2 void dequantize_panel(const WeightOnlyProblem& p, int64_t nb, int64_t q_begin, int64_t q_end,
                                   float* panel) {
  const int64_t n0 = nb * 16;
  const int64_t left = p.n - n0;
  const __m256 scale_lo = load8_floats_masked(p.w_scale + n0, left >= 8 ? 8 : static_cast<int>(left));
  const __m256 scale_hi = load8_floats_masked(p.w_scale + n0 + 8, left >= 16 ? 8 : (left > 8 ? static_cast<int>(left - 8) : 0));
  // Within each 128-bit lane, 4 outputs x 4 k -> 4 k x 4 outputs; then gather lanes so each
  // 64-bit chunk j holds outputs 0..7 of k = j.
  const __m256i transpose4x4 = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i interleave = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int8_t* w = p.w_packed + nb * p.k_quads * 64;
  for (int64_t q = q_begin; q < q_end; ++q) {
    float* dst = panel + (q - q_begin) * 64;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64 + 32 * h));
      v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, transpose4x4), interleave);
      const __m128i k01 = _mm256_castsi256_si128(v), k23 = _mm256_extracti128_si256(v, 1);
      const __m128i chunks[4] = {k01, _mm_unpackhi_epi64(k01, k01), k23, _mm_unpackhi_epi64(k23, k23)};
      const __m256 scale = h == 0 ? scale_lo : scale_hi;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(chunks[j])), scale);
        _mm256_storeu_ps(dst + j * 16 + 8 * h, f);
      }
    }
  }
}

// MR rows x 16 outputs over panel k-slice [k_begin, k_begin + k_count). Partial sums come from
// / go to partial[r * 16] unless this is the first / last slice.
template <int MR>
SPARSEQ_AVX2 void panel_tile(const WeightOnlyProblem& p, int64_t m0, int64_t nb, const float* panel,
                             int64_t k_begin, int64_t k_count, float* partial, bool first, bool last) {
  __m256 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + r * 16);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + r * 16 + 8);
  }
  const float* x = p.x + m0 * p.ldx + k_begin;
  for (int64_t k = 0; k < k_count; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * 16), b1 = _mm256_loadu_ps(panel + k * 16 + 8);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * p.ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (last) {
      store_block(p, m0 + r, nb, acc[r][0], acc[r][1]);
    } else {
      _mm256_storeu_ps(partial + r * 16, acc[r][0]);
      _mm256_storeu_ps(partial + r * 16 + 8, acc[r][1]);
    }
  }
}

SPARSEQ_AVX2 void panel_rows(const WeightOnlyProblem& p, int64_t m0, int rows, int64_t nb, const float* panel,
                             int64_t k_begin, int64_t k_count, float* partial, bool first, bool last) {
  switch (rows) {
    case 6: panel_tile<6>(p, m0, nb, panel, k_begin, k_count, partial, first, last); break;
    case 5: panel_tile<5>(p, m0, nb, panel, k_begin, k_count, partial, first, last); break;
    case 4: panel_tile<4>(p, m0, nb, panel, k_begin, k_count, partial, first, last); break;
    case 3: panel_tile<3>(p, m0, nb, panel, k_begin, k_count, partial, first, last); break;
    case 2: panel_tile<2>(p, m0, nb, panel, k_begin, k_count, partial, first, last); break;
    default: panel_tile<1>(p, m0, nb, panel, k_begin, k_count, partial, first, last);
  }
}

}  // namespace

int64_t weight_only_scratch_floats(int64_t rows) {
  return rows < kWeightOnlyPanelMinRows ? 0 : kPanelQuads * 64 + rows * 16;
}

SPARSEQ_AVX2 void weight_only_tiles_avx2(const WeightOnlyProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                            int64_t nb_end, float* scratch) {
  const int64_t rows = m_end - m_begin;
  float* panel = scratch;
  float* partial = scratch + kPanelQuads * 64;
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    if (rows < kWeightOnlyPanelMinRows) {
      for (int64_t m = m_begin; m < m_end; ++m) {
        if (p.avx512) {
          gemv_block_avx512(p, m, nb);
        } else {
          gemv_block(p, m, nb);
        }
      }
      continue;
    }
    if (p.k_quads == 0) {  // empty K: the output is the bias
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t m = m_begin; m < m_end; ++m) store_block(p, m, nb, zero, zero);
      continue;
    }
    for (int64_t q0 = 0; q0 < p.k_quads; q0 += kPanelQuads) {
      const int64_t q1 = q0 + kPanelQuads < p.k_quads ? q0 + kPanelQuads : p.k_quads;
      dequantize_panel(p, nb, q0, q1, panel);
      for (int64_t m = m_begin; m < m_end; m += 6)
        panel_rows(p, m, m_end - m >= 6 ? 6 : static_cast<int>(m_end - m), nb, panel, 4 * q0, 4 * (q1 - q0),
                   partial + (m - m_begin) * 16, q0 == 0, q1 == p.k_quads);
    }
  }
}

}  // namespace sparseq::cpu
