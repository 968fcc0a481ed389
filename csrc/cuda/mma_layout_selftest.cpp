// CPU replay of one CTA tile of the tensor-core int8 GEMM (int8_mma.cuh), built from the same
// index functions (int8_mma_layout.h) and the PTX ISA's definitions of cp.async, ldmatrix and
// mma.m16n8k32 fragments. It checks, without a GPU, that the copies cover each shared-memory
// byte once, that every lane reads the fragment words the mma expects (the result equals A.B^T
// for both B layouts and every tile shape), and that the fragment reads are free of bank
// conflicts. Not part of the extension (setup.py builds only *.cu under csrc/cuda/):
//   g++ -std=c++17 -O1 -Icsrc/cuda csrc/cuda/mma_layout_selftest.cpp -o /tmp/selftest && /tmp/selftest
// tests/ops/test_int8_cuda.py runs it when a C++ compiler is present.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "int8_mma_layout.h"
#include "selftest_expect.h"

using namespace sparseq::cuda;

static uint32_t word_at(const std::vector<uint8_t>& smem, int byte_offset) {
  uint32_t w;
  std::memcpy(&w, smem.data() + byte_offset, 4);
  return w;
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lane l receives, in register q, the 32-bit word l%4 of the
// row whose address lane 8q + l/4 supplied.
static void ldmatrix_x4(const std::vector<uint8_t>& smem, const int (&addr)[32], uint32_t (&regs)[32][4]) {
  for (int l = 0; l < 32; ++l)
    for (int q = 0; q < 4; ++q) regs[l][q] = word_at(smem, addr[8 * q + l / 4] + 4 * (l % 4));
}

static int8_t byte_of(uint32_t w, int j) { return static_cast<int8_t>((w >> (8 * j)) & 0xff); }

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, fragments per the PTX ISA (g = lane/4, t = lane%4):
// A element a_i (i = 0..15, 4 per register): row g for i < 4 or 8 <= i < 12, else g + 8;
//   column t*4 + (i & 3) for i < 8, else t*4 + (i & 3) + 16.
// B element b_i (i = 0..7): row (k) t*4 + (i & 3) for i < 4, else + 16; column (n) g.
// C element c_i (i = 0..3): row g for i < 2, else g + 8; column t*2 + (i & 1).
static void mma_16832(int (&acc)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  int A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 16; ++i) {
      const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
      const int col = t * 4 + (i & 3) + (i >= 8 ? 16 : 0);
      A[row][col] = byte_of(a[l][i / 4], i % 4);
    }
    for (int i = 0; i < 8; ++i) B[t * 4 + (i & 3) + (i >= 4 ? 16 : 0)][g] = byte_of(b[l][i / 4], i % 4);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      int s = 0;
      for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
      acc[l][i] += s;
    }
  }
}

// Shared memory is 32 banks of 4 bytes. A 16-byte-per-lane access (ldmatrix phase of 8 lanes)
// is conflict free when the 8 addresses fall in distinct 16-byte groups modulo 128 bytes.
static void expect_conflict_free_16B(const int* addr, int count, const char* what) {
  std::set<int> groups;
  for (int i = 0; i < count; ++i) groups.insert((addr[i] % 128) / 16);
  EXPECT(static_cast<int>(groups.size()) == count, "%s: 16-byte bank groups collide", what);
}
static void expect_conflict_free_4B(const int (&addr)[32], const char* what) {
  std::set<int> banks;
  for (int i = 0; i < 32; ++i) banks.insert((addr[i] / 4) % 32);
  EXPECT(banks.size() == 32, "%s: 4-byte banks collide", what);
}

template <class Cfg, bool kPacked>
static void replay_tile(std::mt19937& rng, const char* name) {
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, BK = kTileK;
  std::uniform_int_distribution<int> dist(-128, 127);
  std::vector<int8_t> A(BM * BK), B(BN * BK);  // row-major [rows][64]
  for (auto& v : A) v = static_cast<int8_t>(dist(rng));
  for (auto& v : B) v = static_cast<int8_t>(dist(rng));
  // n16k4 packing of B: P[blk][kq][out][j] = B[blk*16 + out][kq*4 + j].
  std::vector<int8_t> P(BN * BK);
  for (int n = 0; n < BN; ++n)
    for (int k = 0; k < BK; ++k) P[((n / 16) * 16 + k / 4) * 64 + (n % 16) * 4 + k % 4] = B[n * BK + k];

  // The copies of one stage, thread by thread as in load_rowmajor_tile / load_packed_tile.
  std::vector<uint8_t> smem_a(Cfg::kATileBytes), smem_b(Cfg::kBTileBytes);
  std::vector<int> writes_a(Cfg::kATileBytes, 0), writes_b(Cfg::kBTileBytes, 0);
  for (int tid = 0; tid < Cfg::kThreads; ++tid) {
    for (int i = 0; i < BM * kChunksPerRow / Cfg::kThreads; ++i) {
      const int c = tid + i * Cfg::kThreads;
      const int r = rowmajor_copy_row(c), ch = rowmajor_copy_chunk(c);
      const int dst = rowmajor_offset(r, ch);
      std::memcpy(smem_a.data() + dst, A.data() + r * BK + ch * 16, 16);
      for (int b = 0; b < 16; ++b) ++writes_a[dst + b];
    }
    for (int i = 0; i < BN * kChunksPerRow / Cfg::kThreads; ++i) {
      const int c = tid + i * Cfg::kThreads;
      int dst;
      const int8_t* src;
      if (kPacked) {
        const int blk = packed_copy_block(c), kq = packed_copy_kq(c), ch = packed_copy_chunk(c);
        dst = packed_offset(blk, kq, ch);
        src = P.data() + (blk * 16 + kq) * 64 + ch * 16;  // tile-local view of the global layout
      } else {
        const int r = rowmajor_copy_row(c), ch = rowmajor_copy_chunk(c);
        dst = rowmajor_offset(r, ch);
        src = B.data() + r * BK + ch * 16;
      }
      std::memcpy(smem_b.data() + dst, src, 16);
      for (int b = 0; b < 16; ++b) ++writes_b[dst + b];
    }
  }
  for (int v : writes_a) EXPECT(v == 1, "%s: an A tile byte written %d times", name, v);
  for (int v : writes_b) EXPECT(v == 1, "%s: a B tile byte written %d times", name, v);

  // Every warp, both k32 steps: fragments exactly as the kernel addresses them.
  std::vector<int> C(BM * BN, 0), covered(BM * BN, 0);
  for (int warp = 0; warp < Cfg::kThreads / 32; ++warp) {
    const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;
    static int acc[Cfg::kMT][Cfg::kNT][32][4];
    std::memset(acc, 0, sizeof(acc));
    for (int kstep = 0; kstep < BK / 32; ++kstep) {
      uint32_t af[Cfg::kMT][32][4];
      uint32_t bf[Cfg::kNT][32][2];
      for (int i = 0; i < Cfg::kMT; ++i) {
        int addr[32];
        for (int l = 0; l < 32; ++l) addr[l] = a_fragment_offset<Cfg>(warp_m, i, l, kstep);
        for (int q = 0; q < 4; ++q) expect_conflict_free_16B(addr + 8 * q, 8, "A ldmatrix");
        ldmatrix_x4(smem_a, addr, af[i]);
      }
      if (kPacked) {
        for (int j = 0; j < Cfg::kNT; ++j)
          for (int h = 0; h < 2; ++h) {
            int addr[32];
            for (int l = 0; l < 32; ++l) addr[l] = b_fragment_packed_offset<Cfg>(warp_n, j, l, kstep, h);
            expect_conflict_free_4B(addr, "packed B lds");
            for (int l = 0; l < 32; ++l) bf[j][l][h] = word_at(smem_b, addr[l]);
          }
      } else {
        for (int jp = 0; jp < Cfg::kNT / 2; ++jp) {
          int addr[32];
          for (int l = 0; l < 32; ++l) addr[l] = b_fragment_pair_offset<Cfg>(warp_n, jp, l, kstep);
          for (int q = 0; q < 4; ++q) expect_conflict_free_16B(addr + 8 * q, 8, "B ldmatrix");
          uint32_t r[32][4];
          ldmatrix_x4(smem_b, addr, r);
          for (int l = 0; l < 32; ++l) {
            bf[2 * jp][l][0] = r[l][0];
            bf[2 * jp][l][1] = r[l][1];
            bf[2 * jp + 1][l][0] = r[l][2];
            bf[2 * jp + 1][l][1] = r[l][3];
          }
        }
      }
      for (int i = 0; i < Cfg::kMT; ++i)
        for (int j = 0; j < Cfg::kNT; ++j) mma_16832(acc[i][j], af[i], bf[j]);
    }
    for (int i = 0; i < Cfg::kMT; ++i)
      for (int j = 0; j < Cfg::kNT; ++j)
        for (int l = 0; l < 32; ++l)
          for (int r = 0; r < 4; ++r) {
            const int row = acc_row<Cfg>(warp_m, i, l, r), col = acc_col<Cfg>(warp_n, j, l, r);
            C[row * BN + col] = acc[i][j][l][r];
            ++covered[row * BN + col];
          }
  }
  for (int m = 0; m < BM; ++m)
    for (int n = 0; n < BN; ++n) {
      int expect = 0;
      for (int k = 0; k < BK; ++k) expect += A[m * BK + k] * B[n * BK + k];
      EXPECT(covered[m * BN + n] == 1, "%s: C[%d][%d] produced %d times", name, m, n, covered[m * BN + n]);
      EXPECT(C[m * BN + n] == expect, "%s: C[%d][%d] = %d, expected %d", name, m, n, C[m * BN + n], expect);
    }
  std::printf("%-28s %s\n", name, failures ? "FAILED" : "ok");
}

int main() {
  std::mt19937 rng(1234);
  replay_tile<LargeTile, false>(rng, "LargeTile  row-major B");
  replay_tile<LargeTile, true>(rng, "LargeTile  packed B");
  replay_tile<MediumTile, false>(rng, "MediumTile row-major B");
  replay_tile<MediumTile, true>(rng, "MediumTile packed B");
  replay_tile<SmallTile, false>(rng, "SmallTile  row-major B");
  replay_tile<SmallTile, true>(rng, "SmallTile  packed B");
  std::printf(failures ? "%d FAILURES\n" : "all layouts ok\n", failures);
  return failures ? 1 : 0;
}
