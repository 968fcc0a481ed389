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
// Requirements the host side guarantees (see prepare_*_operand in the .cu files):
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

namespace sparseq {
namespace cuda {

constexpr int kTileK = 64;        // bytes of K per pipeline stage (two k32 mma steps)
constexpr int kChunksPerRow = 4;  // 16-byte chunks in one 64-byte row of a row-major tile

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (byte offsets inside one operand tile of one stage).
//
// Row-major tile: ROWS x 64 bytes. Chunk ch (16 bytes) of row r is stored at chunk position
// ch ^ ((r >> 1) & 3): the 8 row addresses an ldmatrix phase reads (rows r..r+7, same logical
// chunk) then land in 8 distinct 16-byte bank groups.
__host__ __device__ constexpr int rowmajor_offset(int row, int chunk) {
  return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// Packed n16k4 tile: (BN/16) blocks x 16 k-quads x [16 outputs x 4 bytes] = 64-byte rows, as in
// global memory. Chunk ch of row (block, kq) is stored at ch ^ (kq & 2): a B-fragment load (lanes
// g = 0..7 read outputs h+g, lanes t = 0..3 read k-quads kq0+t) then hits 32 distinct banks.
__host__ __device__ constexpr int packed_offset(int block, int kq, int chunk) {
  return (block * 16 + kq) * 64 + ((chunk ^ (kq & 2)) << 4);
}
// Byte offset of the 32-bit word (output `out` of 16, k-quad kq) in a packed tile.
__host__ __device__ constexpr int packed_word_offset(int block, int kq, int out) {
  return packed_offset(block, kq, out >> 2) + ((out & 3) << 2);
}

// ---------------------------------------------------------------------------------------------
// Fragment addressing for mma.m16n8k32 (PTX ISA, "Matrix Fragments for mma.m16n8k32"): with
// g = lane / 4 and t = lane % 4 and viewing 4 int8 values as one 32-bit word,
//   A (16 x 32, row): a0 = A[g][word t], a1 = A[g+8][word t], a2 = A[g][word t+4], a3 = A[g+8][word t+4]
//   B (32 x 8, col):  b0 = B^T[g][word t], b1 = B^T[g][word t+4]       (B^T = row n of b [N,K])
//   C (16 x 8):       c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4 gives lane l the word (row l/4, word l%4) of matrix q in its register q, where
// matrix q's 8 row addresses come from lanes 8q..8q+7. So for A (16 rows at m, k32 step kstep):
// matrices = (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31).
__host__ __device__ constexpr int a_ldmatrix_row(int lane) { return lane & 15; }
__host__ __device__ constexpr int a_ldmatrix_chunk(int lane, int kstep) { return kstep * 2 + (lane >> 4); }
// For two n8 tiles of row-major B (16 rows at n): matrices = (n 0-7, k 0-15) -> b0 of tile 0,
// (n 0-7, k 16-31) -> b1 of tile 0, (n 8-15, k 0-15) -> b0 of tile 1, (n 8-15, k 16-31) -> b1 of tile 1.
__host__ __device__ constexpr int b_ldmatrix_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__host__ __device__ constexpr int b_ldmatrix_chunk(int lane, int kstep) { return kstep * 2 + ((lane >> 3) & 1); }

// ---------------------------------------------------------------------------------------------
// Tile shapes. Warps are laid out kWarpsM x kWarpsN; each owns a (kMT*16) x (kNT*8) sub-tile.
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kWarpsN = WARPS_N;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kWM = BM / WARPS_M, kWN = BN / WARPS_N;
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;
  static constexpr int kATileBytes = BM * kTileK, kBTileBytes = BN * kTileK;
  static constexpr int kStageBytes = kATileBytes + kBTileBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tile must be whole m16 tiles and n8 pairs");
  static_assert(BN % 16 == 0, "packed B tiles are whole 16-output blocks");
  static_assert((BM * kChunksPerRow) % kThreads == 0 && (BN * kChunksPerRow) % kThreads == 0,
                "every thread copies the same number of 16-byte chunks");
  static_assert(STAGES >= 2, "pipeline needs at least two stages");
};
// 128x128: the compute-bound shape (2 CTAs of 64 KiB shared memory fit an SM on sm_80/sm_90).
using LargeTile = TileConfig<128, 128, 2, 4, 4>;
// Narrower tiles give enough CTAs to fill the GPU when M or N is small.
using MediumTile = TileConfig<32, 64, 1, 4, 4>;
using SmallTile = TileConfig<32, 32, 1, 2, 4>;

// Operands as the kernel sees them (see the requirements at the top of this file).
struct GemmOperands {
  const int8_t* a;
  const int8_t* b;
  int64_t lda;
  int64_t ldb;  // row-major B: row stride; packed B: number of k-quads per 16-output block (KQ)
  int m, n;
  int kd;       // K extent of A (multiple of 16); row-major B has the same, packed B covers 4*KQ
};

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
    const int r = c / kChunksPerRow, ch = c % kChunksPerRow;
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
    const int blk = c / 64, kq = (c / 4) % 16, ch = c % 4;
    const bool valid = blk0 + blk < blocks && kq0 + kq < kquads;
    const int8_t* src = valid ? w + ((static_cast<int64_t>(blk0 + blk) * kquads + kq0 + kq) * 64 + ch * 16) : w;
    cp_async_16(tile + packed_offset(blk, kq, ch), src, valid);
  }
}
#endif  // SPARSEQ_MMA_ENABLED

// The epilogue functor is called with (row, col, v0, v1): C[row][col] = v0 and, when col + 1 < n,
// C[row][col + 1] = v1 (col is even). The kernel guarantees row < m and col < n.
template <class Cfg, bool kPackedB, class Epilogue>
__global__ void __launch_bounds__(Cfg::kThreads) int8_mma_gemm_kernel(const GemmOperands ops, const Epilogue epi) {
#ifdef SPARSEQ_MMA_ENABLED
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
  const int g = lane >> 2, t = lane & 3;
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
      for (int i = 0; i < Cfg::kMT; ++i) {
        const int row = warp_m * Cfg::kWM + i * 16 + a_ldmatrix_row(lane);
        ldmatrix_x4(af[i], a_tile + rowmajor_offset(row, a_ldmatrix_chunk(lane, kstep)));
      }
      if constexpr (kPackedB) {
#pragma unroll
        for (int j = 0; j < Cfg::kNT; ++j) {
          const int n_local = warp_n * Cfg::kWN + j * 8;
          const int blk = n_local / 16, out = (n_local % 16) + g;
          const int kq = kstep * 8 + t;
          bf[j][0] = lds_u32(b_tile + packed_word_offset(blk, kq, out));
          bf[j][1] = lds_u32(b_tile + packed_word_offset(blk, kq + 4, out));
        }
      } else {
#pragma unroll
        for (int jp = 0; jp < Cfg::kNT / 2; ++jp) {
          const int row = warp_n * Cfg::kWN + jp * 16 + b_ldmatrix_row(lane);
          uint32_t r[4];
          ldmatrix_x4(r, b_tile + rowmajor_offset(row, b_ldmatrix_chunk(lane, kstep)));
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
      const int row = m0 + warp_m * Cfg::kWM + i * 16 + g;
      const int col = n0 + warp_n * Cfg::kWN + j * 8 + 2 * t;
      if (col < ops.n) {
        if (row < ops.m) epi(row, col, acc[i][j][0], acc[i][j][1]);
        if (row + 8 < ops.m) epi(row + 8, col, acc[i][j][2], acc[i][j][3]);
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
