// AVX2 kernel of sparse_sell_int8_linear, for the CPUs without the AVX-512 VBMI2 one: the same
// walk with 16-byte tools. A step's 64 packed entries are spread to their lanes by vpshufb with
// a per-mask-byte table (AVX2 has no vpexpandb); a lane's activation is looked up in its 64-byte
// block by four vpshufb, one per 16-byte quarter, XORed together (AVX2 has no vpermb): quarter j
// holds block bytes 16j.. XOR those of quarter j-1 (sell_xor_quarters_avx2), and the control
// offset - 16j zeroes the lanes below quarter j, so the XOR chain leaves the lane's byte. Each
// slice is expanded once into `Step`s, then every row chunk of x passes over them.
// No torch headers (int8_kernels.h).
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "avx2_common.h"
#include "sell_kernels.h"

namespace sparseq::cpu {
namespace {

using namespace avx2;

// Rows of x that share one pass over a slice's steps: 2 accumulators (slice rows 0-7, 8-15) each.
constexpr int kMaxRows = 4;

// One step, expanded: for each 32-lane half, the vpshufb controls of the four quarters (lane
// offset - 16 q, negative, so zeroing, below quarter q) and the codes (0 in unused lanes).
struct alignas(32) Step {
  __m256i control[4][2];
  __m256i codes[2];
};

// For a mask byte: the packed index of each of its 8 lanes among the byte's set lanes, 0x80
// (vpshufb: zero) for a clear lane.
constexpr std::array<uint64_t, 256> make_expand_table() {
  std::array<uint64_t, 256> table{};
  for (int mask = 0; mask < 256; ++mask) {
    uint64_t entry = 0;
    int rank = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const uint64_t index = (mask >> lane) & 1 ? rank++ : 0x80;
      entry |= index << (8 * lane);
    }
    table[mask] = entry;
  }
  return table;
}
constexpr std::array<uint64_t, 256> kExpandTable = make_expand_table();

// 16 bytes of `packed` from e, zeros past nnz (the arrays end there).
SPARSEQ_AVX2 inline __m128i load16_packed(const void* packed, int64_t e, int64_t nnz) {
  const char* src = static_cast<const char*>(packed) + e;
  if (e + 16 <= nnz) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  alignas(16) char tail[16] = {};
  if (nnz > e) std::memcpy(tail, src, static_cast<size_t>(nnz - e));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
}

// Spreads 16 lanes (mask bits `bits16`) of the packed offsets and codes from entry e.
struct Expanded16 {
  __m128i offsets, codes;
};
SPARSEQ_AVX2 inline Expanded16 expand16(const SellInt8Problem& p, int64_t e, uint32_t bits16) {
  const uint32_t low = bits16 & 0xFF, high = bits16 >> 8;
  // The high byte's indices move past the low byte's entries; its 0x80 entries stay negative
  // (at most 0x88) and nothing carries between bytes.
  const __m128i shift = _mm_set1_epi8(static_cast<char>(__builtin_popcount(low)));
  const __m128i control = _mm_unpacklo_epi64(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpandTable[low])),
      _mm_add_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpandTable[high])), shift));
  return {_mm_shuffle_epi8(load16_packed(p.col_offsets, e, p.nnz), control),
          _mm_shuffle_epi8(load16_packed(p.values, e, p.nnz), control)};
}

// Expands the steps of slice s into `steps` (its row sum of codes into rowsum[2]); false when a
// step's mask is inconsistent with the slice's entries or an offset passes its block.
SPARSEQ_AVX2 bool expand_slice(const SellInt8Problem& p, int64_t s, std::vector<Step>& steps, __m256i rowsum[2]) {
  int64_t e, e_end;
  if (!sell_slice_ranges(p, s, &e, &e_end)) return false;
  const uint64_t foreign_lanes = sell_foreign_lanes(p, s);
  const int32_t* block_ptr = p.block_step_ptr + s * p.blocks;
  steps.resize(static_cast<size_t>(block_ptr[p.blocks] - block_ptr[0]));
  const __m256i ones_u8 = _mm256_set1_epi8(1), ones_i16 = _mm256_set1_epi16(1);
  __m256i sums[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  __m256i bad_offsets = _mm256_setzero_si256();
  uint64_t bad_lanes = 0;
  Step* out = steps.data();
  for (int64_t b = 0; b < p.blocks; ++b) {
    const __m256i last_column = _mm256_set1_epi8(static_cast<char>(sell_block_width(p, b) - 1));
    for (int64_t t = block_ptr[b]; t < block_ptr[b + 1]; ++t, ++out) {
      const uint64_t mask = p.step_masks[t];
      if (e + __builtin_popcountll(mask) > e_end) return false;
      bad_lanes |= mask & foreign_lanes;
      for (int h = 0; h < 2; ++h) {
        const uint32_t bits = static_cast<uint32_t>(mask >> (32 * h));
        const Expanded16 lo = expand16(p, e, bits & 0xFFFF);
        e += __builtin_popcount(bits & 0xFFFF);
        const Expanded16 hi = expand16(p, e, bits >> 16);
        e += __builtin_popcount(bits >> 16);
        const __m256i offsets = _mm256_set_m128i(hi.offsets, lo.offsets);
        const __m256i codes = _mm256_set_m128i(hi.codes, lo.codes);
        bad_offsets = _mm256_or_si256(bad_offsets, _mm256_subs_epu8(offsets, last_column));
        for (int q = 0; q < 4; ++q)
          out->control[q][h] = _mm256_sub_epi8(offsets, _mm256_set1_epi8(static_cast<char>(16 * q)));
        out->codes[h] = codes;
        sums[h] = _mm256_add_epi32(sums[h], _mm256_madd_epi16(_mm256_maddubs_epi16(ones_u8, codes), ones_i16));
      }
    }
  }
  rowsum[0] = sums[0];
  rowsum[1] = sums[1];
  return e == e_end && bad_lanes == 0 && _mm256_testz_si256(bad_offsets, bad_offsets);
}

// acc += the 4-lane dot products of activations `xu` (u8) and `codes` (s8) per 32-bit lane.
// vpmaddubsw adds two u8 x s8 products in int16, exact below 128 (7-bit activations); 8-bit
// ones are split into their low 7 bits and their top bit (128 x 127 x 2 and -128 x 128 x 2 both
// fit int16), each pair-summed apart.
template <bool kEightBit>
SPARSEQ_AVX2 inline __m256i dot4_add(__m256i acc, __m256i xu, __m256i codes) {
  const __m256i ones_i16 = _mm256_set1_epi16(1);
  if constexpr (!kEightBit)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xu, codes), ones_i16));
  const __m256i top = _mm256_and_si256(xu, _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m256i low = _mm256_xor_si256(xu, top);
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(low, codes), ones_i16));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(top, codes), ones_i16));
}

template <int MR, bool kEightBit>
SPARSEQ_AVX2 void slice_rows(const SellInt8Problem& p, int64_t s, int64_t m0, const std::vector<Step>& steps,
                             const __m256i rowsum[2]) {
  const int32_t* block_ptr = p.block_step_ptr + s * p.blocks;
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const Step* step = steps.data();
  for (int64_t b = 0; b < p.blocks; ++b) {
    const Step* block_end = step + (block_ptr[b + 1] - block_ptr[b]);
    const uint8_t* xb = p.xd + m0 * p.ldx + b * kSellBlock;
    for (; step < block_end; ++step) {
      for (int r = 0; r < MR; ++r) {
        const uint8_t* quarters = xb + r * p.ldx;
        __m256i table[4];
        for (int q = 0; q < 4; ++q)
          table[q] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quarters + 16 * q)));
        for (int h = 0; h < 2; ++h) {
          __m256i looked_up = _mm256_shuffle_epi8(table[0], step->control[0][h]);
          for (int q = 1; q < 4; ++q)
            looked_up = _mm256_xor_si256(looked_up, _mm256_shuffle_epi8(table[q], step->control[q][h]));
          acc[r][h] = dot4_add<kEightBit>(acc[r][h], looked_up, step->codes[h]);
        }
      }
    }
  }
  // Same operation order as the reference: float(acc - act_offset * rowsum), times
  // (x_scale * w_scale), plus bias.
  const int64_t n0 = s * kSellSlice;
  const __m256i offset = _mm256_set1_epi32(p.act_offset);
  for (int h = 0; h < 2; ++h) {
    const int64_t first = n0 + 8 * h;
    const int count = static_cast<int>(std::min<int64_t>(8, p.n - first));
    if (count <= 0) break;
    const __m256i lanes = first_lanes_mask(count);
    const __m256i correction = _mm256_mullo_epi32(rowsum[h], offset);
    const __m256 w_scale = _mm256_maskload_ps(p.w_scale + first, lanes);
    const __m256 bias = p.bias != nullptr ? _mm256_maskload_ps(p.bias + first, lanes) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + r;
      const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(p.x_scale[m]), w_scale);
      __m256 out = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], correction)), scale);
      if (p.bias != nullptr) out = _mm256_add_ps(out, bias);
      store8_float_as(p.c_out, p.out_type, m * p.ldc + first, out, count);
    }
  }
}

template <bool kEightBit>
SPARSEQ_AVX2 bool slices(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin, int64_t s_end) {
  std::vector<Step> steps;
  for (int64_t s = s_begin; s < s_end; ++s) {
    __m256i rowsum[2];
    if (!expand_slice(p, s, steps, rowsum)) return false;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kMaxRows) {
      switch (std::min<int64_t>(kMaxRows, m_end - m0)) {
        case 1: slice_rows<1, kEightBit>(p, s, m0, steps, rowsum); break;
        case 2: slice_rows<2, kEightBit>(p, s, m0, steps, rowsum); break;
        case 3: slice_rows<3, kEightBit>(p, s, m0, steps, rowsum); break;
        default: slice_rows<4, kEightBit>(p, s, m0, steps, rowsum); break;
      }
    }
  }
  return true;
}

}  // namespace

void sell_xor_quarters_avx2(const uint8_t* xu, int64_t m, int64_t ldx, uint8_t* xd) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ldx; c += kSellBlock) {
      const uint8_t* src = xu + i * ldx + c;
      uint8_t* dst = xd + i * ldx + c;
      __m128i previous = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), previous);
      for (int q = 1; q < 4; ++q) {
        const __m128i quarter = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * q));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * q), _mm_xor_si128(quarter, previous));
        previous = quarter;
      }
    }
}

bool sell_int8_slices_avx2(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin,
                           int64_t s_end) {
  // Offset-form activations reach 2 * act_offset - 1: 127 with 7-bit ones, 255 with 8-bit ones.
  return p.act_offset <= 64 ? slices<false>(p, m_begin, m_end, s_begin, s_end)
                            : slices<true>(p, m_begin, m_end, s_begin, s_end);
}

}  // namespace sparseq::cpu
