#pragma once
// Index math of the tensor-core int8 GEMM (int8_mma.cuh): tile shapes, shared-memory layouts,
// which bytes each thread copies, and which fragment words each lane reads. Plain constexpr
// functions, host and device, so that csrc/cuda/mma_layout_selftest.cpp can replay a whole CTA
// tile on the CPU against the PTX fragment definitions without a GPU.
#include <cstdint>

#if defined(__CUDACC__)
#define SPARSEQ_HD __host__ __device__
#else
#define SPARSEQ_HD
#endif

namespace sparseq {
namespace cuda {

constexpr int kTileK = 64;        // bytes of K per pipeline stage (two k32 mma steps)
constexpr int kChunksPerRow = 4;  // 16-byte chunks in one 64-byte row of a row-major tile

// ---------------------------------------------------------------------------------------------
// Tile shapes. Warps are laid out kWarpsM x kWarpsN; each owns a (kMT*16) x (kNT*8) sub-tile.
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, int MIN_BLOCKS = 1>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kMinBlocks = MIN_BLOCKS;  // CTAs per SM the register budget must allow
  static constexpr int kWarpsM = WARPS_M, kWarpsN = WARPS_N;
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
// 128x128: the compute-bound shape. Two CTAs per SM (2 x 64 KiB shared memory fit on sm_80 and
// sm_90) hide each other's barriers; that caps registers at 128 per thread.
using LargeTile = TileConfig<128, 128, 2, 4, 4, 2>;
// Narrower tiles give enough CTAs to fill the GPU when M or N is small. Small M is bound by
// streaming B, so the smallest tile keeps more stages (7 x 2 KiB of B) in flight per CTA.
using MediumTile = TileConfig<32, 64, 1, 4, 4>;
using SmallTile = TileConfig<32, 32, 1, 2, 8>;

// Operands as the kernel sees them (see the requirements at the top of int8_mma.cuh).
struct GemmOperands {
  const int8_t* a;
  const int8_t* b;
  int64_t lda;
  int64_t ldb;  // row-major B: row stride; packed B: number of k-quads per 16-output block (KQ)
  int m, n;
  int kd;       // K extent of A (multiple of 16); row-major B has the same, packed B covers 4*KQ
};

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (byte offsets inside one operand tile of one stage).
//
// Row-major tile: ROWS x 64 bytes. Chunk ch (16 bytes) of row r is stored at chunk position
// ch ^ ((r >> 1) & 3): the 8 row addresses an ldmatrix phase reads (rows r..r+7, same logical
// chunk) then land in 8 distinct 16-byte bank groups.
SPARSEQ_HD constexpr int rowmajor_offset(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }

// Packed n16k4 tile: (BN/16) blocks x 16 k-quads x [16 outputs x 4 bytes] = 64-byte rows, as in
// global memory. Chunk ch of row (block, kq) is stored at ch ^ (kq & 2): a B-fragment load (lanes
// g = 0..7 read outputs h+g, lanes t = 0..3 read k-quads kq0+t) then hits 32 distinct banks.
SPARSEQ_HD constexpr int packed_offset(int block, int kq, int chunk) {
  return (block * 16 + kq) * 64 + ((chunk ^ (kq & 2)) << 4);
}
// Byte offset of the 32-bit word (output `out` of 16, k-quad kq) in a packed tile.
SPARSEQ_HD constexpr int packed_word_offset(int block, int kq, int out) {
  return packed_offset(block, kq, out >> 2) + ((out & 3) << 2);
}

// Which 16-byte chunk copy number c (0 .. ROWS*4-1, spread over the threads) is.
// Row-major: row c/4, chunk c%4 (4 consecutive copies = one 64-byte row segment in global memory).
SPARSEQ_HD constexpr int rowmajor_copy_row(int c) { return c / kChunksPerRow; }
SPARSEQ_HD constexpr int rowmajor_copy_chunk(int c) { return c % kChunksPerRow; }
// Packed: block c/64, k-quad (c/4)%16, chunk c%4 (64 consecutive copies = 1 KiB contiguous in global).
SPARSEQ_HD constexpr int packed_copy_block(int c) { return c / 64; }
SPARSEQ_HD constexpr int packed_copy_kq(int c) { return (c / 4) % 16; }
SPARSEQ_HD constexpr int packed_copy_chunk(int c) { return c % 4; }

// ---------------------------------------------------------------------------------------------
// Fragments of mma.m16n8k32 (PTX ISA, "Matrix Fragments for mma.m16n8k32"): with g = lane / 4,
// t = lane % 4 and 4 int8 values viewed as one 32-bit word,
//   A (16 x 32, row): a0 = A[g][word t], a1 = A[g+8][word t], a2 = A[g][word t+4], a3 = A[g+8][word t+4]
//   B (32 x 8, col):  b0 = B^T[g][word t], b1 = B^T[g][word t+4]       (B^T[n] = row n of b [N,K])
//   C (16 x 8):       c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4 gives lane l the word (row l/4, word l%4) of matrix q in its register q, where
// matrix q's 8 row addresses come from lanes 8q..8q+7.

// A: m16 tile i of warp row warp_m, k32 step kstep. Matrices (rows 0-7, k 0-15), (rows 8-15,
// k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) = a0..a3.
template <class Cfg>
SPARSEQ_HD constexpr int a_fragment_offset(int warp_m, int i, int lane, int kstep) {
  return rowmajor_offset(warp_m * Cfg::kWM + i * 16 + (lane & 15), kstep * 2 + (lane >> 4));
}
// Row-major B: n8 tiles 2*jp and 2*jp+1 of warp column warp_n. Matrices (n 0-7, k 0-15),
// (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31) = b0, b1 of tile 2jp, b0, b1 of tile 2jp+1.
template <class Cfg>
SPARSEQ_HD constexpr int b_fragment_pair_offset(int warp_n, int jp, int lane, int kstep) {
  return rowmajor_offset(warp_n * Cfg::kWN + jp * 16 + (lane & 7) + ((lane >> 4) << 3),
                         kstep * 2 + ((lane >> 3) & 1));
}
// Packed B: word `half` (0: b0, 1: b1) of n8 tile j of warp column warp_n, read by one lane.
template <class Cfg>
SPARSEQ_HD constexpr int b_fragment_packed_offset(int warp_n, int j, int lane, int kstep, int half) {
  return packed_word_offset((warp_n * Cfg::kWN + j * 8) / 16, kstep * 8 + (lane & 3) + 4 * half,
                            ((warp_n * Cfg::kWN + j * 8) % 16) + (lane >> 2));
}
// Accumulator r (0..3) of tile (i, j) of a lane: its row and column inside the CTA tile.
template <class Cfg>
SPARSEQ_HD constexpr int acc_row(int warp_m, int i, int lane, int r) {
  return warp_m * Cfg::kWM + i * 16 + (lane >> 2) + (r >= 2 ? 8 : 0);
}
template <class Cfg>
SPARSEQ_HD constexpr int acc_col(int warp_n, int j, int lane, int r) {
  return warp_n * Cfg::kWN + j * 8 + 2 * (lane & 3) + (r & 1);
}

}  // namespace cuda
}  // namespace sparseq
