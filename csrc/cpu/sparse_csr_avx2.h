#pragma once
// Pieces of the CSR kernels shared by sparse_csr_linear_avx2.cpp and sparse_csr_linear_avx512.cpp:
// the check of a row's segment pointers and the expansion of its uint8 offsets to absolute columns.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "sparse_avx2.h"

namespace sparseq::cpu::avx2 {

// Checks the segment pointers of row n (0 <= start <= ... <= end <= nnz, at most 256 entries per
// segment) before anything is read through them. 8 segments per step: a loop per segment made
// the decode of a 90%-sparse row (~410 entries) 4-7% slower. In int32 lanes: every end >= 0, so
// with start >= 0 no count wraps; 0 <= count <= 256; end <= nnz.
SPARSEQ_AVX2 inline bool row_segments_valid(const CsrProblem& p, int64_t n) {
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  if (ptr[0] < 0) return false;
  const __m256i zero = _mm256_setzero_si256(), max_count = _mm256_set1_epi32(static_cast<int32_t>(kMaxSegmentEntries));
  const __m256i nnz = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(p.nnz, INT32_MAX)));
  for (int64_t s = 0; s < p.segments; s += 8) {
    const int64_t rest = p.segments - s;
    const __m256i lanes = first_lanes_mask(static_cast<int>(rest < 8 ? rest : 8));
    const __m256i start = _mm256_maskload_epi32(ptr + s, lanes), end = _mm256_maskload_epi32(ptr + s + 1, lanes);
    const __m256i count = _mm256_sub_epi32(end, start);
    const __m256i bad = _mm256_or_si256(
        _mm256_or_si256(_mm256_cmpgt_epi32(zero, end), _mm256_cmpgt_epi32(zero, count)),
        _mm256_or_si256(_mm256_cmpgt_epi32(count, max_count), _mm256_cmpgt_epi32(end, nnz)));
    if (!_mm256_testz_si256(bad, lanes)) return false;
  }
  return true;
}

// Writes the absolute columns of row n's segments [s0, s1) to columns[0 ..) (one loop over a
// row's entries then replaces a loop per segment). Every segment is expanded 32 entries at a
// time, the first 32 unconditionally (the next segment overwrites the excess; `columns` has 32
// spare entries), so a typical 90%-sparse segment (~26 entries) costs no data-dependent branch.
template <int kShift = 0>
SPARSEQ_AVX2 inline void expand_columns(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1, int32_t* columns) {
  for_segment_steps<32>(p, n, s0, s1, columns, [&](int32_t* out, int64_t e, int32_t first_column) SPARSEQ_AVX2 {
    const __m256i base = _mm256_set1_epi32(first_column);
    alignas(32) uint8_t tail[32] = {};
    const uint8_t* src = p.col_offsets + e;
    if (e + 32 > p.nnz) {  // only near the end of the arrays
      for (int64_t j = 0; e + j < p.nnz; ++j) tail[j] = p.col_offsets[e + j];
      src = tail;
    }
    for (int q = 0; q < 4; ++q) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * q));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * q),
                          _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtepu8_epi32(bytes), base), kShift));
    }
  });
}

// Prefetches the values and offsets of row n's segments [s0, s1) (the tile kernels' K-block walk
// jumps from row to row, which the hardware prefetchers do not follow). The row may not be checked
// yet: a prefetch never faults, and a malformed count is clamped to what a well-formed row holds.
inline __attribute__((always_inline)) void prefetch_row_entries(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1) {
  const int32_t* ptr = p.seg_ptr + n * p.segments;
  const int64_t count = std::clamp<int64_t>(static_cast<int64_t>(ptr[s1]) - ptr[s0], 0, (s1 - s0) * kMaxSegmentEntries);
  prefetch_bytes(static_cast<const char*>(p.values) + static_cast<int64_t>(ptr[s0]) * value_bytes(p.value_type),
                 count * value_bytes(p.value_type));
  prefetch_bytes(p.col_offsets + ptr[s0], count);
}

// How far ahead of the entry in use the row-by-row kernels prefetch the weight (values and
// offsets), a line or so every 16 entries. A weight that other layers pushed out of cache then
// streams while the kernel computes: without it each core's L1 misses (16 in flight) capped the
// stream at ~7 GB/s and the call took compute time + transfer time (M=1, 4096x4096, 70% zeros:
// 1.64 -> 1.26 ms; 2 to 8 KiB ahead measured alike, a burst per row 4-32 rows ahead did nothing).
constexpr int64_t kStreamAheadBytes = 8192;

// Call once per 16 entries, with e the absolute index of the first of them.
inline __attribute__((always_inline)) void prefetch_stream(const CsrProblem& p, int64_t e) {
  const int64_t bytes = value_bytes(p.value_type);
  const int64_t ahead = e + kStreamAheadBytes / bytes;
  const auto values = reinterpret_cast<uintptr_t>(p.values) + static_cast<uintptr_t>(ahead * bytes);
  _mm_prefetch(reinterpret_cast<const char*>(values), _MM_HINT_T0);  // fp32: every line once
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p.col_offsets) + ahead), _MM_HINT_T0);
}

// Segments per K block of the tile kernel. A 90%-sparse row touches ~10% of the x tile's rows, so
// whole rows (the weight streamed in order) run fastest; denser rows touch most of the tile and
// run fastest with its 4-segment block (64 KiB at width 16) kept close.
inline int64_t csr_block_segments(const CsrProblem& p) {
  return csr_density(p) < kCsrSparseDensity ? p.segments : 4;
}

}  // namespace sparseq::cpu::avx2
