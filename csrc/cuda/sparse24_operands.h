#pragma once
// Host side of the 2:4 tensor-core GEMM: brings (x or q, values, meta) into the shape the kernel
// reads (sparse24_mma.cuh), copying only when K is not a whole number of stages or a base pointer
// is misaligned; typical layer widths (K % 128 == 0) run on the caller's tensors as they are.
#include <ATen/ATen.h>

#include <cstdint>

#include "sparse24_mma.cuh"

namespace sparseq {
namespace cuda {
namespace sp24 {

constexpr const char* kInvalidMetaMessage =
    "sparseq: 2:4 meta holds a group whose two positions are not strictly increasing (idx_0 >= idx_1), "
    "which the tensor cores cannot represent; build meta with sparseq.formats.Sparse24Weight.pack "
    "(validate() names the group)";

inline int64_t padded_k(int64_t k, int elem_bytes) {
  const int64_t step = dense_k_per_stage(elem_bytes);
  return (k + step - 1) / step * step;
}

// A [rows, cols] matrix as a [rows, padded_cols] one whose new columns hold `fill`, or itself when
// nothing needs padding and its base is 16-byte aligned.
inline at::Tensor pad_columns(const at::Tensor& t, int64_t padded_cols, int64_t fill) {
  if (t.size(1) == padded_cols && is_aligned16(t.data_ptr())) return t;
  at::Tensor out = at::full({t.size(0), padded_cols}, fill, t.options());
  out.narrow(1, 0, t.size(1)).copy_(t);
  return out;
}

// Fills `ops` for activation rows `act` ([M, Kpad], already padded: bf16/fp16 x, or int8 q) and
// the weight tensors (values of act's dtype, or int8 codes for a 16-bit act). The padded groups
// of meta get positions (0, 1) (kPadMetaByte); an odd group count leaves a high nibble in the
// last real byte that is not a group, which gets them too.
// Returns the tensors that must stay alive until the kernel has run.
inline std::vector<at::Tensor> prepare_weight_operands(Operands& ops, const at::Tensor& act, const at::Tensor& values,
                                                       const at::Tensor& meta, int64_t k) {
  const int64_t kpad = act.size(1);
  const int64_t groups = (k + 3) / 4;
  const at::Tensor v = pad_columns(values, kpad / 2, 0);
  at::Tensor mt = meta;
  if (groups % 2 != 0 || meta.size(1) != kpad / 8 || !is_aligned16(meta.data_ptr())) {
    mt = at::full({meta.size(0), kpad / 8}, static_cast<int64_t>(kPadMetaByte), meta.options());
    mt.narrow(1, 0, meta.size(1)).copy_(meta);
    if (groups % 2 != 0) {
      at::Tensor last = mt.select(1, groups / 2);
      last.copy_(at::bitwise_or(at::bitwise_and(last, 0x0F), kPadMetaByte & 0xF0));
    }
  }
  ops.values = static_cast<const uint8_t*>(v.data_ptr());
  ops.x = static_cast<const uint8_t*>(act.data_ptr());
  ops.meta = static_cast<const uint8_t*>(mt.data_ptr());
  ops.ld_values = kpad / 2 * v.element_size();
  ops.ld_x = kpad * act.element_size();
  ops.ld_meta = kpad / 8;
  ops.n = static_cast<int>(values.size(0));
  ops.m = static_cast<int>(act.size(0));
  ops.k_stages = static_cast<int>(kpad / dense_k_per_stage(static_cast<int>(act.element_size())));
  return {v, mt};
}

}  // namespace sp24
}  // namespace cuda
}  // namespace sparseq
