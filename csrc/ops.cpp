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
  m.def(
      "int8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_rowsum, Tensor? bias, "
      "int act_qmax) -> Tensor");
  // Weight-only int8 linear: x float [M,K] times the dequantized n16k4-packed weight
  // (w[n,k] * w_scale[n]) plus bias, in x's dtype.
  m.def(
      "int8_weight_only_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias) -> Tensor");
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
