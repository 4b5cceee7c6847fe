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

// A test's exit status: 1 with the number of failed checks on stderr, else 0 with `passed` on stdout.
inline int expect_exit_status(const char* passed) {
  if (expect_failures() > 0) {
    std::fprintf(stderr, "%d check(s) failed\n", expect_failures());
    return 1;
  }
  std::printf("%s\n", passed);
  return 0;
}
