// CPU sparse_sell_int8_linear (W8A8 dynamic on a sliced-ELL int8 weight): x quantized per row
// by the int8_linear quantizer (offset form, bit-exact with _ref.quantize_per_row), exact int32
// dots of each row's entries, then float(acc) * (x_scale[m] * w_scale[n]) + bias[n]. The
// AVX-512 VBMI2 + VNNI kernel is in sparse_sell_int8_linear_avx512.cpp, the AVX2 one in
// sparse_sell_int8_linear_avx2.cpp; the portable loop below runs on other CPUs (correct, not
// fast).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>

#include "op_common.h"
#include "parallel_tiles.h"
#include "sell_kernels.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {
namespace {

template <typename O>
bool sell_slices_portable(const SellInt8Problem& p, int64_t m_begin, int64_t m_end, int64_t s_begin, int64_t s_end) {
  O* out = static_cast<O*>(p.c_out);
  for (int64_t s = s_begin; s < s_end; ++s) {
    int64_t e_begin, e_end;
    if (!sell_slice_ranges(p, s, &e_begin, &e_end)) return false;
    const uint64_t foreign_lanes = sell_foreign_lanes(p, s);
    const int32_t* block_ptr = p.block_step_ptr + s * p.blocks;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const uint8_t* x = p.xu + m * p.ldx;
      int32_t acc[kSellSlice] = {};
      int64_t e = e_begin;
      for (int64_t b = 0; b < p.blocks; ++b) {
        const int64_t width = sell_block_width(p, b);
        for (int64_t t = block_ptr[b]; t < block_ptr[b + 1]; ++t) {
          const uint64_t mask = p.step_masks[t];
          if ((mask & foreign_lanes) != 0 || e + __builtin_popcountll(mask) > e_end) return false;
          for (int lane = 0; lane < 64; ++lane) {
            if (((mask >> lane) & 1) == 0) continue;
            if (p.col_offsets[e] >= width) return false;
            const int32_t q = static_cast<int32_t>(x[b * kSellBlock + p.col_offsets[e]]) - p.act_offset;
            acc[lane / 4] += q * p.values[e];
            ++e;
          }
        }
      }
      if (e != e_end) return false;
      for (int64_t r = 0; r < kSellSlice && s * kSellSlice + r < p.n; ++r) {
        const int64_t n = s * kSellSlice + r;
        // Same float steps as _ref.dequant_epilogue: one product of the scales, then the bias.
        float result = static_cast<float>(acc[r]) * (p.x_scale[m] * p.w_scale[n]);
        if (p.bias != nullptr) result += p.bias[n];
        out[m * p.ldc + n] = static_cast<O>(result);
      }
    }
  }
  return true;
}

bool run_sell_slices(const SellInt8Problem& p, bool use_avx512, int64_t m0, int64_t m1, int64_t s0, int64_t s1) {
  if (use_avx512) return sell_int8_slices_avx512(p, m0, m1, s0, s1);
  if (p.xd != nullptr) return sell_int8_slices_avx2(p, m0, m1, s0, s1);
  switch (p.out_type) {
    case OutType::kBFloat16: return sell_slices_portable<c10::BFloat16>(p, m0, m1, s0, s1);
    case OutType::kFloat16: return sell_slices_portable<c10::Half>(p, m0, m1, s0, s1);
    default: return sell_slices_portable<float>(p, m0, m1, s0, s1);
  }
}

at::Tensor sparse_sell_int8_linear_cpu(const at::Tensor& x, const at::Tensor& block_step_ptr,
                                       const at::Tensor& step_masks, const at::Tensor& slice_ptr,
                                       const at::Tensor& col_offsets, const at::Tensor& values,
                                       const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                                       int64_t act_qmax) {
  const int64_t n = check_sell_weight(x, block_step_ptr, step_masks, slice_ptr, col_offsets, values, w_scale, bias);
  check_act_qmax(act_qmax);
  const int64_t m = x.size(0), k = x.size(1), nnz = values.numel(), steps = step_masks.numel();
  const int64_t slices = sell_slices(n), blocks = sell_blocks(k);
  const int32_t* step_ptr = block_step_ptr.const_data_ptr<int32_t>();
  const int32_t* entry_ptr = slice_ptr.const_data_ptr<int32_t>();
  TORCH_CHECK(step_ptr[0] == 0 && step_ptr[slices * blocks] == steps && entry_ptr[0] == 0 &&
                  entry_ptr[slices] == nnz,
              "sparseq: sliced-ELL pointers must run from 0 to the number of steps (", steps,
              ", block_step_ptr) and of entries (", nnz, ", slice_ptr), got ", step_ptr[0], "..",
              step_ptr[slices * blocks], " and ", entry_ptr[0], "..", entry_ptr[slices]);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;

  const bool use_avx512 = cpu_has_avx512_vbmi2_vnni(), use_avx2 = !use_avx512 && cpu_has_avx2_fma();
  const int32_t qmax = static_cast<int32_t>(act_qmax);
  // Whole 64-column blocks: the AVX-512 and AVX2 kernels read a block's full 64 bytes (offsets
  // past K are refused, so the padding is never used).
  const int64_t ldx = blocks * kSellBlock;
  at::Tensor xu = at::empty({m, ldx}, x.options().dtype(at::kByte));
  at::Tensor x_scale = at::empty({m}, x.options().dtype(at::kFloat));
  quantize_activation_rows(x, qmax, xu.mutable_data_ptr<uint8_t>(), nullptr, ldx, x_scale.mutable_data_ptr<float>(),
                           cpu_has_avx2_fma());

  at::Tensor xd;
  if (use_avx2) {
    xd = at::empty({m, ldx}, xu.options());
    sell_xor_quarters_avx2(xu.const_data_ptr<uint8_t>(), m, ldx, xd.mutable_data_ptr<uint8_t>());
  }

  const at::Tensor bias_f32 = bias_as_float(bias);
  SellInt8Problem p;
  p.xu = xu.const_data_ptr<uint8_t>();
  p.xd = use_avx2 ? xd.const_data_ptr<uint8_t>() : nullptr;
  p.ldx = ldx;
  p.act_offset = qmax + 1;
  p.block_step_ptr = step_ptr;
  p.step_masks = reinterpret_cast<const uint64_t*>(step_masks.const_data_ptr<int64_t>());
  p.steps = steps;
  p.slice_ptr = entry_ptr;
  p.col_offsets = col_offsets.const_data_ptr<uint8_t>();
  p.values = values.const_data_ptr<int8_t>();
  p.nnz = nnz;
  p.blocks = blocks;
  p.k = k;
  p.m = m;
  p.n = n;
  p.x_scale = x_scale.const_data_ptr<float>();
  p.w_scale = w_scale.const_data_ptr<float>();
  p.bias = float_ptr_or_null(bias_f32);
  p.c_out = out.mutable_data_ptr();
  p.out_type = out_type_of(x);
  p.ldc = n;

  std::atomic<bool> valid{true};
  // Row chunks of up to 256 quantized rows (256 x K bytes) stay in L2 while a slice passes.
  const int64_t entries_per_row = std::max<int64_t>(1, nnz / n);
  parallel_tiles(m, slices, entries_per_row, 256, kSellSlice, [&](int64_t m0, int64_t m1, int64_t s0, int64_t s1) {
    if (!run_sell_slices(p, use_avx512, m0, m1, s0, s1)) valid.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(valid.load(), "sparseq: sparse_sell_int8_linear: the sliced-ELL weight is inconsistent (a step "
              "pointer that decreases or passes the steps, masks that mark more or fewer entries than slice_ptr "
              "gives a slice or that use the lanes of rows past N, or a column offset past its block or K); build "
              "it with sparseq.formats.SlicedEllInt8Weight.pack");
  return out;
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) { m.impl("sparse_sell_int8_linear", &sparseq::cpu::sparse_sell_int8_linear_cpu); }
