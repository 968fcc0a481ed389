#pragma once
// 2:4 sparse tensor-core GEMM shared by sparse24_linear.cu (bf16/fp16) and
// sparse24_int8_linear.cu (s8): out[m, n] = epilogue(sum_k W[n, k] x[m, k]) with W the 2:4
// weight as mma.sp's sparse operand A and x the dense operand B. Index math and the fragment /
// metadata definitions: sparse24_mma_layout.h (replayed on the CPU by sparse24_layout_selftest.cpp).
//
// Pipeline as in int8_mma.cuh: a CTA tile of BA channels x BB tokens walks K one stage (two
// k-steps) at a time; cp.async keeps kStages - 1 stages of values, x and meta in flight.
// Requirements the host guarantees (prepare_sparse24_operands in sparse24_linear.cu):
//   * K is padded to whole stages: values rows hold k_stages * 64 bytes, x rows k_stages * 128
//     bytes, meta rows k_stages * (8 or 16) bytes, padding = zero values / zero x / meta 0x44;
//   * every row stride and base pointer is 16-byte aligned (meta: 8-byte for 16-bit elements).
// Rows past N or M are zero-filled by cp.async, so tails need masks only in the epilogue.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int8_mma.cuh"  // cp.async / ldmatrix wrappers, require_int8_tensor_cores, kMaxKernelDim
#include "sparse24_mma_layout.h"

namespace sparseq {
namespace cuda {
namespace sp24 {

struct Operands {
  const uint8_t* values;  // [n, ld_values bytes]
  const uint8_t* x;       // [m, ld_x bytes]
  const uint8_t* meta;    // [n, ld_meta bytes]
  int64_t ld_values, ld_x, ld_meta;
  int n, m;
  int k_stages;
  int* error_flag;        // set to 1 when a channel < n has a metadata nibble idx_0 >= idx_1
};

// ::ordered_metadata (PTX 8.5, CUDA 12.5) is the form sm_90 runs at full rate; older toolkits
// only know plain mma.sp, which takes the same (sorted) metadata.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define SPARSEQ_MMA_SP "mma.sp::ordered_metadata.sync.aligned."
#else
#define SPARSEQ_MMA_SP "mma.sp.sync.aligned."
#endif

template <bool kBF16>
struct MmaSp16 {
  using Acc = float;
  static constexpr int kElemBytes = 2;
  // Two int8 codes as a pair of 16-bit elements (low = first), exactly: |code| <= 128 needs 8
  // significand bits, so the bf16 is the top half of the fp32 bits and the fp16 conversion is exact.
  __device__ __forceinline__ static uint32_t widen_pair(int lo, int hi) {
    if constexpr (kBF16) {
      return (__float_as_uint(static_cast<float>(lo)) >> 16) | (__float_as_uint(static_cast<float>(hi)) & 0xffff0000u);
    } else {
      return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(static_cast<float>(lo)))) |
             (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(static_cast<float>(hi)))) << 16);
    }
  }
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#ifdef SPARSEQ_MMA_ENABLED
#define SPARSEQ_MMA_SP_16BIT(TYPE)                                                                          \
  asm volatile(SPARSEQ_MMA_SP "m16n8k32.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
               "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"                                           \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e))
    if constexpr (kBF16) {
      SPARSEQ_MMA_SP_16BIT("bf16");
    } else {
      SPARSEQ_MMA_SP_16BIT("f16");
    }
#undef SPARSEQ_MMA_SP_16BIT
#endif
  }
};
using MmaSpBF16 = MmaSp16<true>;
using MmaSpHalf = MmaSp16<false>;

// Wrapping int32 accumulation (no .satfinite), like the reference's integer dot.
struct MmaSpS8 {
  using Acc = int;
  static constexpr int kElemBytes = 1;
  __device__ __forceinline__ static void run(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#ifdef SPARSEQ_MMA_ENABLED
    asm volatile(SPARSEQ_MMA_SP "m16n8k64.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
#endif
  }
};

#ifdef SPARSEQ_MMA_ENABLED
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, bool valid) {
  const uint32_t src_bytes = valid ? 8u : 0u;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
#endif

// Epilogue functors are called once per output element with (token, channel, acc, poisoned);
// the kernel guarantees token < m and channel < n. kCodes: the values are int8 codes (ld_values
// = K/2 bytes) widened in shared memory for a 16-bit Mma.
template <class Cfg, class Mma, bool kCodes, class Epilogue>
__global__ void __launch_bounds__(Cfg::kThreads, 1) sparse24_mma_kernel(const Operands ops, const Epilogue epi) {
#ifdef SPARSEQ_MMA_ENABLED
  static_assert(Cfg::kElemBytes == Mma::kElemBytes, "tile and instruction element widths differ");
  static_assert(!kCodes || Mma::kElemBytes == 2, "int8 codes are widened for 16-bit instructions only");
  using Acc = typename Mma::Acc;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_a = warp / Cfg::kWarpsB, warp_b = warp % Cfg::kWarpsB;
  const int n0 = blockIdx.x * Cfg::kBA, m0 = blockIdx.y * Cfg::kBB;

  auto load_stage = [&](int stage, int kt) {
    const uint32_t v_tile = smem_base + stage * Cfg::kStageBytes;
    const uint32_t x_tile = v_tile + Cfg::kValueTileBytes;
    const uint32_t m_tile = x_tile + Cfg::kXTileBytes;
    if constexpr (kCodes) {
#pragma unroll
      for (int i = 0; i < Cfg::kCodeCopies / Cfg::kThreads; ++i) {
        const int c = tid + i * Cfg::kThreads;
        const int r = code_copy_row(c), ch = code_copy_chunk(c);
        const bool valid = n0 + r < ops.n;
        const uint8_t* src =
            valid ? ops.values + (n0 + r) * ops.ld_values + kt * (kValueBytesPerStage / 2) + ch * 16 : ops.values;
        cp_async_16(v_tile + value_offset(r, ch), src, valid);
      }
    } else {
#pragma unroll
      for (int i = 0; i < Cfg::kValueCopies / Cfg::kThreads; ++i) {
        const int c = tid + i * Cfg::kThreads;
        const int r = value_copy_row(c), ch = value_copy_chunk(c);
        const bool valid = n0 + r < ops.n;
        const uint8_t* src = valid ? ops.values + (n0 + r) * ops.ld_values + kt * kValueBytesPerStage + ch * 16
                                   : ops.values;
        cp_async_16(v_tile + value_offset(r, ch), src, valid);
      }
    }
#pragma unroll
    for (int i = 0; i < Cfg::kXCopies / Cfg::kThreads; ++i) {
      const int c = tid + i * Cfg::kThreads;
      const int r = x_copy_row(c), ch = x_copy_chunk(c);
      const bool valid = m0 + r < ops.m;
      const uint8_t* src = valid ? ops.x + (m0 + r) * ops.ld_x + kt * kXBytesPerStage + ch * 16 : ops.x;
      cp_async_16(x_tile + x_offset(r, ch), src, valid);
    }
    for (int r = tid; r < Cfg::kBA; r += Cfg::kThreads) {
      const bool valid = n0 + r < ops.n;
      const uint8_t* src = valid ? ops.meta + (n0 + r) * ops.ld_meta + kt * Cfg::kMetaBytes : ops.meta;
      const uint32_t dst = m_tile + meta_offset(r, 0, Cfg::kMetaBytes);
      if constexpr (Cfg::kMetaBytes == 16) {
        cp_async_16(dst, src, valid);
      } else {
        cp_async_8(dst, src, valid);
      }
    }
  };

  Acc acc[Cfg::kAT][Cfg::kBT][4];
#pragma unroll
  for (int i = 0; i < Cfg::kAT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kBT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = Acc(0);
  bool bad_meta = false;

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ops.k_stages) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ops.k_stages; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < ops.k_stages) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const uint32_t stage_tile = smem_base + (kt % Cfg::kStages) * Cfg::kStageBytes;
    const uint32_t x_tile = stage_tile + Cfg::kValueTileBytes;
    const uint32_t m_tile = x_tile + Cfg::kXTileBytes;
    uint32_t v_tile = stage_tile;
    if constexpr (kCodes) {
      // Widen this stage's codes into the conversion tile (after the barrier above, no warp still
      // reads the previous stage's), then make them visible before the fragment loads.
      v_tile = smem_base + Cfg::kSmemBytes;
#pragma unroll
      for (int i = 0; i < Cfg::kCodeCopies / Cfg::kThreads; ++i) {
        const int c = tid + i * Cfg::kThreads;
        const int r = code_copy_row(c), ch = code_copy_chunk(c);
        const uint4 codes = lds_v4(stage_tile + value_offset(r, ch));
        const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
        uint32_t wide[8];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          auto code = [&](int j) { return static_cast<int>(static_cast<int8_t>(words[w] >> (8 * j))); };
          wide[2 * w] = Mma::widen_pair(code(0), code(1));
          wide[2 * w + 1] = Mma::widen_pair(code(2), code(3));
        }
        sts_v4(v_tile + widened_offset(r, ch, 0), wide[0], wide[1], wide[2], wide[3]);
        sts_v4(v_tile + widened_offset(r, ch, 1), wide[4], wide[5], wide[6], wide[7]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int kstep = 0; kstep < kKSteps; ++kstep) {
      uint32_t af[Cfg::kAT][4], bf[Cfg::kBT][4], e[Cfg::kAT];
#pragma unroll
      for (int i = 0; i < Cfg::kAT; ++i) {
        ldmatrix_x4(af[i], v_tile + a_fragment_offset<Cfg>(warp_a, i, lane, kstep));
        uint32_t word;
        if constexpr (Cfg::kElemBytes == 1) {
          word = lds_u32(m_tile + meta_half_offset<Cfg>(warp_a, i, lane, kstep, 0));
        } else {
          word = lds_u16(m_tile + meta_half_offset<Cfg>(warp_a, i, lane, kstep, 0)) |
                 (lds_u16(m_tile + meta_half_offset<Cfg>(warp_a, i, lane, kstep, 1)) << 16);
        }
        const uint32_t bad = sanitize_meta_word(word);
        if (bad != 0u) {
          bad_meta |= ((bad & 0x4444u) && n0 + meta_half_row<Cfg>(warp_a, i, lane, 0) < ops.n) ||
                      ((bad >> 16) && n0 + meta_half_row<Cfg>(warp_a, i, lane, 1) < ops.n);
        }
        e[i] = word;
      }
#pragma unroll
      for (int j = 0; j < Cfg::kBT; ++j) ldmatrix_x4(bf[j], x_tile + b_fragment_offset<Cfg>(warp_b, j, lane, kstep));
#pragma unroll
      for (int i = 0; i < Cfg::kAT; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kBT; ++j) Mma::run(acc[i][j], af[i], bf[j], e[i]);
    }
  }
  cp_async_wait<0>();
  // A metadata nibble the instruction leaves undefined was replaced; the whole CTA tile is
  // poisoned with NaN and the host raises (see device_error_flag.h).
  const bool poisoned = __syncthreads_or(bad_meta) != 0;
  if (poisoned && tid == 0) atomicOr(ops.error_flag, 1);

#pragma unroll
  for (int i = 0; i < Cfg::kAT; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kBT; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int channel = n0 + acc_channel<Cfg>(warp_a, i, lane, r);
        const int token = m0 + acc_token<Cfg>(warp_b, j, lane, r);
        if (channel < ops.n && token < ops.m) epi(token, channel, acc[i][j][r], poisoned);
      }
    }
  }
#else
  __trap();  // the host sends devices below sm_80 to the SIMT path before launching
#endif
}

// Tiles: 128 x 128 for compute-bound shapes; 64 x 64 when that leaves SMs idle; 32 channels x
// 16 tokens for decoding (M <= 16), where streaming the weight is the whole cost.
template <int E>
using LargeTile = Tile<128, 128, 2, 4, 4, E>;
template <int E>
using MediumTile = Tile<64, 64, 2, 2, 4, E>;
template <int E>
using SmallTile = Tile<32, 16, 2, 1, 8, E>;

template <class Cfg, class Mma, bool kCodes, class Epilogue>
void launch_with(const Operands& ops, const Epilogue& epi, cudaStream_t stream) {
  auto kernel = sparse24_mma_kernel<Cfg, Mma, kCodes, Epilogue>;
  constexpr int smem_bytes = Cfg::kSmemBytes + (kCodes ? Cfg::kConvTileBytes : 0);
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  const int64_t tiles_n = (ops.n + Cfg::kBA - 1) / Cfg::kBA;
  const int64_t tiles_m = (ops.m + Cfg::kBB - 1) / Cfg::kBB;
  TORCH_CHECK(tiles_m <= 65535, "sparseq: M=", ops.m, " is too large for the CUDA 2:4 GEMM grid");
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m));
  kernel<<<grid, Cfg::kThreads, smem_bytes, stream>>>(ops, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the largest tile that still gives every SM at least one CTA.
template <class Mma, bool kCodes = false, class Epilogue>
void launch_sparse24_mma(const Operands& ops, const Epilogue& epi, cudaStream_t stream) {
  if (ops.m == 0 || ops.n == 0) return;
  constexpr int E = Mma::kElemBytes;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto ctas = [&](int ba, int bb) {
    return ((ops.n + ba - 1) / static_cast<int64_t>(ba)) * ((ops.m + bb - 1) / static_cast<int64_t>(bb));
  };
  if (ctas(LargeTile<E>::kBA, LargeTile<E>::kBB) >= sms) {
    launch_with<LargeTile<E>, Mma, kCodes>(ops, epi, stream);
  } else if (ops.m > SmallTile<E>::kBB && ctas(MediumTile<E>::kBA, MediumTile<E>::kBB) >= sms) {
    launch_with<MediumTile<E>, Mma, kCodes>(ops, epi, stream);
  } else {
    launch_with<SmallTile<E>, Mma, kCodes>(ops, epi, stream);
  }
}

}  // namespace sp24
}  // namespace cuda
}  // namespace sparseq
