#pragma once
// Torch-side pieces shared by the sparse linear op files (sparse_csr_linear.cpp,
// sparse24_linear.cpp): value types, the fp32 activation forms the kernels read, the portable
// epilogue, and the split of output rows over threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "op_common.h"
#include "parallel_tiles.h"
#include "sparse_kernels.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {

inline ValueType value_type_of(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return ValueType::kBFloat16;
    case at::kHalf: return ValueType::kFloat16;
    case at::kChar: return ValueType::kInt8;
    default: return ValueType::kFloat32;
  }
}

inline float stored_value(const void* values, ValueType t, int64_t e) {
  switch (t) {
    case ValueType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(values)[e]);
    case ValueType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(values)[e]);
    case ValueType::kInt8: return static_cast<float>(static_cast<const int8_t*>(values)[e]);
    default: return static_cast<const float*>(values)[e];
  }
}

// Portable epilogue of one output.
inline void store_output(const SparseEpilogue& ep, int64_t m, int64_t n, float acc) {
  if (ep.w_scale != nullptr) acc *= ep.w_scale[n];
  if (ep.bias != nullptr) acc += ep.bias[n];
  const int64_t i = m * ep.ldc + n;
  switch (ep.out_type) {
    case OutType::kBFloat16: static_cast<c10::BFloat16*>(ep.out)[i] = c10::BFloat16(acc); break;
    case OutType::kFloat16: static_cast<c10::Half*>(ep.out)[i] = c10::Half(acc); break;
    default: static_cast<float*>(ep.out)[i] = acc;
  }
}

inline SparseEpilogue make_epilogue(const at::Tensor& out, const c10::optional<at::Tensor>& w_scale,
                                    const at::Tensor& bias_f32) {
  SparseEpilogue ep;
  ep.w_scale = w_scale.has_value() ? w_scale->const_data_ptr<float>() : nullptr;
  ep.bias = float_ptr_or_null(bias_f32);
  ep.out = out.mutable_data_ptr();
  ep.out_type = out_type_of(out);
  ep.ldc = out.size(1);
  return ep;
}

template <typename T>
void widen_rows(const T* src, int64_t m, int64_t k, float* dst, int64_t k_pad) {
  for (int64_t r = 0; r < m; ++r) {
    const T* in = src + r * k;
    float* out = dst + r * k_pad;
    for (int64_t c = 0; c < k; ++c) out[c] = static_cast<float>(in[c]);
    std::fill(out + k, out + k_pad, 0.0f);
  }
}

// x as fp32 rows [m, k_pad], zero padded (x itself when it already is that). Filled here rather
// than by at::zeros + narrow + copy_: at batch 1 those dispatcher calls cost as much as the kernel.
inline at::Tensor activation_rows(const at::Tensor& x, int64_t k_pad) {
  if (x.scalar_type() == at::kFloat && x.size(1) == k_pad) return x;
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor rows = at::empty({m, k_pad}, x.options().dtype(at::kFloat));
  float* dst = rows.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kBFloat16: widen_rows(x.const_data_ptr<c10::BFloat16>(), m, k, dst, k_pad); break;
    case at::kHalf: widen_rows(x.const_data_ptr<c10::Half>(), m, k, dst, k_pad); break;
    default: widen_rows(x.const_data_ptr<float>(), m, k, dst, k_pad);
  }
  return rows;
}

// Tiles of x rows the tile kernels take: max_width wide (tile_width_max) while that many rows
// remain, then halving down to 16, then 16 and/or 8 wide (at most 7 padding rows wasted, except
// 9..15 left over).
inline int64_t next_tile_width(int64_t rows_left, int64_t max_width) {
  int64_t width = max_width;
  while (width > kTileWidthMedium && rows_left < width) width /= 2;
  if (width == kTileWidthMedium && rows_left <= kTileWidthSmall) width = kTileWidthSmall;
  return width;
}

template <typename Fn>
void for_each_tile(int64_t m, int64_t max_width, const Fn& fn) {
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t width = next_tile_width(m - m0, max_width);
    fn(m0, width);
    m0 += width;
  }
}

// Scratch of a chunk's tile walk: `partial` for the widest tile this x takes (the first), left
// uninitialised since every walk writes a row's partial sums before it adds to them. Sized for
// max_width and zero filled, it cost a 16-row call 256 KiB of fresh pages per chunk.
struct TileScratch {
  std::unique_ptr<float[]> partial, values_f32;
  TileScratch(int64_t rows, int64_t m, int64_t max_width, int64_t value_floats)
      : partial(new float[rows * next_tile_width(m, max_width)]), values_f32(new float[value_floats]) {}
};

template <typename T>
void transpose_to_tile_portable(const T* x, int64_t m, int64_t k, int64_t m0, int64_t width, int64_t k_pad,
                                float* tile) {
  const int64_t rows = std::min(width, m - m0);
  constexpr int64_t kBlock = 64;  // columns per pass: the block of tile rows stays in L1
  for (int64_t c0 = 0; c0 < k; c0 += kBlock) {
    const int64_t c1 = std::min(k, c0 + kBlock);
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = x + (m0 + i) * k;
      for (int64_t c = c0; c < c1; ++c) tile[c * width + i] = static_cast<float>(row[c]);
    }
    if (rows < width)
      for (int64_t c = c0; c < c1; ++c) std::fill(tile + c * width + rows, tile + (c + 1) * width, 0.0f);
  }
  std::fill(tile + k * width, tile + k_pad * width, 0.0f);
}

// One tile of rows m0 .. m0 + width - 1 of x (contiguous [m, k], fp32 / bf16 / fp16) transposed and
// zero padded, as transpose_to_tile_avx2 documents: the layout of x_tiles and of the BSR kernels' xt.
inline void transpose_to_tile(const at::Tensor& x, int64_t m0, int64_t width, int64_t k_pad, float* tile) {
  const int64_t m = x.size(0), k = x.size(1);
  if (cpu_has_avx2_fma())
    return transpose_to_tile_avx2(x.const_data_ptr(), out_type_of(x), k, m, k, m0, width, k_pad, tile);
  switch (x.scalar_type()) {
    case at::kBFloat16: return transpose_to_tile_portable(x.const_data_ptr<c10::BFloat16>(), m, k, m0, width, k_pad, tile);
    case at::kHalf: return transpose_to_tile_portable(x.const_data_ptr<c10::Half>(), m, k, m0, width, k_pad, tile);
    default: return transpose_to_tile_portable(x.const_data_ptr<float>(), m, k, m0, width, k_pad, tile);
  }
}

// x_tiles (see SparseActivations): the transpose of x cut into tiles, zero padded.
inline at::Tensor activation_tiles(const at::Tensor& x, int64_t k_pad, int64_t max_width) {
  std::vector<std::pair<int64_t, int64_t>> list;
  for_each_tile(x.size(0), max_width, [&](int64_t m0, int64_t width) { list.emplace_back(m0, width); });
  const int64_t padded_rows = list.back().first + list.back().second;
  at::Tensor tiles = at::empty({padded_rows * k_pad}, x.options().dtype(at::kFloat));
  float* dst = tiles.mutable_data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(list.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [m0, width] = list[t];
      transpose_to_tile(x, m0, width, k_pad, dst + m0 * k_pad);
    }
  });
  return tiles;
}

// The activations for the kernels: x_rows for the portable loops and for M <= decode_max_rows,
// else x_tiles of at most max_width rows (see for_each_tile). Returns the tensor that holds them
// (keep it alive while the kernels run).
inline at::Tensor prepare_activations(const at::Tensor& x, int64_t k_pad, bool tiles, SparseActivations& act,
                                      int64_t max_width) {
  act.k_pad = k_pad;
  act.m = x.size(0);
  at::Tensor storage = tiles ? activation_tiles(x, k_pad, max_width) : activation_rows(x, k_pad);
  (tiles ? act.x_tiles : act.x_rows) = storage.const_data_ptr<float>();
  return storage;
}

// Calls fn(n_begin, n_end) over chunks of rows (multiples of row_multiple) claimed from a shared
// counter, so a thread slowed by another process does not hold up the rest; on the calling thread
// alone when `serial`. Returns false if any call did.
template <typename Fn>
bool parallel_rows(int64_t n, const Fn& fn, int64_t row_multiple = 8, bool serial = false) {
  if (n <= 0) return true;
  const int64_t threads = serial ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = threads * kChunksPerThread;
  const int64_t chunk =
      std::max<int64_t>(row_multiple, (n + chunks - 1) / chunks / row_multiple * row_multiple);
  const int64_t tasks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next_task{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t = next_task.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next_task.fetch_add(1, std::memory_order_relaxed)) {
      if (!fn(t * chunk, std::min(n, (t + 1) * chunk))) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

}  // namespace sparseq::cpu
