// CPU replay of the 2:4 sparse tensor-core GEMM (sparse24_mma.cuh) over whole weights, built from
// the kernel's own index functions (sparse24_mma_layout.h) and an independent transcription of
// the PTX ISA's mma.sp fragment and metadata definitions. For every tile shape and both element
// widths (bf16 mma.sp m16n8k32, s8 mma.sp m16n8k64; int8 codes also through the bf16
// instruction, staged and widened in shared memory as the kernel does) it checks that
//   * the stage copies write each shared-memory byte exactly once;
//   * the dense A tile the instruction would see, rebuilt from the lanes' value fragments and
//     metadata words, equals Sparse24Weight.unpack() of the packed weight (read from a file the
//     Python test writes), padding columns zero;
//   * the B fragments are the x tile, and the accumulators land on the right (token, channel):
//     the replayed GEMM equals W x^T exactly (small integers, exact in fp32 / int32);
//   * ldmatrix phases are free of shared-memory bank conflicts;
//   * sanitize_meta_word flags exactly the nibbles with idx_0 >= idx_1 and rewrites only them.
// Not part of the extension (setup.py builds only *.cu). tests/ops/test_sparse_cuda.py runs:
//   g++ -std=c++17 -O1 csrc/cuda/sparse24_layout_selftest.cpp -o selftest && ./selftest cases.bin
// cases.bin: per case int32 elem_bytes, N, K, then values [N, 2G] (bf16 bits or int8 codes),
// meta uint8 [N, ceil(G/2)], the unpacked weight float32 [N, K] (int8: the codes).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "selftest_expect.h"
#include "sparse24_mma_layout.h"

using namespace sparseq::cuda::sp24;

static float bf16_to_float(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
static uint16_t float_to_bf16_exact(float f) {  // only for values exact in bf16
  uint32_t w;
  std::memcpy(&w, &f, 4);
  return static_cast<uint16_t>(w >> 16);
}

struct Case {
  int elem_bytes = 0, n = 0, k = 0;
  std::vector<uint8_t> values, meta;  // as stored by Sparse24Weight
  std::vector<float> dense;           // unpack()
};

// The element at compressed / dense index e of a byte row, as a float (bf16 bits or s8).
static float element(const uint8_t* row, int e, int elem_bytes) {
  if (elem_bytes == 1) return static_cast<float>(static_cast<int8_t>(row[e]));
  uint16_t bits;
  std::memcpy(&bits, row + 2 * e, 2);
  return bf16_to_float(bits);
}

// The host padding of prepare_weight_operands (sparse24_operands.h): values to kpad/2 columns of
// zeros, meta to kpad/8 bytes of kPadMetaByte, an odd group count's spare high nibble too.
static void pad_case(const Case& c, int kpad, std::vector<uint8_t>& values, std::vector<uint8_t>& meta) {
  const int groups = (c.k + 3) / 4, vbytes = 2 * groups * c.elem_bytes, mbytes = (groups + 1) / 2;
  const int ld_v = kpad / 2 * c.elem_bytes, ld_m = kpad / 8;
  values.assign(static_cast<size_t>(c.n) * ld_v, 0);
  meta.assign(static_cast<size_t>(c.n) * ld_m, kPadMetaByte);
  for (int r = 0; r < c.n; ++r) {
    std::memcpy(values.data() + r * ld_v, c.values.data() + r * vbytes, vbytes);
    std::memcpy(meta.data() + r * ld_m, c.meta.data() + r * mbytes, mbytes);
    if (groups % 2) meta[r * ld_m + groups / 2] = (meta[r * ld_m + groups / 2] & 0x0F) | (kPadMetaByte & 0xF0);
  }
}

static void ldmatrix_x4(const std::vector<uint8_t>& smem, const int (&addr)[32], uint32_t (&regs)[32][4]) {
  for (int l = 0; l < 32; ++l)
    for (int q = 0; q < 4; ++q) std::memcpy(&regs[l][q], smem.data() + addr[8 * q + l / 4] + 4 * (l % 4), 4);
}
static void expect_conflict_free_16B(const int (&addr)[32], const char* what) {
  for (int phase = 0; phase < 4; ++phase) {
    std::set<int> groups;
    for (int i = 0; i < 8; ++i) groups.insert((addr[8 * phase + i] % 128) / 16);
    EXPECT(groups.size() == 8, "%s: ldmatrix phase %d hits a 16-byte bank group twice", what, phase);
  }
}

// The PTX definitions, written independently of the kernel's index functions.
// Dense A tile (16 rows x KD) an mma.sp sees from lanes' A registers and metadata words.
static void ptx_sparse_a(const uint32_t (&a)[32][4], const uint32_t (&e)[32], int elem_bytes,
                         std::vector<double>& A /* 16 x KD */) {
  const int kd = 64 / elem_bytes;  // dense k of one instruction: 32 (16-bit) or 64 (8-bit)
  const int per_word = 4 / elem_bytes;
  A.assign(16 * kd, 0.0);
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1);
      const int word = t + 4 * (r >> 1);  // compressed 32-bit word of the row
      for (int j = 0; j < per_word; ++j) {
        const int ce = word * per_word + j;  // compressed element index in the row
        const int chunk = ce / 2, slot = ce % 2;
        // Which lane and bits hold the nibble of (row, chunk):
        int src_lane, shift;
        if (elem_bytes == 2) {  // m16n8k32: lane (row % 8, chunk / 4), bits 16 (row >= 8) + 4 (chunk % 4)
          src_lane = 4 * (row % 8) + chunk / 4;
          shift = 16 * (row / 8) + 4 * (chunk % 4);
        } else {  // m16n8k64: lane (row % 8, (row >= 8) + 2 (chunk / 8)), bits 4 (chunk % 8)
          src_lane = 4 * (row % 8) + (row / 8) + 2 * (chunk / 8);
          shift = 4 * (chunk % 8);
        }
        const int nibble = (e[src_lane] >> shift) & 0xF;
        const int idx = slot == 0 ? (nibble & 3) : (nibble >> 2);
        uint8_t bytes[4];
        std::memcpy(bytes, &a[l][r], 4);
        A[row * kd + 4 * chunk + idx] += element(bytes, j, elem_bytes);
      }
    }
  }
}
// Dense B tile (KD x 8 tokens) from lanes' B registers: b_r = X[g][word 4r + t].
static void ptx_dense_b(const uint32_t (&b)[32][4], int elem_bytes, std::vector<double>& B /* 8 x KD */) {
  const int kd = 64 / elem_bytes, per_word = 4 / elem_bytes;
  B.assign(8 * kd, 0.0);
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      uint8_t bytes[4];
      std::memcpy(bytes, &b[l][r], 4);
      for (int j = 0; j < per_word; ++j) B[g * kd + (4 * r + t) * per_word + j] = element(bytes, j, elem_bytes);
    }
  }
}

// kCodes: int8 codes (c.elem_bytes == 1) staged and widened to bf16 for a 16-bit tile, as the
// kernel does for int8 values with bf16 / fp16 activations.
template <class Cfg, bool kCodes = false>
static void replay(const Case& c, std::mt19937& rng, const char* name) {
  constexpr int E = Cfg::kElemBytes;
  const int kstage = dense_k_per_stage(E), kd = kstage / kKSteps;
  const int kpad = (c.k + kstage - 1) / kstage * kstage, k_stages = kpad / kstage;
  const int m = 37;  // tokens: one full and one partial tile for the small shapes
  std::vector<uint8_t> values, meta;
  pad_case(c, kpad, values, meta);
  const int ld_v = kpad / 2 * c.elem_bytes, ld_m = kpad / 8, ld_x = kpad * E;
  // x: small integers (exact in bf16 and s8), zero padding past K.
  std::uniform_int_distribution<int> dist(-8, 8);
  std::vector<uint8_t> x(static_cast<size_t>(m) * ld_x, 0);
  std::vector<float> xf(static_cast<size_t>(m) * c.k);
  for (int t = 0; t < m; ++t)
    for (int kk = 0; kk < c.k; ++kk) {
      const int v = dist(rng);
      xf[t * c.k + kk] = static_cast<float>(v);
      if (E == 1) {
        x[t * ld_x + kk] = static_cast<uint8_t>(static_cast<int8_t>(v));
      } else {
        const uint16_t bits = float_to_bf16_exact(static_cast<float>(v));
        std::memcpy(x.data() + t * ld_x + 2 * kk, &bits, 2);
      }
    }

  std::vector<uint8_t> vt(Cfg::kValueTileBytes), xt(Cfg::kXTileBytes), mt(Cfg::kMetaTileBytes);
  std::vector<uint8_t> conv(Cfg::kConvTileBytes);
  for (int n0 = 0; n0 < c.n; n0 += Cfg::kBA) {
    for (int m0 = 0; m0 < m; m0 += Cfg::kBB) {
      std::vector<double> out(static_cast<size_t>(Cfg::kBA) * Cfg::kBB, 0.0);
      std::vector<int> covered(out.size(), 0);
      for (int warp = 0; warp < Cfg::kThreads / 32; ++warp) {
        const int warp_a = warp / Cfg::kWarpsB, warp_b = warp % Cfg::kWarpsB;
        for (int i = 0; i < Cfg::kAT; ++i)
          for (int j = 0; j < Cfg::kBT; ++j)
            for (int l = 0; l < 32; ++l)
              for (int r = 0; r < 4; ++r)
                ++covered[acc_channel<Cfg>(warp_a, i, l, r) * Cfg::kBB + acc_token<Cfg>(warp_b, j, l, r)];
      }
      for (int v : covered) EXPECT(v == 1, "%s: an output of the CTA tile is owned %d times", name, v);

      for (int kt = 0; kt < k_stages; ++kt) {
        // load_stage: every thread's copies; zero fill past N / M.
        std::vector<int> wv(vt.size(), 0), wx(xt.size(), 0), wm(mt.size(), 0);
        for (int tid = 0; tid < Cfg::kThreads; ++tid) {
          for (int i = 0; !kCodes && i < Cfg::kValueCopies / Cfg::kThreads; ++i) {
            const int cc = tid + i * Cfg::kThreads, r = value_copy_row(cc), ch = value_copy_chunk(cc);
            const int dst = value_offset(r, ch);
            if (n0 + r < c.n) std::memcpy(&vt[dst], &values[(n0 + r) * ld_v + kt * kValueBytesPerStage + ch * 16], 16);
            else std::memset(&vt[dst], 0, 16);
            for (int b = 0; b < 16; ++b) ++wv[dst + b];
          }
          for (int i = 0; kCodes && i < Cfg::kCodeCopies / Cfg::kThreads; ++i) {
            const int cc = tid + i * Cfg::kThreads, r = code_copy_row(cc), ch = code_copy_chunk(cc);
            const int dst = value_offset(r, ch);
            if (n0 + r < c.n) std::memcpy(&vt[dst], &values[(n0 + r) * ld_v + kt * kValueBytesPerStage / 2 + ch * 16], 16);
            else std::memset(&vt[dst], 0, 16);
            for (int b = 0; b < 16; ++b) ++wv[dst + b];
          }
          for (int i = 0; i < Cfg::kXCopies / Cfg::kThreads; ++i) {
            const int cc = tid + i * Cfg::kThreads, r = x_copy_row(cc), ch = x_copy_chunk(cc);
            const int dst = x_offset(r, ch);
            if (m0 + r < m) std::memcpy(&xt[dst], &x[(m0 + r) * ld_x + kt * kXBytesPerStage + ch * 16], 16);
            else std::memset(&xt[dst], 0, 16);
            for (int b = 0; b < 16; ++b) ++wx[dst + b];
          }
          for (int r = tid; r < Cfg::kBA; r += Cfg::kThreads) {
            const int dst = meta_offset(r, 0, Cfg::kMetaBytes);
            if (n0 + r < c.n) std::memcpy(&mt[dst], &meta[(n0 + r) * ld_m + kt * Cfg::kMetaBytes], Cfg::kMetaBytes);
            else std::memset(&mt[dst], 0, Cfg::kMetaBytes);
            for (int b = 0; b < Cfg::kMetaBytes; ++b) ++wm[dst + b];
          }
        }
        if (kCodes) {  // the widening pass: every thread's code chunks into the conversion tile
          std::vector<int> wc(conv.size(), 0);
          for (int cc = 0; cc < Cfg::kCodeCopies; ++cc) {
            const int r = code_copy_row(cc), ch = code_copy_chunk(cc);
            for (int j = 0; j < 16; ++j) {
              const float f = static_cast<float>(static_cast<int8_t>(vt[value_offset(r, ch) + j]));
              const uint16_t bits = float_to_bf16_exact(f);
              const int dst = widened_offset(r, ch, j / 8) + 2 * (j % 8);
              std::memcpy(&conv[dst], &bits, 2);
              ++wc[dst];
              ++wc[dst + 1];
            }
          }
          for (int v : wc) EXPECT(v == 1, "%s: a conversion tile byte written %d times", name, v);
          int staged = 0;
          for (int v : wv) staged += v;
          EXPECT(staged == Cfg::kBA * 32, "%s: %d code bytes staged, want %d", name, staged, Cfg::kBA * 32);
          for (int v : wv) EXPECT(v <= 1, "%s: a staged code byte written %d times", name, v);
        } else if (kt == 0) {
          for (int v : wv) EXPECT(v == 1, "%s: a values tile byte written %d times", name, v);
          for (int v : wx) EXPECT(v == 1, "%s: an x tile byte written %d times", name, v);
          for (int v : wm) EXPECT(v == 1, "%s: a meta tile byte written %d times", name, v);
        }

        for (int warp = 0; warp < Cfg::kThreads / 32; ++warp) {
          const int warp_a = warp / Cfg::kWarpsB, warp_b = warp % Cfg::kWarpsB;
          for (int kstep = 0; kstep < kKSteps; ++kstep) {
            const int kbase = kt * kstage + kstep * kd;  // dense column of the step's first k
            for (int i = 0; i < Cfg::kAT; ++i) {
              int addr[32];
              for (int l = 0; l < 32; ++l) addr[l] = a_fragment_offset<Cfg>(warp_a, i, l, kstep);
              expect_conflict_free_16B(addr, name);
              uint32_t a[32][4], e[32];
              ldmatrix_x4(kCodes ? conv : vt, addr, a);
              for (int l = 0; l < 32; ++l) {
                uint16_t lo, hi;
                std::memcpy(&lo, &mt[meta_half_offset<Cfg>(warp_a, i, l, kstep, 0)], 2);
                std::memcpy(&hi, &mt[meta_half_offset<Cfg>(warp_a, i, l, kstep, 1)], 2);
                e[l] = lo | (static_cast<uint32_t>(hi) << 16);
                const uint32_t bad = sanitize_meta_word(e[l]);
                const bool lo_real = n0 + meta_half_row<Cfg>(warp_a, i, l, 0) < c.n;
                const bool hi_real = n0 + meta_half_row<Cfg>(warp_a, i, l, 1) < c.n;
                EXPECT(!((bad & 0x4444u) && lo_real) && !((bad >> 16) && hi_real),
                       "%s: packed meta flagged invalid (channel tile %d, lane %d)", name, n0, l);
              }
              std::vector<double> A;
              ptx_sparse_a(a, e, E, A);
              // The rebuilt tile must be the unpacked weight (zeros past K and past N).
              for (int row = 0; row < 16; ++row) {
                const int ch = n0 + warp_a * Cfg::kWA + i * 16 + row;
                for (int kk = 0; kk < kd; ++kk) {
                  const int col = kbase + kk;
                  const double want = (ch < c.n && col < c.k) ? c.dense[static_cast<size_t>(ch) * c.k + col] : 0.0;
                  EXPECT(A[row * kd + kk] == want, "%s: A[%d][%d] = %g, unpack() has %g", name, ch, col,
                         A[row * kd + kk], want);
                }
              }
              for (int j = 0; j < Cfg::kBT; ++j) {
                int baddr[32];
                for (int l = 0; l < 32; ++l) baddr[l] = b_fragment_offset<Cfg>(warp_b, j, l, kstep);
                expect_conflict_free_16B(baddr, name);
                uint32_t b[32][4];
                ldmatrix_x4(xt, baddr, b);
                std::vector<double> B;
                ptx_dense_b(b, E, B);
                for (int tok = 0; tok < 8; ++tok) {
                  const int token = m0 + warp_b * Cfg::kWB + j * 8 + tok;
                  for (int kk = 0; kk < kd; ++kk) {
                    const int col = kbase + kk;
                    const double want = (token < m && col < c.k) ? xf[static_cast<size_t>(token) * c.k + col] : 0.0;
                    EXPECT(B[tok * kd + kk] == want, "%s: B fragment token %d col %d", name, token, col);
                  }
                }
                // mma: D[row][tok] += sum_k A[row][k] B[tok][k]; lane l's accumulator r.
                for (int l = 0; l < 32; ++l)
                  for (int r = 0; r < 4; ++r) {
                    const int row = l / 4 + (r >= 2 ? 8 : 0), tok = 2 * (l % 4) + (r & 1);
                    double s = 0;
                    for (int kk = 0; kk < kd; ++kk) s += A[row * kd + kk] * B[tok * kd + kk];
                    out[acc_channel<Cfg>(warp_a, i, l, r) * Cfg::kBB + acc_token<Cfg>(warp_b, j, l, r)] += s;
                  }
              }
            }
          }
        }
      }
      // Epilogue mapping: out[token][channel] = sum_k W[channel][k] x[token][k].
      for (int ch = 0; ch < Cfg::kBA && n0 + ch < c.n; ++ch)
        for (int tok = 0; tok < Cfg::kBB && m0 + tok < m; ++tok) {
          double want = 0;
          for (int kk = 0; kk < c.k; ++kk)
            want += static_cast<double>(c.dense[static_cast<size_t>(n0 + ch) * c.k + kk]) * xf[(m0 + tok) * c.k + kk];
          EXPECT(out[ch * Cfg::kBB + tok] == want, "%s: out[%d][%d] = %g, want %g", name, m0 + tok, n0 + ch,
                 out[ch * Cfg::kBB + tok], want);
        }
    }
  }
}

static void check_sanitize() {
  for (int pos = 0; pos < 8; ++pos)
    for (int nib = 0; nib < 16; ++nib) {
      const uint32_t base = 0x84848484u;  // every other nibble valid: 0x4 (0,1) and 0x8 (0,2)
      uint32_t w = (base & ~(0xFu << (4 * pos))) | (static_cast<uint32_t>(nib) << (4 * pos));
      const uint32_t orig = w;
      const bool valid = (nib & 3) < (nib >> 2);
      const uint32_t bad = sanitize_meta_word(w);
      EXPECT(bad == (valid ? 0u : 0x4u << (4 * pos)), "sanitize: nibble %x at %d flagged %08x", nib, pos, bad);
      EXPECT(w == (valid ? orig : (orig & ~(0xFu << (4 * pos))) | (0x4u << (4 * pos))),
             "sanitize: nibble %x at %d rewritten to %08x", nib, pos, w);
    }
}

static bool read_cases(const char* path, std::vector<Case>& cases) {
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  int32_t hdr[3];
  while (std::fread(hdr, 4, 3, f) == 3) {
    Case c;
    c.elem_bytes = hdr[0], c.n = hdr[1], c.k = hdr[2];
    const int groups = (c.k + 3) / 4;
    c.values.resize(static_cast<size_t>(c.n) * 2 * groups * c.elem_bytes);
    c.meta.resize(static_cast<size_t>(c.n) * ((groups + 1) / 2));
    c.dense.resize(static_cast<size_t>(c.n) * c.k);
    if (std::fread(c.values.data(), 1, c.values.size(), f) != c.values.size() ||
        std::fread(c.meta.data(), 1, c.meta.size(), f) != c.meta.size() ||
        std::fread(c.dense.data(), 4, c.dense.size(), f) != c.dense.size()) {
      std::fclose(f);
      return false;
    }
    cases.push_back(std::move(c));
  }
  std::fclose(f);
  return !cases.empty();
}

// The tile shapes of sparse24_mma.cuh (LargeTile / MediumTile / SmallTile).
template <int E>
static void replay_all(const Case& c, std::mt19937& rng) {
  char name[96];
  std::snprintf(name, sizeof(name), "%s N=%d K=%d large", E == 2 ? "bf16" : "s8", c.n, c.k);
  replay<Tile<128, 128, 2, 4, 4, E>>(c, rng, name);
  std::snprintf(name, sizeof(name), "%s N=%d K=%d medium", E == 2 ? "bf16" : "s8", c.n, c.k);
  replay<Tile<64, 64, 2, 2, 4, E>>(c, rng, name);
  std::snprintf(name, sizeof(name), "%s N=%d K=%d small", E == 2 ? "bf16" : "s8", c.n, c.k);
  replay<Tile<32, 16, 2, 1, 8, E>>(c, rng, name);
  if (E == 1) {  // the same int8 codes widened for the bf16 instruction
    std::snprintf(name, sizeof(name), "s8 codes -> bf16 N=%d K=%d large", c.n, c.k);
    replay<Tile<128, 128, 2, 4, 4, 2>, true>(c, rng, name);
    std::snprintf(name, sizeof(name), "s8 codes -> bf16 N=%d K=%d medium", c.n, c.k);
    replay<Tile<64, 64, 2, 2, 4, 2>, true>(c, rng, name);
    std::snprintf(name, sizeof(name), "s8 codes -> bf16 N=%d K=%d small", c.n, c.k);
    replay<Tile<32, 16, 2, 1, 8, 2>, true>(c, rng, name);
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: %s cases.bin\n", argv[0]);
    return 2;
  }
  std::vector<Case> cases;
  if (!read_cases(argv[1], cases)) {
    std::printf("could not read cases from %s\n", argv[1]);
    return 2;
  }
  check_sanitize();
  std::mt19937 rng(1234);
  int counts[3] = {0, 0, 0};
  for (const Case& c : cases) {
    if (c.elem_bytes == 2) replay_all<2>(c, rng);
    else replay_all<1>(c, rng);
    ++counts[c.elem_bytes];
  }
  std::printf("%d bf16 and %d s8 weights replayed over 3 tile shapes (s8 also widened to bf16): %d failures\n",
              counts[2], counts[1], failures);
  return failures == 0 ? 0 : 1;
}
