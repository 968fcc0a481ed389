#pragma once
// The walks of the sparse tile kernels, shared by their AVX2 and AVX-512 versions. They carry no
// target attribute and are always inlined: inside a kernel marked SPARSEQ_AVX2 or SPARSEQ_AVX512
// they take that kernel's ISA, and the Accumulators type (avx2::TileAccumulators or
// avx512::TileAccumulators512) brings the FMA step of that ISA (and, with kOwnExpansion, its
// column expansion).
#include <algorithm>
#include <climits>
#include <cstring>

#include "sparse_csr_avx2.h"

#define SPARSEQ_ALWAYS_INLINE inline __attribute__((always_inline))

namespace sparseq::cpu::avx2 {

// How many nonzeros ahead the AVX2 32-wide tile kernel prefetches the x tile row of. A nonzero's
// tile row (two cache lines at width 32) sits at a random place in a 512 KiB tile at K=4096, and
// without the prefetch most FMAs waited on it (M=128: about 1.4x faster with it, on the Zen 3
// cores). At widths 8 and 16, and on the AVX-512 Xeons at any width, it measured no better. The
// columns buffer holds 32 spare entries past any row's count (see expand_columns), so reading
// ahead stays inside it; a stale entry only prefetches some tile row.
constexpr int64_t kTilePrefetchAhead = 16;

// acc += row n's entries in segments [s0, s1) times their tile rows (the tile kWidth x rows wide).
// The entries are contiguous: they are widened once and their columns expanded once. A whole row
// streams its weight ahead of use (prefetch_stream); a K block of one the caller prefetched.
template <int kWidth, bool kPrefetchTileRows, class Accumulators>
SPARSEQ_ALWAYS_INLINE void csr_row_walk(const CsrProblem& p, int64_t n, int64_t s0, int64_t s1, const float* tile,
                                        int32_t* columns, float* values_f32, Accumulators& acc) {
  constexpr int kSets = Accumulators::kSets;
  const int32_t* row_ptr = p.seg_ptr + n * p.segments;
  const int64_t begin = row_ptr[s0], count = row_ptr[s1] - begin;
  const float* w = static_cast<const float*>(p.values) + begin;
  if (p.value_type != ValueType::kFloat32) {
    widen_values(p.values, p.value_type, begin, count, values_f32);
    w = values_f32;
  }
  const bool whole_row = s1 - s0 == p.segments;
  int64_t e = 0;
  constexpr int64_t kRowBytes = kWidth * sizeof(float);
  if constexpr (!kPrefetchTileRows && kSets % 2 == 0) {
    if (p.x.k_pad <= INT32_MAX / kRowBytes) {
      // Columns as byte offsets of their tile rows, two per 64-bit load: a nonzero then costs two
      // loads (its value, broadcast, and its tile row) instead of three.
      constexpr int kShift = __builtin_ctzll(kRowBytes);
      if constexpr (Accumulators::kOwnExpansion) {
        Accumulators::template expand_columns<kShift>(p, n, s0, s1, columns);
      } else {
        expand_columns<kShift>(p, n, s0, s1, columns);
      }
      const char* tile_bytes = reinterpret_cast<const char*>(tile);
      for (; e + kSets <= count; e += kSets) {
        if (whole_row && e % 16 == 0) prefetch_stream(p, begin + e);
        for (int set = 0; set < kSets; set += 2) {
          uint64_t pair;
          std::memcpy(&pair, columns + e + set, sizeof(pair));
          acc.fma(set, w + e + set, reinterpret_cast<const float*>(tile_bytes + static_cast<uint32_t>(pair)));
          acc.fma(set + 1, w + e + set + 1, reinterpret_cast<const float*>(tile_bytes + (pair >> 32)));
        }
      }
      #pragma GCC unroll 8
      for (int set = 0; set < kSets - 1; ++set)  // the last < kSets entries, each in its own chain
        if (e + set < count) {
          const uint32_t offset = static_cast<uint32_t>(columns[e + set]);
          acc.fma(set, w + e + set, reinterpret_cast<const float*>(tile_bytes + offset));
        }
      return;
    }
  }
  expand_columns(p, n, s0, s1, columns);
  for (; e + kSets <= count; e += kSets) {
    if (whole_row && e % 16 == 0) prefetch_stream(p, begin + e);
    for (int set = 0; set < kSets; ++set) {
      if constexpr (kPrefetchTileRows) {
        _mm_prefetch(reinterpret_cast<const char*>(tile + columns[e + set + kTilePrefetchAhead] * kWidth), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(tile + columns[e + set + kTilePrefetchAhead] * kWidth + 16),
                     _MM_HINT_T0);
      }
      acc.fma(set, w + e + set, tile + columns[e + set] * kWidth);
    }
  }
  for (; e < count; ++e) acc.fma(0, w + e, tile + columns[e] * kWidth);
}

// The 2:4 tile kernel: tile rows [n_begin, n_end) x the tile of x rows m0.., one K block of
// block_groups groups at a time across all rows (a row reads about half of its block's tile rows,
// so the caller sizes the block to stay in L1), partial sums in `partial`, then the epilogue.
template <int kWidth, class Accumulators>
SPARSEQ_ALWAYS_INLINE void sparse24_tile_walk(const Sparse24Problem& p, int64_t m0, int64_t n_begin, int64_t n_end,
                                              int64_t block_groups, float* partial, float* values_f32) {
  constexpr int kSets = Accumulators::kSets;
  const float* tile = p.x.x_tiles + m0 * p.x.k_pad;
  const int64_t groups = p.groups, meta_bytes = (groups + 1) / 2;
  const int64_t bytes = value_bytes(p.value_type);
  for (int64_t g0 = 0; g0 < groups; g0 += block_groups) {
    const int64_t g1 = std::min(groups, g0 + block_groups);
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (n + kPrefetchRows < n_end) {
        const int64_t ahead = n + kPrefetchRows;
        prefetch_bytes(static_cast<const char*>(p.values) + (ahead * 2 * groups + 2 * g0) * bytes,
                       2 * (g1 - g0) * bytes);
        prefetch_bytes(p.meta + ahead * meta_bytes + g0 / 2, (g1 - g0 + 1) / 2);
      }
      const uint8_t* meta = p.meta + n * meta_bytes;
      const int64_t value_begin = n * 2 * groups + 2 * g0;
      const float* w = static_cast<const float*>(p.values) + value_begin;
      if (p.value_type != ValueType::kFloat32) {
        widen_values(p.values, p.value_type, value_begin, 2 * (g1 - g0), values_f32);
        w = values_f32;
      }
      w -= 2 * g0;  // indexed by group below
      Accumulators acc;
      acc.zero();
      // A meta byte covers 2 groups = 8 columns and 4 stored values; two bytes per step feed 8
      // chains. Positions become byte offsets of tile rows with one shift and one mask each.
      constexpr int64_t kRowBytes = kWidth * sizeof(float);
      const char* tile_bytes = reinterpret_cast<const char*>(tile);
      const uint8_t* meta_step = meta + g0 / 2;
      int64_t g = g0;
      for (; g + 4 <= g1; g += 4, meta_step += 2) {
        const uint64_t bits = static_cast<uint64_t>(meta_step[0] | meta_step[1] << 8) * kRowBytes;
        const char* x16 = tile_bytes + 4 * g * kRowBytes;
        const float* w8 = w + 2 * g;
        #pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {  // value j sits in group g + j / 2, at position bits 2j..2j+1
          const char* x_row = x16 + 4 * (j / 2) * kRowBytes + ((bits >> (2 * j)) & 3 * kRowBytes);
          acc.fma(j % kSets, w8 + j, reinterpret_cast<const float*>(x_row));
        }
      }
      for (; g < g1; ++g) {  // the last 1..3 groups
        const uint32_t bits = meta[g / 2] >> (4 * (g % 2));
        acc.fma(0, w + 2 * g, tile + (4 * g + (bits & 3)) * kWidth);
        acc.fma(1 % kSets, w + 2 * g + 1, tile + (4 * g + ((bits >> 2) & 3)) * kWidth);
      }
      acc.add_to(partial + (n - n_begin) * kWidth, g0 == 0);
    }
  }
  store_partials(p.epilogue, partial, kWidth, n_begin, n_end, m0, std::min<int64_t>(p.x.m - m0, kWidth));
}

}  // namespace sparseq::cpu::avx2
