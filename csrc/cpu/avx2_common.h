#pragma once
// AVX2 helpers shared by the *_avx2.cpp micro-kernel files. Include only from those files: every
// function carries the avx2/fma/f16c target attribute, so nothing here is ever executed unless
// the caller checked cpu_has_avx2_fma() first.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int8_kernels.h"

#define SPARSEQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sparseq::cpu::avx2 {

// Lane mask with the first `count` (0..8) lanes set, for masked loads and stores of tails.
SPARSEQ_AVX2 inline __m256i first_lanes_mask(int count) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), idx);
}

// 8 elements of a fp32 / bf16 / fp16 row, widened to fp32 (exact).
SPARSEQ_AVX2 inline __m256 load8_as_float(const void* base, OutType t, int64_t i) {
  switch (t) {
    case OutType::kBFloat16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case OutType::kFloat16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      return _mm256_cvtph_ps(h);
    }
    default:
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
}

SPARSEQ_AVX2 inline float load1_as_float(const void* base, OutType t, int64_t i) {
  if (t == OutType::kFloat32) return static_cast<const float*>(base)[i];
  uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (t == OutType::kBFloat16) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

// fp32 -> bf16 with round to nearest even (NaN -> quiet NaN), as c10::BFloat16 does.
SPARSEQ_AVX2 inline __m128i float_to_bf16x8(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), is_nan);
  __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane
  packed = _mm256_permute4x64_epi64(packed, 0x08);          // lanes 0 and 2 -> low half
  return _mm256_castsi256_si128(packed);
}

// Stores the first `count` (1..8) lanes of v at dst[i...] as type t.
SPARSEQ_AVX2 inline void store8_float_as(void* dst, OutType t, int64_t i, __m256 v, int count) {
  if (t == OutType::kFloat32) {
    float* d = static_cast<float*>(dst) + i;
    if (count == 8) {
      _mm256_storeu_ps(d, v);
    } else {
      _mm256_maskstore_ps(d, first_lanes_mask(count), v);
    }
    return;
  }
  __m128i h = t == OutType::kBFloat16 ? float_to_bf16x8(v)
                                      : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  uint16_t* d = static_cast<uint16_t*>(dst) + i;
  if (count == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(d, tmp, sizeof(uint16_t) * count);
  }
}

// Stores one fp32 value at dst[i] as type t (rounded as store8_float_as does).
SPARSEQ_AVX2 inline void store1_float_as(void* dst, OutType t, int64_t i, float v) {
  if (t == OutType::kFloat32) {
    static_cast<float*>(dst)[i] = v;
    return;
  }
  const __m128i h = t == OutType::kBFloat16
                        ? float_to_bf16x8(_mm256_set1_ps(v))
                        : _mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  static_cast<uint16_t*>(dst)[i] = static_cast<uint16_t>(_mm_extract_epi16(h, 0));
}

// r[j][i] <- r[i][j]: an 8 x 8 block of floats transposed in registers.
SPARSEQ_AVX2 inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

SPARSEQ_AVX2 inline __m256 load8_floats_masked(const float* p, int count) {
  return count == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes_mask(count));
}

}  // namespace sparseq::cpu::avx2
