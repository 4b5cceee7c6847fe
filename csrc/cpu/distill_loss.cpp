// distill_loss.h: the forward and backward of marginkern/distill.py in C++, over the streaming steps of
// streaming_ce.cpp (the teacher plane's statistics in the forward, its term in streaming_grads_finalized),
// wrapped in a LibTorch autograd Function.
#include "distill_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

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

struct KLDivergenceRows : public torch::autograd::Function<KLDivergenceRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& teacher_x, const at::Tensor& teacher_w, const at::Tensor& target,
                            const KLDivergenceOptions& o) {
    const auto [kl, lse, teacher_lse] =
        kl_divergence_rows(x, w, teacher_x, teacher_w, target, o.temperature, o.ignore_index, o.reverse, o.class_chunk);
    ctx->save_for_backward({x, w, teacher_x, teacher_w, target, lse, teacher_lse, kl});
    auto& d = ctx->saved_data;
    d["temperature"] = o.temperature, d["ignore_index"] = o.ignore_index, d["reverse"] = o.reverse;
    d["class_chunk"] = o.class_chunk, d["reduction"] = o.reduction;
    return loss::reduce(kl, target.ne(o.ignore_index), o.reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    loss::check_once_differentiable("marginkern::linear_kl_divergence");
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const int64_t ignore_index = d["ignore_index"].toInt();
    const at::Tensor& lse = saved[5];
    const at::Tensor g = loss::row_grads(grad_outputs[0], saved[4].ne(ignore_index), d["reduction"].toStringRef(),
                                         lse.scalar_type());
    const bool need_w = ctx->needs_input_grad(1);
    const auto [grad_x, grad_w] = kl_divergence_rows_backward(
        g, saved[0], saved[1], saved[2], saved[3], saved[4], lse, saved[6], saved[7], d["temperature"].toDouble(),
        ignore_index, d["reverse"].toBool(), need_w, d["class_chunk"].toInt());
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

at::Tensor linear_kl_divergence(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                                const at::Tensor& teacher_w, const at::Tensor& target_or_none,
                                const KLDivergenceOptions& o) {
  constexpr const char* op = "marginkern::linear_kl_divergence";
  // no target: every row counts (any value but ignore_index)
  const at::Tensor target = target_or_none.defined()
                                ? target_or_none.to(at::kLong)
                                : at::full({x.dim() == 2 ? x.size(0) : 0}, o.ignore_index == 0 ? 1 : 0, at::kLong);
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
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature > 0 && std::isfinite(1.0 / o.temperature), op,
              ": temperature must be a finite number > 0 with a finite inverse, got ", o.temperature);
  TORCH_CHECK(o.reduction == "mean" || o.reduction == "sum" || o.reduction == "none", op,
              ": reduction must be \"mean\", \"sum\" or \"none\", got \"", o.reduction, "\"");
  return KLDivergenceRows::apply(x, w, teacher_x.detach(), teacher_w.detach(), target, o);
}

}  // namespace marginkern
