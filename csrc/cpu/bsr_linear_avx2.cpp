// AVX2 micro-kernels of bsr_linear (driver in bsr_linear.cpp). Two families:
//  - few rows of x (m < kBsrTransposedMinRows): row-major x; up to 4 rows of x share every
//    weight load, and the values stream once in storage order (prefetched ahead).
//    Shapes: bw % 8 == 0 (8 columns per load), bw == 4 (two output rows per register),
//    bw == 1 with bh % 4 == 0 (4 output rows per register).
//  - many rows (or any other shape): x transposed into 16-row tiles (BsrProblem::xt); each
//    weight is broadcast and multiplies a 16-wide M tile, up to 4 output rows x 16 M in 8
//    accumulators (taller blocks: group by group within each block). A chunk of block rows
//    (converted to fp32 once if stored as bf16/fp16/int8) stays in L2 while every M tile
//    passes over it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "avx2_common.h"
#include "bsr_kernels.h"

namespace sparseq::cpu {
namespace {

template <ValueType V>
SPARSEQ_AVX2 inline __m256 load8_value(const void* base, int64_t i) {
  if constexpr (V == ValueType::kInt8) {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
  } else {
    return avx2::load8_as_float(base, static_cast<OutType>(V), i);
  }
}

template <ValueType V>
SPARSEQ_AVX2 inline __m128 load4_value(const void* base, int64_t i) {
  if constexpr (V == ValueType::kInt8) {
    int32_t codes;
    std::memcpy(&codes, static_cast<const int8_t*>(base) + i, sizeof(codes));
    return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(codes)));
  } else if constexpr (V == ValueType::kFloat32) {
    return _mm_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (V == ValueType::kBFloat16) return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    return _mm_cvtph_ps(h);
  }
}

template <ValueType V>
SPARSEQ_AVX2 inline float load1_value(const void* base, int64_t i) {
  if constexpr (V == ValueType::kInt8) {
    return static_cast<float>(static_cast<const int8_t*>(base)[i]);
  } else {
    return avx2::load1_as_float(base, static_cast<OutType>(V), i);
  }
}

SPARSEQ_AVX2 inline float hsum128(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

SPARSEQ_AVX2 inline float hsum256(__m256 v) {
  return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// out[m, n] = acc (* w_scale[n]) + bias[n], converted to the output type.
SPARSEQ_AVX2 inline void store_output(const BsrProblem& p, int64_t m, int64_t n, float acc) {
  if (p.w_scale != nullptr) acc *= p.w_scale[n];
  if (p.bias != nullptr) acc += p.bias[n];
  avx2::store1_float_as(p.c_out, p.out_type, m * p.ldc + n, acc);
}

// ------------------------------------------------------------------ few rows, row-major x

// Few-row kernels stream the values once, at DRAM speed if they are cold: keep requests for
// the values kValuePrefetchBytes ahead in flight (a block row's blocks are contiguous).
constexpr int64_t kValuePrefetchBytes = 1024;

template <ValueType V>
SPARSEQ_AVX2 inline void prefetch_values_ahead(const void* values, int64_t i) {
  constexpr int64_t kSize = V == ValueType::kFloat32 ? 4 : V == ValueType::kInt8 ? 1 : 2;
  _mm_prefetch(static_cast<const char*>(values) + i * kSize + kValuePrefetchBytes, _MM_HINT_T0);
}

// bw % 8 == 0: the block row's values are read once, in storage order, block by block; each
// output row's 8-lane partial sums wait in `sums` [bh][MR][8] (L1) between blocks, so the
// chains of different rows overlap. One-row blocks keep two register chains instead.
template <ValueType V, int MR>
SPARSEQ_AVX2 void block_row_bw8(const BsrProblem& p, int64_t r, int64_t b, int64_t e, int64_t m0, float* sums) {
  const int64_t bh = p.bh, bw = p.bw;
  if (bh == 1) {
    __m256 even[MR], odd[MR];
    for (int j = 0; j < MR; ++j) even[j] = odd[j] = _mm256_setzero_ps();
    auto add_block = [&](__m256* acc, int64_t blk) SPARSEQ_AVX2 {
      prefetch_values_ahead<V>(p.values, blk * bw);
      const float* xb = p.x + m0 * p.ldx + static_cast<int64_t>(p.block_col_idx[blk]) * bw;
      for (int64_t c = 0; c < bw; c += 8) {
        const __m256 w = load8_value<V>(p.values, blk * bw + c);
        for (int j = 0; j < MR; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + j * p.ldx + c), acc[j]);
      }
    };
    int64_t blk = b;
    for (; blk + 2 <= e; blk += 2) {
      add_block(even, blk);
      add_block(odd, blk + 1);
    }
    if (blk < e) add_block(even, blk);
    for (int j = 0; j < MR; ++j) store_output(p, m0 + j, r, hsum256(_mm256_add_ps(even[j], odd[j])));
    return;
  }
  std::fill(sums, sums + bh * MR * 8, 0.0f);
  for (int64_t blk = b; blk < e; ++blk) {
    const float* xb = p.x + m0 * p.ldx + static_cast<int64_t>(p.block_col_idx[blk]) * bw;
    for (int64_t i = 0; i < bh; ++i) {
      float* row_sums = sums + i * MR * 8;
      __m256 acc[MR];
      for (int j = 0; j < MR; ++j) acc[j] = _mm256_loadu_ps(row_sums + 8 * j);
      const int64_t vb = (blk * bh + i) * bw;
      for (int64_t c = 0; c < bw; c += 8) {
        const __m256 w = load8_value<V>(p.values, vb + c);
        for (int j = 0; j < MR; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + j * p.ldx + c), acc[j]);
      }
      for (int j = 0; j < MR; ++j) _mm256_storeu_ps(row_sums + 8 * j, acc[j]);
    }
  }
  for (int64_t i = 0; i < bh && r * bh + i < p.n; ++i)
    for (int j = 0; j < MR; ++j) store_output(p, m0 + j, r * bh + i, hsum256(_mm256_loadu_ps(sums + (i * MR + j) * 8)));
}

// bw == 4: two output rows per register (their 8 values are contiguous), x's 4 columns
// broadcast to both halves; an odd last row goes through a 128-bit register.
template <ValueType V, int MR>
SPARSEQ_AVX2 void block_row_bw4(const BsrProblem& p, int64_t r, int64_t b, int64_t e, int64_t m0) {
  const int64_t bh = p.bh;
  int64_t i = 0;
  for (; i + 2 <= bh && r * bh + i < p.n; i += 2) {
    __m256 acc[MR];
    for (int j = 0; j < MR; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t blk = b; blk < e; ++blk) {
      prefetch_values_ahead<V>(p.values, (blk * bh + i) * 4);
      const float* xb = p.x + m0 * p.ldx + static_cast<int64_t>(p.block_col_idx[blk]) * 4;
      const __m256 w = load8_value<V>(p.values, (blk * bh + i) * 4);
      for (int j = 0; j < MR; ++j)
        acc[j] = _mm256_fmadd_ps(w, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xb + j * p.ldx)), acc[j]);
    }
    for (int j = 0; j < MR; ++j) {
      store_output(p, m0 + j, r * bh + i, hsum128(_mm256_castps256_ps128(acc[j])));
      if (r * bh + i + 1 < p.n) store_output(p, m0 + j, r * bh + i + 1, hsum128(_mm256_extractf128_ps(acc[j], 1)));
    }
  }
  if (i < bh && r * bh + i < p.n) {
    __m128 acc[MR];
    for (int j = 0; j < MR; ++j) acc[j] = _mm_setzero_ps();
    for (int64_t blk = b; blk < e; ++blk) {
      const float* xb = p.x + m0 * p.ldx + static_cast<int64_t>(p.block_col_idx[blk]) * 4;
      const __m128 w = load4_value<V>(p.values, (blk * bh + i) * 4);
      for (int j = 0; j < MR; ++j) acc[j] = _mm_fmadd_ps(w, _mm_loadu_ps(xb + j * p.ldx), acc[j]);
    }
    for (int j = 0; j < MR; ++j) store_output(p, m0 + j, r * bh + i, hsum128(acc[j]));
  }
}

// bw == 1, bh % 4 == 0: a block is a column; 4 output rows per register times a broadcast x.
template <ValueType V, int MR>
SPARSEQ_AVX2 void block_row_bw1(const BsrProblem& p, int64_t r, int64_t b, int64_t e, int64_t m0) {
  const int64_t bh = p.bh;
  for (int64_t i = 0; i < bh && r * bh + i < p.n; i += 4) {
    __m128 acc[MR];
    for (int j = 0; j < MR; ++j) acc[j] = _mm_setzero_ps();
    for (int64_t blk = b; blk < e; ++blk) {
      const float* xb = p.x + m0 * p.ldx + p.block_col_idx[blk];
      const __m128 w = load4_value<V>(p.values, blk * bh + i);
      for (int j = 0; j < MR; ++j) acc[j] = _mm_fmadd_ps(w, _mm_set1_ps(xb[j * p.ldx]), acc[j]);
    }
    for (int j = 0; j < MR; ++j) {
      alignas(16) float rows[4];
      _mm_store_ps(rows, acc[j]);
      for (int t = 0; t < 4 && r * bh + i + t < p.n; ++t) store_output(p, m0 + j, r * bh + i + t, rows[t]);
    }
  }
}

template <ValueType V, int MR>
SPARSEQ_AVX2 void row_major_block_row(const BsrProblem& p, int64_t r, int64_t b, int64_t e, int64_t m0,
                                      float* sums) {
  if (p.bw % 8 == 0) {
    block_row_bw8<V, MR>(p, r, b, e, m0, sums);
  } else if (p.bw == 4) {
    block_row_bw4<V, MR>(p, r, b, e, m0);
  } else {
    block_row_bw1<V, MR>(p, r, b, e, m0);
  }
}

template <ValueType V>
SPARSEQ_AVX2 bool row_major_rows(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  std::vector<float> sums(static_cast<size_t>(p.bh * 4 * 8));
  for (int64_t r = r_begin; r < r_end; ++r) {
    int64_t b, e;
    if (!bsr_block_row(p, r, &b, &e)) return false;
    int64_t m0 = 0;
    for (; m0 + 4 <= p.m; m0 += 4) row_major_block_row<V, 4>(p, r, b, e, m0, sums.data());
    if (m0 + 2 <= p.m) {
      row_major_block_row<V, 2>(p, r, b, e, m0, sums.data());
      m0 += 2;
    }
    if (m0 < p.m) row_major_block_row<V, 1>(p, r, b, e, m0, sums.data());
  }
  return true;
}

// ------------------------------------------------------------------ many rows, transposed x

// fp32 weights of a chunk of block rows kept in L2 while the M tiles pass over them.
constexpr int64_t kChunkFloats = int64_t{1} << 15;
// Output rows of a chunk, whose M tile of results is gathered before it is written out row by
// row (writing a tile column by column would touch kBsrMTile lines ldc apart, which alias in L1).
constexpr int64_t kChunkMaxRows = 256;
constexpr int64_t kPrefetchBlocks = 8;

// tile[rr][mm] = sum over the block row's blocks and columns c of
//                w[blk, i0 + rr, c] * xt[col(blk) * bw + c][mm],  rr < ROWS, mm < 8 * MV.
// BW > 0 fixes the block width at compile time (the column loop unrolls), 0 reads p.bw.
// Fewer than 4 rows keep 4 / ROWS sets of partial sums over alternating columns, so that
// enough independent FMA chains are in flight to cover the FMA latency.
template <int ROWS, int MV, int BW>
SPARSEQ_AVX2 void transposed_tile(const BsrProblem& p, const float* xt, const float* w, const int32_t* cols,
                                  int64_t blocks, int64_t i0, float* tile) {
  constexpr int kSets = 4 / ROWS;
  const int64_t bh = p.bh, bw = BW > 0 ? BW : p.bw;
  __m256 acc[kSets][ROWS][MV];
  for (int s = 0; s < kSets; ++s)
    for (int rr = 0; rr < ROWS; ++rr)
      for (int v = 0; v < MV; ++v) acc[s][rr][v] = _mm256_setzero_ps();
  auto column = [&](int s, const float* xc, const float* wb, int64_t c) SPARSEQ_AVX2 {
    __m256 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xc + c * kBsrMTile + 8 * v);
    for (int rr = 0; rr < ROWS; ++rr) {
      const __m256 wv = _mm256_broadcast_ss(wb + rr * bw + c);
      for (int v = 0; v < MV; ++v) acc[s][rr][v] = _mm256_fmadd_ps(wv, xv[v], acc[s][rr][v]);
    }
  };
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xc = xt + static_cast<int64_t>(cols[blk]) * bw * kBsrMTile;
    const float* wb = w + (blk * bh + i0) * bw;
    if (BW > 0 && BW <= 8 && blk + kPrefetchBlocks < blocks) {
      // Narrow blocks' activations are a few scattered lines each: fetch them ahead.
      const float* ahead = xt + static_cast<int64_t>(cols[blk + kPrefetchBlocks]) * bw * kBsrMTile;
      for (int64_t c = 0; c < bw; ++c) _mm_prefetch(reinterpret_cast<const char*>(ahead + c * kBsrMTile), _MM_HINT_T0);
    }
    int64_t c = 0;
    for (; c + kSets <= bw; c += kSets)
      for (int s = 0; s < kSets; ++s) column(s, xc, wb, c + s);
    // Narrow blocks (bw < kSets) rotate the sets over blocks instead of columns.
    for (; c < bw; ++c) column(static_cast<int>((blk + c) % kSets), xc, wb, c);
  }
  for (int s = 1; s < kSets; ++s)
    for (int rr = 0; rr < ROWS; ++rr)
      for (int v = 0; v < MV; ++v) acc[0][rr][v] = _mm256_add_ps(acc[0][rr][v], acc[s][rr][v]);
  for (int rr = 0; rr < ROWS; ++rr)
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(tile + rr * kBsrMTile + 8 * v, acc[0][rr][v]);
}

// Runs the widest row group that fits (4, 2 or 1 rows from i0) and returns its row count.
template <int MV, int BW>
SPARSEQ_AVX2 int64_t transposed_row_group(const BsrProblem& p, const float* xt, const float* w, const int32_t* cols,
                                          int64_t blocks, int64_t i0, float* tile) {
  const int64_t left = p.bh - i0;
  if (left >= 4) {
    transposed_tile<4, MV, BW>(p, xt, w, cols, blocks, i0, tile);
    return 4;
  }
  if (left >= 2) {
    transposed_tile<2, MV, BW>(p, xt, w, cols, blocks, i0, tile);
    return 2;
  }
  transposed_tile<1, MV, BW>(p, xt, w, cols, blocks, i0, tile);
  return 1;
}

// Blocks taller than 4 rows (bh % 4 == 0): block by block, each group of 4 rows reuses the
// block's activations while they are in L1 (a row group at a time over the whole block row
// would stream them from L2 bh / 4 times); group accumulators wait in `tile` [bh][kBsrMTile].
template <int MV, int BW>
SPARSEQ_AVX2 void transposed_tall_blocks(const BsrProblem& p, const float* xt, const float* w, const int32_t* cols,
                                         int64_t blocks, float* tile) {
  const int64_t bh = p.bh, bw = BW > 0 ? BW : p.bw;
  std::fill(tile, tile + bh * kBsrMTile, 0.0f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* xc = xt + static_cast<int64_t>(cols[blk]) * bw * kBsrMTile;
    for (int64_t i0 = 0; i0 < bh; i0 += 4) {
      const float* wb = w + (blk * bh + i0) * bw;
      float* group = tile + i0 * kBsrMTile;
      __m256 acc[4][MV];
      for (int rr = 0; rr < 4; ++rr)
        for (int v = 0; v < MV; ++v) acc[rr][v] = _mm256_loadu_ps(group + rr * kBsrMTile + 8 * v);
      for (int64_t c = 0; c < bw; ++c) {
        __m256 xv[MV];
        for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xc + c * kBsrMTile + 8 * v);
        for (int rr = 0; rr < 4; ++rr) {
          const __m256 wv = _mm256_broadcast_ss(wb + rr * bw + c);
          for (int v = 0; v < MV; ++v) acc[rr][v] = _mm256_fmadd_ps(wv, xv[v], acc[rr][v]);
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int v = 0; v < MV; ++v) _mm256_storeu_ps(group + rr * kBsrMTile + 8 * v, acc[rr][v]);
    }
  }
}

template <int MV>
SPARSEQ_AVX2 int64_t transposed_row_group_any_bw(const BsrProblem& p, const float* xt, const float* w,
                                                 const int32_t* cols, int64_t blocks, int64_t i0, float* tile) {
  switch (p.bw) {
    case 1: return transposed_row_group<MV, 1>(p, xt, w, cols, blocks, i0, tile);
    case 2: return transposed_row_group<MV, 2>(p, xt, w, cols, blocks, i0, tile);
    case 4: return transposed_row_group<MV, 4>(p, xt, w, cols, blocks, i0, tile);
    case 8: return transposed_row_group<MV, 8>(p, xt, w, cols, blocks, i0, tile);
    default: return transposed_row_group<MV, 0>(p, xt, w, cols, blocks, i0, tile);
  }
}

// out[m0 + mm, n0 + j] = acc[j * kBsrMTile + mm] (* w_scale) (+ bias) for mm < m_count, j < count.
SPARSEQ_AVX2 void store_chunk_tile(const BsrProblem& p, int64_t n0, int64_t count, int64_t m0, int64_t m_count,
                                   const float* acc) {
  for (int64_t mm = 0; mm < m_count; ++mm) {
    for (int64_t j = 0; j < count; j += 8) {
      const int lanes = static_cast<int>(std::min<int64_t>(8, count - j));
      alignas(32) float column[8] = {};
      for (int t = 0; t < lanes; ++t) column[t] = acc[(j + t) * kBsrMTile + mm];
      __m256 result = _mm256_load_ps(column);
      // Same steps as the scalar epilogue: scale only for int8 codes, then the bias.
      if (p.w_scale != nullptr) result = _mm256_mul_ps(result, avx2::load8_floats_masked(p.w_scale + n0 + j, lanes));
      if (p.bias != nullptr) result = _mm256_add_ps(result, avx2::load8_floats_masked(p.bias + n0 + j, lanes));
      avx2::store8_float_as(p.c_out, p.out_type, (m0 + mm) * p.ldc + n0 + j, result, lanes);
    }
  }
}

template <ValueType V>
SPARSEQ_AVX2 void convert_values(const void* values, int64_t first, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, load8_value<V>(values, first + i));
  for (; i < count; ++i) dst[i] = load1_value<V>(values, first + i);
}

template <ValueType V>
SPARSEQ_AVX2 bool transposed_rows(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    int64_t b, e;
    if (!bsr_block_row(p, r, &b, &e)) return false;
  }
  const int32_t* ptr = p.block_row_ptr;
  const int64_t block_floats = p.bh * p.bw, tile_floats = p.kb * p.bw * kBsrMTile;
  std::vector<float> converted;
  std::vector<float> results(static_cast<size_t>(std::max(kChunkMaxRows, p.bh) * kBsrMTile));
  const bool tall_blocks = p.bh > 4 && p.bh % 4 == 0 && p.bw >= 8;
  for (int64_t r0 = r_begin; r0 < r_end;) {
    int64_t r1 = r0 + 1;
    while (r1 < r_end && (r1 + 1 - r0) * p.bh <= kChunkMaxRows &&
           (ptr[r1 + 1] - ptr[r0]) * block_floats <= kChunkFloats)
      ++r1;
    const int64_t first = ptr[r0];
    const float* w;
    if constexpr (V == ValueType::kFloat32) {
      w = static_cast<const float*>(p.values) + first * block_floats;
    } else {
      const int64_t count = (ptr[r1] - first) * block_floats;
      converted.resize(static_cast<size_t>(count));
      convert_values<V>(p.values, first * block_floats, count, converted.data());
      w = converted.data();
    }
    for (int64_t m0 = 0; m0 < p.m; m0 += kBsrMTile) {
      const float* xt = p.xt + (m0 / kBsrMTile) * tile_floats;
      const int64_t m_count = std::min(kBsrMTile, p.m - m0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = ptr[r], blocks = ptr[r + 1] - b;
        const float* wr = w + (b - first) * block_floats;
        if (tall_blocks) {
          float* tile = results.data() + (r - r0) * p.bh * kBsrMTile;
          if (m_count <= 8) {
            p.bw == 8 ? transposed_tall_blocks<1, 8>(p, xt, wr, p.block_col_idx + b, blocks, tile)
                      : transposed_tall_blocks<1, 0>(p, xt, wr, p.block_col_idx + b, blocks, tile);
          } else {
            p.bw == 8 ? transposed_tall_blocks<2, 8>(p, xt, wr, p.block_col_idx + b, blocks, tile)
                      : transposed_tall_blocks<2, 0>(p, xt, wr, p.block_col_idx + b, blocks, tile);
          }
          continue;
        }
        for (int64_t i0 = 0; i0 < p.bh && r * p.bh + i0 < p.n;) {
          float* tile = results.data() + ((r - r0) * p.bh + i0) * kBsrMTile;
          i0 += m_count <= 8 ? transposed_row_group_any_bw<1>(p, xt, wr, p.block_col_idx + b, blocks, i0, tile)
                             : transposed_row_group_any_bw<2>(p, xt, wr, p.block_col_idx + b, blocks, i0, tile);
        }
      }
      const int64_t n0 = r0 * p.bh;
      store_chunk_tile(p, n0, std::min(p.n, r1 * p.bh) - n0, m0, m_count, results.data());
    }
    r0 = r1;
  }
  return true;
}

template <ValueType V>
SPARSEQ_AVX2 bool rows_typed(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  if (p.m < kBsrTransposedMinRows && bsr_avx2_has_row_major_kernel(p.bh, p.bw))
    return row_major_rows<V>(p, r_begin, r_end);
  return transposed_rows<V>(p, r_begin, r_end);
}

}  // namespace

bool bsr_avx2_has_row_major_kernel(int64_t bh, int64_t bw) {
  return bw % 8 == 0 || bw == 4 || (bw == 1 && bh % 4 == 0);
}

bool bsr_rows_avx2(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  switch (p.value_type) {
    case ValueType::kBFloat16: return rows_typed<ValueType::kBFloat16>(p, r_begin, r_end);
    case ValueType::kFloat16: return rows_typed<ValueType::kFloat16>(p, r_begin, r_end);
    case ValueType::kInt8: return rows_typed<ValueType::kInt8>(p, r_begin, r_end);
    default: return rows_typed<ValueType::kFloat32>(p, r_begin, r_end);
  }
}

}  // namespace sparseq::cpu
