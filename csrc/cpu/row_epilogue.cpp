// Row functions of the epilogue (row_epilogue.h). Each is one or two `omp simd` loops over the row; the
// branches on softcap / cost select a loop once per row, never per element.
#include "row_epilogue.h"

#include <algorithm>

namespace marginkern::epilogue {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
// The float row functions are compiled for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and baseline
// x86-64, and the dynamic loader picks one for the running CPU (an ifunc, hence glibc): the build stays
// portable (no -march) and the epilogue, about as much work as the chunk's GEMM without it, still gets
// wide vectors.
#define MARGINKERN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MARGINKERN_ISA_CLONES
#endif

// Forced, so that the loops are compiled inside each ISA clone instead of called at baseline ISA.
#define MARGINKERN_ALWAYS_INLINE MARGINKERN_HD

template <typename T, bool kSoftcap>
MARGINKERN_ALWAYS_INLINE logit_math::LogitAndChain<T> logit(T a, T s, T b, T cap, T inv_cap) {
  return logit_math::logit<SimdMath, T, kSoftcap>(a, s, b, cap, inv_cap);
}

// The hard-negative re-weighting of a logit and its chain (streaming_ce.h), in place: (α·z + β)·z + γ and
// chain·(2α·z + β) where z > threshold (never for a NaN z or threshold). Both values are computed and selected, so
// that the loop has no branch to keep it from vectorising.
template <typename T>
MARGINKERN_ALWAYS_INLINE void reweight_hard(T& z, T& chain, T threshold, T alpha, T beta, T gamma) {
  const T quadratic = (alpha * z + beta) * z + gamma, slope = T(2) * alpha * z + beta;
  const bool hard = z > threshold;
  chain = hard ? chain * slope : chain;
  z = hard ? quadratic : z;
}

template <typename T, bool kSoftcap, bool kHard>
MARGINKERN_ALWAYS_INLINE void logits_loop(T* row, const ChunkColumns<T>& cols, T row_scale, int target,
                                          T target_logit, T& max_z, T& sum_z, bool& has_nan, T hard_threshold) {
  const int cc = cols.cc;
  const T* scale = cols.scale;
  const T* bias = cols.bias;
  const T cap = cols.softcap, inv_cap = T(1) / cols.softcap;
  const T alpha = cols.hard_alpha, beta = cols.hard_beta, gamma = cols.hard_gamma;
  T m = -std::numeric_limits<T>::infinity();
  T s = 0, nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : s, nans)
  for (int j = 0; j < cc; ++j) {
    T z = logit<T, kSoftcap>(row[j], row_scale * scale[j], bias[j], cap, inv_cap).z;
    if constexpr (kHard) {
      T unused_chain = T(1);
      reweight_hard(z, unused_chain, hard_threshold, alpha, beta, gamma);
    }
    z = j == target ? target_logit : z;
    row[j] = z;
    m = z > m ? z : m;
    s += z;
    nans += z != z ? T(1) : T(0);  // the max skips NaN
  }
  max_z = m;
  sum_z = s;
  has_nan = nans > 0;
}

// (hard negatives come without a softcap: the margin losses; streaming_ce.cpp checks)
template <typename T>
MARGINKERN_ALWAYS_INLINE void logits_row_impl(T* row, const ChunkColumns<T>& cols, T row_scale, int target,
                                              T target_logit, T& max_z, T& sum_z, bool& has_nan, T hard_threshold) {
  if (cols.has_softcap) {
    logits_loop<T, true, false>(row, cols, row_scale, target, target_logit, max_z, sum_z, has_nan, hard_threshold);
  } else if (cols.has_hard) {
    logits_loop<T, false, true>(row, cols, row_scale, target, target_logit, max_z, sum_z, has_nan, hard_threshold);
  } else {
    logits_loop<T, false, false>(row, cols, row_scale, target, target_logit, max_z, sum_z, has_nan, hard_threshold);
  }
}

template <typename T>
MARGINKERN_ALWAYS_INLINE T sum_exp_row_impl(const T* row, int cc, T shift) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < cc; ++j) s += exp_simd(row[j] - shift);
  return s;
}

template <typename T>
MARGINKERN_ALWAYS_INLINE void entropy_part_row_impl(const T* row, int cc, T max_z, T& others, T& gap) {
  T below = 0, at_max = 0, t = 0;
#pragma omp simd reduction(+ : below, at_max, t)
  for (int j = 0; j < cc; ++j) {
    const T d = max_z - row[j];
    const T e = exp_simd(-d);  // 0 for a −inf logit (whose d·e would be inf·0)
    below += row[j] < max_z ? e : T(0);
    at_max += row[j] == max_z ? T(1) : T(0);
    t += e > T(0) ? e * d : T(0);
  }
  others = below + (at_max - T(1));
  gap = t;
}

template <typename T>
MARGINKERN_ALWAYS_INLINE void teacher_part_row_impl(const T* z, T* teacher, int cc, T row_scale, T max_z, T& max_t,
                                                    T& sum_t, T& cross_t, T& cross_s) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < cc; ++j) {
    const T zt = teacher[j] * row_scale;
    teacher[j] = zt;
    m = zt > m ? zt : m;
  }
  // a head whose logits are all −inf in this chunk adds nothing (shift 0: its weights are exp(−inf) = 0)
  const T shift_t = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  const T shift_s = max_z == -std::numeric_limits<T>::infinity() ? T(0) : max_z;
  T st = 0, ct = 0, cs = 0;
#pragma omp simd reduction(+ : st, ct, cs)
  for (int j = 0; j < cc; ++j) {
    const T gap = teacher[j] - z[j];  // z^T − z: ±inf or NaN where a logit is −inf, whose weight is then 0
    const T et = exp_simd(teacher[j] - shift_t), es = exp_simd(z[j] - shift_s);
    st += et;
    ct += et > T(0) ? et * gap : T(0);
    cs -= es > T(0) ? es * gap : T(0);
  }
  max_t = m, sum_t = st, cross_t = ct, cross_s = cs;
}

// log(p/m), m = (1−β)·p + β·q (marginkern.engine.log_ratio_to_mixture: its three forms of d = log q − log p and
// why), `complement` = 1 − β rounded apart. All forms computed and one selected, with the vectorizable float32
// functions of row_epilogue.h, so that the loops vectorize.
template <typename T>
MARGINKERN_ALWAYS_INLINE T log_ratio_to_mixture(T log_p, T log_q, T beta, T complement) {
  const T d = log_q - log_p;
  const bool high = d >= T(80);  // false for NaN, which the general form keeps
  // one comparison per element (GCC vectorizes no && of masks under another select): d < −1 where β > ½
  const bool low = d < (beta > T(0.5) ? T(-1) : -std::numeric_limits<T>::infinity());
  const bool far = high || low;
  const T general = -log1p_simd(beta * expm1_simd(far ? T(0) : d));
  // the two other forms share one exp and one log: −(d or 0) − log(a + b·e^{∓d})
  const T exponent = high ? -d : (low ? d : T(0));
  const T by_parts = -((high ? d : T(0)) + log_simd((high ? beta : complement) + (high ? complement : beta) *
                                                    exp_simd(exponent)));
  return far ? by_parts : general;
}

// A teacher (or student) logit row_scale·dot, rounded as the forward pass rounded it before its log-sum-exp: written
// as a·s + 0, a contraction can only give fma(a, s, 0) = round(a·s), never fma(a, s, −lse), whose unrounded product
// would not match that log-sum-exp (at logits ~1e6, a tiny temperature, log p reached +18).
template <typename T>
MARGINKERN_ALWAYS_INLINE T rounded_logit(T dot, T row_scale) {
  return logit<T, false>(dot, row_scale, T(0), T(1), T(1)).z;
}

template <typename T>
MARGINKERN_ALWAYS_INLINE void jsd_part_row_impl(const T* dots, const T* teacher_dots, int cc, T row_scale, T lse,
                                                T lse_t, T beta, T complement, T& kl_pm, T& kl_qm) {
  T pm = 0, qm = 0;
#pragma omp simd reduction(+ : pm, qm)
  for (int j = 0; j < cc; ++j) {
    const T log_p = rounded_logit(dots[j], row_scale) - lse, log_q = rounded_logit(teacher_dots[j], row_scale) - lse_t;
    const T p = exp_simd(log_p), q = exp_simd(log_q);
    pm += p == T(0) ? T(0) : p * log_ratio_to_mixture(log_p, log_q, beta, complement);
    qm += q == T(0) ? T(0) : q * log_ratio_to_mixture(log_q, log_p, complement, beta);
  }
  kl_pm += pm, kl_qm += qm;
}

template <typename T, bool kSoftcap, bool kCost, bool kEntropy, bool kTeacher, bool kJsd = false, bool kHard = false>
MARGINKERN_ALWAYS_INLINE void grad_loop(T* row, const T* cost_dots, const ChunkColumns<T>& cols,
                                        const RowGradCoefs<T>& k, int target, const T* teacher_dots) {
  const int cc = cols.cc;
  const T* scale = cols.scale;
  const T* bias = cols.bias;
  const T* cost_scale = cols.cost_scale;
  const T cap = cols.softcap, inv_cap = T(1) / cols.softcap;
  const T r = k.row_scale, lse = k.lse, cp = k.coef_p, cu = k.coef_u, tg = k.target_grad, cq = k.cost_coef;
  const T ce = k.entropy_coef, lse_t = k.teacher_lse, c_q = k.coef_q, c_log_q = k.coef_log_q, beta = k.jsd_beta,
          complement = k.jsd_complement;
  const T alpha = cols.hard_alpha, hard_beta = cols.hard_beta, gamma = cols.hard_gamma, threshold = k.hard_threshold;
#pragma omp simd
  for (int j = 0; j < cc; ++j) {
    const logit_math::LogitAndChain<T> zc = logit<T, kSoftcap>(row[j], r * scale[j], bias[j], cap, inv_cap);
    T z = zc.z, chain = zc.chain;  // scalars: a struct modified in the loop keeps GCC from vectorizing it
    if constexpr (kHard) reweight_hard(z, chain, threshold, alpha, hard_beta, gamma);
    T weight_p = cp;
    if constexpr (kCost) weight_p = cp - cq * cost_scale[j] * cost_dots[j];
    T g;
    if constexpr (kEntropy || kTeacher) {  // terms in p·log p and p·log q are 0 where p = 0
      const T log_p = z - lse;
      const T p = exp_simd(log_p);
      T sum = weight_p * p - cu;
      if constexpr (kEntropy) sum -= p > T(0) ? ce * p * log_p : T(0);
      if constexpr (kTeacher && kJsd) {  // coef_log_q·p·log(p/m); 0 where p = 0, NaN where p is
        const T log_q = rounded_logit(teacher_dots[j], r) - lse_t;
        sum += p == T(0) ? T(0) : c_log_q * p * log_ratio_to_mixture(log_p, log_q, beta, complement);
      } else if constexpr (kTeacher) {  // −coef_q·q + coef_log_q·p·log q
        const T log_q = rounded_logit(teacher_dots[j], r) - lse_t;
        // p·log q only where its coefficient is not 0 (forward KL: a −inf teacher logit would give 0·(−inf))
        sum += (p > T(0) && c_log_q != T(0) ? c_log_q * p * log_q : T(0)) - c_q * exp_simd(log_q);
      }
      g = sum * chain;
    } else {
      g = logit_math::grad_of_logit<SimdMath>(z, chain, weight_p, cu, lse);
    }
    row[j] = j == target ? tg : g;
  }
}

// The entropy term comes without a cost term, the teacher's without a cost term or a softcap, and hard negatives
// alone (streaming_ce.cpp checks): one loop instance per combination that a loss uses.
template <typename T>
MARGINKERN_ALWAYS_INLINE void grad_row_impl(T* row, const T* cost_dots, const ChunkColumns<T>& cols,
                                            const RowGradCoefs<T>& coefs, int target, const T* teacher_dots) {
  const bool cost = cost_dots != nullptr;
  if (teacher_dots != nullptr && coefs.has_jsd) {
    grad_loop<T, false, false, false, true, true>(row, cost_dots, cols, coefs, target, teacher_dots);
  } else if (teacher_dots != nullptr) {
    coefs.has_entropy ? grad_loop<T, false, false, true, true>(row, cost_dots, cols, coefs, target, teacher_dots)
                      : grad_loop<T, false, false, false, true>(row, cost_dots, cols, coefs, target, teacher_dots);
  } else if (coefs.has_entropy) {
    cols.has_softcap ? grad_loop<T, true, false, true, false>(row, cost_dots, cols, coefs, target, teacher_dots)
                     : grad_loop<T, false, false, true, false>(row, cost_dots, cols, coefs, target, teacher_dots);
  } else if (cols.has_hard) {  // the margin losses: no softcap, cost term or other term beside it
    grad_loop<T, false, false, false, false, false, true>(row, cost_dots, cols, coefs, target, teacher_dots);
  } else if (cols.has_softcap) {
    cost ? grad_loop<T, true, true, false, false>(row, cost_dots, cols, coefs, target, teacher_dots)
         : grad_loop<T, true, false, false, false>(row, cost_dots, cols, coefs, target, teacher_dots);
  } else {
    cost ? grad_loop<T, false, true, false, false>(row, cost_dots, cols, coefs, target, teacher_dots)
         : grad_loop<T, false, false, false, false>(row, cost_dots, cols, coefs, target, teacher_dots);
  }
}

template <typename T>
MARGINKERN_ALWAYS_INLINE void reduce_subcenters_row_impl(const T* row, const T* scale, int cc, int K, T* best,
                                                         int32_t* winner) {
  // offsets in int64: a chunk's cc·K columns may pass 2^31 (the C++ API's class_chunk bounds cc alone)
#pragma omp simd
  for (int j = 0; j < cc; ++j) {
    const int64_t at = static_cast<int64_t>(j) * K;
    best[j] = row[at] * scale[at];
    winner[j] = 0;
  }
  for (int k = 1; k < K; ++k) {
#pragma omp simd
    for (int j = 0; j < cc; ++j) {
      const int64_t at = static_cast<int64_t>(j) * K + k;
      const T candidate = row[at] * scale[at];
      const T top = best[j];
      // the first of equal ones stays; a NaN wins and stays
      const bool better = candidate > top || (candidate != candidate && top == top);
      best[j] = better ? candidate : top;
      winner[j] = better ? k : winner[j];
    }
  }
}

template <typename T>
MARGINKERN_ALWAYS_INLINE void expand_subcenters_row_impl(const T* g, const int32_t* winner, const T* scale, int cc,
                                                         int K, int target, int64_t target_subcenter, T* out) {
  std::fill(out, out + static_cast<int64_t>(cc) * K, T(0));
  for (int j = 0; j < cc; ++j) {
    const int64_t at = static_cast<int64_t>(j) * K + winner[j];
    out[at] = g[j] * scale[at];
  }
  if (target >= 0) {  // the target's gradient, as it is, at the sub-centre its logit came from
    out[static_cast<int64_t>(target) * K + winner[target]] = T(0);
    out[static_cast<int64_t>(target) * K + target_subcenter] = g[target];
  }
}

}  // namespace

MARGINKERN_ISA_CLONES void reduce_subcenters_row(const float* row, const float* scale, int cc, int K, float* best,
                                                 int32_t* winner) {
  reduce_subcenters_row_impl(row, scale, cc, K, best, winner);
}

void reduce_subcenters_row(const double* row, const double* scale, int cc, int K, double* best, int32_t* winner) {
  reduce_subcenters_row_impl(row, scale, cc, K, best, winner);
}

void expand_subcenters_row(const float* g, const int32_t* winner, const float* scale, int cc, int K, int target,
                           int64_t target_subcenter, float* out) {
  expand_subcenters_row_impl(g, winner, scale, cc, K, target, target_subcenter, out);
}

void expand_subcenters_row(const double* g, const int32_t* winner, const double* scale, int cc, int K, int target,
                           int64_t target_subcenter, double* out) {
  expand_subcenters_row_impl(g, winner, scale, cc, K, target, target_subcenter, out);
}

MARGINKERN_ISA_CLONES void logits_row(float* row, const ChunkColumns<float>& cols, float row_scale,
                                      int target, float target_logit, float& max_z, float& sum_z,
                                      bool& has_nan, float hard_threshold) {
  logits_row_impl(row, cols, row_scale, target, target_logit, max_z, sum_z, has_nan, hard_threshold);
}

void logits_row(double* row, const ChunkColumns<double>& cols, double row_scale, int target,
                double target_logit, double& max_z, double& sum_z, bool& has_nan, double hard_threshold) {
  logits_row_impl(row, cols, row_scale, target, target_logit, max_z, sum_z, has_nan, hard_threshold);
}

MARGINKERN_ISA_CLONES float sum_exp_row(const float* row, int cc, float shift) {
  return sum_exp_row_impl(row, cc, shift);
}

double sum_exp_row(const double* row, int cc, double shift) { return sum_exp_row_impl(row, cc, shift); }

MARGINKERN_ISA_CLONES void entropy_part_row(const float* row, int cc, float max_z, float& others, float& gap) {
  entropy_part_row_impl(row, cc, max_z, others, gap);
}

void entropy_part_row(const double* row, int cc, double max_z, double& others, double& gap) {
  entropy_part_row_impl(row, cc, max_z, others, gap);
}

MARGINKERN_ISA_CLONES void grad_row(float* row, const float* cost_dots, const ChunkColumns<float>& cols,
                                    const RowGradCoefs<float>& coefs, int target, const float* teacher_dots) {
  grad_row_impl(row, cost_dots, cols, coefs, target, teacher_dots);
}

void grad_row(double* row, const double* cost_dots, const ChunkColumns<double>& cols,
              const RowGradCoefs<double>& coefs, int target, const double* teacher_dots) {
  grad_row_impl(row, cost_dots, cols, coefs, target, teacher_dots);
}

MARGINKERN_ISA_CLONES void teacher_part_row(const float* z, float* teacher, int cc, float row_scale, float max_z,
                                            float& max_t, float& sum_t, float& cross_t, float& cross_s) {
  teacher_part_row_impl(z, teacher, cc, row_scale, max_z, max_t, sum_t, cross_t, cross_s);
}

void teacher_part_row(const double* z, double* teacher, int cc, double row_scale, double max_z, double& max_t,
                      double& sum_t, double& cross_t, double& cross_s) {
  teacher_part_row_impl(z, teacher, cc, row_scale, max_z, max_t, sum_t, cross_t, cross_s);
}

MARGINKERN_ISA_CLONES void jsd_part_row(const float* dots, const float* teacher_dots, int cc, float row_scale,
                                        float lse, float lse_t, float beta, float complement, float& kl_pm,
                                        float& kl_qm) {
  jsd_part_row_impl(dots, teacher_dots, cc, row_scale, lse, lse_t, beta, complement, kl_pm, kl_qm);
}

void jsd_part_row(const double* dots, const double* teacher_dots, int cc, double row_scale, double lse, double lse_t,
                  double beta, double complement, double& kl_pm, double& kl_qm) {
  jsd_part_row_impl(dots, teacher_dots, cc, row_scale, lse, lse_t, beta, complement, kl_pm, kl_qm);
}

}  // namespace marginkern::epilogue
