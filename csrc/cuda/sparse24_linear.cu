// CUDA 2:4 sparse linear: out = x @ W.T (* w_scale) + bias for a Sparse24Weight's tensors.
//   * x bf16 / fp16 with values of the same dtype, or int8 codes (exact in bf16 / fp16, |code| <=
//     128; loaded as int8 and widened in shared memory, w_scale applied in the epilogue): mma.sp
//     tensor cores (sparse24_mma.cuh), fp32 accumulation, on sm_80+;
//   * every other mix (fp32 x, bf16 x with fp16 values, ...) and GPUs below sm_80: a SIMT kernel,
//     one warp per output channel and 8 tokens, that follows _ref.sparse24_linear literally
//     (any meta nibble, duplicated positions included).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "device_error_flag.h"
#include "sparse24_operands.h"
#include "sparse_common.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

constexpr int kSimtWarps = 4;   // channels per CTA
constexpr int kSimtTokens = 8;  // tokens per warp

template <typename TX, typename TV>
__global__ void __launch_bounds__(32 * kSimtWarps)
    sparse24_simt_kernel(const TX* __restrict__ x, const TV* __restrict__ values, const uint8_t* __restrict__ meta,
                         const float* __restrict__ w_scale, const float* __restrict__ bias, TX* __restrict__ out,
                         int m, int n, int k, int groups, int meta_cols) {
  const int lane = threadIdx.x & 31;
  const int channel = blockIdx.x * kSimtWarps + (threadIdx.x >> 5);
  const int m0 = blockIdx.y * kSimtTokens;
  if (channel >= n) return;
  const int tokens = min(kSimtTokens, m - m0);
  const TV* vrow = values + static_cast<int64_t>(channel) * 2 * groups;
  const uint8_t* mrow = meta + static_cast<int64_t>(channel) * meta_cols;
  float acc[kSimtTokens] = {};
  for (int g = lane; g < groups; g += 32) {
    const int byte = mrow[g >> 1];
    const int nibble = (g & 1) ? byte >> 4 : byte & 0xF;
    const int c0 = 4 * g + (nibble & 3), c1 = 4 * g + (nibble >> 2);
    const float v0 = static_cast<float>(vrow[2 * g]), v1 = static_cast<float>(vrow[2 * g + 1]);
#pragma unroll
    for (int t = 0; t < kSimtTokens; ++t) {
      if (t < tokens) {
        const TX* xr = x + static_cast<int64_t>(m0 + t) * k;
        // Columns past K read as zeros, as in _ref (which pads x), so 0 * Inf stays NaN there too.
        const float x0 = c0 < k ? static_cast<float>(xr[c0]) : 0.f;
        const float x1 = c1 < k ? static_cast<float>(xr[c1]) : 0.f;
        acc[t] += v0 * x0;
        acc[t] += v1 * x1;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kSimtTokens; ++t) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
  }
  if (lane == 0) {
    for (int t = 0; t < tokens; ++t)
      out[static_cast<int64_t>(m0 + t) * n + channel] = TX(scale_and_bias(acc[t], w_scale, bias, channel));
  }
}

void launch_sparse24_simt(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                          const float* w_scale, const float* bias, at::Tensor& out, cudaStream_t stream) {
  const int64_t m = x.size(0), n = values.size(0);
  const int64_t tiles_m = (m + kSimtTokens - 1) / kSimtTokens;
  TORCH_CHECK(tiles_m <= 65535, "sparseq: M=", m, " is too large for the CUDA 2:4 SIMT grid");
  const dim3 grid(static_cast<unsigned>((n + kSimtWarps - 1) / kSimtWarps), static_cast<unsigned>(tiles_m));
  dispatch_activation_dtype(x.scalar_type(), [&](auto x_tag) {
    using TX = decltype(x_tag);
    dispatch_value_dtype(values.scalar_type(), [&](auto v_tag) {
      using TV = decltype(v_tag);
      sparse24_simt_kernel<TX, TV><<<grid, 32 * kSimtWarps, 0, stream>>>(
          x.data_ptr<TX>(), values.data_ptr<TV>(), meta.data_ptr<uint8_t>(), w_scale, bias, out.data_ptr<TX>(),
          static_cast<int>(m), static_cast<int>(n), static_cast<int>(x.size(1)),
          static_cast<int>(values.size(1) / 2), static_cast<int>(meta.size(1)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                const c10::optional<at::Tensor>& w_scale, const c10::optional<at::Tensor>& bias) {
  const int64_t n = check_sparse24_weight(x, values, meta, w_scale, bias);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA sparse24_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim,
              "sparseq: sparse24_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const float* scale_ptr = w_scale.has_value() ? w_scale->data_ptr<float>() : nullptr;

  const auto xt = x.scalar_type(), vt = values.scalar_type();
  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
  if (!tensor_cores || (xt != at::kBFloat16 && xt != at::kHalf) || (vt != xt && vt != at::kChar)) {
    launch_sparse24_simt(x, values, meta, scale_ptr, bias_ptr, out, stream);
    return out;
  }
  const at::Tensor act = sp24::pad_columns(x, sp24::padded_k(k, 2), 0);
  sp24::Operands ops{};
  const auto keep_alive = sp24::prepare_weight_operands(ops, act, values, meta, k);
  const DeviceErrorFlag flag(x);
  ops.error_flag = flag.data();
  dispatch_activation_dtype(xt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const FloatEpilogue<T> epi{out.data_ptr<T>(), scale_ptr, bias_ptr, static_cast<int>(n)};
      using Mma = std::conditional_t<std::is_same_v<T, c10::BFloat16>, sp24::MmaSpBF16, sp24::MmaSpHalf>;
      if (vt == at::kChar) {
        sp24::launch_sparse24_mma<Mma, /*kCodes=*/true>(ops, epi, stream);
      } else {
        sp24::launch_sparse24_mma<Mma>(ops, epi, stream);
      }
    }
  });
  TORCH_CHECK(flag.read(stream) == 0, sp24::kInvalidMetaMessage);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) { m.impl("sparse24_linear", &sparseq::cuda::sparse24_linear_cuda); }
