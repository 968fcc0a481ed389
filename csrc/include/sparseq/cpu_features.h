#pragma once
// Run-time CPU feature detection: kernels pick their AVX2 path only when the CPU has it, so a
// wheel built anywhere runs everywhere. SPARSEQ_DISABLE_AVX2=1 forces the portable path
// (tests use it to cover every path).
#include <cstdlib>
#include <map>
#include <string>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Whether this compiler builds the AMX core (its intrinsics and __builtin_cpu_supports names came
// with GCC 11 and clang 12); without it the AMX core is never chosen.
#if (defined(__x86_64__) || defined(_M_X64)) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SPARSEQ_AMX_COMPILER 1
#else
#define SPARSEQ_AMX_COMPILER 0
#endif

namespace sparseq {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  // The AVX2 kernels also convert fp16 with F16C (every AVX2 CPU has it, but check).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has && !env_flag("SPARSEQ_DISABLE_AVX2");
#else
  return false;
#endif
}

// AVX-512 (F, BW, VL, DQ) kernels of the sparse ops (*_avx512.cpp): they also call the AVX2
// helpers. SPARSEQ_DISABLE_AVX512=1 falls back to the AVX2 kernels, VNNI's included (tests use it
// to cover both).
inline bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has && cpu_has_avx2_fma() && !env_flag("SPARSEQ_DISABLE_AVX512");
#else
  return false;
#endif
}

// AVX-512 VNNI int8 GEMM core (int8_gemm_vnni.cpp). SPARSEQ_DISABLE_VNNI=1 falls back to the AVX2
// core (tests use it to cover both).
inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has && cpu_has_avx512() && !env_flag("SPARSEQ_DISABLE_VNNI");
#else
  return false;
#endif
}

// AVX-512 VBMI / VBMI2 sliced-ELL W8A8 kernel (sparse_sell_int8_linear_avx512.cpp): vpermb looks
// activations up, vpexpandb spreads the packed entries, vpdpbusd sums them. Ice Lake and later
// Xeons, Zen 4 and later; off with VNNI (and so with SPARSEQ_DISABLE_AVX512 / _VNNI).
inline bool cpu_has_avx512_vbmi2_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
  return has && cpu_has_avx512_vnni();
#else
  return false;
#endif
}

// Whether the OS lets this process use the AMX tile registers: Linux hands out their 8 KiB of
// state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; an AMX instruction
// without it is SIGILL). Asked once, for the whole process.
inline bool os_allows_amx() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool allowed = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return allowed;
#else
  return false;
#endif
}

// AMX-INT8 GEMM core (int8_gemm_amx.cpp), which shares the VNNI core's operand form and epilogue.
// SPARSEQ_DISABLE_AMX=1 (or any switch that turns VNNI off) falls back to VNNI.
inline bool cpu_has_amx_int8() {
#if SPARSEQ_AMX_COMPILER
  static const bool has = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && os_allows_amx();
  return has && cpu_has_avx512_vnni() && !env_flag("SPARSEQ_DISABLE_AMX");
#else
  return false;
#endif
}

inline std::map<std::string, bool> cpu_features_dict() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(_M_X64)
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["f16c"] = __builtin_cpu_supports("f16c");
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512vnni"] = __builtin_cpu_supports("avx512vnni");
  f["avx512vbmi2"] = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2");
#if SPARSEQ_AMX_COMPILER
  f["amx_int8"] = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8");
#endif
#if defined(__GNUC__) && __GNUC__ >= 11
  f["avxvnni"] = __builtin_cpu_supports("avxvnni");
#endif
#endif
  f["avx2_kernels_enabled"] = cpu_has_avx2_fma();
  f["avx512_kernels_enabled"] = cpu_has_avx512();
  f["vnni_kernels_enabled"] = cpu_has_avx512_vnni();
  f["vbmi2_kernels_enabled"] = cpu_has_avx512_vbmi2_vnni();
  f["amx_kernels_enabled"] = cpu_has_amx_int8();
  return f;
}

}  // namespace sparseq
