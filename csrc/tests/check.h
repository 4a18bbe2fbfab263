// A minimal check macro for the C++ tests: counts failures, prints the first few, and makes
// main() return non-zero.
#pragma once

#include <cstdio>

namespace mgpp_test {
inline int failures = 0;
}

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      if (++mgpp_test::failures <= 20) {                                       \
        std::printf("%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);   \
        std::printf(__VA_ARGS__);                                              \
        std::printf("\n");                                                     \
      }                                                                        \
    }                                                                          \
  } while (0)

#define TEST_MAIN_RESULT()                                                     \
  (mgpp_test::failures == 0                                                    \
       ? (std::printf("all checks passed\n"), 0)                               \
       : (std::printf("%d checks failed\n", mgpp_test::failures), 1))
