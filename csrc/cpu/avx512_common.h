#pragma once
// AVX-512 helpers shared by the *_avx512.cpp kernel files and the AMX core (int8_gemm_amx.cpp,
// through int8_epilogue_avx512.h). Include only from those files: every function carries the
// AVX-512 target attribute, so nothing here runs unless the caller checked cpu_has_avx512() first.
// The AVX2 helpers stay callable (their ISA is a subset).
#include <immintrin.h>

#include <cstdint>

#include "sparse_kernels.h"

// GCC 12's AVX-512 headers start several intrinsics from _mm512_undefined_*(), which it then
// reports as "may be used uninitialized" once inlined into a target-attribute function.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define SPARSEQ_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

namespace sparseq::cpu::avx512 {

SPARSEQ_AVX512 inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// The first `count` (0..16) stored values from index e, widened to fp32 (int8 codes unscaled),
// zeros after them; reads only those (masked loads never fault on the lanes they skip).
SPARSEQ_AVX512 inline __m512 load16_values(const void* values, ValueType t, int64_t e, int64_t count = 16) {
  const __mmask16 k = first_lanes(count);
  switch (t) {
    case ValueType::kInt8:
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, static_cast<const int8_t*>(values) + e)));
    case ValueType::kBFloat16: {
      const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(values) + e);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case ValueType::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(values) + e));
    default:
      return _mm512_maskz_loadu_ps(k, static_cast<const float*>(values) + e);
  }
}

// avx2::expand_columns (sparse_csr_avx2.h) with AVX-512: 16 offsets per widening, and masked
// loads instead of a tail copy near the end of the arrays (a 90%-sparse segment, ~26 entries,
// costs 2 steps of 5 instructions instead of 4 of 5 per 8). Same contract: `columns` has 32 spare
// entries past the row's count (this writes at most 15 past).
template <int kShift = 0>
SPARSEQ_AVX512 inline void expand_columns(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1, int32_t* columns) {
  for_segment_steps<16>(p, n, s0, s1, columns, [&](int32_t* out, int64_t e, int32_t first_column) SPARSEQ_AVX512 {
    const __m128i bytes = _mm_maskz_loadu_epi8(first_lanes(p.nnz - e), p.col_offsets + e);
    const __m512i columns16 = _mm512_add_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(first_column));
    _mm512_storeu_si512(out, _mm512_slli_epi32(columns16, kShift));
  });
}

// Accumulators of one output row against one x tile of 16 * kVectors rows: kSets independent sets
// of kVectors zmm (8 chains at least, to cover the FMA latency of two FMA ports). Each step is one
// FMA per zmm with the weight broadcast from memory ({1to16}), so a 16-wide tile costs one load
// and one FMA per nonzero.
template <int kVectors>
struct TileAccumulators512 {
  static constexpr int kSets = kVectors >= 4 ? 2 : 8 / kVectors;
  static constexpr bool kOwnExpansion = true;  // the walks expand columns with expand_columns below
  __m512 v[kSets][kVectors];

  template <int kShift>
  SPARSEQ_AVX512 static void expand_columns(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1, int32_t* columns) {
    avx512::expand_columns<kShift>(p, n, s0, s1, columns);
  }

  SPARSEQ_AVX512 void zero() {
    for (int s = 0; s < kSets; ++s)
      for (int t = 0; t < kVectors; ++t) v[s][t] = _mm512_setzero_ps();
  }
  SPARSEQ_AVX512 void fma(int set, const float* value, const float* x_row) {
    const __m512 w = _mm512_set1_ps(*value);
    for (int t = 0; t < kVectors; ++t) v[set][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x_row + 16 * t), v[set][t]);
  }
  // out = (first ? 0 : out) + the sets' sum: continues the partial sums of earlier K blocks.
  SPARSEQ_AVX512 void add_to(float* out, bool first) const {
    for (int t = 0; t < kVectors; ++t) {
      __m512 sum = first ? v[0][t] : _mm512_add_ps(_mm512_loadu_ps(out + 16 * t), v[0][t]);
      for (int s = 1; s < kSets; ++s) sum = _mm512_add_ps(sum, v[s][t]);
      _mm512_storeu_ps(out + 16 * t, sum);
    }
  }
  SPARSEQ_AVX512 void reduce_to(float* out) const { add_to(out, true); }
};

}  // namespace sparseq::cpu::avx512
