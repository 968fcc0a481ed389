// CUDA W8A8 linear on a sliced-ELL int8 weight (layout in sparse_formats.h): x quantized per row
// by the bit-exact kernel int8_linear uses (int8_quantize.cuh), exact int32 dots of every row's
// entries, then acc * (x_scale[m] * w_scale[n]) + bias in x's dtype (DequantBiasStore's steps).
//
// One warp per slice (16 rows) and kTokens tokens. A step's 64 byte lanes go two per CUDA lane,
// so CUDA lanes 2r and 2r + 1 hold row r; a lane finds its entries in the step's packed run by
// popcount of the mask bits below its own, and a shuffle adds each row's two halves at the end.
// The CPU layout serves as is: meant for high sparsity, where a dense GEMM wastes its work.
//
// Contents are checked as they are read, as on the CPU (sell_kernels.h): a bad slice's outputs
// become NaN and the op raises (device_error_flag.h); nothing outside the tensors is read.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "device_error_flag.h"
#include "int8_mma.cuh"  // dispatch_activation_dtype, kMaxKernelDim
#include "int8_quantize.cuh"
#include "sparse_common.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

constexpr int kSellWarps = 4;  // slices per CTA
constexpr int kTokens = 8;     // tokens per warp
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__global__ void __launch_bounds__(32 * kSellWarps)
    sell_int8_kernel(const int8_t* __restrict__ q, int64_t ldq, const int* __restrict__ block_step_ptr,
                     const unsigned long long* __restrict__ step_masks, int64_t steps,
                     const int* __restrict__ slice_ptr, const uint8_t* __restrict__ col_offsets,
                     const int8_t* __restrict__ values, int64_t nnz, int blocks, int k, int m, int n,
                     DequantBiasStore<T> dequant, int* error_flag) {
  const int lane = threadIdx.x & 31;
  const int slice = blockIdx.x * kSellWarps + (threadIdx.x >> 5);
  const int slices = (n + 15) / 16;
  if (slice >= slices) return;
  const int m0 = blockIdx.y * kTokens;
  const int tokens = min(kTokens, m - m0);
  const int* ptr = block_step_ptr + static_cast<int64_t>(slice) * blocks;
  int64_t e = slice_ptr[slice];
  const int64_t e_end = slice_ptr[slice + 1];
  const int rows = min(16, n - slice * 16);
  const unsigned long long foreign = rows >= 16 ? 0ull : ~0ull << (4 * rows);
  bool bad = e < 0 || e > e_end || e_end > nnz || ptr[0] < 0 || ptr[blocks] > steps;
  // The first and last pointers pin both arrays to [0, steps] and [0, nnz] as the format requires.
  if (slice == 0) bad = bad || ptr[0] != 0 || e != 0;
  if (slice == slices - 1) bad = bad || ptr[blocks] != steps || e_end != nnz;
  // This lane's two byte lanes 2 lane, 2 lane + 1: the mask bits below them count the entries before.
  const unsigned long long below = (1ull << (2 * lane)) - 1ull;
  int acc[kTokens] = {};
  for (int b = 0; b < blocks && !bad; ++b) {
    const int t0 = ptr[b], t1 = ptr[b + 1];
    if (t1 < t0) {
      bad = true;
      break;
    }
    const int width = min(64, k - 64 * b);
    for (int t = t0; t < t1; ++t) {
      const unsigned long long mask = step_masks[t];
      const int count = __popcll(mask);
      if (e + count > e_end || (mask & foreign) != 0ull) {
        bad = true;
        break;
      }
      int64_t idx = e + __popcll(mask & below);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (!((mask >> (2 * lane + half)) & 1ull)) continue;
        const int offset = col_offsets[idx];
        if (offset >= width) {
          bad = true;
          break;
        }
        const int v = values[idx];
        const int8_t* qc = q + static_cast<int64_t>(m0) * ldq + 64 * b + offset;
#pragma unroll
        for (int i = 0; i < kTokens; ++i)
          if (i < tokens) acc[i] += v * static_cast<int>(qc[static_cast<int64_t>(i) * ldq]);
        ++idx;
      }
      e += count;
    }
  }
  bad = bad || e != e_end;
  bad = __any_sync(kFullMask, bad);
#pragma unroll
  for (int i = 0; i < kTokens; ++i) acc[i] += __shfl_xor_sync(kFullMask, acc[i], 1);
  if (lane == 0 && bad) atomicOr(error_flag, 1);
  const int row = lane >> 1;
  if ((lane & 1) == 0 && row < rows) {
    const int channel = slice * 16 + row;
    for (int i = 0; i < tokens; ++i) {
      const float o = bad ? quiet_nan() : dequant.value(dequant.x_scale[m0 + i], channel, acc[i]);
      dequant.out[static_cast<int64_t>(m0 + i) * n + channel] = T(o);
    }
  }
}

at::Tensor sparse_sell_int8_linear_cuda(const at::Tensor& x, const at::Tensor& block_step_ptr,
                                        const at::Tensor& step_masks, const at::Tensor& slice_ptr,
                                        const at::Tensor& col_offsets, const at::Tensor& values,
                                        const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                        int64_t act_qmax) {
  const int64_t n = check_sell_weight(x, block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale, bias);
  check_act_qmax(act_qmax);
  TORCH_CHECK(x.is_cuda(), "sparseq: the CUDA sparse_sell_int8_linear got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t blocks = sell_blocks(k);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim && block_step_ptr.numel() < INT32_MAX,
              "sparseq: sparse_sell_int8_linear dimensions must be <= 2^31 - 257, got x ", x.sizes(), " and N=", n);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const int64_t tiles_m = (m + kTokens - 1) / kTokens;
  TORCH_CHECK(tiles_m <= 65535, "sparseq: M=", m, " is too large for the CUDA sliced-ELL grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Whole 64-column blocks, as on the CPU; the quantizer zero-fills the padding.
  const int64_t ldq = (blocks * 64 + 15) / 16 * 16;
  at::Tensor q = at::empty({m, ldq}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const DeviceErrorFlag flag(x);
  const int64_t slices = sell_slices(n);
  const dim3 grid(static_cast<unsigned>((slices + kSellWarps - 1) / kSellWarps), static_cast<unsigned>(tiles_m));
  dispatch_activation_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<static_cast<unsigned>(m), kQuantThreads, 0, stream>>>(
        x.data_ptr<T>(), q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), static_cast<int>(k), ldq,
        static_cast<int>(act_qmax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const DequantBiasStore<T> dequant{out.data_ptr<T>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                                      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, static_cast<int>(n),
                                      false};
    sell_int8_kernel<T><<<grid, 32 * kSellWarps, 0, stream>>>(
        q.data_ptr<int8_t>(), ldq, block_step_ptr.data_ptr<int>(),
        reinterpret_cast<const unsigned long long*>(step_masks.data_ptr<int64_t>()), step_masks.numel(),
        slice_ptr.data_ptr<int>(), col_offsets.data_ptr<uint8_t>(), values.data_ptr<int8_t>(), values.numel(),
        static_cast<int>(blocks), static_cast<int>(k), static_cast<int>(m), static_cast<int>(n), dequant,
        flag.data());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_CHECK(flag.read(stream) == 0,
              "sparseq: sparse_sell_int8_linear: the sliced-ELL weight is inconsistent (see "
              "sparseq.formats.SlicedEllInt8Weight.validate)");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("sparse_sell_int8_linear", &sparseq::cuda::sparse_sell_int8_linear_cuda);
}
