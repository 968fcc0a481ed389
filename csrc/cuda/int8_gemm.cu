// CUDA int8 GEMM: a int8 [M,K] @ b int8 [N,K]^T -> int32 [M,N], exact (tensor cores, sm_80+).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "int8_mma.cuh"
#include "sparseq/checks.h"

namespace sparseq {
namespace cuda {
namespace {

struct StoreInt32 {
  int32_t* out;
  int n;
  bool pairs_aligned;  // n even: (row, col even) pairs are 8-byte aligned

  __device__ __forceinline__ void operator()(int row, int col, int v0, int v1) const {
    int32_t* p = out + static_cast<int64_t>(row) * n + col;
    if (pairs_aligned) {  // n even and col even imply col + 1 < n
      *reinterpret_cast<int2*>(p) = make_int2(v0, v1);
    } else {
      p[0] = v0;
      if (col + 1 < n) p[1] = v1;
    }
  }
};

// The kernel's copies are 16-byte chunks along K: rows must start 16-byte aligned and K must be
// a whole number of chunks. Other inputs (K % 16 != 0, or a view at an odd offset) are copied
// once into a zero-padded [rows, round_up(K, 16)] buffer; the zeros add nothing to the sums.
at::Tensor prepare_rowmajor_operand(const at::Tensor& t) {
  const int64_t k = t.size(1), kd = round_up16(k);
  if (kd == k && is_aligned16(t.data_ptr())) return t;
  at::Tensor padded = at::zeros({t.size(0), kd}, t.options());
  padded.narrow(1, 0, k).copy_(t);
  return padded;
}

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_int8_matrix(a, "a");
  check_int8_matrix(b, "b");
  TORCH_CHECK(a.size(1) == b.size(1), "sparseq: a is [M,K]=", a.sizes(), " and b is [N,K]=", b.sizes(),
              ": K differs");
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), "sparseq: a and b must be on the same CUDA device, got ",
              a.device(), " and ", b.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  TORCH_CHECK(m <= kMaxKernelDim && n <= kMaxKernelDim && k <= kMaxKernelDim,
              "sparseq: int8_gemm dimensions must be <= 2^31 - 257, got ", a.sizes(), " and ", b.sizes());
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  require_int8_tensor_cores();

  const at::Tensor a_op = prepare_rowmajor_operand(a);
  const at::Tensor b_op = prepare_rowmajor_operand(b);
  GemmOperands ops;
  ops.a = a_op.data_ptr<int8_t>();
  ops.b = b_op.data_ptr<int8_t>();
  ops.lda = a_op.size(1);
  ops.ldb = b_op.size(1);
  ops.m = static_cast<int>(m);
  ops.n = static_cast<int>(n);
  ops.kd = static_cast<int>(a_op.size(1));
  const StoreInt32 epi{out.data_ptr<int32_t>(), static_cast<int>(n), n % 2 == 0};
  launch_int8_mma_gemm</*kPackedB=*/false>(ops, epi, at::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparseq

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) { m.impl("int8_gemm", &sparseq::cuda::int8_gemm_cuda); }
