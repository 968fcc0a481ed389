// CUDA W8A8 dynamic linear: per-row activation quantization, then the tensor-core int8 GEMM
// reading the n16k4 packed weight directly, with the dequantization and bias fused into the
// epilogue. Bit-exact with sparseq._ref up to the final fp32 -> x.dtype rounding (same steps).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "int8_mma.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;

// One CTA per row: absmax in fp32, then q = clamp(rint(x * (qmax / absmax))) with the exact
// IEEE steps of _ref.quantize_per_row (no fast-math, no contraction). q has row stride kq_stride
// (a multiple of 16 >= K); the padding columns get zeros so the GEMM may read whole chunks.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ x_scale, int k,
                         int64_t kq_stride, int qmax) {
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
  const bool finite = amax < 0x7f800000u;
  const float absmax = finite && amax > 0u ? __uint_as_float(amax) : 1.f;
  const float qmax_f = static_cast<float>(qmax);
  const float inv = finite ? __fdiv_rn(qmax_f, absmax) : 0.f;
  if (threadIdx.x == 0) x_scale[row] = finite ? __fdiv_rn(absmax, qmax_f) : __int_as_float(0x7fc00000);

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

  __device__ __forceinline__ float value(float xs, int col, int acc) const {
    float o = __fmul_rn(__int2float_rn(acc), __fmul_rn(xs, w_scale[col]));
    if (bias != nullptr) o = __fadd_rn(o, bias[col]);
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

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const at::Tensor& w_rowsum, const c10::optional<at::Tensor>& bias, int64_t act_qmax) {
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
        static_cast<int>(act_qmax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const DequantBiasStore<T> epi{out.data_ptr<T>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                                  bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, static_cast<int>(n),
                                  n % 2 == 0};
    launch_int8_mma_gemm</*kPackedB=*/true>(ops, epi, stream);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) { m.impl("int8_linear", &sparseq::cuda::int8_linear_cuda); }
