// CUDA W8A8 2:4 sparse linear: x quantized per row by the bit-exact kernel int8_linear uses
// (int8_quantize.cuh), an exact int32 dot with the 2:4 int8 codes through mma.sp m16n8k64 s8
// (sparse24_mma.cuh), then acc * (x_scale[m] * w_scale[n]) + bias in x's dtype with the same
// fp32 steps as _ref.dequant_epilogue.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "device_error_flag.h"
#include "int8_quantize.cuh"
#include "sparse24_operands.h"
#include "sparse_common.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

template <typename T>
struct SparseDequantEpilogue {
  DequantBiasStore<T> dequant;  // its value() is the shared fp32 epilogue arithmetic
  __device__ __forceinline__ void operator()(int token, int channel, int acc, bool poisoned) const {
    const float o = poisoned ? quiet_nan() : dequant.value(dequant.x_scale[token], channel, acc);
    dequant.out[static_cast<int64_t>(token) * dequant.n + channel] = T(o);
  }
};

at::Tensor sparse24_int8_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                     const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                     int64_t act_qmax) {
  const int64_t n = check_sparse24_weight(x, values, meta, w_scale, bias);
  TORCH_CHECK(values.scalar_type() == at::kChar, "sparseq: sparse24_int8_linear needs int8 values, got ",
              values.scalar_type());
  TORCH_CHECK(act_qmax == 127 || act_qmax == 63, "sparseq: act_qmax must be 127 or 63, got ", act_qmax);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA sparse24_int8_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim,
              "sparseq: sparse24_int8_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  require_int8_tensor_cores();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // q is written straight at the padded width: its padding columns are zeros.
  const int64_t kpad = sp24::padded_k(k, 1);
  at::Tensor q = at::empty({m, kpad}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  sp24::Operands ops{};
  const auto keep_alive = sp24::prepare_weight_operands(ops, q, values, meta, k);
  const DeviceErrorFlag flag(x);
  ops.error_flag = flag.data();

  dispatch_activation_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<static_cast<unsigned>(m), kQuantThreads, 0, stream>>>(
        x.data_ptr<T>(), q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), static_cast<int>(k), kpad,
        static_cast<int>(act_qmax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const SparseDequantEpilogue<T> epi{{out.data_ptr<T>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                                        bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, static_cast<int>(n),
                                        false}};
    sp24::launch_sparse24_mma<sp24::MmaSpS8>(ops, epi, stream);
  });
  TORCH_CHECK(flag.read(stream) == 0, sp24::kInvalidMetaMessage);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) { m.impl("sparse24_int8_linear", &sparseq::cuda::sparse24_int8_linear_cuda); }
