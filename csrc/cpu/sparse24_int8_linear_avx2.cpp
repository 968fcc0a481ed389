// AVX2 micro-kernel of sparse24_int8_linear. Per output column and 8 groups (32 quantized
// activations, 16 codes, 4 meta bytes): the meta bytes become a vpshufb control that picks each
// group's two activations, which are widened to int16 beside the widened codes and summed in
// pairs into int32 by vpmaddwd, which is exact for int8-range operands.
// The control and the codes are built once per column and reused by up to 4 rows of x.
#include <array>

#include "avx2_common.h"
#include "bsr_kernels.h"

namespace sparseq::cpu {
namespace {

// For a meta byte (two groups: low nibble the even group): the byte offsets of the four picked
// activations inside the 8 activations of the two groups, as one little-endian uint32.
constexpr std::array<uint32_t, 256> make_pick_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    const uint32_t lo = b & 0xF, hi = b >> 4;
    table[b] = (lo & 3) | (lo >> 2) << 8 | (4 + (hi & 3)) << 16 | (4 + (hi >> 2)) << 24;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kPickTable = make_pick_table();

// vpshufb control for 8 groups: per 128-bit lane (4 groups, 16 activations) the low 8 bytes
// pick that lane's 8 activations; the high 8 bytes are never used.
SPARSEQ_AVX2 inline __m256i pick_control(const uint8_t* meta) {
  auto lane = [&](int i) {
    return static_cast<int64_t>(kPickTable[meta[i]] | static_cast<uint64_t>(kPickTable[meta[i + 1]] + 0x08080808u) << 32);
  };
  return _mm256_setr_epi64x(lane(0), 0, lane(2), 0);
}

// 16 picked activations of 8 groups as int16, in the order of the group's stored codes.
SPARSEQ_AVX2 inline __m256i picked_activations(const int8_t* q, __m256i control) {
  const __m256i picked = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), control);
  return _mm256_cvtepi8_epi16(_mm256_castsi256_si128(_mm256_permute4x64_epi64(picked, 0x08)));
}

SPARSEQ_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

template <int MR>
SPARSEQ_AVX2 void column_rows(const Sparse24Int8Problem& p, int64_t n, int64_t m0) {
  const int8_t* v = p.values + n * 2 * p.groups;
  const uint8_t* meta = p.meta + n * ((p.groups + 1) / 2);
  __m256i acc[MR];
  for (int j = 0; j < MR; ++j) acc[j] = _mm256_setzero_si256();
  int64_t g = 0;
  for (; g + 8 <= p.groups; g += 8) {
    const __m256i control = pick_control(meta + g / 2);
    const __m256i codes = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 2 * g)));
    for (int j = 0; j < MR; ++j)
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(picked_activations(p.q + (m0 + j) * p.ldq + 4 * g, control), codes));
  }
  for (int j = 0; j < MR; ++j) {
    const int8_t* q = p.q + (m0 + j) * p.ldq;
    int32_t total = hsum_epi32(acc[j]);
    for (int64_t t = g; t < p.groups; ++t) {
      const int nibble = (meta[t >> 1] >> ((t & 1) * 4)) & 0xF;
      total += static_cast<int32_t>(q[4 * t + (nibble & 3)]) * v[2 * t] +
               static_cast<int32_t>(q[4 * t + (nibble >> 2)]) * v[2 * t + 1];
    }
    // Same float steps as _ref.dequant_epilogue (mul then add, no fused multiply-add).
    const __m128 scale = _mm_mul_ss(_mm_set_ss(p.x_scale[m0 + j]), _mm_set_ss(p.w_scale[n]));
    __m128 result = _mm_mul_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), total), scale);
    if (p.bias != nullptr) result = _mm_add_ss(result, _mm_set_ss(p.bias[n]));
    avx2::store1_float_as(p.c_out, p.out_type, (m0 + j) * p.ldc + n, _mm_cvtss_f32(result));
  }
}

}  // namespace

void sparse24_int8_tiles_avx2(const Sparse24Int8Problem& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                              int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    int64_t m0 = m_begin;
    for (; m0 + 4 <= m_end; m0 += 4) column_rows<4>(p, n, m0);
    for (; m0 < m_end; ++m0) column_rows<1>(p, n, m0);
  }
}

}  // namespace sparseq::cpu
