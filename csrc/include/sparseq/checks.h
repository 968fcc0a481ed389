#pragma once
// Input checks shared by the CPU and CUDA kernels. Every op validates here, so a bad tensor
// reaching torch.ops.sparseq.* directly still gets a clear error instead of a crash.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "sparseq/packed_int8.h"
#include "sparseq/sparse_formats.h"

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

// The int8_linear ops' fused activation: "none" or "gelu"; true for GELU.
inline bool parse_fused_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "gelu",
              "sparseq: activation must be \"none\" or \"gelu\", got \"", std::string(activation), "\"");
  return activation == "gelu";
}

// The W8A8 ops quantize activations to 8 bits (127) or 7 bits (63).
inline void check_act_qmax(int64_t act_qmax) {
  TORCH_CHECK(act_qmax == 63 || act_qmax == 127,
              "sparseq: act_qmax must be 127 (8-bit activations) or 63 (7-bit), got ", act_qmax);
}

// int8_linear_static's activation scale: one fp32 value on x's device, read by the kernel
// itself so that no host sync is needed.
inline void check_static_act_scale(const at::Tensor& x, const at::Tensor& x_scale) {
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 1 && x_scale.size(0) == 1,
              "sparseq: x_scale must be a float32 tensor of shape [1], got ", x_scale.scalar_type(), " ",
              x_scale.sizes());
  TORCH_CHECK(x_scale.device() == x.device(), "sparseq: x_scale must be on x's device");
}

inline void check_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous(),
              "sparseq: bias must be a contiguous vector of N=", n, " elements, got ", bias->sizes());
  TORCH_CHECK(bias->device() == x.device(), "sparseq: bias must be on x's device");
  TORCH_CHECK(bias->is_floating_point(), "sparseq: bias must be floating point");
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
  check_bias(x, bias, n);
  return n;
}

// Sparse values: float32/bfloat16/float16, or int8 codes that need w_scale float32 [N].
inline void check_sparse_values(const at::Tensor& x, const at::Tensor& values,
                                const c10::optional<at::Tensor>& w_scale, int64_t n) {
  const auto t = values.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kChar,
              "sparseq: sparse values must be float32, bfloat16, float16 or int8, got ", t);
  TORCH_CHECK(values.is_contiguous(), "sparseq: sparse values must be contiguous");
  TORCH_CHECK(values.device() == x.device(), "sparseq: sparse values must be on x's device");
  if (t == at::kChar) {
    TORCH_CHECK(w_scale.has_value(), "sparseq: int8 sparse values need w_scale (float32 [N])");
    TORCH_CHECK(w_scale->scalar_type() == at::kFloat && w_scale->dim() == 1 && w_scale->size(0) == n &&
                    w_scale->is_contiguous() && w_scale->device() == x.device(),
                "sparseq: w_scale must be a contiguous float32 vector of N=", n, " on x's device, got ",
                w_scale->scalar_type(), " ", w_scale->sizes());
  } else {
    TORCH_CHECK(!w_scale.has_value(), "sparseq: w_scale is only for int8 sparse values, got ", t, " values");
  }
}

inline void check_index_tensor(const at::Tensor& x, const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), "sparseq: ", name,
              " must be a contiguous 1-D ", dtype, " tensor, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "sparseq: ", name, " must be on x's device");
}

// Returns N. Only shapes are checked here (O(1)); pointer contents are checked by the kernels as
// they read them, and a uint8 offset cannot leave its segment.
inline int64_t check_csr_weight(const at::Tensor& x, const at::Tensor& seg_ptr, const at::Tensor& col_offsets,
                                const at::Tensor& values, const c10::optional<at::Tensor>& w_scale,
                                const c10::optional<at::Tensor>& bias) {
  check_float_activation(x);
  check_index_tensor(x, seg_ptr, at::kInt, "seg_ptr");
  check_index_tensor(x, col_offsets, at::kByte, "col_offsets");
  const int64_t segments = csr_segments(x.size(1));
  TORCH_CHECK(seg_ptr.numel() >= 1 && (seg_ptr.numel() - 1) % segments == 0, "sparseq: seg_ptr has ",
              seg_ptr.numel(), " entries; for K=", x.size(1), " it must hold N*", segments, "+1");
  const int64_t n = (seg_ptr.numel() - 1) / segments;
  TORCH_CHECK(values.dim() == 1 && values.numel() == col_offsets.numel(),
              "sparseq: values must be 1-D with one entry per column offset (", col_offsets.numel(), "), got ",
              values.sizes());
  check_sparse_values(x, values, w_scale, n);
  check_bias(x, bias, n);
  return n;
}

// Returns N.
inline int64_t check_sparse24_weight(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                     const c10::optional<at::Tensor>& w_scale,
                                     const c10::optional<at::Tensor>& bias) {
  check_float_activation(x);
  const int64_t groups = sparse24_groups(x.size(1));
  TORCH_CHECK(values.dim() == 2 && values.size(1) == 2 * groups, "sparseq: 2:4 values must be [N, ",
              2 * groups, "] for K=", x.size(1), ", got ", values.sizes());
  const int64_t n = values.size(0);
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == n &&
                  meta.size(1) == (groups + 1) / 2 && meta.is_contiguous(),
              "sparseq: 2:4 meta must be contiguous uint8 [", n, ", ", (groups + 1) / 2, "], got ",
              meta.scalar_type(), " ", meta.sizes());
  TORCH_CHECK(meta.device() == x.device(), "sparseq: meta must be on x's device");
  check_sparse_values(x, values, w_scale, n);
  check_bias(x, bias, n);
  return n;
}

// Returns N (w_scale's length). Shapes and the pointers' two ends are checked here (O(1)); the
// kernels check the rest of the pointers, the masks and the offsets as they read them.
inline int64_t check_sell_weight(const at::Tensor& x, const at::Tensor& block_step_ptr, const at::Tensor& step_masks,
                                 const at::Tensor& slice_ptr, const at::Tensor& col_offsets, const at::Tensor& values,
                                 const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias) {
  check_float_activation(x);
  check_index_tensor(x, block_step_ptr, at::kInt, "block_step_ptr");
  check_index_tensor(x, step_masks, at::kLong, "step_masks");
  check_index_tensor(x, slice_ptr, at::kInt, "slice_ptr");
  check_index_tensor(x, col_offsets, at::kByte, "col_offsets");
  check_index_tensor(x, values, at::kChar, "values");
  TORCH_CHECK(values.numel() == col_offsets.numel(), "sparseq: sliced-ELL values (", values.numel(),
              ") and col_offsets (", col_offsets.numel(), ") must have one entry each");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous() &&
                  w_scale.device() == x.device(),
              "sparseq: w_scale must be a contiguous float32 vector on x's device, got ", w_scale.scalar_type(), " ",
              w_scale.sizes());
  const int64_t n = w_scale.size(0), slices = sell_slices(n), blocks = sell_blocks(x.size(1));
  TORCH_CHECK(block_step_ptr.numel() == slices * blocks + 1 && slice_ptr.numel() == slices + 1,
              "sparseq: for N=", n, " and K=", x.size(1), " a sliced-ELL weight has ", slices * blocks + 1,
              " block_step_ptr and ", slices + 1, " slice_ptr entries, got ", block_step_ptr.numel(), " and ",
              slice_ptr.numel());
  check_bias(x, bias, n);
  return n;
}

// Returns the number of block rows NB; N is out_features.
inline int64_t check_bsr_weight(const at::Tensor& x, const at::Tensor& block_row_ptr,
                                const at::Tensor& block_col_idx, const at::Tensor& values,
                                const c10::optional<at::Tensor>& w_scale, const c10::optional<at::Tensor>& bias,
                                int64_t out_features) {
  check_float_activation(x);
  check_index_tensor(x, block_row_ptr, at::kInt, "block_row_ptr");
  check_index_tensor(x, block_col_idx, at::kInt, "block_col_idx");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == block_col_idx.numel() && values.size(1) > 0 &&
                  values.size(2) > 0,
              "sparseq: BSR values must be [nnz_blocks=", block_col_idx.numel(), ", bh, bw], got ", values.sizes());
  const int64_t bh = values.size(1);
  TORCH_CHECK(out_features >= 0 && block_row_ptr.numel() == (out_features + bh - 1) / bh + 1,
              "sparseq: block_row_ptr has ", block_row_ptr.numel(), " entries; out_features=", out_features,
              " with bh=", bh, " needs ", (out_features + bh - 1) / bh + 1);
  check_sparse_values(x, values, w_scale, out_features);
  check_bias(x, bias, out_features);
  return block_row_ptr.numel() - 1;
}

}  // namespace sparseq
