#pragma once
// Input checks shared by the CPU and CUDA kernels. Every op validates here, so a bad tensor
// reaching torch.ops.sparseq.* directly still gets a clear error instead of a crash.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "sparseq/packed_int8.h"

namespace sparseq {

inline void check_int8_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kChar, "sparseq: ", name, " must be int8, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "sparseq: ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "sparseq: ", name, " must be contiguous");
}

inline void check_float_activation(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "sparseq: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "sparseq: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "sparseq: x must be contiguous");
}

// Checks the n16k4 packed weight against K (from x) and N (from w_scale) and returns N.
inline int64_t check_packed_weight(const at::Tensor& x, const at::Tensor& w_packed,
                                   const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 4 &&
                  w_packed.size(2) == kPackN && w_packed.size(3) == kPackK && w_packed.is_contiguous(),
              "sparseq: w_packed must be a contiguous int8 tensor of shape [ceil(N/16), ceil(K/4), 16, 4]"
              " (see sparseq.formats.PackedInt8Weight), got ", w_packed.sizes(), " ", w_packed.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous(),
              "sparseq: w_scale must be a contiguous float32 vector [N]");
  const int64_t n = w_scale.size(0);
  const int64_t k = x.size(1);
  TORCH_CHECK(w_packed.size(0) == packed_blocks_n(n) && w_packed.size(1) == packed_quads_k(k),
              "sparseq: w_packed shape ", w_packed.sizes(), " does not match N=", n, " (from w_scale) and K=",
              k, " (from x)");
  TORCH_CHECK(x.device() == w_packed.device() && x.device() == w_scale.device(),
              "sparseq: x, w_packed and w_scale must be on the same device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
                "sparseq: bias must be a contiguous vector of N=", n, " elements, got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "sparseq: bias must be on x's device");
    TORCH_CHECK(bias->is_floating_point(), "sparseq: bias must be floating point");
  }
  return n;
}

}  // namespace sparseq
