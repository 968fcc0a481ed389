// The one place where sparseq's op schemas live, plus the small pybind11 module that
// loading the library goes through (build and CPU-feature facts for `sparseq info`).
#include <torch/extension.h>

#include "sparseq/cpu_features.h"

TORCH_LIBRARY(sparseq, m) {
  // a int8 [M,K], b int8 [N,K] -> int32 [M,N] = a @ b.T, exact for every int8 value.
  m.def("int8_gemm(Tensor a, Tensor b) -> Tensor");
  // W8A8 dynamic linear: x float [M,K] is quantized per row (symmetric, to [-act_qmax, act_qmax],
  // round half to even of x * (act_qmax / absmax)), multiplied with the n16k4-packed int8 weight,
  // then out = acc * (x_scale[m] * w_scale[n]) + bias[n], in x's dtype.
  // w_rowsum[n] = sum_k w[n,k] (int32) lets kernels that offset activations to unsigned correct.
  // activation "gelu" applies GELU (the erf form) to out in fp32 before the cast, in the epilogue
  // (to within 3e-7 * |out| of torch's; "none": nothing).
  m.def(
      "int8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_rowsum, Tensor? bias, "
      "int act_qmax, str activation=\"none\") -> Tensor");
  // W8A8 static linear: as int8_linear, but every row is quantized with the one calibrated scale
  // s = x_scale[0] (fp32 [1], read on the device: no host sync). In fp32, IEEE round to nearest:
  //   inv = 1.0f / s;  q = clamp(round_half_even(x * inv), -act_qmax, act_qmax)
  //   out = float(acc) * (s * w_scale[n]) + bias[n], in x's dtype.
  // A row holding NaN/Inf quantizes to zeros with scale NaN (its outputs are NaN), and so does
  // every row when s is not positive and finite or 1/s overflows (see _ref.quantize_static).
  m.def(
      "int8_linear_static(Tensor x, Tensor x_scale, Tensor w_packed, Tensor w_scale, Tensor w_rowsum, "
      "Tensor? bias, int act_qmax, str activation=\"none\") -> Tensor");
  // Weight-only int8 linear: x float [M,K] times the dequantized n16k4-packed weight
  // (w[n,k] * w_scale[n]) plus bias, in x's dtype.
  m.def(
      "int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias) -> Tensor");

  // Sparse linears (layouts in include/sparseq/sparse_formats.h): x float [M,K] times the sparse
  // weight W [N,K], fp32 accumulation, then * w_scale[n] when the values are int8 codes (w_scale is
  // given exactly then), + bias[n], in x's dtype. Values may be float32 / bfloat16 / float16 / int8
  // whatever x's dtype is. K is x.size(1); N comes from the index tensors.
  m.def(
      "sparse_csr_linear(Tensor x, Tensor seg_ptr, Tensor col_offsets, Tensor values, Tensor? w_scale, "
      "Tensor? bias) -> Tensor");
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? w_scale, Tensor? bias) -> Tensor");
  m.def(
      "bsr_linear(Tensor x, Tensor block_row_ptr, Tensor block_col_idx, Tensor values, Tensor? w_scale, "
      "Tensor? bias, int out_features) -> Tensor");
  // W8A8 dynamic linear on a 2:4 int8 weight: x quantized per row exactly as in int8_linear
  // (act_qmax 127 or 63), an exact int32 dot with the stored codes, then
  // acc * (x_scale[m] * w_scale[n]) + bias[n] in x's dtype.
  m.def(
      "sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor w_scale, Tensor? bias, "
      "int act_qmax) -> Tensor");
  // W8A8 dynamic linear on a sliced-ELL int8 weight (layout in sparse_formats.h; N = w_scale's
  // length): x quantized per row exactly as in int8_linear, an exact int32 dot of every row's
  // entries, then acc * (x_scale[m] * w_scale[n]) + bias[n] in x's dtype.
  m.def(
      "sparse_sell_int8_linear(Tensor x, Tensor block_step_ptr, Tensor step_masks, Tensor slice_ptr, "
      "Tensor col_offsets, Tensor values, Tensor w_scale, Tensor? bias, int act_qmax) -> Tensor");
}

namespace {
std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
#ifdef SPARSEQ_CUDA_ARCHS
  std::string s = SPARSEQ_CUDA_ARCHS;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) archs.push_back(s.substr(start, end - start));
    start = end + 1;
  }
#endif
  return archs;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("cpu_features", &sparseq::cpu_features_dict,
             "CPU features this process detected at run time (dict of name -> bool)");
  module.def("cuda_archs", &cuda_archs, "CUDA architectures compiled into the extension");
#ifdef SPARSEQ_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
