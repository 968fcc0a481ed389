// CPU int8_linear (W8A8 dynamic) and int8_linear_static (W8A8 with a calibrated per-tensor
// activation scale): fused activation quantization (per row, or with the given scale), then the
// shared int8 GEMM core (int8_gemm.cpp / int8_gemm_avx2.cpp) with the dequantization epilogue fused.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "int8_kernels.h"
#include "op_common.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

template <typename T>
void quantize_rows_portable_typed(const T* x, int64_t k, int64_t m_begin, int64_t m_end, int32_t qmax,
                                  uint8_t* a_u, int8_t* a_sign, int64_t lda, float* x_scale,
                                  const float* static_scale) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const T* row = x + m * k;
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      const float v = static_cast<float>(row[i]);
      finite = finite && std::isfinite(v);
      absmax = std::max(absmax, std::fabs(v));
    }
    float inv, scale;
    if (static_scale != nullptr) {
      inv = static_inverse_scale(*static_scale);
      finite = finite && inv != 0.0f;
      scale = *static_scale;
    } else {
      if (!finite || !(absmax > 0.0f)) absmax = 1.0f;
      inv = static_cast<float>(qmax) / absmax;
      scale = absmax / static_cast<float>(qmax);
    }
    // A NaN/Inf row quantizes to zeros with a NaN scale: its outputs come out NaN (see _ref).
    x_scale[m] = finite ? scale : std::numeric_limits<float>::quiet_NaN();
    uint8_t* u = a_u + m * lda;
    int8_t* s = a_sign != nullptr ? a_sign + m * lda : nullptr;
    for (int64_t i = 0; i < lda; ++i) {
      int32_t q = 0;
      if (i < k && finite) {
        const float scaled = static_cast<float>(row[i]) * inv;
        // nearbyint rounds half to even in the default rounding mode, like torch.round.
        q = static_cast<int32_t>(std::clamp(std::nearbyint(scaled), static_cast<float>(-qmax), static_cast<float>(qmax)));
      }
      if (s == nullptr) {
        u[i] = i < k ? static_cast<uint8_t>(q + qmax + 1) : 0;
      } else {
        u[i] = static_cast<uint8_t>(q < 0 ? -q : q);
        s[i] = static_cast<int8_t>(q);
      }
    }
  }
}

void quantize_rows_portable(const at::Tensor& x, int64_t m_begin, int64_t m_end, int32_t qmax, uint8_t* a_u,
                            int8_t* a_sign, int64_t lda, float* x_scale, const float* static_scale) {
  const int64_t k = x.size(1);
  switch (x.scalar_type()) {
    case at::kBFloat16:
      quantize_rows_portable_typed(x.const_data_ptr<c10::BFloat16>(), k, m_begin, m_end, qmax, a_u, a_sign, lda,
                                   x_scale, static_scale);
      break;
    case at::kHalf:
      quantize_rows_portable_typed(x.const_data_ptr<c10::Half>(), k, m_begin, m_end, qmax, a_u, a_sign, lda,
                                   x_scale, static_scale);
      break;
    default:
      quantize_rows_portable_typed(x.const_data_ptr<float>(), k, m_begin, m_end, qmax, a_u, a_sign, lda, x_scale,
                                   static_scale);
  }
}

}  // namespace

void quantize_activation_rows(const at::Tensor& x, int32_t qmax, uint8_t* a_u, int8_t* a_sign, int64_t lda,
                              float* x_scale, bool use_avx2, const float* static_scale) {
  const int64_t k = x.size(1);
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(k, 1)), [&](int64_t b, int64_t e) {
    if (use_avx2) {
      quantize_rows_avx2(x.const_data_ptr(), out_type_of(x), k, b, e, qmax, a_u, a_sign, lda, x_scale, static_scale);
    } else {
      quantize_rows_portable(x, b, e, qmax, a_u, a_sign, lda, x_scale, static_scale);
    }
  });
}

namespace {

// static_scale: nullptr for per-row (dynamic) activation scales, else the one calibrated scale.
at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const at::Tensor& w_rowsum, const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                            c10::string_view activation, const float* static_scale) {
  const bool gelu = parse_fused_activation(activation);
  check_float_activation(x);
  const int64_t n = check_packed_weight(x, w_packed, w_scale, bias);
  TORCH_CHECK(w_rowsum.scalar_type() == at::kInt && w_rowsum.dim() == 1 && w_rowsum.size(0) == n &&
                  w_rowsum.is_contiguous() && w_rowsum.device() == x.device(),
              "sparseq: w_rowsum must be a contiguous int32 vector of N=", n, " elements on x's device, got ",
              w_rowsum.scalar_type(), " ", w_rowsum.sizes());
  check_act_qmax(act_qmax);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  const GemmKernel kernel = best_gemm_kernel(m);
  const bool use_avx2 = kernel != GemmKernel::kPortable;
  const int32_t qmax = static_cast<int32_t>(act_qmax);
  // Activations go unsigned as q + qmax + 1, corrected by (qmax + 1) * rowsum in the epilogue,
  // wherever the core is exact for them: always with VNNI and AMX, and for 7-bit ones (q + 64 in
  // [1, 127]) with AVX2's vpmaddubsw, the fastest AVX2 path. 8-bit ones on AVX2 use the sign trick.
  const bool offset_form = qmax == 63 || takes_offset_form(kernel);
  const int64_t k_quads = packed_quads_k(k);
  const ActivationLayout layout = gemm_activation_layout(kernel, m, k_quads);
  const int64_t lda = layout.lda;
  at::Tensor a_u = at::empty({layout.rows, lda}, x.options().dtype(at::kByte));
  zero_padding_rows(a_u, m);
  at::Tensor a_sign;
  if (!offset_form) a_sign = at::empty({m, lda}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  uint8_t* u_ptr = a_u.mutable_data_ptr<uint8_t>();
  int8_t* s_ptr = offset_form ? nullptr : a_sign.mutable_data_ptr<int8_t>();
  float* scale_ptr = x_scale.mutable_data_ptr<float>();
  quantize_activation_rows(x, qmax, u_ptr, s_ptr, lda, scale_ptr, use_avx2, static_scale);

  const at::Tensor bias_f32 = bias_as_float(bias);
  GemmProblem p;
  p.a_u = u_ptr;
  p.a_sign = s_ptr;
  p.lda = lda;
  p.w_packed = w_packed.const_data_ptr<int8_t>();
  p.k_quads = k_quads;
  p.m = m;
  p.n = n;
  p.c_out = out.mutable_data_ptr();
  p.out_type = out_type_of(x);
  p.ldc = n;
  p.a_offset = offset_form ? qmax + 1 : 0;
  p.w_rowsum = w_rowsum.const_data_ptr<int32_t>();
  p.x_scale = scale_ptr;
  p.w_scale = w_scale.const_data_ptr<float>();
  p.bias = float_ptr_or_null(bias_f32);
  p.gelu = gelu;
  p.check_w_min = !offset_form;
  if (!run_gemm(p, kernel)) {
    // A weight of -128 (PackedInt8Weight never makes one) breaks the sign trick; redo exactly.
    TORCH_WARN_ONCE("sparseq: int8_linear weight holds -128; using the slow exact path (pack weights with "
                    "sparseq.PackedInt8Weight, which keeps them in [-127, 127])");
    run_gemm(p, GemmKernel::kPortable);
  }
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                           const at::Tensor& w_rowsum, const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                           c10::string_view activation) {
  return int8_linear_impl(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation, nullptr);
}

at::Tensor int8_linear_static_cpu(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w_packed,
                                  const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                  const c10::optional<at::Tensor>& bias, int64_t act_qmax,
                                  c10::string_view activation) {
  check_static_act_scale(x, x_scale);
  return int8_linear_impl(x, w_packed, w_scale, w_rowsum, bias, act_qmax, activation,
                          x_scale.const_data_ptr<float>());
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("int8_linear", &sparseq::cpu::int8_linear_cpu);
  m.impl("int8_linear_static", &sparseq::cpu::int8_linear_static_cpu);
}
