// CPU int8_weight_only_linear: float activations times the int8 n16k4 weight dequantized on the
// fly (w[n,k] * w_scale[n]), fp32 accumulation, bias, output in x's dtype. AVX2 micro-kernels
// in int8_weight_only_linear_avx2.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "int8_kernels.h"
#include "op_common.h"
#include "parallel_tiles.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

template <typename T>
void weight_only_tiles_portable(const WeightOnlyProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                                int64_t nb_end) {
  T* out = static_cast<T*>(p.c_out);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int8_t* w_block = p.w_packed + nb * p.k_quads * 64;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const float* x = p.x + m * p.ldx;
      for (int i = 0; i < 16 && nb * 16 + i < p.n; ++i) {
        const int64_t n = nb * 16 + i;
        const float scale = p.w_scale[n];
        float acc = 0.0f;
        for (int64_t q = 0; q < p.k_quads; ++q)
          for (int j = 0; j < 4; ++j) acc += x[4 * q + j] * (static_cast<float>(w_block[q * 64 + 4 * i + j]) * scale);
        if (p.bias != nullptr) acc += p.bias[n];
        out[m * p.ldc + n] = static_cast<T>(acc);
      }
    }
  }
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                       const c10::optional<at::Tensor>& bias) {
  check_float_activation(x);
  const int64_t n = check_packed_weight(x, w_packed, w_scale, bias);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  // The kernels read x as fp32 rows padded with zeros to whole K-quads.
  const int64_t k_quads = packed_quads_k(k), ldx = 4 * k_quads;
  at::Tensor x_f32 = x;
  if (x.scalar_type() != at::kFloat || ldx != k) {
    x_f32 = at::zeros({m, ldx}, x.options().dtype(at::kFloat));
    x_f32.narrow(1, 0, k).copy_(x);
  }
  const at::Tensor bias_f32 = bias_as_float(bias);

  WeightOnlyProblem p;
  p.x = x_f32.const_data_ptr<float>();
  p.ldx = ldx;
  p.w_packed = w_packed.const_data_ptr<int8_t>();
  p.k_quads = k_quads;
  p.m = m;
  p.n = n;
  p.w_scale = w_scale.const_data_ptr<float>();
  p.bias = float_ptr_or_null(bias_f32);
  p.c_out = out.mutable_data_ptr();
  p.out_type = out_type_of(x);
  p.ldc = n;
  p.avx512 = cpu_has_avx512();

  const bool use_avx2 = cpu_has_avx2_fma();
  // Row chunks of up to 192 rows reuse each dequantized panel slice; their x slices stay in L2.
  parallel_tiles(m, packed_blocks_n(n), ldx, 192, kWeightOnlyPanelMinRows,
                 [&](int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
                   if (use_avx2) {
                     std::vector<float> scratch(weight_only_scratch_floats(m1 - m0));
                     weight_only_tiles_avx2(p, m0, m1, nb0, nb1, scratch.data());
                   } else if (p.out_type == OutType::kBFloat16) {
                     weight_only_tiles_portable<c10::BFloat16>(p, m0, m1, nb0, nb1);
                   } else if (p.out_type == OutType::kFloat16) {
                     weight_only_tiles_portable<c10::Half>(p, m0, m1, nb0, nb1);
                   } else {
                     weight_only_tiles_portable<float>(p, m0, m1, nb0, nb1);
                   }
                 });
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("int8_weight_only_linear", &sparseq::cpu::int8_weight_only_linear_cpu);
}
