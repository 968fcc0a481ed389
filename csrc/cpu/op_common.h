#pragma once
// Torch-side helpers shared by the CPU op files (not the AVX2 files: int8_kernels.h stays
// torch-free for them).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstring>

#include "int8_kernels.h"

namespace sparseq::cpu {

inline OutType out_type_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return OutType::kBFloat16;
    case at::kHalf: return OutType::kFloat16;
    default: return OutType::kFloat32;
  }
}

// The kernels' epilogues read the bias as fp32: returns an undefined tensor when there is none.
// An fp32 contiguous bias (the usual one) is returned as is, without a dispatcher round trip.
inline at::Tensor bias_as_float(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  if (bias->scalar_type() == at::kFloat && bias->is_contiguous()) return *bias;
  return bias->to(at::kFloat).contiguous();
}

// Zeroes the rows of a [rows, lda] u8 activation operand past the first m (the padding rows that
// gemm_activation_layout adds for the AMX core: its tiles read them, and their outputs are dropped).
inline void zero_padding_rows(at::Tensor& a_u, int64_t m) {
  if (a_u.size(0) > m) std::memset(a_u.mutable_data_ptr<uint8_t>() + m * a_u.size(1), 0, (a_u.size(0) - m) * a_u.size(1));
}

inline const float* float_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

// Quantizes every row of x [m, k] as quantize_rows_avx2 documents (its bit-exact portable twin
// when use_avx2 is false), per row or with the one static_scale, rows split over threads
// (defined in int8_linear.cpp).
void quantize_activation_rows(const at::Tensor& x, int32_t qmax, uint8_t* a_u, int8_t* a_sign, int64_t lda,
                              float* x_scale, bool use_avx2, const float* static_scale = nullptr);

}  // namespace sparseq::cpu
