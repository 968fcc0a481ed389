#pragma once
// Index math of the 2:4 sparse tensor-core GEMM (sparse24_mma.cuh): tile shapes, shared-memory
// layouts, which bytes each thread copies, which fragment words each lane reads and how a lane
// builds its mma.sp metadata word from the compact Sparse24Weight meta bytes. Plain constexpr
// functions, host and device, so csrc/cuda/sparse24_layout_selftest.cpp replays whole CTA tiles
// on the CPU against the PTX fragment definitions without a GPU.
//
// The sparse operand A of mma.sp is the weight (rows = output channels n, reduction over k); the
// dense operand B is the activations x (rows = tokens m). One mma k-step covers 64 bytes of x per
// token and 32 bytes of stored values per channel for both element widths:
//   16-bit (bf16/fp16): mma.sp m16n8k32, 32 dense k = 16 stored values, 8 groups = 4 meta bytes;
//   8-bit  (s8):        mma.sp m16n8k64, 64 dense k = 32 stored values, 16 groups = 8 meta bytes.
// A pipeline stage holds two k-steps: 128 bytes of x per token, 64 bytes of values and
// 8 (16-bit) or 16 (8-bit) meta bytes per channel.
//
// Fragments (PTX ISA "Matrix fragments for sparse mma.m16n8k32 .f16/.bf16" and "... m16n8k64
// .u8/.s8"), g = lane / 4, t = lane % 4, a "word" = 4 bytes:
//   A (16 channels x 32 compressed bytes): a0 = Ac[g][word t], a1 = Ac[g+8][word t],
//     a2 = Ac[g][word t+4], a3 = Ac[g+8][word t+4]  (the dense m16n8k16 / m16n8k32 A layout over
//     the compressed matrix, so ldmatrix.x4 loads it); the stored values of a group are adjacent,
//     the one of its idx_0 first, exactly the Sparse24Weight values row.
//   B (dense k x 8 tokens): b_r = X[g][word 4r + t], r = 0..3 (16-bit: k = 8r + 2t, +1;
//     8-bit: k = 16r + 4t .. +3).
//   C/D: c0, c1 = D[g][2t, 2t+1], c2, c3 = D[g+8][2t, 2t+1] (rows = channels, columns = tokens).
//   Metadata, one 32-bit word per lane, nibble = idx_0 | idx_1 << 2 (idx_0 < idx_1 with
//   ::ordered_metadata), nibble j of a 16-bit half = the j-th group of 4 dense columns:
//     m16n8k32 16-bit, sparsity selector 0 (lanes t = 0, 1 supply it): bits 15:0 = row g,
//       bits 31:16 = row g + 8, both over dense columns 16t .. 16t + 15;
//     m16n8k64 8-bit, selector 0 (all four lanes): row g + 8 (t & 1), dense columns
//       32 (t >> 1) .. + 31 (bits 15:0 the first 16, bits 31:16 the next 16).
//   The 8-bit assignment is not the 16-bit one extended: it was established on hardware by a
//   one-hot probe (a Triton sparse-dot port, notes "m16n8k64: row = (T>>2) + 8*(T&1),
//   col = 2*((T>>1)&1)") and agrees with CUTLASS's 32-bit metadata element for 8-bit A (one row,
//   32 dense columns) interleaving rows g and g + 8. The 16-bit one agrees with CUTLASS's
//   example 15 port. Both reduce to reading the compact meta bytes as little-endian words: the
//   compact layout (low nibble = even group) already is the register's nibble order.
#include <cstdint>

#include "int8_mma_layout.h"  // SPARSEQ_HD

namespace sparseq {
namespace cuda {
namespace sp24 {

constexpr int kValueBytesPerStage = 64;   // stored values per channel per stage (two k-steps)
constexpr int kXBytesPerStage = 128;      // x bytes per token per stage
constexpr int kKSteps = 2;                // mma k-steps per stage
// Dense k per stage: 64 for 16-bit elements, 128 for 8-bit ones.
SPARSEQ_HD constexpr int dense_k_per_stage(int elem_bytes) { return kXBytesPerStage / elem_bytes; }
// Meta bytes per channel per stage: one byte per 8 dense columns.
SPARSEQ_HD constexpr int meta_bytes_per_stage(int elem_bytes) { return dense_k_per_stage(elem_bytes) / 8; }
// The host pads K to whole stages; padded groups hold positions (0, 1) with zero values, so every
// meta nibble the instruction sees is valid (0b0100 = idx_0 0, idx_1 1).
constexpr uint8_t kPadMetaByte = 0x44;

// ---------------------------------------------------------------------------------------------
// Tile shapes. BA channels x BB tokens per CTA; warps kWarpsA x kWarpsB, each owning
// (kAT * 16) channels x (kBT * 8) tokens.
template <int BA, int BB, int WARPS_A, int WARPS_B, int STAGES, int ELEM_BYTES>
struct Tile {
  static constexpr int kBA = BA, kBB = BB, kStages = STAGES, kElemBytes = ELEM_BYTES;
  static constexpr int kWarpsA = WARPS_A, kWarpsB = WARPS_B;
  static constexpr int kThreads = 32 * WARPS_A * WARPS_B;
  static constexpr int kWA = BA / WARPS_A, kWB = BB / WARPS_B;
  static constexpr int kAT = kWA / 16, kBT = kWB / 8;
  static constexpr int kMetaBytes = meta_bytes_per_stage(ELEM_BYTES);
  static constexpr int kValueTileBytes = BA * kValueBytesPerStage;
  static constexpr int kXTileBytes = BB * kXBytesPerStage;
  static constexpr int kMetaTileBytes = BA * kMetaBytes;
  static constexpr int kStageBytes = kValueTileBytes + kXTileBytes + kMetaTileBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static constexpr int kValueCopies = BA * 4;   // 16-byte chunks per stage
  // int8 codes feeding a 16-bit mma ("convert on load"): BA x 32 code bytes per stage, staged in
  // the stage's values tile, widened into one extra BA x 64-byte tile (kConvTileBytes).
  static constexpr int kCodeCopies = BA * 2;
  static constexpr int kConvTileBytes = BA * kValueBytesPerStage;
  static constexpr int kXCopies = BB * 8;
  static constexpr int kMetaCopies = BA;        // one 8- or 16-byte copy per channel
  static_assert(kWA % 16 == 0 && kWB % 8 == 0, "warp tile must be whole m16 x n8 tiles");
  static_assert(kValueCopies % kThreads == 0 && kXCopies % kThreads == 0 && kCodeCopies % kThreads == 0,
                "every thread copies the same number of 16-byte chunks");
  static_assert(kStageBytes % 128 == 0, "stages stay 128-byte aligned");
  static_assert(STAGES >= 2, "pipeline needs at least two stages");
};

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (byte offsets inside one operand tile of one stage).
// Values: BA rows x 64 bytes; chunk ch of row r at ch ^ ((r >> 1) & 3) (ldmatrix phases read 8
// consecutive rows of one chunk: 8 distinct 16-byte bank groups).
SPARSEQ_HD constexpr int value_offset(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }
// x: BB rows x 128 bytes; chunk ch of row r at ch ^ (r & 7).
SPARSEQ_HD constexpr int x_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }
// Meta: BA rows x kMetaBytes, plain row-major (a warp's 4-byte reads span 8 or 16 rows of 8 or
// 16 bytes: 128 or 256 contiguous bytes, at most 2-way conflicts on 16 distinct words).
SPARSEQ_HD constexpr int meta_offset(int row, int byte, int meta_bytes) { return row * meta_bytes + byte; }

// Copy number c of a stage: values row c/4 chunk c%4; x row c/8 chunk c%8; meta row c.
SPARSEQ_HD constexpr int value_copy_row(int c) { return c / 4; }
SPARSEQ_HD constexpr int value_copy_chunk(int c) { return c % 4; }
// int8 codes for a 16-bit mma: copy c is code chunk c % 2 (16 codes) of row c / 2, staged at
// value_offset(row, chunk); its 16 widened values are chunks 2 (c % 2) and 2 (c % 2) + 1 of the
// row in the conversion tile, at value_offset as for values loaded directly.
SPARSEQ_HD constexpr int code_copy_row(int c) { return c / 2; }
SPARSEQ_HD constexpr int code_copy_chunk(int c) { return c % 2; }
// Where the widened 16-bit values of code chunk `chunk` go: codes 8 half .. 8 half + 7.
SPARSEQ_HD constexpr int widened_offset(int row, int chunk, int half) { return value_offset(row, 2 * chunk + half); }
SPARSEQ_HD constexpr int x_copy_row(int c) { return c / 8; }
SPARSEQ_HD constexpr int x_copy_chunk(int c) { return c % 8; }

// ---------------------------------------------------------------------------------------------
// Fragment addresses. ldmatrix.x4 gives lane l the word (l % 4) of row (l / 4) of matrix q in
// register q, where matrix q's 8 row addresses come from lanes 8q .. 8q + 7.

// A (values) of m16 tile i of warp row warp_a, k-step s: matrices (rows 0-7, chunk 2s),
// (rows 8-15, chunk 2s), (rows 0-7, chunk 2s+1), (rows 8-15, chunk 2s+1) = a0..a3.
template <class Cfg>
SPARSEQ_HD constexpr int a_fragment_offset(int warp_a, int i, int lane, int kstep) {
  return value_offset(warp_a * Cfg::kWA + i * 16 + (lane & 15), kstep * 2 + (lane >> 4));
}
// B (x) of n8 tile j of warp column warp_b, k-step s: matrices = chunks 4s .. 4s+3 of the 8
// token rows = b0..b3.
template <class Cfg>
SPARSEQ_HD constexpr int b_fragment_offset(int warp_b, int j, int lane, int kstep) {
  return x_offset(warp_b * Cfg::kWB + j * 8 + (lane & 7), kstep * 4 + (lane >> 3));
}

// Metadata word of a lane for m16 tile i, k-step s, read from the stage's meta tile as 32-bit
// little-endian loads. Returns the byte offsets of the two 16-bit halves (low, high).
// 16-bit elements: row g (low) and g + 8 (high), meta bytes 4s + 2 (t & 1) .. + 1 (lanes t = 2,
// 3 duplicate t = 0, 1: the instruction ignores them with selector 0).
// 8-bit elements: row g + 8 (t & 1), meta bytes 8s + 4 (t >> 1) .. + 3 (low half first).
template <class Cfg>
SPARSEQ_HD constexpr int meta_half_offset(int warp_a, int i, int lane, int kstep, int half) {
  return Cfg::kElemBytes == 2
             ? meta_offset(warp_a * Cfg::kWA + i * 16 + (lane >> 2) + 8 * half, kstep * 4 + 2 * (lane & 1),
                           Cfg::kMetaBytes)
             : meta_offset(warp_a * Cfg::kWA + i * 16 + (lane >> 2) + 8 * (lane & 1),
                           kstep * 8 + 4 * ((lane >> 1) & 1) + 2 * half, Cfg::kMetaBytes);
}
// The channel (row of the CTA's A tile) each 16-bit half of a lane's metadata word describes.
template <class Cfg>
SPARSEQ_HD constexpr int meta_half_row(int warp_a, int i, int lane, int half) {
  return warp_a * Cfg::kWA + i * 16 + (lane >> 2) + (Cfg::kElemBytes == 2 ? 8 * half : 8 * (lane & 1));
}

// Accumulator r (0..3) of tile (i, j) of a lane: its channel and token inside the CTA tile.
template <class Cfg>
SPARSEQ_HD constexpr int acc_channel(int warp_a, int i, int lane, int r) {
  return warp_a * Cfg::kWA + i * 16 + (lane >> 2) + (r >= 2 ? 8 : 0);
}
template <class Cfg>
SPARSEQ_HD constexpr int acc_token(int warp_b, int j, int lane, int r) {
  return warp_b * Cfg::kWB + j * 8 + 2 * (lane & 3) + (r & 1);
}

// ---------------------------------------------------------------------------------------------
// Metadata nibbles the instruction leaves undefined (idx_0 >= idx_1, e.g. 0b0000, 0b0101 or an
// unsorted pair) never reach it: each is replaced by 0b0100 and reported. For every nibble
// 3 + idx_1 - idx_0 lies in 0..6 (no borrow between nibbles); its bit 2 is set iff idx_1 > idx_0.
// Returns the bad-nibble mask (bit 2 of each bad nibble) and rewrites `word`.
SPARSEQ_HD constexpr uint32_t sanitize_meta_word(uint32_t& word) {
  const uint32_t idx0 = word & 0x33333333u, idx1 = (word >> 2) & 0x33333333u;
  const uint32_t ordered = ((idx1 | 0x44444444u) - idx0 - 0x11111111u) & 0x44444444u;
  const uint32_t bad = ~ordered & 0x44444444u;
  const uint32_t bad_nibbles = (bad >> 2) * 0xFu;
  word = (word & ~bad_nibbles) | (0x44444444u & bad_nibbles);
  return bad;
}

}  // namespace sp24
}  // namespace cuda
}  // namespace sparseq
