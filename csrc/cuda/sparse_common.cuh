#pragma once
// Pieces shared by the CUDA sparse ops (sparse24_linear.cu, sparse_csr_linear.cu): the value
// dtype dispatch and the float epilogue acc (* w_scale[n]) + bias[n] -> x.dtype, in _ref's order.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparseq {
namespace cuda {

// Runs fn(V{}) with V the C++ type of a sparse value dtype (float, bf16, fp16 or int8 codes).
template <class Fn>
void dispatch_value_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kChar: fn(int8_t{}); break;
    default: TORCH_CHECK(false, "sparseq: unsupported sparse value dtype ", dtype);
  }
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// _ref._epilogue: the fp32 accumulator times the int8 scale (when there is one), plus bias.
__device__ __forceinline__ float scale_and_bias(float acc, const float* w_scale, const float* bias, int channel) {
  float o = acc;
  if (w_scale != nullptr) o = __fmul_rn(o, w_scale[channel]);
  if (bias != nullptr) o = __fadd_rn(o, bias[channel]);
  return o;
}

// out[token, channel] of an [M, N] output in T.
template <typename T>
struct FloatEpilogue {
  T* out;
  const float* w_scale;  // int8 codes only, else nullptr
  const float* bias;     // float32 copy of bias, or nullptr
  int n;
  __device__ __forceinline__ void operator()(int token, int channel, float acc, bool poisoned) const {
    const float o = poisoned ? quiet_nan() : scale_and_bias(acc, w_scale, bias, channel);
    out[static_cast<int64_t>(token) * n + channel] = T(o);
  }
};

}  // namespace cuda
}  // namespace sparseq
