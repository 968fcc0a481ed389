#pragma once
// The int8 GEMM core's epilogue, shared by its AVX2 (int8_gemm_avx2.cpp) and AVX-512 VNNI
// (int8_gemm_vnni.cpp) micro-kernels so both round exactly alike. Include only from those files.
#include <cstring>

#include "avx2_common.h"

namespace sparseq::cpu::avx2 {

// gelu_erf (int8_kernels.h) on 8 lanes; NaN stays NaN.
SPARSEQ_AVX2 inline __m256 gelu_erf8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(0.70710678118654752f));
  __m256 poly = _mm256_set1_ps(kGeluErfCoeffs[5]);
  for (int i = 4; i >= 0; --i) poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(kGeluErfCoeffs[i]));
  poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(1.0f));
  __m256 p = _mm256_mul_ps(poly, poly);
  p = _mm256_mul_ps(p, p);
  p = _mm256_mul_ps(p, p);
  p = _mm256_mul_ps(p, p);
  const __m256 erf_abs = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(1.0f), p));
  const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign, x));  // erf is odd
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

// Stores one 8-column slice of a tile row: n0 is the first output column, `count` of 8 valid.
SPARSEQ_AVX2 inline void store_acc8(const GemmProblem& p, int64_t m, int64_t n0, int count, __m256i acc) {
  const __m256i mask = first_lanes_mask(count);
  if (p.a_offset != 0) {
    __m256i rowsum = _mm256_maskload_epi32(p.w_rowsum + n0, mask);
    acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(rowsum, _mm256_set1_epi32(p.a_offset)));
  }
  if (p.c_int32 != nullptr) {
    int32_t* d = p.c_int32 + m * p.ldc + n0;
    if (count == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), acc);
    } else {
      _mm256_maskstore_epi32(d, mask, acc);
    }
    return;
  }
  // Same operation order as the reference: (x_scale * w_scale), then acc * that, then + bias.
  __m256 scale = _mm256_mul_ps(_mm256_set1_ps(p.x_scale[m]), _mm256_maskload_ps(p.w_scale + n0, mask));
  __m256 out = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);
  if (p.bias != nullptr) out = _mm256_add_ps(out, _mm256_maskload_ps(p.bias + n0, mask));
  if (p.gelu) out = gelu_erf8(out);
  store8_float_as(p.c_out, p.out_type, m * p.ldc + n0, out, count);
}

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace sparseq::cpu::avx2
