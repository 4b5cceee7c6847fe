// distill_loss.h: the forward and backward of marginkern/distill.py in C++, over the streaming steps of
// streaming_ce.cpp (the teacher plane's statistics in the forward, its term in streaming_grads_finalized),
// wrapped in a LibTorch autograd Function.
#include "distill_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "loss_reduction.h"
#include "streaming_ce.h"

namespace marginkern {
namespace {

// Half the automatic chunk: two N × chunk buffers (the student's and the teacher's logits) are live.
int64_t chunk_of(int64_t class_chunk, int64_t N, at::ScalarType acc) {
  return class_chunk > 0 ? class_chunk : std::max<int64_t>(256, loss::class_chunk(0, N, acc) / 2);
}

at::Tensor inverse_temperature(const at::Tensor& x, double temperature) {
  return at::full({x.size(0)}, 1.0 / temperature, x.options().dtype(accumulation_dtype(x.scalar_type())));
}

// What one distillation call computes (KLDivergenceOptions or JSDOptions): forward or reverse KL, or JSD_β.
struct Distillation {
  double temperature;
  int64_t ignore_index;
  std::string reduction;
  int64_t class_chunk;
  bool reverse = false;                // KL's direction
  std::optional<double> jsd_beta;      // set: the generalized JSD
};

// Both distillation losses' autograd: their per-row halves (kl_divergence_rows or jsd_rows and their backwards),
// reduced. The fourth saved per-row vector is what the backward takes: KL itself, or JSD's KL(p‖m).
struct DistillationRows : public torch::autograd::Function<DistillationRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& teacher_x, const at::Tensor& teacher_w, const at::Tensor& target,
                            const Distillation& o) {
    at::Tensor loss_rows, lse, teacher_lse, saved;
    if (o.jsd_beta) {
      std::tie(loss_rows, lse, teacher_lse, saved) = jsd_rows(x, w, teacher_x, teacher_w, target, *o.jsd_beta,
                                                              o.temperature, o.ignore_index, o.class_chunk);
    } else {
      std::tie(loss_rows, lse, teacher_lse) = kl_divergence_rows(x, w, teacher_x, teacher_w, target, o.temperature,
                                                                 o.ignore_index, o.reverse, o.class_chunk);
      saved = loss_rows;
    }
    ctx->save_for_backward({x, w, teacher_x, teacher_w, target, lse, teacher_lse, saved});
    auto& d = ctx->saved_data;
    d["temperature"] = o.temperature, d["ignore_index"] = o.ignore_index, d["reverse"] = o.reverse;
    d["class_chunk"] = o.class_chunk, d["reduction"] = o.reduction, d["jsd_beta"] = o.jsd_beta.value_or(-1.0);
    return loss::reduce(loss_rows, target.ne(o.ignore_index), o.reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto& d = ctx->saved_data;
    const double jsd_beta = d["jsd_beta"].toDouble();  // < 0: KL
    loss::check_once_differentiable(jsd_beta < 0 ? "marginkern::linear_kl_divergence" : "marginkern::linear_jsd");
    const auto saved = ctx->get_saved_variables();
    const int64_t ignore_index = d["ignore_index"].toInt();
    const at::Tensor& lse = saved[5];
    const at::Tensor g = loss::row_grads(grad_outputs[0], saved[4].ne(ignore_index), d["reduction"].toStringRef(),
                                         lse.scalar_type());
    const bool need_w = ctx->needs_input_grad(1);
    const double temperature = d["temperature"].toDouble();
    const int64_t class_chunk = d["class_chunk"].toInt();
    const auto [grad_x, grad_w] =
        jsd_beta < 0 ? kl_divergence_rows_backward(g, saved[0], saved[1], saved[2], saved[3], saved[4], lse, saved[6],
                                                   saved[7], temperature, ignore_index, d["reverse"].toBool(), need_w,
                                                   class_chunk)
                     : jsd_rows_backward(g, saved[0], saved[1], saved[2], saved[3], saved[4], lse, saved[6], saved[7],
                                         jsd_beta, temperature, ignore_index, need_w, class_chunk);
    return {grad_x, need_w ? grad_w : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_rows(const at::Tensor& x, const at::Tensor& w,
                                                                  const at::Tensor& teacher_x,
                                                                  const at::Tensor& teacher_w, const at::Tensor& target,
                                                                  double temperature, int64_t ignore_index,
                                                                  bool reverse, int64_t class_chunk) {
  const at::Tensor row_scale = inverse_temperature(x, temperature);
  const auto [lse, teacher_lse, mean_q, mean_p] = streaming_row_stats_with_teacher(
      x, w, row_scale, Teacher{teacher_x, teacher_w}, chunk_of(class_chunk, x.size(0), row_scale.scalar_type()));
  // ≥ 0 as the sum it stands for (a difference of terms of the logits' size rounds below 0); NaN stays NaN
  const at::Tensor kl = (reverse ? mean_p - lse + teacher_lse : mean_q - teacher_lse + lse).clamp_min(0.0);
  return {at::where(target.ne(ignore_index), kl, at::zeros_like(kl)), lse, teacher_lse};
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_rows_backward(
    const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
    const at::Tensor& teacher_w, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl, double temperature, int64_t ignore_index, bool reverse, bool need_weight_grad,
    int64_t class_chunk) {
  const at::Tensor row_scale = inverse_temperature(x, temperature);
  const at::ScalarType acc = row_scale.scalar_type();
  const at::Tensor zero = at::zeros_like(row_scale);
  const at::Tensor g = at::where(target.ne(ignore_index), grad_kl.to(acc), zero);
  const at::Tensor no_target = at::full({x.size(0)}, -1, target.options().dtype(at::kLong));
  // forward: dKL/dz_j = p_j − q_j; reverse: p_j·(log p_j − log q_j − KL), the entropy term carrying p·log p
  const at::Tensor coef_p = reverse ? -g * kl.to(acc) : g;
  const Teacher teacher{teacher_x, teacher_w, teacher_lse.to(acc), reverse ? zero : g, reverse ? -g : zero};
  const auto [grad_x, grad_w, unused_bias] = streaming_grads_finalized(
      x, w, row_scale, std::nullopt, std::nullopt, std::nullopt, no_target, lse.to(acc), coef_p, zero, zero,
      /*need_bias_grad=*/false, need_weight_grad, chunk_of(class_chunk, x.size(0), acc), WeightChunkFinalizer(),
      std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, Subcenters{}, reverse ? -g : at::Tensor(),
      teacher);
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0})};
}

namespace {

// The distillation losses' argument checks; returns the target as int64 (no target: every row counts, any value but
// ignore_index).
at::Tensor checked_distillation_target(const char* op, const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& teacher_x, const at::Tensor& teacher_w,
                                       const at::Tensor& target_or_none, int64_t ignore_index, double temperature,
                                       const std::string& reduction) {
  const at::Tensor target = target_or_none.defined()
                                ? target_or_none.to(at::kLong)
                                : at::full({x.dim() == 2 ? x.size(0) : 0}, ignore_index == 0 ? 1 : 0, at::kLong);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1) && w.size(0) >= 1, op,
              ": input must be (N, D) and weight (C, D) with the same D and C >= 1, got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), op, ": target must have shape (N=", x.size(0),
              ",), got ", target.sizes());
  TORCH_CHECK(teacher_x.dim() == 2 && teacher_x.size(0) == x.size(0) && teacher_w.dim() == 2 &&
                  teacher_w.size(0) == w.size(0) && teacher_w.size(1) == teacher_x.size(1),
              op, ": teacher_x must be (N, E) and teacher_w (C, E), got ", teacher_x.sizes(), " and ", teacher_w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && teacher_x.device().is_cpu() && teacher_w.device().is_cpu(),
              op, ": this C++ entry point takes CPU tensors (the GPU kernels run from the Python package)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && w.scalar_type() == x.scalar_type() &&
                  teacher_x.scalar_type() == x.scalar_type() && teacher_w.scalar_type() == x.scalar_type(),
              op, ": input, weight and the teacher's tensors must have one floating-point dtype");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0 && std::isfinite(1.0 / temperature), op,
              ": temperature must be a finite number > 0 with a finite inverse, got ", temperature);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction must be \"mean\", \"sum\" or \"none\", got \"", reduction, "\"");
  return target;
}

}  // namespace

at::Tensor linear_kl_divergence(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                                const at::Tensor& teacher_w, const at::Tensor& target_or_none,
                                const KLDivergenceOptions& o) {
  const at::Tensor target = checked_distillation_target("marginkern::linear_kl_divergence", x, w, teacher_x, teacher_w,
                                                        target_or_none, o.ignore_index, o.temperature, o.reduction);
  return DistillationRows::apply(x, w, teacher_x.detach(), teacher_w.detach(), target,
                                 Distillation{o.temperature, o.ignore_index, o.reduction, o.class_chunk, o.reverse});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jsd_rows(const at::Tensor& x, const at::Tensor& w,
                                                                    const at::Tensor& teacher_x,
                                                                    const at::Tensor& teacher_w,
                                                                    const at::Tensor& target, double beta,
                                                                    double temperature, int64_t ignore_index,
                                                                    int64_t class_chunk) {
  const at::Tensor row_scale = inverse_temperature(x, temperature);
  const int64_t chunk = chunk_of(class_chunk, x.size(0), row_scale.scalar_type());
  const auto stats = streaming_row_stats_with_teacher(x, w, row_scale, Teacher{teacher_x, teacher_w}, chunk);
  const at::Tensor &lse = std::get<0>(stats), &teacher_lse = std::get<1>(stats);
  Teacher teacher{teacher_x, teacher_w, teacher_lse};
  teacher.jsd_beta = beta;
  const auto [kl_pm, kl_qm] = streaming_jsd_row_sums(x, w, row_scale, teacher, lse, chunk);
  // each sum carries both log-sum-exps' rounding to first order, which cancels in the combination (distill.py):
  // only the divergence is clamped at 0; NaN stays NaN
  const at::Tensor jsd = (beta * kl_qm + (1.0 - beta) * kl_pm).clamp_min(0.0);
  const at::Tensor valid = target.ne(ignore_index);
  return {at::where(valid, jsd, at::zeros_like(jsd)), lse, teacher_lse, at::where(valid, kl_pm, at::zeros_like(kl_pm))};
}

std::tuple<at::Tensor, at::Tensor> jsd_rows_backward(
    const at::Tensor& grad_jsd, const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
    const at::Tensor& teacher_w, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl_student_mixture, double beta, double temperature, int64_t ignore_index, bool need_weight_grad,
    int64_t class_chunk) {
  const at::Tensor row_scale = inverse_temperature(x, temperature);
  const at::ScalarType acc = row_scale.scalar_type();
  const at::Tensor zero = at::zeros_like(row_scale);
  // dJSD/dz_j = (1−β)·p_j·(log(p_j/m_j) − KL(p‖m))
  const at::Tensor g = at::where(target.ne(ignore_index), grad_jsd.to(acc), zero) * (1.0 - beta);
  const at::Tensor no_target = at::full({x.size(0)}, -1, target.options().dtype(at::kLong));
  Teacher teacher{teacher_x, teacher_w, teacher_lse.to(acc), zero, g};
  teacher.jsd_beta = beta;
  const auto [grad_x, grad_w, unused_bias] = streaming_grads_finalized(
      x, w, row_scale, std::nullopt, std::nullopt, std::nullopt, no_target, lse.to(acc),
      -g * kl_student_mixture.to(acc), zero, zero, /*need_bias_grad=*/false, need_weight_grad,
      chunk_of(class_chunk, x.size(0), acc), WeightChunkFinalizer(), std::nullopt, std::nullopt, std::nullopt,
      std::nullopt, std::nullopt, Subcenters{}, at::Tensor(), teacher);
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0})};
}

at::Tensor linear_jsd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x, const at::Tensor& teacher_w,
                      const at::Tensor& target_or_none, const JSDOptions& o) {
  constexpr const char* op = "marginkern::linear_jsd";
  TORCH_CHECK(o.beta > 0.0 && o.beta < 1.0, op, ": beta must lie in (0, 1) (0 and 1 are linear_kl_divergence's ",
              "forward and reverse KL), got ", o.beta);
  const at::Tensor target = checked_distillation_target(op, x, w, teacher_x, teacher_w, target_or_none,
                                                        o.ignore_index, o.temperature, o.reduction);
  return DistillationRows::apply(x, w, teacher_x.detach(), teacher_w.detach(), target,
                                 Distillation{o.temperature, o.ignore_index, o.reduction, o.class_chunk, false, o.beta});
}

}  // namespace marginkern
