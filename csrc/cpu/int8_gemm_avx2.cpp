// AVX2 core of int8_gemm and int8_linear: u8 x s8 micro-kernels over the n16k4 packed weight,
// with the epilogue fused while the accumulators are in registers, and the fused per-row
// activation quantizer. No torch headers here (see int8_kernels.h).
#include <algorithm>
#include <cstring>
#include <memory>

#include "avx2_common.h"
#include "int8_epilogue_avx2.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// Accumulators of a tile over a slice of K: start from zero or from `partial`, and finish with
// the epilogue or by saving to `partial` ([rows, 16 * NB] int32, row stride 16 * NB).
struct TileSlice {
  int64_t q_begin = 0;
  int64_t q_end = 0;
  const int32_t* partial_in = nullptr;
  int32_t* partial_out = nullptr;  // nullptr: last slice, run the epilogue
};

// MR rows x (16 * NB) columns over K-quads [q_begin, q_end). SIGN: sign trick (a = sign(a_sign)
// * a_u), else a_u is used as is. CHECK: also report whether the weight slice holds -128.
// Per K-quad and row: one 4-byte broadcast; per 8 outputs: vpmaddubsw (u8*s8 pairs -> int16,
// exact, see GemmProblem) + vpmaddwd with ones (int16 pairs -> int32) + vpaddd.
template <int MR, int NB, bool SIGN, bool CHECK>
SPARSEQ_AVX2 bool tile(const GemmProblem& p, int64_t m0, int64_t nb0, const TileSlice& slice) {
  constexpr int NV = 2 * NB;
  __m256i acc[MR][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = slice.partial_in == nullptr
                      ? _mm256_setzero_si256()
                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(slice.partial_in + (r * NV + v) * 8));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i wmin = _mm256_set1_epi8(127);
  const int64_t lda = p.lda;
  const uint8_t* au = p.a_u + m0 * lda;
  const int8_t* as = SIGN ? p.a_sign + m0 * lda : nullptr;
  const int64_t nb_stride = p.k_quads * 64;
  const int8_t* wb = p.w_packed + nb0 * nb_stride;

  for (int64_t q = slice.q_begin; q < slice.q_end; ++q) {
    __m256i w[NV];
    #pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const int8_t* src = wb + j * nb_stride + q * 64;
      _mm_prefetch(reinterpret_cast<const char*>(src + 1024), _MM_HINT_T0);
      w[2 * j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      w[2 * j + 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    }
    if (CHECK) {
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) wmin = _mm256_min_epi8(wmin, w[v]);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256i a = _mm256_set1_epi32(static_cast<int>(load_u32(au + r * lda + 4 * q)));
      __m256i s;
      if (SIGN) s = _mm256_set1_epi32(static_cast<int>(load_u32(as + r * lda + 4 * q)));
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        __m256i b = SIGN ? _mm256_sign_epi8(w[v], s) : w[v];
        __m256i prod = _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones);
        acc[r][v] = _mm256_add_epi32(acc[r][v], prod);
      }
    }
  }

  if (slice.partial_out != nullptr) {
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(slice.partial_out + (r * NV + v) * 8), acc[r][v]);
  } else {
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const int64_t n0 = (nb0 + v / 2) * 16 + (v % 2) * 8;
        const int64_t left = p.n - n0;
        if (left <= 0) continue;
        store_acc8(p, m0 + r, n0, left >= 8 ? 8 : static_cast<int>(left), acc[r][v]);
      }
    }
  }
  if (CHECK) {
    const __m256i is_min = _mm256_cmpeq_epi8(wmin, _mm256_set1_epi8(-128));
    return _mm256_movemask_epi8(is_min) == 0;
  }
  return true;
}

template <int MR, int NB, bool SIGN>
SPARSEQ_AVX2 bool tile_dispatch_check(const GemmProblem& p, int64_t m0, int64_t nb0, const TileSlice& slice,
                                      bool check) {
  return check ? tile<MR, NB, SIGN, true>(p, m0, nb0, slice) : tile<MR, NB, SIGN, false>(p, m0, nb0, slice);
}

template <bool SIGN>
SPARSEQ_AVX2 bool tile_rows(const GemmProblem& p, int rows, int nblocks, int64_t m0, int64_t nb0,
                            const TileSlice& slice, bool check) {
  // (rows, nblocks) pairs used by gemm_tiles_avx2; each keeps 8 or fewer accumulators.
  if (nblocks == 4) return tile_dispatch_check<1, 4, SIGN>(p, m0, nb0, slice, check);
  if (nblocks == 2) return tile_dispatch_check<2, 2, SIGN>(p, m0, nb0, slice, check);
  switch (rows) {
    case 4: return tile_dispatch_check<4, 1, SIGN>(p, m0, nb0, slice, check);
    case 3: return tile_dispatch_check<3, 1, SIGN>(p, m0, nb0, slice, check);
    case 2: return tile_dispatch_check<2, 1, SIGN>(p, m0, nb0, slice, check);
    default: return tile_dispatch_check<1, 1, SIGN>(p, m0, nb0, slice, check);
  }
}

// K-quads per slice in the many-row path: 16 columns x 1024 k = 16 KiB of weight, which stays in
// L1 while every row tile of the chunk runs over it (a full 4096-deep panel would come from L2).
constexpr int64_t kSliceQuads = 256;

template <bool SIGN>
SPARSEQ_AVX2 bool gemm_tiles(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                             int64_t nb_end) {
  const int64_t rows = m_end - m_begin;
  bool ok = true;
  const bool check = SIGN && p.check_w_min;
  if (rows >= 4) {
    const int64_t slices = (p.k_quads + kSliceQuads - 1) / kSliceQuads;
    // Partial sums of the chunk's rows x 16 columns between slices.
    std::unique_ptr<int32_t[]> partial(slices > 1 ? new int32_t[rows * 16] : nullptr);
    for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
      for (int64_t sl = 0; sl < slices; ++sl) {
        TileSlice slice;
        slice.q_begin = sl * kSliceQuads;
        slice.q_end = std::min(p.k_quads, slice.q_begin + kSliceQuads);
        const bool first_slice = sl == 0;
        for (int64_t m = m_begin; m < m_end; m += 4) {
          const int tile_rows_now = static_cast<int>(std::min<int64_t>(4, m_end - m));
          int32_t* part = partial.get() + (m - m_begin) * 16;
          slice.partial_in = first_slice ? nullptr : part;
          slice.partial_out = sl + 1 == slices ? nullptr : part;
          // The -128 check needs each weight byte seen once: the chunk's first row tile.
          ok &= tile_rows<SIGN>(p, tile_rows_now, 1, m, nb, slice, check && m == m_begin);
        }
      }
    }
    return ok;
  }
  // Decode-sized M: several column blocks at once so 8 accumulators stay busy; the weight is
  // streamed once, so K is not sliced.
  TileSlice full;
  full.q_end = p.k_quads;
  const int nblocks = rows == 1 ? 4 : rows == 2 ? 2 : 1;
  int64_t nb = nb_begin;
  for (; nb + nblocks <= nb_end; nb += nblocks) ok &= tile_rows<SIGN>(p, static_cast<int>(rows), nblocks, m_begin, nb, full, check);
  for (; nb < nb_end; ++nb) ok &= tile_rows<SIGN>(p, static_cast<int>(rows), 1, m_begin, nb, full, check);
  return ok;
}

// Packs 32 int32 (4 vectors) in [-128, 127] into 32 int8 in order.
SPARSEQ_AVX2 inline __m256i pack_epi32_to_epi8(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  __m256i lo = _mm256_packs_epi32(q0, q1);
  __m256i hi = _mm256_packs_epi32(q2, q3);
  __m256i bytes = _mm256_packs_epi16(lo, hi);
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// _mm256_cvtps_epi32 rounds half to even under the default MXCSR, like torch.round.
SPARSEQ_AVX2 inline __m256i quantize8(const void* row, OutType t, int64_t i, __m256 inv, __m256i qmax,
                                      __m256i qmin) {
  __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8_as_float(row, t, i), inv));
  return _mm256_max_epi32(_mm256_min_epi32(q, qmax), qmin);
}

}  // namespace

bool gemm_tiles_avx2(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                     int64_t nb_end) {
  if (m_begin >= m_end || nb_begin >= nb_end) return true;
  return p.a_sign != nullptr ? gemm_tiles<true>(p, m_begin, m_end, nb_begin, nb_end)
                             : gemm_tiles<false>(p, m_begin, m_end, nb_begin, nb_end);
}

SPARSEQ_AVX2 void add_u8_rows_avx2(const uint8_t* const* rows, int64_t count, int64_t m, int32_t* dst) {
  constexpr int64_t kRowsPerU16Sum = 256;  // 256 * 255 < 65536
  int64_t r = 0;
  for (; r + 16 <= m; r += 16) {
    __m256i sum32_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + r));
    __m256i sum32_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + r + 8));
    for (int64_t i0 = 0; i0 < count; i0 += kRowsPerU16Sum) {
      const int64_t i1 = std::min(count, i0 + kRowsPerU16Sum);
      __m256i sum16 = _mm256_setzero_si256();
      for (int64_t i = i0; i < i1; ++i)
        sum16 = _mm256_add_epi16(sum16, _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + r))));
      sum32_lo = _mm256_add_epi32(sum32_lo, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(sum16)));
      sum32_hi = _mm256_add_epi32(sum32_hi, _mm256_cvtepu16_epi32(_mm256_extracti128_si256(sum16, 1)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r), sum32_lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r + 8), sum32_hi);
  }
  for (; r < m; ++r)
    for (int64_t i = 0; i < count; ++i) dst[r] += rows[i][r];
}

SPARSEQ_AVX2 void quantize_rows_avx2(const void* x, OutType x_type, int64_t k, int64_t m_begin,
                                     int64_t m_end, int32_t qmax, uint8_t* a_u, int8_t* a_sign,
                                     int64_t lda, float* x_scale, const float* static_scale) {
  const size_t elem = x_type == OutType::kFloat32 ? 4 : 2;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i vqmax = _mm256_set1_epi32(qmax);
  const __m256i vqmin = _mm256_set1_epi32(-qmax);
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(qmax + 1));
  const bool offset_form = a_sign == nullptr;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const void* row = static_cast<const char*>(x) + m * k * elem;
    // Max of |x| taken on the bit patterns: for non-negative floats they order like integers,
    // and Inf/NaN (>= 0x7f800000) sort above every finite value, where vmaxps would drop a NaN.
    __m256i vmax = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
      vmax = _mm256_max_epi32(vmax, _mm256_castps_si256(_mm256_and_ps(load8_as_float(row, x_type, i), abs_mask)));
    __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
    uint32_t absmax_bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
    for (; i < k; ++i) {
      const float v = __builtin_fabsf(load1_as_float(row, x_type, i));
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof(bits));
      absmax_bits = bits > absmax_bits ? bits : absmax_bits;
    }
    uint8_t* u_row = a_u + m * lda;
    int8_t* s_row = offset_form ? nullptr : a_sign + m * lda;
    const float inv_static = static_scale != nullptr ? static_inverse_scale(*static_scale) : 0.0f;
    if (absmax_bits >= 0x7f800000u || (static_scale != nullptr && inv_static == 0.0f)) {
      // A NaN/Inf row quantizes to zeros with a NaN scale: its outputs come out NaN (see _ref).
      x_scale[m] = __builtin_nanf("");
      std::memset(u_row, offset_form ? qmax + 1 : 0, static_cast<size_t>(k));
      std::memset(u_row + k, 0, static_cast<size_t>(lda - k));
      if (!offset_form) std::memset(s_row, 0, static_cast<size_t>(lda));
      continue;
    }
    float inv;
    if (static_scale != nullptr) {
      inv = inv_static;
      x_scale[m] = *static_scale;
    } else {
      float absmax;
      std::memcpy(&absmax, &absmax_bits, sizeof(absmax));
      if (!(absmax > 0.0f)) absmax = 1.0f;
      inv = static_cast<float>(qmax) / absmax;
      x_scale[m] = absmax / static_cast<float>(qmax);
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 32 <= k; i += 32) {
      __m256i q = pack_epi32_to_epi8(quantize8(row, x_type, i, vinv, vqmax, vqmin),
                                     quantize8(row, x_type, i + 8, vinv, vqmax, vqmin),
                                     quantize8(row, x_type, i + 16, vinv, vqmax, vqmin),
                                     quantize8(row, x_type, i + 24, vinv, vqmax, vqmin));
      if (offset_form) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u_row + i), _mm256_add_epi8(q, offset));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u_row + i), _mm256_abs_epi8(q));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s_row + i), q);
      }
    }
    for (; i < k; ++i) {
      int q = _mm_cvtss_si32(_mm_set_ss(load1_as_float(row, x_type, i) * inv));
      q = q > qmax ? qmax : (q < -qmax ? -qmax : q);
      if (offset_form) {
        u_row[i] = static_cast<uint8_t>(q + qmax + 1);
      } else {
        u_row[i] = static_cast<uint8_t>(q < 0 ? -q : q);
        s_row[i] = static_cast<int8_t>(q);
      }
    }
    for (; i < lda; ++i) {
      u_row[i] = 0;
      if (!offset_form) s_row[i] = 0;
    }
  }
}

}  // namespace sparseq::cpu
