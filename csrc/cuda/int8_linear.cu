// CUDA W8A8 linear, dynamic (int8_linear: per-row activation scales) or static
// (int8_linear_static: one calibrated scale read on the device): activation quantization, then
// the tensor-core int8 GEMM reading the n16k4 packed weight directly, with the dequantization
// and bias fused into the epilogue. Bit-exact with sparseq._ref up to the final fp32 -> x.dtype
// rounding (same steps).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "int8_mma.cuh"
#include "int8_quantize.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

// static_scale: nullptr for per-row (dynamic) activation scales, else int8_linear_static's x_scale.
at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const at::Tensor& w_rowsum, const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                            c10::string_view activation, const at::Tensor* static_scale) {
  const bool gelu = parse_fused_activation(activation);
  check_float_activation(x);
  const int64_t n = check_packed_weight(x, w_packed, w_scale, bias);
  TORCH_CHECK(w_rowsum.scalar_type() == at::kInt && w_rowsum.dim() == 1 && w_rowsum.size(0) == n,
              "sparseq: w_rowsum must be an int32 vector of N=", n, " elements, got ", w_rowsum.scalar_type(),
              " ", w_rowsum.sizes());
  TORCH_CHECK(w_rowsum.device() == x.device(), "sparseq: w_rowsum must be on x's device");
  TORCH_CHECK(act_qmax == 127 || act_qmax == 63, "sparseq: act_qmax must be 127 or 63, got ", act_qmax);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA int8_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim,
              "sparseq: int8_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  require_int8_tensor_cores();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t kd = round_up16(k);
  at::Tensor q = at::empty({m, kd}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  // The packed rows are 64 bytes, so a 16-byte aligned base makes every copy aligned; a view at
  // an odd offset (rare) is copied once.
  const at::Tensor w = is_aligned16(w_packed.data_ptr()) ? w_packed : w_packed.clone();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  GemmOperands ops;
  ops.a = q.data_ptr<int8_t>();
  ops.b = w.data_ptr<int8_t>();
  ops.lda = kd;
  ops.ldb = w.size(1);
  ops.m = static_cast<int>(m);
  ops.n = static_cast<int>(n);
  ops.kd = static_cast<int>(kd);

  dispatch_activation_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<static_cast<unsigned>(m), kQuantThreads, 0, stream>>>(
        x.data_ptr<T>(), q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), static_cast<int>(k), kd,
        static_cast<int>(act_qmax), static_scale != nullptr ? static_scale->data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const DequantBiasStore<T> epi{out.data_ptr<T>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                                  bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, static_cast<int>(n),
                                  n % 2 == 0, gelu};
    launch_int8_mma_gemm</*kPackedB=*/true>(ops, epi, stream);
  });
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const at::Tensor& w_rowsum, const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                            c10::string_view activation) {
  return int8_linear_impl(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation, nullptr);
}

at::Tensor int8_linear_static_cuda(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w_packed,
                                   const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                   const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                                   c10::string_view activation) {
  check_static_act_scale(x, x_scale);
  const at::Tensor scale = x_scale.contiguous();
  return int8_linear_impl(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation, &scale);
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("int8_linear", &sparseq::cuda::int8_linear_cuda);
  m.impl("int8_linear_static", &sparseq::cuda::int8_linear_static_cuda);
}
