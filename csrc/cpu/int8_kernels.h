#pragma once
// Raw-pointer kernel interface shared by the CPU op files (csrc/cpu/<op>.cpp, which include
// torch) and their AVX2 micro-kernels (csrc/cpu/<op>_avx2.cpp, which must not: they are built
// with target("avx2,fma,f16c") function attributes and nothing from torch may inline into them).
#include <cstdint>

namespace sparseq::cpu {

// Output element type of a float epilogue (the x dtype of the linear ops).
enum class OutType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One int8 GEMM problem for the shared core: C[m, n] = sum_k a[m, k] * w[n, k].
// The activation side is given as an unsigned magnitude `a_u` plus, for the sign trick, a sign
// source `a_sign` (a[m,k] = sign(a_sign[m,k]) * a_u[m,k]); with a_sign == nullptr the kernel
// uses a_u directly (the 7-bit "offset" path: a_u = q + 64 <= 127, corrected by a_offset).
// Why two forms: vpmaddubsw(u8, s8) saturates its int16 pair sums; both forms keep every pair
// below 2^15 (|u| <= 128 with |s| <= 127, or u <= 127 with any s8), so the sums stay exact.
struct GemmProblem {
  const uint8_t* a_u = nullptr;    // [m, lda], zero padded to lda = 4 * k_quads
  const int8_t* a_sign = nullptr;  // [m, lda] or nullptr
  int64_t lda = 0;
  const int8_t* w_packed = nullptr;  // n16k4: [ceil(n/16), k_quads, 16, 4]
  int64_t k_quads = 0;
  int64_t m = 0;
  int64_t n = 0;
  // Epilogue. Integer output when c_int32 != nullptr: C = acc (no scaling).
  int32_t* c_int32 = nullptr;
  // Float output otherwise: out = float(acc - a_offset * w_rowsum[n]) * (x_scale[m] * w_scale[n])
  // + bias[n], stored as out_type.
  void* c_out = nullptr;
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
  int32_t a_offset = 0;
  const int32_t* w_rowsum = nullptr;  // needed when a_offset != 0
  const float* x_scale = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;  // may be nullptr
  bool gelu = false;  // float output only: out = GELU(out) (gelu_erf below) before the store
  // Sign-trick path only: set when w holds -128 (sign(a) * -128 wraps), which makes the result
  // inexact; the caller then recomputes with the portable kernel.
  bool check_w_min = false;
};

// Computes rows [m_begin, m_end) x 16-column blocks [nb_begin, nb_end) of `p`, epilogue
// included. Returns false if check_w_min was set and w held -128 somewhere in that range (the
// range's outputs are then not exact).
bool gemm_tiles_avx2(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                     int64_t nb_end);
bool gemm_tiles_portable(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                         int64_t nb_end);
// AVX-512 VNNI (vpdpbusd): exact for any u8 x s8, so it takes the offset form only
// (a_sign == nullptr) with any a_offset; -128 in w needs no check.
bool gemm_tiles_avx512_vnni(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin,
                            int64_t nb_end);

// AMX-INT8 (tdpbusd on 16 x 64-byte tiles): the offset form as VNNI, on an activation operand
// laid out by gemm_activation_layout; row chunks start at multiples of 16.
bool gemm_tiles_amx(const GemmProblem& p, int64_t m_begin, int64_t m_end, int64_t nb_begin, int64_t nb_end);

// Which micro-kernels run the core; chosen per call from the CPU's features, the SPARSEQ_DISABLE_*
// switches (see sparseq/cpu_features.h) and M.
enum class GemmKernel : int { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
GemmKernel best_gemm_kernel(int64_t m);

// Below this many rows the AMX core's 16-row tiles compute mostly padding: VNNI runs instead.
constexpr int64_t kAmxMinRows = 16;

// VNNI and AMX multiply u8 x s8 exactly, so they take the offset form only (a_sign == nullptr).
inline bool takes_offset_form(GemmKernel kernel) {
  return kernel == GemmKernel::kAvx512Vnni || kernel == GemmKernel::kAmx;
}

// The activation operand a kernel reads for m rows of k_quads K-quads: lda bytes per row and
// `rows` rows, zero padded past m rows and 4 * k_quads columns (AMX tiles read 16 rows and 64
// bytes at a time: lda a multiple of 64, rows of 16).
struct ActivationLayout {
  int64_t lda;
  int64_t rows;
};
inline ActivationLayout gemm_activation_layout(GemmKernel kernel, int64_t m, int64_t k_quads) {
  if (kernel == GemmKernel::kAmx) return {(4 * k_quads + 63) / 64 * 64, (m + 15) / 16 * 16};
  return {4 * k_quads, m};
}

// Runs the core over the whole problem with at::parallel_for (defined in int8_gemm.cpp).
// Returns false as gemm_tiles_* does.
bool run_gemm(const GemmProblem& p, GemmKernel kernel);

// dst[r] += sum over i < count of rows[i][r], r < m: the u8 row sums of int8_gemm's correction of
// the sign trick's wrapped -128 products (see int8_gemm.cpp). Any count: partial sums are
// kept in u16 for at most 256 rows (of values <= 255) before they are widened.
void add_u8_rows_avx2(const uint8_t* const* rows, int64_t count, int64_t m, int32_t* dst);

// Per-row symmetric activation quantization, bit-exact with sparseq/_ref.py quantize_per_row:
// absmax (0 -> 1), inv = float(qmax) / absmax, q = round_half_even(x * inv) clamped to +-qmax,
// x_scale = absmax / qmax. With static_scale (int8_linear_static, _ref.quantize_static) the one
// given scale s replaces the per-row one: inv = 1.0f / s, x_scale[m] = s; a scale that is not
// positive and finite with a finite inverse makes every row quantize like a non-finite row.
// Either way a row holding NaN/Inf gets q = 0 and x_scale NaN. Writes row m of the kernel's
// activation operand:
//   a_sign == nullptr: a_u = q + qmax + 1 (the offset form: qmax = 63 for the AVX2 core, whose
//     vpmaddubsw needs a_u <= 127; any qmax for the VNNI core);
//   otherwise a_u = |q|, a_sign = q.
// K is padded to lda with zeros in both (a_u padding is harmless: packed w is zero there).
void quantize_rows_avx2(const void* x, OutType x_type, int64_t k, int64_t m_begin, int64_t m_end,
                        int32_t qmax, uint8_t* a_u, int8_t* a_sign, int64_t lda, float* x_scale,
                        const float* static_scale = nullptr);

// The static quantizer's 1 / s, or 0 when s is unusable (not positive and finite, or its inverse
// overflows): the quantizers then treat every row as non-finite.
inline float static_inverse_scale(float s) {
  const float inv = 1.0f / s;
  return s > 0.0f && s <= 3.4028234663852886e38f && inv <= 3.4028234663852886e38f ? inv : 0.0f;
}

// GELU in its erf form, x * (1 + erf(x / sqrt 2)) / 2, with erf from Abramowitz & Stegun 7.1.28
// (|error| <= 3e-7, no exp): erf(z) = 1 - 1 / (1 + a1 z + ... + a6 z^6)^16 for z >= 0, odd.
// The scalar form of the vector epilogue's (which fuses the multiply-adds).
constexpr float kGeluErfCoeffs[6] = {0.0705230784f, 0.0422820123f, 0.0092705272f,
                                     0.0001520143f, 0.0002765672f, 0.0000430638f};
inline float gelu_erf(float x) {
  const float z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
  float poly = kGeluErfCoeffs[5];
  for (int i = 4; i >= 0; --i) poly = poly * z + kGeluErfCoeffs[i];
  poly = poly * z + 1.0f;
  float p = poly * poly;  // ^2
  p = p * p;              // ^4
  p = p * p;              // ^8
  p = p * p;              // ^16
  const float erf_abs = 1.0f - 1.0f / p;
  return 0.5f * x * (1.0f + (x < 0.0f ? -erf_abs : erf_abs));
}

// Weight-only linear: out[m, n] = sum_k x[m, k] * (w[n, k] * w_scale[n]) + bias[n].
// x_f32 is fp32 [m, ldx] zero padded to ldx = 4 * k_quads.
struct WeightOnlyProblem {
  const float* x = nullptr;
  int64_t ldx = 0;
  const int8_t* w_packed = nullptr;
  int64_t k_quads = 0;
  int64_t m = 0;
  int64_t n = 0;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  void* c_out = nullptr;
  OutType out_type = OutType::kFloat32;
  int64_t ldc = 0;
  bool avx512 = false;  // cpu_has_avx512(): the few-row stream may use zmm
};

// Row chunks with at least this many rows dequantize weight panels (and reuse them over the rows)
// instead of streaming the int8 weight once per row.
constexpr int64_t kWeightOnlyPanelMinRows = 4;

// Rows [m_begin, m_end) x blocks [nb_begin, nb_end). `scratch` holds
// weight_only_scratch_floats(m_end - m_begin) floats (the many-row path's dequantized panel
// slice and partial sums).
int64_t weight_only_scratch_floats(int64_t rows);
void weight_only_tiles_avx2(const WeightOnlyProblem& p, int64_t m_begin, int64_t m_end,
                            int64_t nb_begin, int64_t nb_end, float* scratch);

}  // namespace sparseq::cpu
