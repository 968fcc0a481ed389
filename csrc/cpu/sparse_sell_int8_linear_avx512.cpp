// AVX-512 VBMI2 + VNNI kernel of sparse_sell_int8_linear. Per step of a slice: two vpexpandb
// spread the step's packed column offsets and codes into their 64 lanes, then for every row of
// x one vpermb looks the 64 activations up in that row's 64-byte block (no gather: a gather
// costs ~4 ns per 16 lanes here, a vpermb under 1 ns per 64) and one vpdpbusd adds the four
// products of each lane group into the slice's 16 row sums. No torch headers (int8_kernels.h).
#include <array>
#include <utility>

#include "int8_epilogue_avx512.h"
#include "sell_kernels.h"

#define SPARSEQ_SELL \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512vbmi2")))

namespace sparseq::cpu {
namespace {

// Rows of x that share one pass over a slice's steps: MR accumulators, one zmm each.
constexpr int kMaxRows = 16;

template <int MR>
SPARSEQ_SELL bool slice_rows(const SellInt8Problem& p, int64_t s, int64_t m0) {
  int64_t e, e_end;
  if (!sell_slice_ranges(p, s, &e, &e_end)) return false;
  const uint64_t foreign_lanes = sell_foreign_lanes(p, s);
  const int32_t* block_ptr = p.block_step_ptr + s * p.blocks;
  const uint8_t* x = p.xu + m0 * p.ldx;
  __m512i acc[MR];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
  // The codes' sum per row, for the act_offset correction: one more vpdpbusd per step.
  __m512i rowsum = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  __mmask64 bad_offsets = 0;
  uint64_t bad_lanes = 0;
  for (int64_t b = 0; b < p.blocks; ++b) {
    const __m512i width = _mm512_set1_epi8(static_cast<char>(sell_block_width(p, b)));
    const uint8_t* xb = x + b * kSellBlock;
    for (int64_t t = block_ptr[b]; t < block_ptr[b + 1]; ++t) {
      const uint64_t mask = p.step_masks[t];
      const int64_t count = __builtin_popcountll(mask);
      if (e + count > e_end) return false;
      bad_lanes |= mask & foreign_lanes;
      _mm_prefetch(reinterpret_cast<const char*>(p.col_offsets + e + 512), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p.values + e + 512), _MM_HINT_T0);
      const __mmask64 lanes = _cvtu64_mask64(mask);
      const __m512i offsets = _mm512_maskz_expandloadu_epi8(lanes, p.col_offsets + e);
      const __m512i codes = _mm512_maskz_expandloadu_epi8(lanes, p.values + e);
      bad_offsets = _kor_mask64(bad_offsets, _mm512_mask_cmpge_epu8_mask(lanes, offsets, width));
      e += count;
      rowsum = _mm512_dpbusd_epi32(rowsum, ones, codes);
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512i looked_up = _mm512_permutexvar_epi8(offsets, _mm512_loadu_si512(xb + r * p.ldx));
        acc[r] = _mm512_dpbusd_epi32(acc[r], looked_up, codes);
      }
    }
  }
  if (e != e_end || bad_lanes != 0 || _cvtmask64_u64(bad_offsets) != 0) return false;

  GemmProblem epilogue;
  epilogue.c_out = p.c_out;
  epilogue.out_type = p.out_type;
  epilogue.ldc = p.ldc;
  epilogue.x_scale = p.x_scale;
  epilogue.bias = p.bias;
  const int64_t n0 = s * kSellSlice;
  avx512_epilogue::ColumnBlock columns;
  columns.mask = avx512::first_lanes(p.n - n0);
  columns.correction = _mm512_mullo_epi32(rowsum, _mm512_set1_epi32(p.act_offset));
  columns.w_scale = _mm512_maskz_loadu_ps(columns.mask, p.w_scale + n0);
  columns.bias = p.bias != nullptr ? _mm512_maskz_loadu_ps(columns.mask, p.bias + n0) : _mm512_setzero_ps();
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) avx512_epilogue::store_row16(epilogue, columns, m0 + r, n0, acc[r]);
  return true;
}

using SliceRowsFn = bool (*)(const SellInt8Problem&, int64_t, int64_t);

template <size_t... I>
constexpr std::array<SliceRowsFn, sizeof...(I)> slice_rows_table(std::index_sequence<I...>) {
  return {&slice_rows<static_cast<int>(I) + 1>...};
}

}  // namespace

bool sell_int8_slices_avx512(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin,
                             int64_t s_end) {
  static constexpr auto kSliceRows = slice_rows_table(std::make_index_sequence<kMaxRows>{});
  // Slice-major: a slice's entries stay in L1/L2 while every row chunk of x passes over them.
  for (int64_t s = s_begin; s < s_end; ++s)
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kMaxRows)
      if (!kSliceRows[std::min<int64_t>(kMaxRows, m_end - m0) - 1](p, s, m0)) return false;
  return true;
}

}  // namespace sparseq::cpu
