// The epilogue's own float exp and tanh (row_epilogue.h) against libm in double, including the edges the
// row statistics rely on: ±inf, NaN, underflow to 0 and overflow to inf.
#include <cmath>
#include <cstdio>
#include <limits>

#include "expect.h"
#include "row_epilogue.h"

namespace {

using marginkern::epilogue::exp_simd;
using marginkern::epilogue::tanh_simd;

void test_exp() {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  double worst = 0;
  float worst_at = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -86.5f + 175.2f * static_cast<float>(i) / 2000000.0f;  // the normal range
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(exp_simd(x) - want) / want;
    if (rel > worst) worst = rel, worst_at = x;
  }
  // 3 ulp of float (2^-23 each): the polynomial's ~1 ulp plus the rounding of the reduction.
  EXPECT(worst < 3.6e-7, "exp_simd: relative error %.3e at x = %.9g", worst, worst_at);
  EXPECT(exp_simd(0.0f) == 1.0f, "exp_simd(0) = %.9g", exp_simd(0.0f));
  EXPECT(exp_simd(-kInf) == 0.0f, "exp_simd(-inf) = %g", exp_simd(-kInf));
  EXPECT(exp_simd(-1000.0f) == 0.0f, "exp_simd(-1000) = %g", exp_simd(-1000.0f));
  EXPECT(exp_simd(kInf) == kInf, "exp_simd(inf) = %g", exp_simd(kInf));
  EXPECT(exp_simd(89.0f) == kInf, "exp_simd(89) = %g", exp_simd(89.0f));
  EXPECT(std::isfinite(exp_simd(88.7f)), "exp_simd(88.7) = %g", exp_simd(88.7f));
  EXPECT(std::isnan(exp_simd(std::nanf(""))), "exp_simd(nan) = %g", exp_simd(std::nanf("")));
}

void test_tanh() {
  double worst = 0;
  float worst_at = 0;
  for (int i = 0; i <= 400000; ++i) {
    const float x = -20.0f + 40.0f * static_cast<float>(i) / 400000.0f;
    const double want = std::tanh(static_cast<double>(x));
    const double err = want == 0 ? std::fabs(tanh_simd(x)) : std::fabs(tanh_simd(x) - want) / std::fabs(want);
    if (err > worst) worst = err, worst_at = x;
  }
  // relative, near 0 too (the softcapped logit cap·tanh(z/cap) is cap times this off): 4 ulp of float
  EXPECT(worst < 4.0 * 0x1p-23, "tanh_simd: relative error %.3e at x = %.9g", worst, worst_at);
  for (float x = 1e-30f; x < 1.0f; x *= 1.7f)  // tiny arguments: tanh(x) = x to float's resolution
    EXPECT(std::fabs(tanh_simd(x) - x) <= 2e-7 * x + x * x * x, "tanh_simd(%g) = %.9g", x, tanh_simd(x));
  EXPECT(std::isnan(tanh_simd(std::nanf(""))), "tanh_simd(nan) not nan");
  constexpr float kInf = std::numeric_limits<float>::infinity();
  EXPECT(tanh_simd(kInf) == 1.0f && tanh_simd(-kInf) == -1.0f, "tanh_simd(±inf) = %g, %g", tanh_simd(kInf),
        tanh_simd(-kInf));
  EXPECT(tanh_simd(100.0f) == 1.0f && tanh_simd(-100.0f) == -1.0f, "tanh_simd(±100) not ±1");
}

}  // namespace

int main() {
  test_exp();
  test_tanh();
  return expect_exit_status("exp_simd and tanh_simd match libm");
}
