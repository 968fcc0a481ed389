// CPU bsr_linear: float activations times a block-sparse weight (BlockSparseWeight's tensors),
// fp32 accumulation, int8 codes scaled per output row in the epilogue, bias, output in x's
// dtype. Threads split the block rows; AVX2 micro-kernels in bsr_linear_avx2.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "bsr_kernels.h"
#include "op_common.h"
#include "parallel_tiles.h"
#include "sparse_op_common.h"  // value_type_of, transpose_to_tile
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

template <typename V, typename O>
bool bsr_rows_portable_typed(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  const V* values = static_cast<const V*>(p.values);
  O* out = static_cast<O*>(p.c_out);
  for (int64_t r = r_begin; r < r_end; ++r) {
    int64_t b, e;
    if (!bsr_block_row(p, r, &b, &e)) return false;
    for (int64_t i = 0; i < p.bh && r * p.bh + i < p.n; ++i) {
      const int64_t n = r * p.bh + i;
      for (int64_t m = 0; m < p.m; ++m) {
        const float* x = p.x + m * p.ldx;
        float acc = 0.0f;
        for (int64_t blk = b; blk < e; ++blk) {
          const float* xb = x + static_cast<int64_t>(p.block_col_idx[blk]) * p.bw;
          const V* w = values + (blk * p.bh + i) * p.bw;
          for (int64_t c = 0; c < p.bw; ++c) acc += xb[c] * static_cast<float>(w[c]);
        }
        if (p.w_scale != nullptr) acc *= p.w_scale[n];
        if (p.bias != nullptr) acc += p.bias[n];
        out[m * p.ldc + n] = static_cast<O>(acc);
      }
    }
  }
  return true;
}

template <typename V>
bool bsr_rows_portable_values(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  switch (p.out_type) {
    case OutType::kBFloat16: return bsr_rows_portable_typed<V, c10::BFloat16>(p, r_begin, r_end);
    case OutType::kFloat16: return bsr_rows_portable_typed<V, c10::Half>(p, r_begin, r_end);
    default: return bsr_rows_portable_typed<V, float>(p, r_begin, r_end);
  }
}

bool bsr_rows_portable(const BsrProblem& p, int64_t r_begin, int64_t r_end) {
  switch (p.value_type) {
    case ValueType::kBFloat16: return bsr_rows_portable_values<c10::BFloat16>(p, r_begin, r_end);
    case ValueType::kFloat16: return bsr_rows_portable_values<c10::Half>(p, r_begin, r_end);
    case ValueType::kInt8: return bsr_rows_portable_values<int8_t>(p, r_begin, r_end);
    default: return bsr_rows_portable_values<float>(p, r_begin, r_end);
  }
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& block_row_ptr, const at::Tensor& block_col_idx,
                          const at::Tensor& values, const c10::optional<at::Tensor>& w_scale,
                          const c10::optional<at::Tensor>& bias, int64_t out_features) {
  const int64_t nb = check_bsr_weight(x, block_row_ptr, block_col_idx, values, w_scale, bias, out_features);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, out_features}, x.options());
  if (m == 0 || out_features == 0) return out;

  BsrProblem p;
  p.block_row_ptr = block_row_ptr.const_data_ptr<int32_t>();
  p.block_col_idx = block_col_idx.const_data_ptr<int32_t>();
  p.nnzb = block_col_idx.numel();
  p.values = values.const_data_ptr();
  p.value_type = value_type_of(values);
  p.bh = values.size(1);
  p.bw = values.size(2);
  p.nb = nb;
  p.kb = (k + p.bw - 1) / p.bw;
  p.n = out_features;
  p.m = m;
  const at::Tensor bias_f32 = bias_as_float(bias);
  p.w_scale = w_scale.has_value() ? w_scale->const_data_ptr<float>() : nullptr;
  p.bias = float_ptr_or_null(bias_f32);
  p.c_out = out.mutable_data_ptr();
  p.out_type = out_type_of(x);
  p.ldc = out_features;

  // Activations as fp32 padded with zeros to whole blocks of columns, so a stored block (whose
  // column index is checked against kb) never reads past them.
  const int64_t k_pad = p.kb * p.bw;
  const bool use_avx2 = cpu_has_avx2_fma();
  const bool row_major = !use_avx2 || (m < kBsrTransposedMinRows && bsr_avx2_has_row_major_kernel(p.bh, p.bw));
  at::Tensor x_act;
  if (row_major) {
    x_act = activation_rows(x, k_pad);
    p.x = x_act.const_data_ptr<float>();
    p.ldx = k_pad;
  } else {
    const int64_t tiles = (m + kBsrMTile - 1) / kBsrMTile;
    x_act = at::empty({tiles, k_pad, kBsrMTile}, x.options().dtype(at::kFloat));
    float* xt = x_act.mutable_data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) transpose_to_tile(x, t * kBsrMTile, kBsrMTile, k_pad, xt + t * k_pad * kBsrMTile);
    });
    p.xt = xt;
  }

  // Small problems stay on the calling thread: waking a second one costs more than it saves.
  const int64_t macs = m * std::max<int64_t>(1, p.nnzb) * p.bh * p.bw;
  const bool valid = parallel_rows(
      nb,
      [&](int64_t r_begin, int64_t r_end) {
        return use_avx2 ? bsr_rows_avx2(p, r_begin, r_end) : bsr_rows_portable(p, r_begin, r_end);
      },
      1, macs < (int64_t{1} << 17));
  TORCH_CHECK(valid, "sparseq: bsr_linear: invalid BSR indices: block_row_ptr must be non-decreasing "
              "from >= 0 to <= nnz_blocks=", p.nnzb, " and block_col_idx within [0, ", p.kb,
              ") (K=", k, ", bw=", p.bw, ")");
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) { m.impl("bsr_linear", &sparseq::cpu::bsr_linear_cpu); }
