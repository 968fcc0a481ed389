// CPU sparse_csr_linear: x float [M, K] times a segmented-CSR weight [N, K] (uint8 column offsets,
// values fp32/bf16/fp16 or int8 codes with w_scale), fp32 accumulation, bias, x's dtype. AVX-512
// kernels in sparse_csr_linear_avx512.cpp, AVX2 ones in sparse_csr_linear_avx2.cpp; the portable
// loop below runs otherwise.
#include <torch/library.h>

#include <vector>

#include "sparse_op_common.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

bool csr_rows_portable(const CsrProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int32_t* ptr = p.seg_ptr + n * p.segments;
    if (ptr[0] < 0) return false;
    for (int64_t s = 0; s < p.segments; ++s) {
      const int64_t count = static_cast<int64_t>(ptr[s + 1]) - ptr[s];
      if (count < 0 || count > kMaxSegmentEntries || ptr[s + 1] > p.nnz) return false;
    }
    for (int64_t m = 0; m < p.x.m; ++m) {
      const float* x = p.x.x_rows + m * p.x.k_pad;
      float acc = 0.0f;
      for (int64_t s = 0; s < p.segments; ++s)
        for (int64_t e = ptr[s]; e < ptr[s + 1]; ++e)
          acc += x[s * kCsrSegment + p.col_offsets[e]] * stored_value(p.values, p.value_type, e);
      store_output(p.epilogue, m, n, acc);
    }
  }
  return true;
}

at::Tensor sparse_csr_linear_cpu(const at::Tensor& x, const at::Tensor& seg_ptr, const at::Tensor& col_offsets,
                                 const at::Tensor& values, const c10::optional<at::Tensor>& w_scale,
                                 const c10::optional<at::Tensor>& bias) {
  const int64_t n = check_csr_weight(x, seg_ptr, col_offsets, values, w_scale, bias);
  const int64_t m = x.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  CsrProblem p;
  p.seg_ptr = seg_ptr.const_data_ptr<int32_t>();
  p.col_offsets = col_offsets.const_data_ptr<uint8_t>();
  p.values = values.const_data_ptr();
  p.value_type = value_type_of(values);
  p.nnz = values.numel();
  p.n = n;
  p.segments = csr_segments(x.size(1));
  const at::Tensor bias_f32 = bias_as_float(bias);
  p.epilogue = make_epilogue(out, w_scale, bias_f32);
  const bool use_avx2 = cpu_has_avx2_fma(), use_avx512 = cpu_has_avx512();
  const bool tiles = use_avx2 && m > kCsrDecodeMaxRows;
  const int64_t max_width = csr_tile_width_max(p, use_avx512);
  const at::Tensor x_storage = prepare_activations(x, csr_k_pad(p.segments), tiles, p.x, max_width);

  bool ok;
  if (use_avx2) {
    ok = parallel_rows(n, [&](int64_t n0, int64_t n1) {
      std::vector<int32_t> columns(p.x.k_pad + 32);
      if (!tiles)
        return use_avx512 ? csr_decode_rows_avx512(p, n0, n1, columns.data())
                          : csr_decode_rows_avx2(p, n0, n1, columns.data());
      bool chunk_ok = true;
      const TileScratch scratch(n1 - n0, m, max_width, p.x.k_pad);
      for_each_tile(m, max_width, [&](int64_t m0, int64_t width) {
        const auto tile_rows = use_avx512 ? csr_tile_rows_avx512 : csr_tile_rows_avx2;
        chunk_ok = chunk_ok &&
                   tile_rows(p, m0, width, n0, n1, scratch.partial.get(), columns.data(), scratch.values_f32.get());
      });
      return chunk_ok;
    });
  } else {
    ok = parallel_rows(n, [&](int64_t n0, int64_t n1) { return csr_rows_portable(p, n0, n1); });
  }
  TORCH_CHECK(ok, "sparseq: sparse_csr_linear: malformed seg_ptr (it must start at >= 0, never decrease, hold "
              "at most 256 entries per segment and end at most at nnz=", p.nnz, ")");
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("sparse_csr_linear", &sparseq::cpu::sparse_csr_linear_cpu);
}
