// The C++ tests' one check macro: EXPECT(cond, printf-format, ...) prints the failed condition with a
// message and counts it; a test's main returns expect_failures() != 0. Header-only, no test framework.
#pragma once

#include <cstdio>

inline int& expect_failures() {
  static int failures = 0;
  return failures;
}

#define EXPECT(cond, ...)                                                             \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      ++expect_failures();                                                           \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                             \
      std::fprintf(stderr, "\n");                                                    \
    }                                                                                \
  } while (0)
