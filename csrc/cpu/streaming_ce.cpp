// CPU kernels of the engine's class-streaming ops (math in streaming_ce.h; TorchTiles in
// marginkern/engine.py is the oracle they match).
//
// Per class chunk: one ATen GEMM writes the raw dot products into a reused N × chunk buffer, then the
// epilogue (row_epilogue.h) passes once over each row of it, rows in parallel, in place: scales, bias,
// softcap, target column, and either the running max / sum-exp / sum (forward) or dL/da (backward).
// The backward op then feeds that buffer straight into the dX and dW GEMMs of the same chunk.
#include "streaming_ce.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/op_args.h"
#include "row_epilogue.h"

namespace marginkern {
namespace {

// ---------------------------------------------------------------------------------------------
// One class chunk.

// a · bᵀ for the rows [c0, c1) of b, as a contiguous (N, c1 − c0) matrix at the start of `buffer`.
// Returns it and that chunk of b in the accumulation dtype (the dX GEMM needs it again).
std::pair<at::Tensor, at::Tensor> chunk_dots(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc,
                                             const at::Tensor& buffer, int64_t c0, int64_t c1) {
  at::Tensor b_chunk = b.narrow(0, c0, c1 - c0).to(acc);
  at::Tensor dots = buffer.narrow(0, 0, a.size(0) * (c1 - c0)).view({a.size(0), c1 - c0});
  at::mm_out(dots, a, b_chunk.t());
  return {dots, b_chunk};
}

// The chunk's column vectors as the row loops take them.
template <typename T>
epilogue::ChunkColumns<T> columns_view(const ChunkColumnTensors& c, const Spec& s) {
  return {static_cast<int>(c.scale.size(0)), c.scale.data_ptr<T>(), c.bias.data_ptr<T>(),
          c.cost_scale.defined() ? c.cost_scale.data_ptr<T>() : nullptr, s.softcap.has_value(),
          static_cast<T>(s.softcap.value_or(1.0)), s.hard_threshold.defined(), static_cast<T>(s.hard_coefs[0]),
          static_cast<T>(s.hard_coefs[1]), static_cast<T>(s.hard_coefs[2])};
}

// Row n's hard-negative threshold, +inf without hard negatives.
template <typename T>
inline T hard_threshold_of(const Spec& s, int64_t n) {
  return s.hard_threshold.defined() ? s.hard_threshold.data_ptr<T>()[n] : std::numeric_limits<T>::infinity();
}

// The spec with `hard`'s re-weighting (streaming_ce.h), checked: cosine-like logits, no softcap or bias.
Spec with_hard_negatives(const char* op, Spec s, const HardNegatives& hard) {
  if (!hard.present()) return s;
  TORCH_CHECK(!s.softcap && !s.bias.defined(), op, ": hard negatives come without a softcap or a bias");
  s.hard_coefs = hard.coefs;
  s.hard_threshold = float_vector(op, "hard threshold", hard.threshold, s.N, s.acc, s.device);
  return s;
}

// The target column of row n relative to the chunk, or −1 when it lies in another chunk.
inline int target_in_chunk(int64_t target, int64_t c0, int cc) {
  const int64_t t = target - c0;
  return (t >= 0 && t < cc) ? static_cast<int>(t) : -1;
}

// The log-sum-exp part of a row of cc logits whose max over the non-NaN ones is max_z: Σ exp relative to
// a finite max; logit_math's (NaN, NaN) when a logit is NaN, whatever else the row holds.
template <typename T>
logit_math::MaxSumExp<T> row_part(const T* row, int cc, T max_z, bool has_nan) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  if (has_nan) return {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::quiet_NaN()};
  if (max_z == -kInf || max_z == kInf) return {max_z, T(max_z == kInf ? 1 : 0)};
  return {max_z, epilogue::sum_exp_row(row, cc, max_z)};
}

// Forward epilogue: folds the chunk's logits into the running max / sum-exp (and Σz) of every row.
template <typename T>
void accumulate_row_stats(const Spec& s, const epilogue::ChunkColumns<T>& cols, int64_t c0, T* dots,
                          const T* target_logit, T* run_max, T* run_sum, T* total) {
  const T* row_scale = s.row_scale.data_ptr<T>();
  const int64_t* target = s.target.data_ptr<int64_t>();
  // at::parallel_for is OpenMP in torch's builds, and respects torch.set_num_threads.
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* row = dots + n * cols.cc;
      T max_z, sum_z;
      bool has_nan;
      epilogue::logits_row(row, cols, row_scale[n], target_in_chunk(target[n], c0, cols.cc), target_logit[n],
                           max_z, sum_z, has_nan, hard_threshold_of<T>(s, n));
      if (total != nullptr) total[n] += sum_z;
      const auto merged = logit_math::merge<epilogue::SimdMath>(logit_math::MaxSumExp<T>{run_max[n], run_sum[n]},
                                                                row_part(row, cols.cc, max_z, has_nan));
      run_max[n] = merged.max;
      run_sum[n] = merged.sum;
    }
  });
}

// Folds a chunk's entropy statistics (M_b, S′_b, T_b) into a row's running ones (streaming_ce.h): the side with
// the larger max keeps its S′ and takes the other's 1 + S′ rescaled; T moves to the new max as
// e^{m − M}·(T + (M − m)·(1 + S′)). Every term ≥ 0. The running max starts at −inf (no classes yet).
template <typename T>
void merge_entropy_state(T& max_a, T& others_a, T& gap_a, T max_b, T others_b, T gap_b) {
  if (max_a == -std::numeric_limits<T>::infinity()) {
    max_a = max_b, others_a = others_b, gap_a = gap_b;
    return;
  }
  const T top = std::max(max_a, max_b);
  const T scale_a = std::exp(max_a - top), scale_b = std::exp(max_b - top);
  const T moved_a = scale_a * (gap_a + (top - max_a) * (T(1) + others_a));
  const T moved_b = scale_b * (gap_b + (top - max_b) * (T(1) + others_b));
  others_a = max_a >= max_b ? others_a + (T(1) + others_b) * scale_b : others_b + (T(1) + others_a) * scale_a;
  gap_a = moved_a + moved_b;
  max_a = top;
}

// The entropy forward epilogue: folds the chunk's logits into each row's running (M, S′, T). A NaN logit, or
// +inf (p·log p undefined), poisons the row's state with NaN.
template <typename T>
void accumulate_entropy_stats(const Spec& s, const epilogue::ChunkColumns<T>& cols, int64_t c0, T* dots,
                              const T* target_logit, T* run_max, T* run_others, T* run_gap) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  const T* row_scale = s.row_scale.data_ptr<T>();
  const int64_t* target = s.target.data_ptr<int64_t>();
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* row = dots + n * cols.cc;
      T max_z, sum_z;
      bool has_nan;
      epilogue::logits_row(row, cols, row_scale[n], target_in_chunk(target[n], c0, cols.cc), target_logit[n],
                           max_z, sum_z, has_nan);
      if (run_others[n] != run_others[n]) continue;  // already NaN
      if (has_nan || max_z == kInf) {
        run_max[n] = has_nan ? kNaN : kInf, run_others[n] = kNaN, run_gap[n] = kNaN;
        continue;
      }
      if (max_z == -kInf) continue;  // only −inf logits: nothing to add
      T others, gap;
      epilogue::entropy_part_row(row, cols.cc, max_z, others, gap);
      merge_entropy_state(run_max[n], run_others[n], run_gap[n], max_z, others, gap);
    }
  });
}

// The teacher of spec `s` (streaming_ce.h), checked against its rows and classes: x in the accumulation dtype, and
// with `backward` its per-row vectors too.
Teacher checked_teacher(const char* op, const Spec& s, const Teacher& teacher, bool backward = false) {
  TORCH_CHECK(teacher.x.dim() == 2 && teacher.x.size(0) == s.N && teacher.w.dim() == 2 && teacher.w.size(0) == s.C &&
                  teacher.w.size(1) == teacher.x.size(1),
              op, ": the teacher must be (N, E) hidden states and a (C, E) head, got ", teacher.x.sizes(), " and ",
              teacher.w.sizes());
  Teacher checked{teacher.x.to(s.acc).contiguous(), teacher.w};
  checked.jsd_beta = teacher.jsd_beta;
  if (backward) {
    checked.lse = float_vector(op, "teacher lse", teacher.lse, s.N, s.acc, s.device);
    checked.coef_q = float_vector(op, "coef_q", teacher.coef_q, s.N, s.acc, s.device);
    checked.coef_log_q = float_vector(op, "coef_log_q", teacher.coef_log_q, s.N, s.acc, s.device);
  }
  return checked;
}

// A softmax-weighted sum moved to a new max: (max, Σ e^{z−max}, Σ e^{z−max}·v) of two class sets merged
// (engine.merge_weighted_sums); the running max starts at −inf (no classes yet).
template <typename T>
void merge_weighted_state(T& max_a, T& sum_a, T& values_a, T max_b, T sum_b, T values_b) {
  if (max_a == -std::numeric_limits<T>::infinity()) {
    max_a = max_b, sum_a = sum_b, values_a = values_b;
    return;
  }
  const T top = std::max(max_a, max_b);
  const T scale_a = std::exp(max_a - top), scale_b = std::exp(max_b - top);
  sum_a = sum_a * scale_a + sum_b * scale_b;
  values_a = values_a * scale_a + values_b * scale_b;
  max_a = top;
}

// Distillation's forward epilogue: folds the chunk's student and teacher logits into each row's running
// (max, Σexp, cross sum) of both (streaming_ce.h). `teacher` holds the chunk's teacher dot products.
template <typename T>
void accumulate_teacher_stats(const Spec& s, const epilogue::ChunkColumns<T>& cols, T* dots, T* teacher,
                              const T* target_logit, T* student_state, T* teacher_state) {
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  const T* row_scale = s.row_scale.data_ptr<T>();
  T *max_s = student_state, *sum_s = student_state + s.N, *cross_s = student_state + 2 * s.N;
  T *max_t = teacher_state, *sum_t = teacher_state + s.N, *cross_t = teacher_state + 2 * s.N;
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* row = dots + n * cols.cc;
      T max_z, sum_z;
      bool has_nan;
      epilogue::logits_row(row, cols, row_scale[n], -1, target_logit[n], max_z, sum_z, has_nan);
      if (sum_s[n] != sum_s[n]) continue;  // already NaN
      if (has_nan || max_z == std::numeric_limits<T>::infinity()) {  // NaN, or +inf: p·log p undefined
        sum_s[n] = kNaN, sum_t[n] = kNaN;
        continue;
      }
      T chunk_max_t, chunk_sum_t, chunk_cross_t, chunk_cross_s;
      epilogue::teacher_part_row(row, teacher + n * cols.cc, cols.cc, row_scale[n], max_z, chunk_max_t, chunk_sum_t,
                                 chunk_cross_t, chunk_cross_s);
      // a chunk of −inf student logits adds (−inf, 0, 0): nothing
      const T chunk_sum_s = max_z == -std::numeric_limits<T>::infinity() ? T(0)
                                                                         : epilogue::sum_exp_row(row, cols.cc, max_z);
      merge_weighted_state(max_s[n], sum_s[n], cross_s[n], max_z, chunk_sum_s, chunk_cross_s);
      merge_weighted_state(max_t[n], sum_t[n], cross_t[n], chunk_max_t, chunk_sum_t, chunk_cross_t);
    }
  });
}

// The forward epilogue of a whole row of logits that must survive (the 3-GEMM path turns the same dots
// into dL/da afterwards): each row is copied to a per-thread scratch row first. lse as torch.logsumexp.
template <typename T>
void row_stats_of_rows(const Spec& s, const epilogue::ChunkColumns<T>& cols, const T* dots, const T* target_logit,
                       T* lse, T* total) {
  const T* row_scale = s.row_scale.data_ptr<T>();
  const int64_t* target = s.target.data_ptr<int64_t>();
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(cols.cc);
    for (int64_t n = begin; n < end; ++n) {
      std::memcpy(scratch.data(), dots + n * cols.cc, cols.cc * sizeof(T));
      T max_z, sum_z;
      bool has_nan;
      epilogue::logits_row(scratch.data(), cols, row_scale[n], target_in_chunk(target[n], 0, cols.cc),
                           target_logit[n], max_z, sum_z, has_nan);
      if (total != nullptr) total[n] = sum_z;
      lse[n] = logit_math::log_sum_exp<epilogue::SimdMath>(row_part(scratch.data(), cols.cc, max_z, has_nan));
    }
  });
}

// Backward epilogue: dots ← dL/da for the chunk [c0, c0 + cc); cost_dots holds q·kᵀ of the chunk.
void grads_into(const Spec& s, const Cost& cost, const RowGrads& rg, int64_t c0, const at::Tensor& dots,
                const at::Tensor& cost_dots, const Teacher& teacher = {}, const at::Tensor& teacher_dots = {}) {
  const ChunkColumnTensors columns(s, cost, c0, c0 + dots.size(1));
  AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_streaming_grads", [&] {
    using T = scalar_t;
    const epilogue::ChunkColumns<T> cols = columns_view<T>(columns, s);
    const T* row_scale = s.row_scale.data_ptr<T>();
    const int64_t* target = s.target.data_ptr<int64_t>();
    const T *lse = rg.lse.data_ptr<T>(), *coef_p = rg.coef_p.data_ptr<T>(), *coef_u = rg.coef_u.data_ptr<T>(),
            *target_grad = rg.target_grad.data_ptr<T>();
    const T* row_coef = cost.present() ? cost.row_coef.data_ptr<T>() : nullptr;
    const T* cost_base = cost.present() ? cost_dots.data_ptr<T>() : nullptr;
    const T* entropy_coef = rg.entropy_coef.defined() ? rg.entropy_coef.data_ptr<T>() : nullptr;
    const T* teacher_base = teacher.present() ? teacher_dots.data_ptr<T>() : nullptr;
    const T *teacher_lse = teacher.present() ? teacher.lse.data_ptr<T>() : nullptr,
            *coef_q = teacher.present() ? teacher.coef_q.data_ptr<T>() : nullptr,
            *coef_log_q = teacher.present() ? teacher.coef_log_q.data_ptr<T>() : nullptr;
    T* g = dots.data_ptr<T>();
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        epilogue::RowGradCoefs<T> coefs{row_scale[n], lse[n], coef_p[n], coef_u[n], target_grad[n],
                                        row_coef != nullptr ? row_coef[n] : T(0),
                                        entropy_coef != nullptr ? entropy_coef[n] : T(0), entropy_coef != nullptr};
        coefs.hard_threshold = hard_threshold_of<T>(s, n);
        if (teacher_base != nullptr) {
          coefs.teacher_lse = teacher_lse[n], coefs.coef_q = coef_q[n], coefs.coef_log_q = coef_log_q[n];
          coefs.has_jsd = teacher.jsd_beta.has_value(), coefs.jsd_beta = static_cast<T>(teacher.jsd_beta.value_or(0.0));
          coefs.jsd_complement = static_cast<T>(1.0 - teacher.jsd_beta.value_or(0.0));  // 1 − β in double
        }
        epilogue::grad_row(g + n * cols.cc, cost_base != nullptr ? cost_base + n * cols.cc : nullptr, cols,
                           coefs, target_in_chunk(target[n], c0, cols.cc),
                           teacher_base != nullptr ? teacher_base + n * cols.cc : nullptr);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Sub-centres (streaming_ce.h): the chunk's N × cc·K dot products are reduced to N × cc scaled logits
// before the epilogue (whose column scale is then 1) and its dL/da expanded back after it.

// The reduction's scratch: the N × cc best scaled dots and their winners.
struct SubcenterBuffers {
  at::Tensor best, winner;
  SubcenterBuffers(const Spec& s, int64_t chunk) {
    if (s.K == 1) return;
    best = at::empty({s.N * chunk}, s.x.options().dtype(s.acc));
    winner = at::empty({s.N * chunk}, s.x.options().dtype(at::kInt));
  }
};

// The chunk's dots (N, cc·K) → best (N, cc) and winner (N, cc), rows in parallel (row_epilogue.h).
template <typename T>
void reduce_subcenters(const Spec& s, int64_t c0, int cc, const T* dots, T* best, int32_t* winner) {
  const T* col_scale = s.col_scale.data_ptr<T>() + c0 * s.K;
  const int K = static_cast<int>(s.K);
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      epilogue::reduce_subcenters_row(dots + n * cc * K, col_scale, cc, K, best + n * cc, winner + n * cc);
    }
  });
}

// The compact dL/da g (N, cc) → out (N, cc·K), rows in parallel (row_epilogue.h).
template <typename T>
void expand_subcenters(const Spec& s, int64_t c0, int cc, const T* g, const int32_t* winner, T* out) {
  const T* col_scale = s.col_scale.data_ptr<T>() + c0 * s.K;
  const int K = static_cast<int>(s.K);
  const int64_t* target = s.target.data_ptr<int64_t>();
  const int64_t* target_subcenter = s.target_subcenter.data_ptr<int64_t>();
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      epilogue::expand_subcenters_row(g + n * cc, winner + n * cc, col_scale, cc, K, target_in_chunk(target[n], c0, cc),
                                      target_subcenter[n], out + n * cc * K);
    }
  });
}

// The chunk's logit inputs for the epilogue: the raw dots (N, cc) as they are, or with sub-centres
// the reduced (N, cc) view of `sub.best` (the dots (N, cc·K) stay in `dots`).
at::Tensor epilogue_dots(const Spec& s, const SubcenterBuffers& sub, int64_t c0, const at::Tensor& dots) {
  if (s.K == 1) return dots;
  const int64_t cc = dots.size(1) / s.K;
  at::Tensor best = sub.best.narrow(0, 0, s.N * cc).view({s.N, cc});
  AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_reduce_subcenters", [&] {
    reduce_subcenters<scalar_t>(s, c0, static_cast<int>(cc), dots.data_ptr<scalar_t>(), best.data_ptr<scalar_t>(),
                                sub.winner.data_ptr<int32_t>());
  });
  return best;
}

// dL/da of the chunk [c0, c1) in `buffer` (and q·kᵀ in `cost_buffer` with a cost term). Returns
// (dL/da as an (N, (c1 − c0)·K) view of `buffer`, the chunk's rows of w in the accumulation dtype).
std::pair<at::Tensor, at::Tensor> chunk_grads(const Spec& s, const Cost& cost, const RowGrads& rg,
                                              const at::Tensor& buffer, const at::Tensor& cost_buffer,
                                              const SubcenterBuffers& sub, int64_t c0, int64_t c1,
                                              const Teacher& teacher = {}) {
  auto [dots, w_chunk] = chunk_dots(s.x, s.w, s.acc, buffer, c0 * s.K, c1 * s.K);
  at::Tensor cost_dots, teacher_dots;  // the second buffer holds either (a cost term and a teacher exclude each other)
  if (cost.present()) cost_dots = chunk_dots(cost.query, cost.keys, s.acc, cost_buffer, c0, c1).first;
  if (teacher.present()) teacher_dots = chunk_dots(teacher.x, teacher.w, s.acc, cost_buffer, c0, c1).first;
  const at::Tensor g = epilogue_dots(s, sub, c0, dots);
  grads_into(s, cost, rg, c0, g, cost_dots, teacher, teacher_dots);
  if (s.K > 1) {
    AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_expand_subcenters", [&] {
      expand_subcenters<scalar_t>(s, c0, static_cast<int>(c1 - c0), g.data_ptr<scalar_t>(),
                                  sub.winner.data_ptr<int32_t>(), dots.data_ptr<scalar_t>());
    });
  }
  return {dots, w_chunk};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The ops.

namespace {

// (lse, Σ_j z_nj or empty, the row max: the largest logit, the target's substituted one included).
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_impl(const char* op, const Spec& s,
                                                              const at::Tensor& target_logit, bool need_sum_logits,
                                                              int64_t class_chunk) {
  const at::Tensor target_logit_acc = float_vector(op, "target_logit", target_logit, s.N, s.acc, s.device);
  check_class_chunk(op, class_chunk);
  const auto opts = s.x.options().dtype(s.acc);
  at::Tensor run_max = at::full({s.N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({s.N}, opts);
  at::Tensor total = need_sum_logits ? at::zeros({s.N}, opts) : at::empty({0}, opts);
  const at::Tensor buffer = at::empty({s.N * std::min(class_chunk, s.C) * s.K}, opts);
  const SubcenterBuffers sub(s, std::min(class_chunk, s.C));
  const Cost no_cost;
  for (int64_t c0 = 0; c0 < s.C; c0 += class_chunk) {
    const int64_t c1 = std::min(s.C, c0 + class_chunk);
    const at::Tensor dots = epilogue_dots(s, sub, c0, chunk_dots(s.x, s.w, s.acc, buffer, c0 * s.K, c1 * s.K).first);
    const ChunkColumnTensors columns(s, no_cost, c0, c1);
    AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_streaming_row_stats", [&] {
      accumulate_row_stats<scalar_t>(s, columns_view<scalar_t>(columns, s), c0, dots.data_ptr<scalar_t>(),
                                     target_logit_acc.data_ptr<scalar_t>(), run_max.data_ptr<scalar_t>(),
                                     run_sum.data_ptr<scalar_t>(),
                                     need_sum_logits ? total.data_ptr<scalar_t>() : nullptr);
    });
  }
  // max + log(sum); a row of −inf logits gives −inf + log 0 = −inf, as torch.logsumexp.
  at::Tensor lse = at::log(run_sum).add_(run_max);
  return {lse, total, run_max};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> streaming_row_stats(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit,
    bool need_sum_logits, int64_t class_chunk) {
  constexpr const char* op = "marginkern::streaming_row_stats";
  const auto stats = row_stats_impl(op, make_spec(op, x, w, row_scale, col_scale, bias, softcap, target), target_logit,
                                    need_sum_logits, class_chunk);
  return {std::get<0>(stats), std::get<1>(stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_max(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit,
    bool need_sum_logits, int64_t class_chunk) {
  constexpr const char* op = "marginkern::streaming_row_stats_with_max";
  return row_stats_impl(op, make_spec(op, x, w, row_scale, col_scale, bias, softcap, target), target_logit,
                        need_sum_logits, class_chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_entropy(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit, int64_t class_chunk) {
  constexpr const char* op = "marginkern::streaming_row_stats_with_entropy";
  const Spec s = make_spec(op, x, w, row_scale, std::nullopt, bias, softcap, target);
  const at::Tensor target_logit_acc = float_vector(op, "target_logit", target_logit, s.N, s.acc, s.device);
  check_class_chunk(op, class_chunk);
  const auto opts = s.x.options().dtype(s.acc);
  at::Tensor run_max = at::full({s.N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_others = at::zeros({s.N}, opts), run_gap = at::zeros({s.N}, opts);
  const at::Tensor buffer = at::empty({s.N * std::min(class_chunk, s.C)}, opts);
  const Cost no_cost;
  for (int64_t c0 = 0; c0 < s.C; c0 += class_chunk) {
    const int64_t c1 = std::min(s.C, c0 + class_chunk);
    const at::Tensor dots = chunk_dots(s.x, s.w, s.acc, buffer, c0, c1).first;
    const ChunkColumnTensors columns(s, no_cost, c0, c1);
    AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_streaming_row_stats_with_entropy", [&] {
      accumulate_entropy_stats<scalar_t>(s, columns_view<scalar_t>(columns, s), c0, dots.data_ptr<scalar_t>(),
                                         target_logit_acc.data_ptr<scalar_t>(), run_max.data_ptr<scalar_t>(),
                                         run_others.data_ptr<scalar_t>(), run_gap.data_ptr<scalar_t>());
    });
  }
  at::Tensor log_sum = at::log1p(run_others);
  at::Tensor entropy = log_sum + run_gap / (run_others + 1.0);
  return {run_max, log_sum, entropy};
}

namespace {

// The distillation forward passes' chunk loop: the student spec (row_scale·(x·wᵀ), no target column) and, per class
// chunk, both heads' dot products into two reused N × chunk buffers, handed to body(s, c0, c1, dots, teacher_dots).
// Returns the spec (the body's state lives with the caller).
template <typename Body>
Spec over_teacher_chunks(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
                         const Teacher& teacher, int64_t class_chunk, const Body& body) {
  const at::Tensor no_target = at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  const Spec s = make_spec(op, x, w, row_scale, std::nullopt, std::nullopt, std::nullopt, no_target);
  const at::Tensor teacher_x = checked_teacher(op, s, teacher).x;
  check_class_chunk(op, class_chunk);
  const auto opts = s.x.options().dtype(s.acc);
  const int64_t chunk = std::min(class_chunk, s.C);
  const at::Tensor buffer = at::empty({s.N * chunk}, opts), teacher_buffer = at::empty({s.N * chunk}, opts);
  for (int64_t c0 = 0; c0 < s.C; c0 += class_chunk) {
    const int64_t c1 = std::min(s.C, c0 + class_chunk);
    body(s, c0, c1, chunk_dots(s.x, s.w, s.acc, buffer, c0, c1).first,
         chunk_dots(teacher_x, teacher.w, s.acc, teacher_buffer, c0, c1).first);
  }
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_teacher(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const Teacher& teacher,
    int64_t class_chunk) {
  const auto opts = x.options().dtype(accumulation_dtype(x.scalar_type()));
  // rows: max, Σexp, cross sum; the student's (0..2) and the teacher's (3..5)
  at::Tensor state = at::zeros({6, x.size(0)}, opts);
  state[0].fill_(-std::numeric_limits<double>::infinity());
  state[3].fill_(-std::numeric_limits<double>::infinity());
  const at::Tensor zero_logit = at::zeros({x.size(0)}, opts);
  const Cost no_cost;
  over_teacher_chunks("marginkern::streaming_row_stats_with_teacher", x, w, row_scale, teacher, class_chunk,
                      [&](const Spec& s, int64_t c0, int64_t c1, const at::Tensor& dots, const at::Tensor& teacher_dots) {
    const ChunkColumnTensors columns(s, no_cost, c0, c1);
    AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_streaming_row_stats_with_teacher", [&] {
      accumulate_teacher_stats<scalar_t>(s, columns_view<scalar_t>(columns, s), dots.data_ptr<scalar_t>(),
                                         teacher_dots.data_ptr<scalar_t>(), zero_logit.data_ptr<scalar_t>(),
                                         state.data_ptr<scalar_t>(), state.data_ptr<scalar_t>() + 3 * s.N);
    });
  });
  return {state[0] + at::log(state[1]), state[3] + at::log(state[4]), state[5] / state[4], state[2] / state[1]};
}

std::tuple<at::Tensor, at::Tensor> streaming_jsd_row_sums(const at::Tensor& x, const at::Tensor& w,
                                                          const at::Tensor& row_scale, const Teacher& teacher,
                                                          const at::Tensor& lse, int64_t class_chunk) {
  constexpr const char* op = "marginkern::streaming_jsd_row_sums";
  TORCH_CHECK(teacher.jsd_beta.has_value() && *teacher.jsd_beta > 0.0 && *teacher.jsd_beta < 1.0, op,
              ": teacher.jsd_beta must lie in (0, 1)");
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  const at::Tensor student_lse = float_vector(op, "lse", lse, x.size(0), acc, x.device());
  const at::Tensor teacher_lse = float_vector(op, "teacher lse", teacher.lse, x.size(0), acc, x.device());
  at::Tensor sums = at::zeros({2, x.size(0)}, x.options().dtype(acc));  // KL(p‖m), KL(q‖m)
  over_teacher_chunks(op, x, w, row_scale, teacher, class_chunk,
                      [&](const Spec& s, int64_t c0, int64_t c1, const at::Tensor& dots, const at::Tensor& teacher_dots) {
    AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_streaming_jsd_row_sums", [&] {
      using T = scalar_t;
      const int cc = static_cast<int>(c1 - c0);
      const T *a = dots.data_ptr<T>(), *b = teacher_dots.data_ptr<T>(), *r = s.row_scale.data_ptr<T>();
      const T *l = student_lse.data_ptr<T>(), *lt = teacher_lse.data_ptr<T>();
      T *pm = sums.data_ptr<T>(), *qm = pm + s.N;
      const T beta = static_cast<T>(*teacher.jsd_beta), complement = static_cast<T>(1.0 - *teacher.jsd_beta);
      at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          epilogue::jsd_part_row(a + n * cc, b + n * cc, cc, r[n], l[n], lt[n], beta, complement, pm[n], qm[n]);
        }
      });
    });
  });
  return {sums[0], sums[1]};
}

std::tuple<at::Tensor, at::Tensor> streaming_row_stats_of_subcenters(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits, int64_t class_chunk, const Subcenters& subcenters,
    const HardNegatives& hard) {
  constexpr const char* op = "marginkern::streaming_row_stats";
  const Spec s = make_spec(op, x, w, row_scale, col_scale, std::nullopt, softcap, target, true, subcenters.K);
  const auto stats = row_stats_impl(op, with_hard_negatives(op, s, hard), target_logit, need_sum_logits, class_chunk);
  return {std::get<0>(stats), std::get<1>(stats)};
}

at::Tensor streaming_grad_logits(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad, int64_t c0,
    int64_t c1, const std::optional<at::Tensor>& cost_query,
    const std::optional<at::Tensor>& cost_query_scale, const std::optional<at::Tensor>& cost_keys,
    const std::optional<at::Tensor>& cost_key_scale, const std::optional<at::Tensor>& cost_coef) {
  constexpr const char* op = "marginkern::streaming_grad_logits";
  const Spec s = make_spec(op, x, w, row_scale, col_scale, bias, softcap, target);
  const Cost cost = make_cost(op, s, cost_query, cost_query_scale, cost_keys, cost_key_scale, cost_coef);
  const RowGrads rg = make_row_grads(op, s, lse, coef_p, coef_u, target_grad);
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= s.C, op, ": the class range [c0, c1) must lie in [0, C=", s.C,
              "], got [", c0, ", ", c1, ")");
  check_class_chunk(op, std::max<int64_t>(1, c1 - c0));
  const auto opts = s.x.options().dtype(s.acc);
  const at::Tensor buffer = at::empty({s.N * (c1 - c0)}, opts);
  const at::Tensor cost_buffer = cost.present() ? at::empty({s.N * (c1 - c0)}, opts) : at::Tensor();
  return chunk_grads(s, cost, rg, buffer, cost_buffer, SubcenterBuffers(s, c1 - c0), c0, c1).first;
}

namespace {

// streaming_grads and streaming_grads_finalized: `finalize` (may be empty) chains each chunk of the raw dW;
// `weight_dtype` stores dW in w's dtype chunk by chunk (else in the accumulation dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_grads_impl(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    bool need_bias_grad, bool need_weight_grad, int64_t class_chunk, const std::optional<at::Tensor>& cost_query,
    const std::optional<at::Tensor>& cost_query_scale, const std::optional<at::Tensor>& cost_keys,
    const std::optional<at::Tensor>& cost_key_scale, const std::optional<at::Tensor>& cost_coef,
    const WeightChunkFinalizer& finalize, bool weight_dtype, const Subcenters& subcenters,
    const at::Tensor& entropy_coef, const Teacher& teacher_in, const HardNegatives& hard) {
  constexpr const char* op = "marginkern::streaming_grads";
  TORCH_CHECK(!hard.present() || (!cost_query && !entropy_coef.defined() && !teacher_in.present()), op,
              ": hard negatives come without a cost, entropy or teacher term");
  TORCH_CHECK(!teacher_in.present() || (subcenters.K == 1 && !cost_query && !col_scale && !bias && !softcap), op,
              ": the teacher term comes without sub-centres, a cost term, a col_scale, a bias or a softcap");
  TORCH_CHECK(subcenters.K == 1 || (subcenters.target_subcenter.defined() && !cost_query), op,
              ": sub-centres need target_subcenter, and have no cost term");
  TORCH_CHECK(!entropy_coef.defined() || (subcenters.K == 1 && !cost_query), op,
              ": the entropy term comes without sub-centres or a cost term");
  const Spec s = with_hard_negatives(op, make_spec(op, x, w, row_scale, col_scale, bias, softcap, target, true,
                                                    subcenters.K, subcenters.target_subcenter), hard);
  const Cost cost = make_cost(op, s, cost_query, cost_query_scale, cost_keys, cost_key_scale, cost_coef);
  RowGrads rg = make_row_grads(op, s, lse, coef_p, coef_u, target_grad);
  if (entropy_coef.defined()) rg.entropy_coef = float_vector(op, "entropy_coef", entropy_coef, s.N, s.acc, s.device);
  const Teacher teacher = teacher_in.present() ? checked_teacher(op, s, teacher_in, /*backward=*/true) : Teacher{};
  check_class_chunk(op, class_chunk);
  const auto opts = s.x.options().dtype(s.acc);
  at::Tensor grad_x = at::zeros({s.N, x.size(1)}, opts);
  // a 16-bit w's gradient is stored chunk by chunk in its dtype: no (C, D) fp32 copy beside it
  const bool store_converted = weight_dtype && w.scalar_type() != s.acc;
  at::Tensor grad_w = need_weight_grad ? at::empty({w.size(0), x.size(1)}, store_converted ? w.options() : opts)
                                       : at::empty({0}, opts);
  at::Tensor grad_bias = need_bias_grad ? at::empty({s.C}, opts) : at::empty({0}, opts);
  if (s.N == 0) {
    grad_w.zero_();
    grad_bias.zero_();
    return {grad_x, grad_w, grad_bias};
  }
  const int64_t buffer_size = s.N * std::min(class_chunk, s.C);
  const at::Tensor buffer = at::empty({buffer_size * s.K}, opts);
  const at::Tensor cost_buffer = cost.present() || teacher.present() ? at::empty({buffer_size}, opts) : at::Tensor();
  const SubcenterBuffers sub(s, std::min(class_chunk, s.C));
  for (int64_t c0 = 0; c0 < s.C; c0 += class_chunk) {
    const int64_t c1 = std::min(s.C, c0 + class_chunk);
    const int64_t r0 = c0 * s.K, r1 = c1 * s.K;  // the chunk's rows of w
    const auto [g, w_chunk] = chunk_grads(s, cost, rg, buffer, cost_buffer, sub, c0, c1, teacher);
    grad_x.addmm_(g, w_chunk);                                 // dX += G · W[r0:r1]
    if (need_weight_grad) {
      at::Tensor grad_w_chunk = grad_w.narrow(0, r0, r1 - r0);  // dW[r0:r1] = Gᵀ · X
      at::Tensor raw = store_converted ? at::mm(g.t(), s.x) : at::mm_out(grad_w_chunk, g.t(), s.x);
      if (finalize) finalize(r0, r1, raw);
      if (store_converted) grad_w_chunk.copy_(raw);
    }
    if (need_bias_grad) {
      at::Tensor grad_bias_chunk = grad_bias.narrow(0, c0, c1 - c0);
      at::sum_out(grad_bias_chunk, g, {0});
    }
  }
  return {grad_x, grad_w, grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_grads(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    bool need_bias_grad, bool need_weight_grad, int64_t class_chunk, const std::optional<at::Tensor>& cost_query,
    const std::optional<at::Tensor>& cost_query_scale, const std::optional<at::Tensor>& cost_keys,
    const std::optional<at::Tensor>& cost_key_scale, const std::optional<at::Tensor>& cost_coef) {
  return streaming_grads_impl(x, w, row_scale, col_scale, bias, softcap, target, lse, coef_p, coef_u, target_grad,
                              need_bias_grad, need_weight_grad, class_chunk, cost_query, cost_query_scale, cost_keys,
                              cost_key_scale, cost_coef, WeightChunkFinalizer(), /*weight_dtype=*/false, Subcenters{},
                              at::Tensor(), Teacher{}, HardNegatives{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_grads_finalized(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    bool need_bias_grad, bool need_weight_grad, int64_t class_chunk, const WeightChunkFinalizer& finalize,
    const std::optional<at::Tensor>& cost_query, const std::optional<at::Tensor>& cost_query_scale,
    const std::optional<at::Tensor>& cost_keys, const std::optional<at::Tensor>& cost_key_scale,
    const std::optional<at::Tensor>& cost_coef, const Subcenters& subcenters, const at::Tensor& entropy_coef,
    const Teacher& teacher, const HardNegatives& hard) {
  return streaming_grads_impl(x, w, row_scale, col_scale, bias, softcap, target, lse, coef_p, coef_u, target_grad,
                              need_bias_grad, need_weight_grad, class_chunk, cost_query, cost_query_scale, cost_keys,
                              cost_key_scale, cost_coef, finalize, /*weight_dtype=*/true, subcenters, entropy_coef,
                              teacher, hard);
}

std::tuple<at::Tensor, at::Tensor> row_stats_of_dots(
    const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits) {
  constexpr const char* op = "marginkern::row_stats_of_dots";
  const Spec s = make_dots_spec(op, dots, row_scale, col_scale, bias, softcap, target);
  const at::Tensor target_logit_acc = float_vector(op, "target_logit", target_logit, s.N, s.acc, s.device);
  const auto opts = dots.options();
  at::Tensor lse = at::full({s.N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor total = need_sum_logits ? at::zeros({s.N}, opts) : at::empty({0}, opts);
  if (s.N == 0 || s.C == 0) return {lse, total};
  const Cost no_cost;
  const ChunkColumnTensors columns(s, no_cost, 0, s.C);
  AT_DISPATCH_FLOATING_TYPES(s.acc, "marginkern_row_stats_of_dots", [&] {
    row_stats_of_rows<scalar_t>(s, columns_view<scalar_t>(columns, s), dots.data_ptr<scalar_t>(),
                                target_logit_acc.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                need_sum_logits ? total.data_ptr<scalar_t>() : nullptr);
  });
  return {lse, total};
}

void grads_of_dots_(const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
                    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
                    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_u,
                    const at::Tensor& target_grad) {
  constexpr const char* op = "marginkern::grads_of_dots_";
  const Spec s = make_dots_spec(op, dots, row_scale, col_scale, bias, softcap, target);
  const RowGrads rg = make_row_grads(op, s, lse, coef_p, coef_u, target_grad);
  if (s.N == 0 || s.C == 0) return;
  grads_into(s, Cost{}, rg, 0, dots, at::Tensor());
}

}  // namespace marginkern

// Schemas and CPU kernels. marginkern/cpp_tiles.py adds the fake kernels; the loss ops of
// marginkern/ops.py share the namespace, hence FRAGMENT.
TORCH_LIBRARY_FRAGMENT(marginkern, m) {
  m.def(
      "streaming_row_stats(Tensor x, Tensor w, Tensor row_scale, Tensor? col_scale, Tensor? bias, "
      "float? softcap, Tensor target, Tensor target_logit, bool need_sum_logits, int class_chunk) "
      "-> (Tensor lse, Tensor sum_logits)");
  // the same, and each row's largest logit (token accuracy: is the target's the largest?)
  m.def(
      "streaming_row_stats_with_max(Tensor x, Tensor w, Tensor row_scale, Tensor? col_scale, Tensor? bias, "
      "float? softcap, Tensor target, Tensor target_logit, bool need_sum_logits, int class_chunk) "
      "-> (Tensor lse, Tensor sum_logits, Tensor row_max)");
  m.def(
      "streaming_grad_logits(Tensor x, Tensor w, Tensor row_scale, Tensor? col_scale, Tensor? bias, "
      "float? softcap, Tensor target, Tensor lse, Tensor coef_p, Tensor coef_u, Tensor target_grad, "
      "int c0, int c1, Tensor? cost_query=None, Tensor? cost_query_scale=None, Tensor? cost_keys=None, "
      "Tensor? cost_key_scale=None, Tensor? cost_coef=None) -> Tensor");
  m.def(
      "streaming_grads(Tensor x, Tensor w, Tensor row_scale, Tensor? col_scale, Tensor? bias, "
      "float? softcap, Tensor target, Tensor lse, Tensor coef_p, Tensor coef_u, Tensor target_grad, "
      "bool need_bias_grad, bool need_weight_grad, int class_chunk, Tensor? cost_query=None, "
      "Tensor? cost_query_scale=None, Tensor? cost_keys=None, Tensor? cost_key_scale=None, Tensor? cost_coef=None) "
      "-> (Tensor grad_x, Tensor grad_w, Tensor grad_bias)");
  // The 3-GEMM path's epilogue over an (N, C) matrix of dot products computed elsewhere.
  m.def(
      "row_stats_of_dots(Tensor dots, Tensor row_scale, Tensor? col_scale, Tensor? bias, float? softcap, "
      "Tensor target, Tensor target_logit, bool need_sum_logits) -> (Tensor lse, Tensor sum_logits)");
  m.def(
      "grads_of_dots_(Tensor(a!) dots, Tensor row_scale, Tensor? col_scale, Tensor? bias, float? softcap, "
      "Tensor target, Tensor lse, Tensor coef_p, Tensor coef_u, Tensor target_grad) -> ()");
}

TORCH_LIBRARY_IMPL(marginkern, CPU, m) {
  m.impl("streaming_row_stats", TORCH_FN(marginkern::streaming_row_stats));
  m.impl("streaming_row_stats_with_max", TORCH_FN(marginkern::streaming_row_stats_with_max));
  m.impl("streaming_grad_logits", TORCH_FN(marginkern::streaming_grad_logits));
  m.impl("streaming_grads", TORCH_FN(marginkern::streaming_grads));
  m.impl("row_stats_of_dots", TORCH_FN(marginkern::row_stats_of_dots));
  m.impl("grads_of_dots_", TORCH_FN(marginkern::grads_of_dots_));
}
