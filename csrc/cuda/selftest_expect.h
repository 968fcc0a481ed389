#pragma once
// EXPECT(cond, printf-args): counts a failure in `failures` and prints the first 20, for the CPU
// replays of the CUDA tile layouts (mma_layout_selftest.cpp, sparse24_layout_selftest.cpp).
#include <cstdio>

static int failures = 0;
#define EXPECT(cond, ...)                \
  do {                                   \
    if (!(cond)) {                       \
      if (failures < 20) {               \
        std::printf("FAIL %s: ", #cond); \
        std::printf(__VA_ARGS__);        \
        std::printf("\n");               \
      }                                  \
      ++failures;                        \
    }                                    \
  } while (0)
