// CUDA unstructured sparse linear on a SparseCSRWeight (segmented CSR, uint8 column offsets):
// out[m, n] = sum over row n's entries of values[e] * x[m, 256 s + col_offsets[e]] (* w_scale[n])
// + bias[n], fp32 accumulation, any value dtype, output in x's dtype.
//
// One warp per output channel and kTokens tokens: lanes walk the row's nonzeros (consecutive
// entries, so the index and value loads coalesce and the x gathers of a segment stay within one
// 256-column window), each lane keeps kTokens partial sums, a warp reduction finishes the row.
// A lane finds its entry's segment from pointers held in registers (one per lane), so decoding
// (M = 1) waits on two dependent loads per 32 entries, not on a chain of pointer loads.
// Larger M is a grid dimension of token tiles: the row is re-read per tile, from L2 for a layer's
// worth of weight. Meant for high sparsity (>= ~90%), where the dense GEMM wastes most of its work.
//
// Pointer contents are checked as they are read: a segment [lo, hi) with lo < 0, hi < lo or
// hi > nnz is skipped, as is an entry whose column reaches K; the row's outputs become NaN and the
// op raises (device_error_flag.h). Nothing outside seg_ptr, col_offsets, values and x is read.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "device_error_flag.h"
#include "int8_mma.cuh"  // dispatch_activation_dtype, kMaxKernelDim
#include "sparse_common.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

constexpr int kCsrWarps = 4;  // channels per CTA
constexpr int kTokens = 8;    // tokens per warp
constexpr int kBadPointers = 1, kBadColumns = 2;
constexpr int kWindow = 31;  // segments whose 32 pointers one warp load brings
constexpr unsigned kFullMask = 0xffffffffu;

template <typename TX, typename TV>
__global__ void __launch_bounds__(32 * kCsrWarps)
    csr_linear_kernel(const TX* __restrict__ x, const int* __restrict__ seg_ptr, const uint8_t* __restrict__ col_offsets,
                      const TV* __restrict__ values, const float* __restrict__ w_scale, const float* __restrict__ bias,
                      TX* __restrict__ out, int m, int n, int k, int segments, int64_t nnz, int* error_flag) {
  const int lane = threadIdx.x & 31;
  const int channel = blockIdx.x * kCsrWarps + (threadIdx.x >> 5);
  if (channel >= n) return;
  const int m0 = blockIdx.y * kTokens;
  const int tokens = min(kTokens, m - m0);
  const int* ptr = seg_ptr + static_cast<int64_t>(channel) * segments;
  int bad = 0;
  // The first and last pointers pin the whole array to [0, nnz] as the format requires.
  if ((channel == 0 && ptr[0] != 0) || (channel == n - 1 && ptr[segments] != nnz)) bad |= kBadPointers;
  float acc[kTokens] = {};
  // Windows of up to 31 segments: lane i holds pointer s0 + i (the window's starts and its end),
  // so one load brings every pointer the window needs and no loop waits on a pointer chain.
  for (int s0 = 0; s0 < segments; s0 += kWindow) {
    const int count = min(kWindow, segments - s0);
    const int64_t p = lane <= count ? ptr[s0 + lane] : 0;
    const int64_t p_next = __shfl_down_sync(kFullMask, p, 1);
    const bool lane_bad = lane <= count && (p < 0 || p > nnz || (lane < count && p_next < p));
    if (__any_sync(kFullMask, lane_bad)) {
      bad |= kBadPointers;
      continue;
    }
    const int64_t end = __shfl_sync(kFullMask, p, count);
    int seg = 0;  // the segment (within the window) of this lane's entry; only ever advances
    for (int64_t e = __shfl_sync(kFullMask, p, 0) + lane; __any_sync(kFullMask, e < end); e += 32) {
      const bool live = e < end;
      for (;;) {  // advance past the segments that end at or before e (empty ones included)
        const int64_t next_start = __shfl_sync(kFullMask, p, min(seg + 1, count));
        const bool advance = live && seg < count - 1 && e >= next_start;
        if (!__any_sync(kFullMask, advance)) break;
        seg += advance;
      }
      if (!live) continue;
      const int col = (s0 + seg) * 256 + col_offsets[e];
      if (col >= k) {
        bad |= kBadColumns;
        continue;
      }
      const float v = static_cast<float>(values[e]);
      const TX* xc = x + static_cast<int64_t>(m0) * k + col;
#pragma unroll
      for (int t = 0; t < kTokens; ++t)
        if (t < tokens) acc[t] += v * static_cast<float>(xc[static_cast<int64_t>(t) * k]);
    }
  }
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(kFullMask, acc[t], off);
  }
  if (__any_sync(kFullMask, bad & kBadPointers)) bad |= kBadPointers;
  if (__any_sync(kFullMask, bad & kBadColumns)) bad |= kBadColumns;
  if (lane == 0) {
    if (bad) atomicOr(error_flag, bad);
    for (int t = 0; t < tokens; ++t) {
      const float o = bad ? quiet_nan() : scale_and_bias(acc[t], w_scale, bias, channel);
      out[static_cast<int64_t>(m0 + t) * n + channel] = TX(o);
    }
  }
}

at::Tensor sparse_csr_linear_cuda(const at::Tensor& x, const at::Tensor& seg_ptr, const at::Tensor& col_offsets,
                                  const at::Tensor& values, const c10::optional<at::Tensor>& w_scale,
                                  const c10::optional<at::Tensor>& bias) {
  const int64_t n = check_csr_weight(x, seg_ptr, col_offsets, values, w_scale, bias);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA sparse_csr_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t segments = csr_segments(k);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim && n * segments < INT32_MAX,
              "sparseq: sparse_csr_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const int64_t tiles_m = (m + kTokens - 1) / kTokens;
  TORCH_CHECK(tiles_m <= 65535, "sparseq: M=", m, " is too large for the CUDA CSR grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const DeviceErrorFlag flag(x);
  const dim3 grid(static_cast<unsigned>((n + kCsrWarps - 1) / kCsrWarps), static_cast<unsigned>(tiles_m));
  dispatch_activation_dtype(x.scalar_type(), [&](auto x_tag) {
    using TX = decltype(x_tag);
    dispatch_value_dtype(values.scalar_type(), [&](auto v_tag) {
      using TV = decltype(v_tag);
      csr_linear_kernel<TX, TV><<<grid, 32 * kCsrWarps, 0, stream>>>(
          x.data_ptr<TX>(), seg_ptr.data_ptr<int>(), col_offsets.data_ptr<uint8_t>(), values.data_ptr<TV>(),
          w_scale.has_value() ? w_scale->data_ptr<float>() : nullptr,
          bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr<TX>(), static_cast<int>(m),
          static_cast<int>(n), static_cast<int>(k), static_cast<int>(segments), values.numel(), flag.data());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const int found = flag.read(stream);
  TORCH_CHECK(!(found & kBadPointers), "sparseq: seg_ptr must start at 0, end at nnz=", values.numel(),
              " and never decrease (see sparseq.formats.SparseCSRWeight.validate)");
  TORCH_CHECK(!(found & kBadColumns), "sparseq: a CSR column offset lands on a column >= K=", k,
              " in the last segment (see sparseq.formats.SparseCSRWeight.validate)");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) { m.impl("sparse_csr_linear", &sparseq::cuda::sparse_csr_linear_cuda); }
