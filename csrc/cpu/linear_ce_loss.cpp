// linear_ce_loss.h: the forward and backward of marginkern/linear_ce.py (streaming path) in C++, over the
// streaming ops of streaming_ce.cpp, wrapped in a LibTorch autograd Function.
#include "linear_ce_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "loss_reduction.h"
#include "streaming_ce.h"

namespace marginkern {
namespace {

using Options = LinearCrossEntropyOptions;

// f(u) and f'(u) of the header, elementwise (linear_ce.py target_term).
std::pair<at::Tensor, at::Tensor> target_term(const at::Tensor& u, const Options& o) {
  if (o.focal_gamma > 0) {
    const double gamma = o.focal_gamma;
    // 1 − p_t without cancellation, ≥ 0: u > 0 on an ignored row with lse < 0 (placeholder target logit 0) or by
    // rounding on a confident one, and q^γ of q < 0 is NaN for a fractional γ (linear_ce.py target_term)
    const at::Tensor q = (-at::expm1(u)).clamp_min(0.0);
    const at::Tensor u_over_q = at::where(q > 0, u / q.clamp_min(1e-30), -at::ones_like(q));  // → −1 as q → 0
    const at::Tensor q_gamma = q.pow(gamma);
    return {-q_gamma * u, -q_gamma + gamma * q_gamma * at::exp(u) * u_over_q};
  }
  if (o.gamma_ce > 0) {
    // m = γ + (1−γ)·p_t = 1 − (1−γ)·(1 − p_t): log1p(−(1−γ)(1 − p_t)) where m ≥ 1/2 (exact as γ → 1), the log of
    // the two positive terms' sum below (exact as γ → 0 and p_t → 0) (linear_ce.py target_term)
    const double gamma = o.gamma_ce;
    const at::Tensor damped = (1.0 - gamma) * -at::expm1(u);
    const at::Tensor near_one = damped.le(0.5);
    const at::Tensor mass = at::where(near_one, 1.0 - damped, gamma + (1.0 - gamma) * at::exp(u));
    return {at::where(near_one, -at::log1p(-damped), -at::log(mass)) / (1.0 - gamma), -at::exp(u) / mass};
  }
  return {-u, -at::ones_like(u)};
}

// z_t per row (gathered dot product plus bias, soft-capped) and dz_t/da_t (linear_ce.py _TargetLogits).
struct TargetLogits {
  at::Tensor valid, column, logit, slope, row_scale;

  TargetLogits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const at::Tensor& bias,
               const Options& o) {
    const at::ScalarType acc = accumulation_dtype(x.scalar_type());
    valid = target.ne(o.ignore_index);
    column = at::where(valid, target, -1);
    const at::Tensor safe = column.clamp_min(0);
    at::Tensor raw = (x.to(acc) * w.index_select(0, safe).to(acc)).sum(1);
    if (bias.defined()) raw = raw + bias.index_select(0, safe).to(acc);
    // 0 on ignored rows, not row 0's logit: a −inf bias[0] (a masked token) would make the row's focal or γ-CE
    // coefficient 0·(−inf) = NaN, which its zero upstream gradient does not cancel
    raw = at::where(valid, raw, at::zeros_like(raw));
    slope = at::ones_like(raw);
    if (o.softcap) {
      const at::Tensor t = at::tanh(raw / *o.softcap);
      raw = *o.softcap * t;
      slope = 1.0 - t * t;
    }
    logit = raw;
    row_scale = at::ones_like(raw);
  }

  std::optional<at::Tensor> bias_arg(const at::Tensor& bias) const {
    return bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  }
};

void save_options(torch::autograd::AutogradContext* ctx, const Options& o) {
  auto& d = ctx->saved_data;
  d["ignore_index"] = o.ignore_index, d["label_smoothing"] = o.label_smoothing, d["z_loss"] = o.z_loss;
  d["softcap"] = o.softcap ? c10::IValue(*o.softcap) : c10::IValue();
  d["focal_gamma"] = o.focal_gamma, d["gamma_ce"] = o.gamma_ce, d["reduction"] = o.reduction;
  d["class_chunk"] = o.class_chunk;
}

Options saved_options(torch::autograd::AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  Options o;
  o.ignore_index = d["ignore_index"].toInt(), o.label_smoothing = d["label_smoothing"].toDouble();
  o.z_loss = d["z_loss"].toDouble();
  if (!d["softcap"].isNone()) o.softcap = d["softcap"].toDouble();
  o.focal_gamma = d["focal_gamma"].toDouble(), o.gamma_ce = d["gamma_ce"].toDouble();
  o.reduction = d["reduction"].toStringRef(), o.class_chunk = d["class_chunk"].toInt();
  return o;
}

struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  // bias_or_empty: the bias, or a (0,) placeholder when there is none (autograd's inputs must be defined)
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& target, const at::Tensor& bias_or_empty, bool has_bias, const Options& o) {
    const at::Tensor bias = has_bias ? bias_or_empty : at::Tensor();
    const auto [rows, lse] = linear_ce_rows(x, w, target, bias, o);
    ctx->save_for_backward({x, w, target, bias_or_empty, lse});
    ctx->saved_data["has_bias"] = has_bias;
    save_options(ctx, o);
    return loss::reduce(rows, target.ne(o.ignore_index), o.reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    loss::check_once_differentiable("marginkern::linear_cross_entropy");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &target = saved[2], &lse = saved[4];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor bias = has_bias ? saved[3] : at::Tensor();
    const Options o = saved_options(ctx);
    const at::Tensor g = loss::row_grads(grad_outputs[0], target.ne(o.ignore_index), o.reduction, lse.scalar_type());
    const bool need_w = ctx->needs_input_grad(1), need_bias = has_bias && ctx->needs_input_grad(3);
    const auto [grad_x, grad_w, grad_bias] = linear_ce_rows_backward(g, x, w, target, bias, lse, o, need_w, need_bias);
    return {grad_x, need_w ? grad_w : at::Tensor(), at::Tensor(), need_bias ? grad_bias : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_ce_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                                  const at::Tensor& bias, const Options& o) {
  const TargetLogits tgt(x, w, target, bias, o);
  const double eps = o.label_smoothing, C = static_cast<double>(w.size(0));
  const auto [lse, sum_logits] =
      streaming_row_stats(x, w, tgt.row_scale, std::nullopt, tgt.bias_arg(bias), o.softcap, tgt.column, tgt.logit,
                          eps > 0, loss::class_chunk(o.class_chunk, x.size(0), tgt.logit.scalar_type()));
  at::Tensor rows = (1.0 - eps) * target_term(tgt.logit - lse, o).first;
  if (eps > 0) rows = rows + eps * lse - (eps / C) * sum_logits;
  if (o.z_loss > 0) rows = rows + o.z_loss * lse * lse;
  return {at::where(tgt.valid, rows, at::zeros_like(rows)), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_rows_backward(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
    const at::Tensor& bias, const at::Tensor& lse, const Options& o, bool need_weight_grad, bool need_bias_grad) {
  const TargetLogits tgt(x, w, target, bias, o);  // recomputed: O(N·D), instead of saved
  const at::ScalarType acc = tgt.logit.scalar_type();
  const double eps = o.label_smoothing, C = static_cast<double>(w.size(0));
  // dL/dz_j = coef_p·p_j − coef_u + [j = t]·(1−ε)·f'(u)
  const at::Tensor lse_acc = lse.to(acc);
  const at::Tensor g = at::where(tgt.valid, grad_rows.to(acc), at::zeros_like(lse_acc));
  const at::Tensor u = tgt.logit - lse_acc;
  const at::Tensor df = target_term(u, o).second;
  const at::Tensor coef_p = g * (-(1.0 - eps) * df + eps + 2.0 * o.z_loss * lse_acc);
  const at::Tensor coef_u = g * (eps / C);
  const at::Tensor target_grad = (coef_p * at::exp(u) - coef_u + g * (1.0 - eps) * df) * tgt.slope;
  need_bias_grad = need_bias_grad && bias.defined();
  const auto [grad_x, grad_w, grad_bias] = streaming_grads_finalized(
      x, w, tgt.row_scale, std::nullopt, tgt.bias_arg(bias), o.softcap, tgt.column, lse_acc, coef_p, coef_u,
      target_grad, need_bias_grad, need_weight_grad, loss::class_chunk(o.class_chunk, x.size(0), acc),
      WeightChunkFinalizer());
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0}),
          need_bias_grad ? grad_bias.to(bias.scalar_type()) : w.new_empty({0})};
}

at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const at::Tensor& bias, const LinearCrossEntropyOptions& o) {
  constexpr const char* op = "marginkern::linear_cross_entropy";
  loss::check_classification_inputs(op, x, w, target, o.ignore_index, o.reduction);
  loss::check_bias(op, bias, w);
  loss::check_label_smoothing(op, o.label_smoothing);
  TORCH_CHECK(std::isfinite(o.z_loss) && o.z_loss >= 0, op, ": z_loss must be a finite number >= 0, got ", o.z_loss);
  loss::check_softcap(op, o.softcap);
  TORCH_CHECK(std::isfinite(o.focal_gamma) && o.focal_gamma >= 0, op, ": focal_gamma must be >= 0, got ",
              o.focal_gamma);
  TORCH_CHECK(std::isfinite(o.gamma_ce) && o.gamma_ce >= 0 && o.gamma_ce < 1, op, ": gamma_ce must be in [0, 1), got ",
              o.gamma_ce);
  TORCH_CHECK(o.focal_gamma == 0 || o.gamma_ce == 0, op,
              ": focal_gamma and gamma_ce are two different target terms; set at most one of them");
  return LinearCrossEntropy::apply(x, w, target.to(at::kLong), bias.defined() ? bias : at::empty({0}, w.options()),
                                   bias.defined(), o);
}

}  // namespace marginkern
