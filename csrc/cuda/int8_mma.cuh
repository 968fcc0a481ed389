#pragma once
// Tensor-core int8 GEMM tile code shared by int8_gemm.cu and int8_linear.cu.
//
// C[M,N] (int32) = A[M,K] (int8, row-major) x B[N,K]^T (int8), with mma.sync m16n8k32 s8.s8.s32:
// exact for every int8 value (-128 too) and wrapping int32 accumulation like the reference.
// B comes either row-major ([N,K], int8_gemm) or in the n16k4 packed layout (int8_linear), where
// the 32-bit word holding the k-quad kq of output i is already the per-thread B fragment word.
//
// The pipeline: a CTA tile of BM x BN outputs walks K in steps of 64; cp.async (16-byte copies,
// zero-fill out of range) keeps kStages - 1 tiles in flight in shared memory; warps read their
// fragments with ldmatrix (row-major tiles) or 32-bit shared loads (packed tiles) and issue mma.
//
// Requirements the host side guarantees (int8_gemm.cu: prepare_rowmajor_operand; int8_linear.cu:
// the padded q buffer and the aligned packed weight):
//   * A's leading dimension lda and its K extent kd are multiples of 16 and A's base is 16-byte
//     aligned, so every 16-byte chunk of a row is either fully inside or fully outside [0, kd);
//   * row-major B likewise (ldb, base); packed B's base is 16-byte aligned (its 64-byte rows
//     then are too). Out-of-range chunks are zero-filled, so M, N and K tails need no masks in
//     the main loop, only in the epilogue.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int8_mma_layout.h"

namespace sparseq {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+: cp.async, ldmatrix, int8 mma).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SPARSEQ_MMA_ENABLED 1
#endif

#ifdef SPARSEQ_MMA_ENABLED
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const uint32_t src_bytes = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void mma_s8_16832(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies rows [row0, row0 + ROWS) x bytes [k0, k0 + 64) of a row-major int8 matrix into a tile.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_rowmajor_tile(uint32_t tile, const int8_t* g, int64_t ld, int row0,
                                                   int rows, int k0, int kd, int tid) {
#pragma unroll
  for (int i = 0; i < ROWS * kChunksPerRow / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int r = rowmajor_copy_row(c), ch = rowmajor_copy_chunk(c);
    const int grow = row0 + r, gk = k0 + ch * 16;
    const bool valid = grow < rows && gk < kd;
    const int8_t* src = valid ? g + static_cast<int64_t>(grow) * ld + gk : g;
    cp_async_16(tile + rowmajor_offset(r, ch), src, valid);
  }
}

// Copies blocks [blk0, blk0 + BN/16) x k-quads [kq0, kq0 + 16) of an n16k4 packed weight.
template <int BN, int THREADS>
__device__ __forceinline__ void load_packed_tile(uint32_t tile, const int8_t* w, int64_t kquads, int blk0,
                                                 int blocks, int kq0, int tid) {
#pragma unroll
  for (int i = 0; i < BN * kChunksPerRow / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int blk = packed_copy_block(c), kq = packed_copy_kq(c), ch = packed_copy_chunk(c);
    const bool valid = blk0 + blk < blocks && kq0 + kq < kquads;
    const int8_t* src = valid ? w + ((static_cast<int64_t>(blk0 + blk) * kquads + kq0 + kq) * 64 + ch * 16) : w;
    cp_async_16(tile + packed_offset(blk, kq, ch), src, valid);
  }
}
#endif  // SPARSEQ_MMA_ENABLED

// The epilogue functor is called with (row, col, v0, v1): C[row][col] = v0 and, when col + 1 < n,
// C[row][col + 1] = v1 (col is even). The kernel guarantees row < m and col < n.
template <class Cfg, bool kPackedB, class Epilogue>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) int8_mma_gemm_kernel(const GemmOperands ops, const Epilogue epi) {
#ifdef SPARSEQ_MMA_ENABLED
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const int m0 = blockIdx.x * Cfg::kBM, n0 = blockIdx.y * Cfg::kBN;
  const int k_tiles = (ops.kd + kTileK - 1) / kTileK;

  auto load_stage = [&](int stage, int kt) {
    const uint32_t a_tile = smem_base + stage * Cfg::kStageBytes;
    const uint32_t b_tile = a_tile + Cfg::kATileBytes;
    load_rowmajor_tile<Cfg::kBM, Cfg::kThreads>(a_tile, ops.a, ops.lda, m0, ops.m, kt * kTileK, ops.kd, tid);
    if constexpr (kPackedB) {
      load_packed_tile<Cfg::kBN, Cfg::kThreads>(b_tile, ops.b, ops.ldb, n0 / 16, (ops.n + 15) / 16,
                                                kt * (kTileK / 4), tid);
    } else {
      load_rowmajor_tile<Cfg::kBN, Cfg::kThreads>(b_tile, ops.b, ops.ldb, n0, ops.n, kt * kTileK, ops.kd, tid);
    }
  };

  int acc[Cfg::kMT][Cfg::kNT][4];
#pragma unroll
  for (int i = 0; i < Cfg::kMT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Prologue: tiles 0 .. kStages-2 in flight. Every thread commits one group per tile slot, even
  // an empty one, so "group kt complete" always means "tile kt landed".
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // this thread's copies of tile kt are done
    // ... and everyone's; also every warp has finished computing on tile kt-1, whose buffer the
    // next load overwrites.
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) load_stage(next % Cfg::kStages, next);
    cp_async_commit();

    const uint32_t a_tile = smem_base + (kt % Cfg::kStages) * Cfg::kStageBytes;
    const uint32_t b_tile = a_tile + Cfg::kATileBytes;
#pragma unroll
    for (int kstep = 0; kstep < kTileK / 32; ++kstep) {
      uint32_t af[Cfg::kMT][4];
      uint32_t bf[Cfg::kNT][2];
#pragma unroll
      for (int i = 0; i < Cfg::kMT; ++i) ldmatrix_x4(af[i], a_tile + a_fragment_offset<Cfg>(warp_m, i, lane, kstep));
      if constexpr (kPackedB) {
#pragma unroll
        for (int j = 0; j < Cfg::kNT; ++j) {
          bf[j][0] = lds_u32(b_tile + b_fragment_packed_offset<Cfg>(warp_n, j, lane, kstep, 0));
          bf[j][1] = lds_u32(b_tile + b_fragment_packed_offset<Cfg>(warp_n, j, lane, kstep, 1));
        }
      } else {
#pragma unroll
        for (int jp = 0; jp < Cfg::kNT / 2; ++jp) {
          uint32_t r[4];
          ldmatrix_x4(r, b_tile + b_fragment_pair_offset<Cfg>(warp_n, jp, lane, kstep));
          bf[2 * jp][0] = r[0];
          bf[2 * jp][1] = r[1];
          bf[2 * jp + 1][0] = r[2];
          bf[2 * jp + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int i = 0; i < Cfg::kMT; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kNT; ++j) mma_s8_16832(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; drain them before the CTA exits

#pragma unroll
  for (int i = 0; i < Cfg::kMT; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::kNT; ++j) {
      const int row_lo = m0 + acc_row<Cfg>(warp_m, i, lane, 0);  // c0, c1
      const int row_hi = m0 + acc_row<Cfg>(warp_m, i, lane, 2);  // c2, c3
      const int col = n0 + acc_col<Cfg>(warp_n, j, lane, 0);
      if (col < ops.n) {
        if (row_lo < ops.m) epi(row_lo, col, acc[i][j][0], acc[i][j][1]);
        if (row_hi < ops.m) epi(row_hi, col, acc[i][j][2], acc[i][j][3]);
      }
    }
  }
#else
  __trap();  // the host refuses devices below sm_80 before launching (require_int8_tensor_cores)
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.
inline void require_int8_tensor_cores() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "sparseq: the CUDA int8 GEMM needs compute capability 8.0 or newer "
              "(mma.sync s8 + cp.async); this device ", prop->name, " is ", prop->major, ".", prop->minor);
}

template <class Cfg, bool kPackedB, class Epilogue>
void launch_int8_mma_gemm_with(const GemmOperands& ops, const Epilogue& epi, cudaStream_t stream) {
  auto kernel = int8_mma_gemm_kernel<Cfg, kPackedB, Epilogue>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  }
  const int64_t tiles_m = (ops.m + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t tiles_n = (ops.n + Cfg::kBN - 1) / Cfg::kBN;
  TORCH_CHECK(tiles_n <= 65535, "sparseq: N=", ops.n, " is too large for the CUDA int8 GEMM grid");
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(ops, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the largest tile that still gives every SM at least one CTA.
template <bool kPackedB, class Epilogue>
void launch_int8_mma_gemm(const GemmOperands& ops, const Epilogue& epi, cudaStream_t stream) {
  if (ops.m == 0 || ops.n == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto ctas = [&](int bm, int bn) {
    return ((ops.m + bm - 1) / static_cast<int64_t>(bm)) * ((ops.n + bn - 1) / static_cast<int64_t>(bn));
  };
  if (ctas(LargeTile::kBM, LargeTile::kBN) >= sms) {
    launch_int8_mma_gemm_with<LargeTile, kPackedB>(ops, epi, stream);
  } else if (ctas(MediumTile::kBM, MediumTile::kBN) >= sms) {
    launch_int8_mma_gemm_with<MediumTile, kPackedB>(ops, epi, stream);
  } else {
    launch_int8_mma_gemm_with<SmallTile, kPackedB>(ops, epi, stream);
  }
}

// Largest M, N or K the kernels accept. They index rows, columns and K in int, and a tile reaches
// past the last row/column by up to 127 and past K by up to 63 (K padded to 16, walked in 64), so
// the extents must stay that far below 2^31 or the indices wrap (K: a negative kd = zeros, silently).
constexpr int64_t kMaxKernelDim = INT32_MAX - 256;

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }

// Runs fn(T{}) with T the C++ type of a float activation dtype (float, c10::BFloat16, c10::Half).
template <class Fn>
void dispatch_activation_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "sparseq: unsupported activation dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace sparseq
