// The per-row work after each class chunk's GEMM (the "epilogue"), shared by the CPU ops of
// streaming_ce.cpp. A row here is one row of the N × chunk buffer: the raw dot products a_j = x_n · w_j
// of classes c0 + j, j < cc, overwritten in place. See streaming_ce.h for the math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/logit_math.h"

namespace marginkern::epilogue {

// The bits of a float and back. Not std::bit_cast: it is C++20, and torch's cpp_extension compiles with
// -std=c++17 before torch 2.13 (setup.py supports torch >= 2.6). GCC turns the 4-byte memcpy into a register
// move, so `omp simd` loops over these still vectorize.
MARGINKERN_HD int32_t float_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
MARGINKERN_HD float float_from_bits(int32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// exp(x) = 2^n · e^r, n = round(x·log2 e), |r| ≤ ln2/2 (Cody–Waite), e^r by Cephes' expf polynomial:
// about 1 ulp. Plain arithmetic and bit operations, so that `omp simd` loops vectorize it (libm's expf
// only vectorizes under -ffast-math, which would also break the ±inf handling of the row statistics).
// Results below e^-86.6 (≈ 2^-125) flush to 0: far below the fp32 resolution of a sum of exponentials
// that contains its own maximum (≥ 1).
MARGINKERN_HD float exp_simd(float x) {
  constexpr float kMin = -86.6f;         // keeps 2^(n−1) a normal number
  constexpr float kMax = 88.72f;         // e^88.72 ≈ FLT_MAX
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding then subtracting it rounds to an integer
  float xc = x < kMin ? kMin : x;        // NaN passes through both clamps
  xc = xc > kMax ? kMax : xc;
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - n * 0.693359375f;  // ln 2 in two parts, so that n·ln 2 loses nothing
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  // 2^(n−1) from its exponent bits, times 2 afterwards: near kMax n is 128, and 2^128 is not a float.
  const float half_scale = float_from_bits((static_cast<int32_t>(n) + 126) << 23);
  float y = er * half_scale * 2.0f;
  y = x < kMin ? 0.0f : y;
  y = x > kMax ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// tanh(x) within 3 ulp (relative): 1 − 2/(e^{2x} + 1) for |x| ≥ 0.625 (exact limits ±1, NaN stays NaN); below,
// where that form's absolute error (~1e-7) is large against tanh itself, the Taylor series to x¹⁷ (≤ 1.3 ulp; the
// next term is < 6e-8 relative at 0.625). The softcapped logit cap·tanh(z/cap) needs the relative accuracy: with
// the absolute one alone it was cap·1e-7 off (1e-3 at cap = 1e4; 6 ulp of z at Gemma-2's cap of 30).
MARGINKERN_HD float tanh_simd(float x) {
  const float x2 = x * x;
  const float series =
      x * (1.0f + x2 * (-0.33333334f + x2 * (0.13333334f + x2 * (-0.053968254f + x2 * (0.021869488f + x2 * (
               -0.008863236f + x2 * (0.0035921279f + x2 * (-0.0014558344f + x2 * 0.00059002743f))))))));
  const float formula = 1.0f - 2.0f / (exp_simd(2.0f * x) + 1.0f);
  return std::fabs(x) < 0.625f ? series : formula;
}

// 2·atanh(s) = log((1 + s)/(1 − s)) by its series to s¹¹, for |s| ≤ 1/5.8 (the remainder, 2s·s¹²/13, is below
// float32's resolution there): the core of log_simd and log1p_simd.
MARGINKERN_HD float twice_atanh_series(float s) {
  const float s2 = s * s;
  return 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11))))));
}

// log(x), within 2 ulp: x = m·2^e with m in [√½, √2) from the exponent bits, log m = 2·atanh((m − 1)/(m + 1)),
// |s| ≤ 0.172. Plain arithmetic and bit operations, so that `omp simd` loops vectorize it, as exp_simd.
// log(0) = −inf, log(x < 0) = NaN, log(+inf) = +inf, NaN stays NaN; subnormals are taken as 0 (−inf): far below
// anything the losses' sums resolve.
MARGINKERN_HD float log_simd(float x) {
  const int32_t bits = float_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = float_from_bits((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1 : e;
  float y = static_cast<float>(e) * 0.693147180559945f + twice_atanh_series((m - 1.0f) / (m + 1.0f));
  y = x < std::numeric_limits<float>::min() ? -std::numeric_limits<float>::infinity() : y;  // 0 and subnormals
  y = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
  y = x == std::numeric_limits<float>::infinity() ? x : y;
  return x != x ? x : y;
}

// log(1 + y) without cancellation near 0: 2·atanh(y/(2 + y)) where |y| < 0.25 (|s| < 1/7), log_simd(1 + y)
// elsewhere.
MARGINKERN_HD float log1p_simd(float y) {
  const bool small = std::fabs(y) < 0.25f;  // one comparison: GCC vectorizes no && of masks under another select
  const float t = small ? y : 0.0f;
  return small ? twice_atanh_series(t / (2.0f + t)) : log_simd(1.0f + y);
}

// e^x − 1 without cancellation near 0: its Taylor series to x⁸ where |x| < 0.5 (remainder x⁹/9! below float32's
// resolution of the result), exp_simd(x) − 1 elsewhere (±inf and NaN as that gives them).
MARGINKERN_HD float expm1_simd(float x) {
  const bool small = std::fabs(x) < 0.5f;
  const float t = small ? x : 0.0f;
  const float series =
      t * (1.0f + t * (1.0f / 2 + t * (1.0f / 6 + t * (1.0f / 24 + t * (1.0f / 120 + t * (1.0f / 720 + t * (1.0f / 5040
      + t * (1.0f / 40320))))))));
  return small ? series : exp_simd(x) - 1.0f;
}

// float64 stays on libm: exactness over speed.
inline double exp_simd(double x) { return std::exp(x); }
inline double tanh_simd(double x) { return std::tanh(x); }
inline double log_simd(double x) { return std::log(x); }
inline double log1p_simd(double x) { return std::log1p(x); }
inline double expm1_simd(double x) { return std::expm1(x); }

// The `Math` of logit_math.h on the CPU.
struct SimdMath {
  template <typename T>
  MARGINKERN_HD static T exp(T x) { return exp_simd(x); }
  template <typename T>
  MARGINKERN_HD static T tanh(T x) { return tanh_simd(x); }
  template <typename T>
  MARGINKERN_HD static T log(T x) { return std::log(x); }
};

// What a row's logits need from the class chunk: length-cc column vectors (ones / zeros when the spec
// has no col_scale / bias, so that one branch-free loop serves every case) and the softcap.
template <typename T>
struct ChunkColumns {
  int cc;                  // classes in the chunk
  const T* scale;          // col_scale[c0:c1]
  const T* bias;           // bias[c0:c1]
  const T* cost_scale;     // key_scale[c0:c1] of the EMO cost term, or nullptr without it
  bool has_softcap;
  T softcap;
  // the hard-negative re-weighting (streaming_ce.h): z ← (α·z + β)·z + γ where z exceeds the row's threshold
  bool has_hard = false;
  T hard_alpha = 0, hard_beta = 1, hard_gamma = 0;
};

// What the backward epilogue needs from row n.
template <typename T>
struct RowGradCoefs {
  T row_scale, lse, coef_p, coef_u, target_grad;
  T cost_coef;          // coef_cost_n · query_scale_n (EMO), 0 without a cost term
  T entropy_coef = 0;   // the entropy term's coefficient (streaming_ce.h), read only when has_entropy
  bool has_entropy = false;
  // distillation's teacher term (streaming_ce.h), read only with a teacher_dots row: its lse and coefficients
  T teacher_lse = 0, coef_q = 0, coef_log_q = 0;
  // the generalized JSD's term coef_log_q·p·log(p/m) instead of the KL one (streaming_ce.h), m = (1−β)p + βq;
  // jsd_complement = 1 − β, rounded apart from β
  T jsd_beta = 0, jsd_complement = 1;
  bool has_jsd = false;
  // the row's hard-negative threshold, read only with cols.has_hard (the margin losses: no other term beside it)
  T hard_threshold = std::numeric_limits<T>::infinity();
};

// Forward: z_j in place of a_j (the target column, if 0 ≤ target < cc, becomes target_logit; with cols.has_hard
// the others above hard_threshold are re-weighted first); returns max_j z_j over the non-NaN z in `max_z`, Σ_j z_j
// in `sum_z` and whether any z is NaN.
void logits_row(float* row, const ChunkColumns<float>& cols, float row_scale, int target,
                float target_logit, float& max_z, float& sum_z, bool& has_nan,
                float hard_threshold = std::numeric_limits<float>::infinity());
void logits_row(double* row, const ChunkColumns<double>& cols, double row_scale, int target,
                double target_logit, double& max_z, double& sum_z, bool& has_nan,
                double hard_threshold = std::numeric_limits<double>::infinity());

// Σ_j exp(z_j − shift).
float sum_exp_row(const float* row, int cc, float shift);
double sum_exp_row(const double* row, int cc, double shift);

// The entropy statistics (streaming_ce.h) of a row of cc logits already in place, relative to its max
// max_z (finite): `others` = Σ_j e^{z_j − max_z} without one cell at the max (the cells below it, plus the
// count at it minus one: never 1 + small − 1), `gap` = Σ_j e^{z_j − max_z}·(max_z − z_j); both ≥ 0.
void entropy_part_row(const float* row, int cc, float max_z, float& others, float& gap);
void entropy_part_row(const double* row, int cc, double max_z, double& others, double& gap);

// Distillation's forward statistics of a row (streaming_ce.h): the student's logits z (in place, max max_z, not +inf)
// and the teacher's raw dot products, which become its logits z^T = row_scale·dot in place; returns the
// teacher's max, and with it Σ_j e^{z^T_j − max^T}, Σ_j e^{z^T_j − max^T}·(z^T_j − z_j) and
// Σ_j e^{z_j − max_z}·(z_j − z^T_j).
void teacher_part_row(const float* z, float* teacher, int cc, float row_scale, float max_z, float& max_t,
                      float& sum_t, float& cross_t, float& cross_s);
void teacher_part_row(const double* z, double* teacher, int cc, double row_scale, double max_z, double& max_t,
                      double& sum_t, double& cross_t, double& cross_s);

// The generalized JSD's second forward pass over a row (streaming_ce.h): the student's and the teacher's raw dot
// products (logits row_scale·dot), both log-sum-exps known; adds Σ_j p_j·log(p_j/m_j) to kl_pm and
// Σ_j q_j·log(q_j/m_j) to kl_qm, m = (1−β)·p + β·q (a zero probability adds 0, a NaN one NaN); `complement` is
// 1 − β rounded apart from β (in float32, 1 − fp32(β) would lose it near β = 1).
void jsd_part_row(const float* dots, const float* teacher_dots, int cc, float row_scale, float lse, float lse_t,
                  float beta, float complement, float& kl_pm, float& kl_qm);
void jsd_part_row(const double* dots, const double* teacher_dots, int cc, double row_scale, double lse, double lse_t,
                  double beta, double complement, double& kl_pm, double& kl_qm);

// Backward: dL/da_j in place of a_j; `cost_dots` is the row of q_n · k_j (EMO) or nullptr; `teacher_dots` the
// row of the teacher's raw dot products (distillation) or nullptr.
void grad_row(float* row, const float* cost_dots, const ChunkColumns<float>& cols,
              const RowGradCoefs<float>& coefs, int target, const float* teacher_dots = nullptr);
void grad_row(double* row, const double* cost_dots, const ChunkColumns<double>& cols,
              const RowGradCoefs<double>& coefs, int target, const double* teacher_dots = nullptr);

// Sub-centres (streaming_ce.h), one row of a chunk of cc classes with K rows of w each: `row` holds the
// cc·K dot products and `scale` the rows' col_scale. Reduce: best_j = max_k scale_{jK+k}·row_{jK+k} and its k
// (the first of equal ones; a NaN wins and stays). Expand: `out` (cc·K) ← the compact dL/da g at each
// class's winner times its scale, the target column's g as it is at target_subcenter, 0 elsewhere.
void reduce_subcenters_row(const float* row, const float* scale, int cc, int K, float* best, int32_t* winner);
void reduce_subcenters_row(const double* row, const double* scale, int cc, int K, double* best, int32_t* winner);
void expand_subcenters_row(const float* g, const int32_t* winner, const float* scale, int cc, int K, int target,
                           int64_t target_subcenter, float* out);
void expand_subcenters_row(const double* g, const int32_t* winner, const double* scale, int cc, int K, int target,
                           int64_t target_subcenter, double* out);

}  // namespace marginkern::epilogue
