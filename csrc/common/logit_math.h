// The element math of the engine's epilogue, one definition for the CPU row loops
// (csrc/cpu/row_epilogue.cpp) and the CUDA kernels (csrc/cuda/epilogue_kernels.cu): the logit of a raw
// dot product and its chain factor, dL/da, and the (max, Σ exp) state of an online log-sum-exp with
// torch.logsumexp's ±inf semantics. Formulas in csrc/cpu/streaming_ce.h.
//
// `Math` supplies exp and tanh (and log, for log_sum_exp): the vectorizable polynomials of row_epilogue.h on the CPU, CUDA's
// expf/tanhf on the GPU. Nothing here includes a CUDA or torch header, so both compilers take it.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MARGINKERN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced, so that the CPU loops that call these are compiled inside each ISA clone and vectorize.
#define MARGINKERN_HD __attribute__((always_inline)) inline
#else
#define MARGINKERN_HD inline
#endif

namespace marginkern::logit_math {

template <typename T>
MARGINKERN_HD T infinity() {
  return static_cast<T>(INFINITY);  // a constant expression in host and device code alike
}

template <typename T>
struct LogitAndChain {
  T z, chain;  // the logit and dz/da
};

// z and dz/da for the raw dot product a, the combined row·column scale s and the column bias b; with a
// softcap, z = cap·tanh((a·s + b)/cap). (Returned by value: a reference out-parameter keeps GCC from
// vectorizing the loops.)
template <typename Math, typename T, bool kSoftcap>
MARGINKERN_HD LogitAndChain<T> logit(T a, T s, T b, T cap, T inv_cap) {
  const T z = a * s + b;
  if constexpr (kSoftcap) {
    const T t = Math::tanh(z * inv_cap);
    return {cap * t, s * (T(1) - t * t)};
  } else {
    return {z, s};
  }
}

// dL/da = (weight_p · p − coef_u) · dz/da with p = exp(z − lse); weight_p is coef_p, less the EMO cost
// term when there is one.
// (The logit and chain are passed apart: a struct argument keeps GCC from vectorizing the CPU loop.)
template <typename Math, typename T>
MARGINKERN_HD T grad_of_logit(T z, T chain, T weight_p, T coef_u, T lse) {
  return (weight_p * Math::exp(z - lse) - coef_u) * chain;
}

// Part of a row's log-sum-exp: lse = max + log(sum) with sum = Σ exp(z − max). Empty: (−inf, 0). A part
// that holds +inf is (+inf, 1), so that lse = +inf as in torch.logsumexp; one that holds NaN is
// (NaN, NaN) from then on (a NaN sum under a number max also gives lse NaN).
template <typename T>
struct MaxSumExp {
  T max, sum;
};

template <typename Math, typename T>
MARGINKERN_HD MaxSumExp<T> merge(MaxSumExp<T> a, MaxSumExp<T> b) {
  if (a.max != a.max) return a;  // NaN is sticky: two empty-looking parts must not make it −inf again
  if (b.max != b.max) return b;
  const T m = a.max > b.max ? a.max : b.max;
  if (m == -infinity<T>()) return {m, T(0)};
  if (m == infinity<T>()) return {m, T(1)};
  // exp(−inf − m) = 0 takes care of an empty side
  return {m, a.sum * Math::exp(a.max - m) + b.sum * Math::exp(b.max - m)};
}

// One logit into a running state: a single exp unless z is a new maximum.
template <typename Math, typename T>
MARGINKERN_HD MaxSumExp<T> push(MaxSumExp<T> s, T z) {
  if (z != z) return {z, z};  // NaN
  if (z > s.max) {
    if (z == infinity<T>()) return {z, T(1)};
    const T sum = s.max == -infinity<T>() ? T(0) : s.sum * Math::exp(s.max - z);
    return {z, sum + T(1)};
  }
  if (z == -infinity<T>() || s.max == infinity<T>()) return s;  // adds exp(−inf) = 0 / lse stays +inf
  return {s.max, s.sum + Math::exp(z - s.max)};
}

template <typename Math, typename T>
MARGINKERN_HD T log_sum_exp(MaxSumExp<T> s) {
  return (s.max == -infinity<T>() || s.max == infinity<T>()) ? s.max : s.max + Math::log(s.sum);
}

}  // namespace marginkern::logit_math
