// CPU sparse24_int8_linear (W8A8 dynamic on a 2:4 int8 weight): x quantized per row by the
// int8_linear quantizer (bit-exact with _ref.quantize_per_row), exact int32 dots of the
// quantized rows with the 2:4 codes, then float(acc) * (x_scale[m] * w_scale[n]) + bias[n].
// AVX2 micro-kernel in sparse24_int8_linear_avx2.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "bsr_kernels.h"
#include "op_common.h"
#include "parallel_tiles.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

// Output columns per parallel_tiles column block.
constexpr int64_t kColumnsPerBlock = 16;

template <typename O>
void sparse24_int8_tiles_portable(const Sparse24Int8Problem& p, int64_t m_begin, int64_t m_end, int64_t n_begin,
                                  int64_t n_end) {
  O* out = static_cast<O*>(p.c_out);
  const int64_t meta_stride = (p.groups + 1) / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* v = p.values + n * 2 * p.groups;
    const uint8_t* meta = p.meta + n * meta_stride;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int8_t* q = p.q + m * p.ldq;
      int32_t acc = 0;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
        acc += static_cast<int32_t>(q[4 * g + (nibble & 3)]) * v[2 * g] +
               static_cast<int32_t>(q[4 * g + (nibble >> 2)]) * v[2 * g + 1];
      }
      // Same float steps as _ref.dequant_epilogue: one product of the scales, then the bias.
      const float scale = p.x_scale[m] * p.w_scale[n];
      float result = static_cast<float>(acc) * scale;
      if (p.bias != nullptr) result += p.bias[n];
      out[m * p.ldc + n] = static_cast<O>(result);
    }
  }
}

at::Tensor sparse24_int8_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                    const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                    int64_t act_qmax) {
  TORCH_CHECK(values.scalar_type() == at::kChar, "sparseq: sparse24_int8_linear needs int8 values, got ",
              values.scalar_type());
  const int64_t n = check_sparse24_weight(x, values, meta, w_scale, bias);
  check_act_qmax(act_qmax);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  const bool use_avx2 = cpu_has_avx2_fma();
  const int64_t groups = sparse24_groups(k);
  // Signed codes q (a_sign) padded with zeros to whole groups; a_u (|q|) is not needed here.
  const int64_t ldq = 4 * groups;
  at::Tensor q = at::empty({m, ldq}, x.options().dtype(at::kChar));
  at::Tensor q_abs = at::empty({m, ldq}, x.options().dtype(at::kByte));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  quantize_activation_rows(x, static_cast<int32_t>(act_qmax), q_abs.mutable_data_ptr<uint8_t>(),
                           q.mutable_data_ptr<int8_t>(), ldq, x_scale.mutable_data_ptr<float>(), use_avx2);

  const at::Tensor bias_f32 = bias_as_float(bias);
  Sparse24Int8Problem p;
  p.q = q.const_data_ptr<int8_t>();
  p.ldq = ldq;
  p.values = values.const_data_ptr<int8_t>();
  p.meta = meta.const_data_ptr<uint8_t>();
  p.groups = groups;
  p.m = m;
  p.n = n;
  p.x_scale = x_scale.const_data_ptr<float>();
  p.w_scale = w_scale.const_data_ptr<float>();
  p.bias = float_ptr_or_null(bias_f32);
  p.c_out = out.mutable_data_ptr();
  p.out_type = out_type_of(x);
  p.ldc = n;

  const int64_t column_blocks = (n + kColumnsPerBlock - 1) / kColumnsPerBlock;
  // Row chunks of 64 quantized rows (64 x K bytes) stay in L2 while a column chunk passes.
  parallel_tiles(m, column_blocks, groups * 2, 64, 4, [&](int64_t m0, int64_t m1, int64_t cb0, int64_t cb1) {
    const int64_t n0 = cb0 * kColumnsPerBlock, n1 = std::min(n, cb1 * kColumnsPerBlock);
    if (use_avx2) {
      sparse24_int8_tiles_avx2(p, m0, m1, n0, n1);
    } else if (p.out_type == OutType::kBFloat16) {
      sparse24_int8_tiles_portable<c10::BFloat16>(p, m0, m1, n0, n1);
    } else if (p.out_type == OutType::kFloat16) {
      sparse24_int8_tiles_portable<c10::Half>(p, m0, m1, n0, n1);
    } else {
      sparse24_int8_tiles_portable<float>(p, m0, m1, n0, n1);
    }
  });
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) { m.impl("sparse24_int8_linear", &sparseq::cpu::sparse24_int8_linear_cpu); }
