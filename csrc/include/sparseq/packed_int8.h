#pragma once
// The n16k4 packed int8 weight layout shared by every kernel (CPU, CUDA, Triton) and by
// sparseq/formats.py. A weight W [N, K] is stored as P [ceil(N/16), ceil(K/4), 16, 4] with
//   P[nb, kq, i, j] = W[nb*16 + i, kq*4 + j]   (zero where out of range).
// Why: one 64-byte row P[nb, kq] holds the K-quads of 16 outputs, which is exactly two AVX2
// registers of 8 int32 lanes for vpmaddubsw/vpmaddwd, and a 32-bit word per (n, k-quad) is the
// operand fragment shape of mma.sync m16n8k32 on the GPU.
#include <cstdint>

namespace sparseq {

constexpr int64_t kPackN = 16;
constexpr int64_t kPackK = 4;

inline int64_t packed_blocks_n(int64_t n) { return (n + kPackN - 1) / kPackN; }
inline int64_t packed_quads_k(int64_t k) { return (k + kPackK - 1) / kPackK; }

}  // namespace sparseq
