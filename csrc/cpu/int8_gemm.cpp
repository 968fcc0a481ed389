// CPU int8_gemm, plus the shared int8 GEMM core (portable kernel and the threaded driver) that
// int8_linear runs too. The AVX2 micro-kernels live in int8_gemm_avx2.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "int8_kernels.h"
#include "op_common.h"
#include "parallel_tiles.h"
#include "sparseq/checks.h"
#include "sparseq/cpu_features.h"

namespace sparseq::cpu {

namespace {

inline void store_float_as(void* dst, OutType t, int64_t i, float v) {
  switch (t) {
    case OutType::kBFloat16: static_cast<c10::BFloat16*>(dst)[i] = c10::BFloat16(v); break;
    case OutType::kFloat16: static_cast<c10::Half*>(dst)[i] = c10::Half(v); break;
    default: static_cast<float*>(dst)[i] = v;
  }
}

// Rows of the activation chunk stay in L2 while a weight panel is reused over them.
constexpr int64_t kActivationChunkBytes = 256 * 1024;

}  // namespace

// Plain C++ model of the AVX2 core: same operands and epilogue, exact int32 arithmetic.
bool gemm_tiles_portable(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                         int64_t nb_end) {
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int8_t* w_block = p.w_packed + nb * p.k_quads * 64;
    for (int64_t m = m_begin; m < m_end; ++m) {
      int32_t acc[16] = {};
      const uint8_t* au = p.a_u + m * p.lda;
      const int8_t* as = p.a_sign != nullptr ? p.a_sign + m * p.lda : nullptr;
      for (int64_t q = 0; q < p.k_quads; ++q) {
        int32_t a[4];
        for (int j = 0; j < 4; ++j) {
          const int32_t u = au[4 * q + j];
          a[j] = as == nullptr ? u : (as[4 * q + j] < 0 ? -u : (as[4 * q + j] == 0 ? 0 : u));
        }
        const int8_t* w = w_block + q * 64;
        for (int i = 0; i < 16; ++i)
          acc[i] += a[0] * w[4 * i] + a[1] * w[4 * i + 1] + a[2] * w[4 * i + 2] + a[3] * w[4 * i + 3];
      }
      for (int i = 0; i < 16; ++i) {
        const int64_t n = nb * 16 + i;
        if (n >= p.n) break;
        // Wrapping int32 arithmetic, like the vector kernels; the true result fits in int32.
        const uint32_t corrected = static_cast<uint32_t>(acc[i]) -
                                   static_cast<uint32_t>(p.a_offset) * static_cast<uint32_t>(p.a_offset ? p.w_rowsum[n] : 0);
        if (p.c_int32 != nullptr) {
          p.c_int32[m * p.ldc + n] = static_cast<int32_t>(corrected);
          continue;
        }
        float out = static_cast<float>(static_cast<int32_t>(corrected)) * (p.x_scale[m] * p.w_scale[n]);
        if (p.bias != nullptr) out += p.bias[n];
        if (p.gelu) out = gelu_erf(out);
        store_float_as(p.c_out, p.out_type, m * p.ldc + n, out);
      }
    }
  }
  return true;
}

GemmKernel best_gemm_kernel(int64_t m) {
  if (m >= kAmxMinRows && cpu_has_amx_int8()) return GemmKernel::kAmx;
  if (cpu_has_avx512_vnni()) return GemmKernel::kAvx512Vnni;
  return cpu_has_avx2_fma() ? GemmKernel::kAvx2 : GemmKernel::kPortable;
}

bool run_gemm(const GemmProblem& p, GemmKernel kernel) {
  TORCH_CHECK(!takes_offset_form(kernel) || p.a_sign == nullptr,
              "sparseq: internal error: the VNNI and AMX int8 cores take the offset form only");
  const int64_t n_blocks = packed_blocks_n(p.n);
  const int64_t bytes_per_row = std::max<int64_t>(1, p.lda) * (p.a_sign != nullptr ? 2 : 1);
  // Row tiles are 16 high in the AMX core, 6 in the VNNI core, 4 in the AVX2 core.
  const int64_t row_multiple = kernel == GemmKernel::kAmx ? 16 : kernel == GemmKernel::kAvx512Vnni ? 6 : 4;
  const int64_t chunk_rows = std::max<int64_t>(row_multiple, kActivationChunkBytes / bytes_per_row / row_multiple * row_multiple);
  std::atomic<bool> exact{true};
  parallel_tiles(p.m, n_blocks, p.k_quads * 4, chunk_rows, row_multiple,
                 [&](int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
                   bool ok = true;
                   switch (kernel) {
                     case GemmKernel::kAmx: ok = gemm_tiles_amx(p, m0, m1, nb0, nb1); break;
                     case GemmKernel::kAvx512Vnni: ok = gemm_tiles_avx512_vnni(p, m0, m1, nb0, nb1); break;
                     case GemmKernel::kAvx2: ok = gemm_tiles_avx2(p, m0, m1, nb0, nb1); break;
                     default: ok = gemm_tiles_portable(p, m0, m1, nb0, nb1);
                   }
                   if (!ok) exact.store(false);
                 },
                 // column panels: the VNNI core's 4 blocks, the AMX core's 2
                 kernel == GemmKernel::kAvx512Vnni ? 4 : kernel == GemmKernel::kAmx ? 2 : 1);
  return exact.load();
}

namespace {

bool contains_int8_min(const int8_t* data, int64_t count) {
  return count > 0 && std::memchr(data, 0x80, static_cast<size_t>(count)) != nullptr;
}

// a [m, k] -> (|a| as u8, a) zero padded to lda columns: the sign-trick operand pair.
void split_magnitude_sign(const int8_t* a, int64_t m, int64_t k, int64_t lda, uint8_t* a_u, int8_t* a_sign) {
  at::parallel_for(0, m, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int8_t* src = a + r * k;
      uint8_t* u = a_u + r * lda;
      int8_t* s = a_sign + r * lda;
      for (int64_t i = 0; i < k; ++i) {
        const int32_t v = src[i];
        u[i] = static_cast<uint8_t>(v < 0 ? -v : v);
        s[i] = static_cast<int8_t>(v);
      }
      for (int64_t i = k; i < lda; ++i) u[i] = 0, s[i] = 0;
    }
  });
}

// b [n, k] -> n16k4 (see sparseq/packed_int8.h).
void pack_n16k4(const int8_t* b, int64_t n, int64_t k, int8_t* packed) {
  const int64_t n_blocks = packed_blocks_n(n), k_quads = packed_quads_k(k);
  const int64_t full_quads = k / 4;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      int8_t* dst = packed + nb * k_quads * 64;
      for (int i = 0; i < 16; ++i) {
        const int64_t row = nb * 16 + i;
        for (int64_t q = 0; q < k_quads; ++q) {
          int8_t* d = dst + q * 64 + 4 * i;
          if (row < n && q < full_quads) {
            std::memcpy(d, b + row * k + 4 * q, 4);
            continue;
          }
          for (int j = 0; j < 4; ++j) d[j] = (row < n && 4 * q + j < k) ? b[row * k + 4 * q + j] : 0;
        }
      }
    }
  });
}

// The AVX2 sign trick multiplies |a| by vpsignb(b, a), which is -b where a < 0 and wraps for
// b = -128 (-(-128) -> -128). Every int16 pair sum still fits (|a| <= 128, so they lie in
// [-32768, 32512]), so c is exact for the wrapped operand, and the true product adds
// 256 * |a[m, k]| for each k with b[n, k] = -128 and a[m, k] < 0. Cost: M adds per -128 in b.
// Runs only after the AVX2 kernel (the portable one multiplies in int32 and never wraps).
void add_wrapped_int8_min_correction(const int8_t* a, const int8_t* b, int64_t m, int64_t k, int64_t n,
                                     int32_t* c) {
  // neg_t [k, m] = max(-a, 0): the magnitudes each correction adds, one contiguous row per k.
  // Transposed through a small block buffer, so both sides are read and written a line at a time
  // (a column walk of `a` would hit one L1 set per 4 KiB of row stride).
  std::vector<uint8_t> neg_t(static_cast<size_t>(k * m));
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (k + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    uint8_t block[kBlock][kBlock];
    for (int64_t kb = begin; kb < end; ++kb) {
      const int64_t k0 = kb * kBlock, kw = std::min(kBlock, k - k0);
      for (int64_t r0 = 0; r0 < m; r0 += kBlock) {
        const int64_t rw = std::min(kBlock, m - r0);
        for (int64_t r = 0; r < rw; ++r)
          for (int64_t i = 0; i < kw; ++i) {
            const int32_t v = a[(r0 + r) * k + k0 + i];
            block[i][r] = static_cast<uint8_t>(v < 0 ? -v : 0);
          }
        for (int64_t i = 0; i < kw; ++i) std::memcpy(neg_t.data() + (k0 + i) * m + r0, block[i], static_cast<size_t>(rw));
      }
    }
  });
  // Columns in groups of 16: their sums are gathered in corr [16, m] and then added to c row by
  // row, one 64-byte line of c per row (c's rows are often 4 KiB-aliased: touch each line once).
  constexpr int64_t kGroup = 16;
  at::parallel_for(0, (n + kGroup - 1) / kGroup, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> corr(static_cast<size_t>(kGroup * m));
    std::vector<const uint8_t*> hit_rows;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kGroup, cols = std::min(kGroup, n - n0);
      bool any = false;
      std::fill(corr.begin(), corr.end(), 0);
      for (int64_t j = 0; j < cols; ++j) {
        const int8_t* b_row = b + (n0 + j) * k;
        const int8_t* b_end = b_row + k;
        hit_rows.clear();
        for (const int8_t* hit = b_row;
             (hit = static_cast<const int8_t*>(std::memchr(hit, 0x80, static_cast<size_t>(b_end - hit)))) != nullptr; ++hit)
          hit_rows.push_back(neg_t.data() + (hit - b_row) * m);
        if (hit_rows.empty()) continue;
        add_u8_rows_avx2(hit_rows.data(), static_cast<int64_t>(hit_rows.size()), m, corr.data() + j * m);
        any = true;
      }
      if (!any) continue;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < cols; ++j)
          c[r * n + n0 + j] = static_cast<int32_t>(static_cast<uint32_t>(c[r * n + n0 + j]) +
                                                   (static_cast<uint32_t>(corr[j * m + r]) << 8));
    }
  });
}

// a [m, k] -> a + 128 as u8, zero padded to lda columns: the offset form of the VNNI core.
void offset_by_128(const int8_t* a, int64_t m, int64_t k, int64_t lda, uint8_t* a_u) {
  at::parallel_for(0, m, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int8_t* src = a + r * k;
      uint8_t* u = a_u + r * lda;
      for (int64_t i = 0; i < k; ++i) u[i] = static_cast<uint8_t>(src[i]) ^ 0x80;
      for (int64_t i = k; i < lda; ++i) u[i] = 0;
    }
  });
}

// rowsum[n] = sum_k b[n, k]: the offset form's correction.
void row_sums(const int8_t* b, int64_t n, int64_t k, int32_t* rowsum) {
  at::parallel_for(0, n, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int32_t sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += b[r * k + i];
      rowsum[r] = sum;
    }
  });
}

at::Tensor int8_gemm_impl(const at::Tensor& a, const at::Tensor& b, GemmKernel kernel) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  const int8_t* a_data = a.const_data_ptr<int8_t>();
  const int8_t* b_data = b.const_data_ptr<int8_t>();

  const int64_t k_quads = packed_quads_k(k);
  const ActivationLayout layout = gemm_activation_layout(kernel, m, k_quads);
  const int64_t lda = layout.lda;
  at::Tensor b_packed = at::empty({packed_blocks_n(n), k_quads, kPackN, kPackK}, b.options());
  pack_n16k4(b_data, n, k, b_packed.mutable_data_ptr<int8_t>());
  at::Tensor a_u = at::empty({layout.rows, lda}, a.options().dtype(at::kByte));
  zero_padding_rows(a_u, m);
  GemmProblem p;
  at::Tensor a_sign, b_rowsum;
  if (takes_offset_form(kernel)) {
    // vpdpbusd / tdpbusd are exact for every u8 x s8: a + 128, corrected by 128 * rowsum (no
    // -128 issue).
    offset_by_128(a_data, m, k, lda, a_u.mutable_data_ptr<uint8_t>());
    b_rowsum = at::empty({n}, a.options().dtype(at::kInt));
    row_sums(b_data, n, k, b_rowsum.mutable_data_ptr<int32_t>());
    p.a_offset = 128;
    p.w_rowsum = b_rowsum.const_data_ptr<int32_t>();
  } else {
    a_sign = at::empty({m, lda}, a.options());
    split_magnitude_sign(a_data, m, k, lda, a_u.mutable_data_ptr<uint8_t>(), a_sign.mutable_data_ptr<int8_t>());
    p.a_sign = a_sign.const_data_ptr<int8_t>();
  }
  p.a_u = a_u.const_data_ptr<uint8_t>();
  p.lda = lda;
  p.w_packed = b_packed.const_data_ptr<int8_t>();
  p.k_quads = k_quads;
  p.m = m;
  p.n = n;
  p.c_int32 = out.mutable_data_ptr<int32_t>();
  p.ldc = n;
  run_gemm(p, kernel);
  // The portable kernel multiplies in int32 and never wraps; only the AVX2 sign trick needs this.
  if (kernel == GemmKernel::kAvx2 && contains_int8_min(b_data, n * k))
    add_wrapped_int8_min_correction(a_data, b_data, m, k, n, p.c_int32);
  return out;
}

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_int8_matrix(a, "a");
  check_int8_matrix(b, "b");
  TORCH_CHECK(a.size(1) == b.size(1), "sparseq: int8_gemm needs a [M,K] and b [N,K] with the same K, got a ",
              a.sizes(), " and b ", b.sizes());
  return int8_gemm_impl(a, b, best_gemm_kernel(a.size(0)));
}

}  // namespace
}  // namespace sparseq::cpu

TORCH_LIBRARY_IMPL(sparseq, CPU, m) { m.impl("int8_gemm", &sparseq::cpu::int8_gemm_cpu); }
