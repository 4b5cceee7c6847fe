// The online log-sum-exp of csrc/common/logit_math.h (push / merge / log_sum_exp) against a float64
// log-sum-exp with torch.logsumexp's semantics, on the CPU. It is evaluated in the order of the CUDA
// forward kernel (csrc/cuda/epilogue_kernels.cu: 256 threads each push a strided part of the row, an
// xor-shuffle tree merges each warp, thread 0 merges the warps into the running state of earlier class
// chunks) and in the order of the CPU ops (one part per chunk): the GPU's reduction logic is checked
// here, where CI runs, before a GPU ever sees it.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "../common/logit_math.h"
#include "expect.h"

namespace {

namespace lm = marginkern::logit_math;
using State = lm::MaxSumExp<float>;

struct HostMath {
  static float exp(float x) { return std::exp(x); }
  static float tanh(float x) { return std::tanh(x); }
  static float log(float x) { return std::log(x); }
};

constexpr float kInf = std::numeric_limits<float>::infinity();

// torch.logsumexp in float64: NaN if any NaN, +inf if any +inf, −inf if all are −inf (or none).
double reference_lse(const std::vector<float>& z) {
  double m = -INFINITY;
  for (float v : z) {
    if (std::isnan(v)) return NAN;
    m = std::max(m, static_cast<double>(v));
  }
  if (std::isinf(m)) return m;
  double s = 0;
  for (float v : z) s += std::exp(static_cast<double>(v) - m);
  return m + std::log(s);
}

// The CUDA forward kernel's order for one chunk [begin, end) of the row, merged into `running`.
State kernel_order(const std::vector<float>& z, size_t begin, size_t end, State running) {
  constexpr int kThreads = 256, kWarp = 32;
  std::vector<State> part(kThreads, State{-kInf, 0.0f});
  for (int t = 0; t < kThreads; ++t)
    for (size_t j = begin + t; j < end; j += kThreads) part[t] = lm::push<HostMath>(part[t], z[j]);
  for (int w = 0; w < kThreads / kWarp; ++w) {
    State* lane = part.data() + w * kWarp;
    for (int mask = 16; mask > 0; mask >>= 1) {  // every lane reads its partner's value before the step
      std::vector<State> before(lane, lane + kWarp);
      for (int i = 0; i < kWarp; ++i) lane[i] = lm::merge<HostMath>(before[i], before[i ^ mask]);
    }
  }
  for (int w = 0; w < kThreads / kWarp; ++w) running = lm::merge<HostMath>(running, part[w * kWarp]);
  return running;
}

// Chunks of `chunk` classes: the kernel order per chunk, the running state across chunks.
float chunked_kernel_lse(const std::vector<float>& z, size_t chunk) {
  State running{-kInf, 0.0f};
  for (size_t c0 = 0; c0 < z.size(); c0 += chunk) running = kernel_order(z, c0, std::min(z.size(), c0 + chunk), running);
  return lm::log_sum_exp<HostMath>(running);
}

// The plain sequential order: one push per logit.
float pushed_lse(const std::vector<float>& z) {
  State s{-kInf, 0.0f};
  for (float v : z) s = lm::push<HostMath>(s, v);
  return lm::log_sum_exp<HostMath>(s);
}

void check_row(const std::vector<float>& z, const char* what) {
  const double want = reference_lse(z);
  const size_t chunks[] = {z.size() + 1, 7, 1000};
  for (size_t chunk : chunks) {
    for (int order = 0; order < 2; ++order) {
      const float got = order == 0 ? chunked_kernel_lse(z, chunk) : pushed_lse(z);
      const char* how = order == 0 ? "kernel order" : "sequential push";
      if (std::isnan(want) || std::isinf(want)) {
        const bool same = std::isnan(want) ? std::isnan(got) : got == want;
        EXPECT(same, "%s (%s, chunk %zu): lse %g, want %g", what, how, chunk, got, want);
      } else {
        // fp32 accumulation over up to ~5000 terms, each exp within 1 ulp: a few 1e-6 relative to max(|lse|, 1)
        const double err = std::fabs(got - want) / std::max(1.0, std::fabs(want));
        EXPECT(err < 4e-6, "%s (%s, chunk %zu): lse %.9g, want %.9g (error %.2e)", what, how, chunk, got, want, err);
      }
    }
  }
}

void test_random_rows() {
  std::mt19937 rng(1234);
  const size_t lengths[] = {1, 2, 31, 257, 1000, 5003};
  const float scales[] = {1.0f, 30.0f, 300.0f};
  for (size_t n : lengths) {
    for (float scale : scales) {
      std::normal_distribution<float> normal(0.0f, scale);
      std::vector<float> z(n);
      for (float& v : z) v = normal(rng);
      check_row(z, "normal row");
      // a masked vocabulary tail (−inf bias) and a few masked entries scattered in the row
      for (size_t j = n / 2; j < n; j += 3) z[j] = -kInf;
      check_row(z, "row with -inf entries");
    }
  }
}

void test_special_rows() {
  check_row(std::vector<float>(300, -kInf), "all -inf");
  check_row({-kInf}, "one -inf");
  std::vector<float> z(600, 1.0f);
  z[17] = kInf;
  check_row(z, "one +inf");
  z[400] = kInf;
  check_row(z, "two +inf");
  z[5] = -kInf;
  check_row(z, "+inf and -inf");
  std::vector<float> with_nan(600, 2.0f);
  with_nan[300] = std::nanf("");
  check_row(with_nan, "NaN");
  // a new maximum far above the running one: the old sum must scale to 0, not overflow
  std::vector<float> rising(513);
  for (size_t j = 0; j < rising.size(); ++j) rising[j] = -80.0f + 0.31f * static_cast<float>(j);
  check_row(rising, "rising row");
}

void test_logit_and_grad() {
  // z = a·s + b without a softcap; with one, z = cap·tanh((a·s + b)/cap) and dz/da = s·(1 − tanh²)
  const auto plain = lm::logit<HostMath, float, false>(2.0f, 3.0f, 0.5f, 1.0f, 1.0f);
  EXPECT(plain.z == 6.5f && plain.chain == 3.0f, "logit: z %g chain %g", plain.z, plain.chain);
  const float cap = 10.0f;
  const auto capped = lm::logit<HostMath, float, true>(2.0f, 3.0f, 0.5f, cap, 1.0f / cap);
  const double t = std::tanh(0.65);
  EXPECT(std::fabs(capped.z - cap * t) < 1e-5 && std::fabs(capped.chain - 3.0 * (1 - t * t)) < 1e-6,
         "softcapped logit: z %g chain %g", capped.z, capped.chain);
  const float g = lm::grad_of_logit<HostMath>(1.0f, 2.0f, 0.5f, 0.25f, 0.0f);
  EXPECT(std::fabs(g - (0.5 * std::exp(1.0) - 0.25) * 2.0) < 1e-5, "grad_of_logit %g", g);
}

}  // namespace

int main() {
  test_random_rows();
  test_special_rows();
  test_logit_and_grad();
  return expect_exit_status("the online log-sum-exp matches float64 in the CUDA kernel's order and sequentially");
}
