// CUDA weight-only int8 linear: out = x @ (w * w_scale[:, None]).T + bias, in x's dtype.
//
// M <= 16 (decoding) is bandwidth bound: a GEMV-style kernel streams the n16k4 packed weight once
// with 128-bit loads, converts in registers and accumulates in fp32. Larger M is compute bound:
// there the weight is dequantized once to x's dtype and at::matmul (cuBLAS) does the product.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "int8_mma.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvMaxM = 16;

// Exact int8 -> float for the 4 bytes of a word: 2^23 + (b + 128) is a float whose mantissa is
// b + 128, so one byte permute and one subtraction replace the slower integer conversion.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float (&f)[4]) {
  const uint32_t biased = word ^ 0x80808080u;  // b + 128 per byte, as unsigned
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t bits = __byte_perm(biased, 0x4b000000u, 0x7650 + j);
    f[j] = __uint_as_float(bits) - 8388736.f;  // 2^23 + 128
  }
}

// Loads x[row, col..col+3] as floats. kVec: the four are in range and 4-element aligned.
template <typename T, bool kVec>
__device__ __forceinline__ void load_x4(const T* __restrict__ xr, int col, int k, float (&v)[4]) {
  if constexpr (kVec && sizeof(T) == 4) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(xr + col));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else if constexpr (kVec) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(xr + col));
    const uint32_t halves[4] = {u.x & 0xffffu, u.x >> 16, u.y & 0xffffu, u.y >> 16};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      T t;
      t.x = static_cast<uint16_t>(halves[j]);
      v[j] = static_cast<float>(t);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = col + j < k ? static_cast<float>(xr[col + j]) : 0.f;
  }
}

// One CTA per 16-output block. The block's weight is KQ rows of 64 bytes (16 outputs x one
// k-quad); thread tid reads 16-byte chunks tid, tid + 256, ..., i.e. 4 outputs (tid % 4 fixed)
// x 4 k of one k-quad each. Partial sums are reduced across the 8 lanes of a warp that share the
// outputs (shuffles), then across warps through shared memory.
template <typename T, int MAXM, bool kVecX>
__global__ void __launch_bounds__(kGemvThreads)
    weight_only_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ w_scale,
                            const float* __restrict__ bias, T* __restrict__ out, int m, int n, int k, int64_t kquads) {
  constexpr int kWarps = kGemvThreads / 32;
  __shared__ float partial[kWarps][MAXM][16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int blk = blockIdx.x;
  const uint4* wb = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(blk) * kquads * 64);
  const int64_t chunks = kquads * 4;

  float acc[MAXM][4];
#pragma unroll
  for (int r = 0; r < MAXM; ++r)
#pragma unroll
    for (int o = 0; o < 4; ++o) acc[r][o] = 0.f;

#pragma unroll 4
  for (int64_t c = tid; c < chunks; c += kGemvThreads) {
    const uint4 wv = __ldg(wb + c);
    const int col = static_cast<int>(c >> 2) * 4;  // first k of this chunk's k-quad
    float wf[4][4];  // [output][k]
    int8x4_to_float(wv.x, wf[0]);
    int8x4_to_float(wv.y, wf[1]);
    int8x4_to_float(wv.z, wf[2]);
    int8x4_to_float(wv.w, wf[3]);
#pragma unroll
    for (int r = 0; r < MAXM; ++r) {
      if (r < m) {
        float xv[4];
        load_x4<T, kVecX>(x + static_cast<int64_t>(r) * k, col, k, xv);
#pragma unroll
        for (int o = 0; o < 4; ++o)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[r][o] = fmaf(xv[j], wf[o][j], acc[r][o]);
      }
    }
  }

  // Lanes l, l^4, l^8, l^16 hold the same 4 outputs ((l % 4) * 4 ..): sum them.
#pragma unroll
  for (int r = 0; r < MAXM; ++r)
#pragma unroll
    for (int o = 0; o < 4; ++o) {
      float v = acc[r][o];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      acc[r][o] = v;
    }
  if (lane < 4) {
#pragma unroll
    for (int r = 0; r < MAXM; ++r)
#pragma unroll
      for (int o = 0; o < 4; ++o) partial[warp][r][lane * 4 + o] = acc[r][o];
  }
  __syncthreads();

  for (int idx = tid; idx < MAXM * 16; idx += kGemvThreads) {
    const int r = idx / 16, i = idx % 16;
    const int col = blk * 16 + i;
    if (r < m && col < n) {
      float s = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) s += partial[wi][r][i];
      s *= w_scale[col];
      if (bias != nullptr) s += bias[col];
      out[static_cast<int64_t>(r) * n + col] = T(s);
    }
  }
}

template <typename T, int MAXM>
void launch_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const float* bias,
                 at::Tensor& out, cudaStream_t stream) {
  const int m = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1)), n = static_cast<int>(out.size(1));
  const unsigned blocks = static_cast<unsigned>(w.size(0));
  const bool vec = k % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % (4 * sizeof(T)) == 0;
  const auto kernel = vec ? weight_only_gemv_kernel<T, MAXM, true> : weight_only_gemv_kernel<T, MAXM, false>;
  kernel<<<blocks, kGemvThreads, 0, stream>>>(x.data_ptr<T>(), w.data_ptr<int8_t>(), w_scale.data_ptr<float>(), bias,
                                              out.data_ptr<T>(), m, n, k, w.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor int8_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                        const c10::optional<at::Tensor>& bias) {
  check_float_activation(x);
  const int64_t n = check_packed_weight(x, w_packed, w_scale, bias);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA int8_weight_only_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  // The GEMV walks K in whole k-quads (to round_up(K, 4)) and 16-output blocks with int indices.
  TORCH_CHECK(n <= kMaxKernelDim && k <= kMaxKernelDim,
              "sparseq: int8_weight_only_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  if (m > kGemvMaxM) {
    // Compute bound: dequantize once (w[n,k] * w_scale[n], rounded to x's dtype) and use cuBLAS.
    const int64_t blocks = w_packed.size(0), kquads = w_packed.size(1);
    const at::Tensor w = w_packed.permute({0, 2, 1, 3})
                             .reshape({blocks * kPackN, kquads * kPackK})
                             .narrow(0, 0, n)
                             .narrow(1, 0, k)
                             .to(at::kFloat)
                             .mul_(w_scale.unsqueeze(1))
                             .to(x.scalar_type());
    at::Tensor out = at::matmul(x, w.t());
    if (bias_f.defined()) out = out.to(at::kFloat).add_(bias_f).to(x.scalar_type());
    return out;
  }

  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  // 128-bit weight loads need a 16-byte aligned base (the 64-byte rows follow); a view at an odd
  // offset (rare) is copied once.
  const at::Tensor w = is_aligned16(w_packed.data_ptr()) ? w_packed : w_packed.clone();
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_activation_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (m <= 1) {
      launch_gemv<T, 1>(x, w, w_scale, bias_ptr, out, stream);
    } else if (m <= 4) {
      launch_gemv<T, 4>(x, w, w_scale, bias_ptr, out, stream);
    } else if (m <= 8) {
      launch_gemv<T, 8>(x, w, w_scale, bias_ptr, out, stream);
    } else {
      launch_gemv<T, kGemvMaxM>(x, w, w_scale, bias_ptr, out, stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("int8_weight_only_linear", &sparseq::cuda::int8_weight_only_linear_cuda);
}
