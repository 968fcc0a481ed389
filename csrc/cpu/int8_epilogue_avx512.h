#pragma once
// The int8 GEMM core's epilogue on 16 columns at a time, for its AVX-512 micro-kernels: the same
// operations in the same order as store_acc8 (int8_epilogue_avx2.h), so every core rounds alike,
// with the per-column operands (correction, w_scale, bias) loaded once per column block instead
// of once per output row. Include only from files built with these targets.
#include "avx512_common.h"
#include "int8_epilogue_avx2.h"

namespace sparseq::cpu::avx512_epilogue {

// gelu_erf8 on 16 lanes, operation for operation.
SPARSEQ_AVX512 inline __m512 gelu_erf16(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 z = _mm512_mul_ps(_mm512_andnot_ps(sign, x), _mm512_set1_ps(0.70710678118654752f));
  __m512 poly = _mm512_set1_ps(kGeluErfCoeffs[5]);
  for (int i = 4; i >= 0; --i) poly = _mm512_fmadd_ps(poly, z, _mm512_set1_ps(kGeluErfCoeffs[i]));
  poly = _mm512_fmadd_ps(poly, z, _mm512_set1_ps(1.0f));
  __m512 p = _mm512_mul_ps(poly, poly);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  const __m512 erf_abs = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(1.0f), p));
  const __m512 erf = _mm512_or_ps(erf_abs, _mm512_and_ps(sign, x));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

// float_to_bf16x8 on 16 lanes: round to nearest even, NaN -> 0x7fc0.
SPARSEQ_AVX512 inline __m256i float_to_bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

// The epilogue's operands for output columns n0 .. n0 + count - 1 (count 1..16).
struct ColumnBlock {
  __mmask16 mask;
  __m512i correction;  // a_offset * w_rowsum[n]
  __m512 w_scale;
  __m512 bias;
};

SPARSEQ_AVX512 inline ColumnBlock load_column_block(const GemmProblem& p, int64_t n0, int count) {
  ColumnBlock c;
  c.mask = avx512::first_lanes(count);
  c.correction = _mm512_setzero_si512();
  if (p.a_offset != 0)
    c.correction = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(c.mask, p.w_rowsum + n0), _mm512_set1_epi32(p.a_offset));
  c.w_scale = p.c_int32 == nullptr ? _mm512_maskz_loadu_ps(c.mask, p.w_scale + n0) : _mm512_setzero_ps();
  c.bias = p.bias != nullptr ? _mm512_maskz_loadu_ps(c.mask, p.bias + n0) : _mm512_setzero_ps();
  return c;
}

// Stores output row m at the block's columns from the raw accumulators.
SPARSEQ_AVX512 inline void store_row16(const GemmProblem& p, const ColumnBlock& c, int64_t m, int64_t n0,
                                                __m512i acc) {
  acc = _mm512_sub_epi32(acc, c.correction);
  if (p.c_int32 != nullptr) {
    _mm512_mask_storeu_epi32(p.c_int32 + m * p.ldc + n0, c.mask, acc);
    return;
  }
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(p.x_scale[m]), c.w_scale);
  __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
  if (p.bias != nullptr) out = _mm512_add_ps(out, c.bias);
  if (p.gelu) out = gelu_erf16(out);
  const int64_t i = m * p.ldc + n0;
  switch (p.out_type) {
    case OutType::kFloat32: _mm512_mask_storeu_ps(static_cast<float*>(p.c_out) + i, c.mask, out); break;
    case OutType::kBFloat16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.c_out) + i, c.mask, float_to_bf16x16(out));
      break;
    default:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.c_out) + i, c.mask,
                               _mm512_cvtps_ph(out, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

}  // namespace sparseq::cpu::avx512_epilogue
