// CPU sparse24_linear: x float [M, K] times a 2:4 weight [N, K] (values fp32/bf16/fp16 or int8
// codes with w_scale, 2-bit positions in meta), fp32 accumulation, bias, x's dtype. AVX2 kernels in
// sparse24_linear_avx2.cpp, the AVX-512 tile kernel in sparse24_linear_avx512.cpp; the portable loop
// below runs otherwise.
#include <torch/library.h>

#include <vector>

#include "sparse_op_common.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

void sparse24_rows_portable(const Sparse24Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t meta_bytes = (p.groups + 1) / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < p.x.m; ++m) {
      const float* x = p.x.x_rows + m * p.x.k_pad;
      float acc = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int nibble = (p.meta[n * meta_bytes + g / 2] >> (4 * (g % 2))) & 0xF;
        const int64_t e = n * 2 * p.groups + 2 * g;
        acc += x[4 * g + (nibble & 3)] * stored_value(p.values, p.value_type, e);
        acc += x[4 * g + (nibble >> 2)] * stored_value(p.values, p.value_type, e + 1);
      }
      store_output(p.epilogue, m, n, acc);
    }
  }
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const c10::optional<at::Tensor>& w_scale, const c10::optional<at::Tensor>& bias) {
  const int64_t n = check_sparse24_weight(x, values, meta, w_scale, bias);
  const int64_t m = x.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  Sparse24Problem p;
  p.values = values.const_data_ptr();
  p.meta = meta.const_data_ptr<uint8_t>();
  p.value_type = value_type_of(values);
  p.n = n;
  p.groups = sparse24_groups(x.size(1));
  const at::Tensor bias_f32 = bias_as_float(bias);
  p.epilogue = make_epilogue(out, w_scale, bias_f32);
  const bool use_avx2 = cpu_has_avx2_fma(), use_avx512 = cpu_has_avx512();
  const bool tiles = use_avx2 && m > kSparse24DecodeMaxRows;
  const int64_t max_width = tile_width_max(use_avx512);
  const at::Tensor x_storage = prepare_activations(x, sparse24_k_pad(p.groups), tiles, p.x, max_width);

  parallel_rows(n, [&](int64_t n0, int64_t n1) {
    if (tiles) {
      const auto tile_rows = use_avx512 ? sparse24_tile_rows_avx512 : sparse24_tile_rows_avx2;
      const TileScratch scratch(n1 - n0, m, max_width, kTileValueScratch);
      for_each_tile(m, max_width, [&](int64_t m0, int64_t width) {
        tile_rows(p, m0, width, n0, n1, scratch.partial.get(), scratch.values_f32.get());
      });
    } else if (use_avx2) {
      sparse24_decode_rows_avx2(p, n0, n1);
    } else {
      sparse24_rows_portable(p, n0, n1);
    }
    return true;
  });
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("sparse24_linear", &sparseq::cpu::sparse24_linear_cpu);
}
