#pragma once
// Per-row int8 activation quantization (bit-exact with sparseq._ref.quantize_per_row) and the
// W8A8 dequantization epilogue, shared by int8_linear.cu and sparse24_int8_linear.cu.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparseq {
namespace cuda {

constexpr int kQuantThreads = 256;

// One CTA per row: absmax in fp32, then q = clamp(rint(x * (qmax / absmax))) with the exact
// IEEE steps of _ref.quantize_per_row (no fast-math, no contraction). With static_scale (the
// device pointer to int8_linear_static's one scale s) inv = 1 / s and x_scale[row] = s instead,
// as _ref.quantize_static; an unusable s (not positive and finite, or 1/s overflowing) makes the
// row quantize like a non-finite one. q has row stride kq_stride (a multiple of 16 >= K); the
// padding columns get zeros so the GEMM may read whole chunks.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ x_scale, int k,
                         int64_t kq_stride, int qmax, const float* __restrict__ static_scale = nullptr) {
  __shared__ unsigned warp_max[kQuantThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * k;
  // Max of |x| on the bit patterns: non-negative floats order like unsigned integers, and
  // Inf/NaN (>= 0x7f800000) sort above every finite value, where fmaxf would drop a NaN.
  unsigned amax = 0u;
  // Unrolled so that several loads are in flight: for one row (decoding) this loop is latency bound.
#pragma unroll 8
  for (int i = threadIdx.x; i < k; i += kQuantThreads)
    amax = max(amax, __float_as_uint(fabsf(static_cast<float>(xr[i]))));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = max(amax, warp_max[w]);

  // A NaN/Inf row quantizes to zeros with a NaN scale, so its outputs come out NaN (see _ref).
  bool finite = amax < 0x7f800000u;
  float inv, scale;
  if (static_scale != nullptr) {
    scale = *static_scale;
    inv = __fdiv_rn(1.f, scale);
    finite = finite && scale > 0.f && scale <= 3.4028234663852886e38f && inv <= 3.4028234663852886e38f;
  } else {
    const float absmax = finite && amax > 0u ? __uint_as_float(amax) : 1.f;
    const float qmax_f = static_cast<float>(qmax);
    inv = __fdiv_rn(qmax_f, absmax);
    scale = __fdiv_rn(absmax, qmax_f);
  }
  if (threadIdx.x == 0) x_scale[row] = finite ? scale : __int_as_float(0x7fc00000);

  // Four columns per thread so each store is one aligned 32-bit word (kq_stride % 16 == 0).
  uint32_t* qr = reinterpret_cast<uint32_t*>(q + row * kq_stride);
  const int words = static_cast<int>(kq_stride / 4);
#pragma unroll 4
  for (int wi = threadIdx.x; wi < words; wi += kQuantThreads) {
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = wi * 4 + j;
      int v = 0;
      if (col < k && finite) {
        v = __float2int_rn(__fmul_rn(static_cast<float>(xr[col]), inv));  // rint: half to even
        v = min(max(v, -qmax), qmax);
      }
      packed |= (static_cast<uint32_t>(v) & 0xffu) << (8 * j);
    }
    qr[wi] = packed;
  }
}

template <typename T>
__device__ __forceinline__ void store_out_pair(T* p, float o0, float o1, bool pair) {
  if (pair) {  // 4-byte (bf16/half) or 8-byte (float) aligned: see DequantBiasStore::pairs_aligned
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float2*>(p) = make_float2(o0, o1);
    } else {
      const T t0(o0), t1(o1);
      *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(t0.x) | (static_cast<uint32_t>(t1.x) << 16);
    }
  } else {
    p[0] = T(o0);
  }
}

// out[row, col] = float(acc) * (x_scale[row] * w_scale[col]) + bias[col], in T, as _ref does it:
// the two scales are multiplied first, and nothing is fused into an FMA.
template <typename T>
struct DequantBiasStore {
  T* out;
  const float* x_scale;
  const float* w_scale;
  const float* bias;  // float32 copy of bias, or nullptr
  int n;
  bool pairs_aligned;  // n even: (row, col even) pairs are 2-element aligned
  bool gelu = false;   // int8_linear's activation="gelu": GELU (erf form) before the store

  __device__ __forceinline__ float value(float xs, int col, int acc) const {
    float o = __fmul_rn(__int2float_rn(acc), __fmul_rn(xs, w_scale[col]));
    if (bias != nullptr) o = __fadd_rn(o, bias[col]);
    if (gelu) o = 0.5f * o * (1.0f + erff(o * 0.70710678118654752f));
    return o;
  }
  __device__ __forceinline__ void operator()(int row, int col, int v0, int v1) const {
    const float xs = x_scale[row];
    T* p = out + static_cast<int64_t>(row) * n + col;
    const bool has_second = col + 1 < n;
    const float o0 = value(xs, col, v0);
    const float o1 = has_second ? value(xs, col + 1, v1) : 0.f;
    if (pairs_aligned || !has_second) {
      store_out_pair(p, o0, o1, has_second);
    } else {
      p[0] = T(o0);
      p[1] = T(o1);
    }
  }
};

}  // namespace cuda
}  // namespace sparseq
