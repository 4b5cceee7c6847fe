// log_probs_loss.h: the forward and backward of marginkern/log_probs.py in C++, over the streaming steps of
// streaming_ce.cpp (the entropy statistics in the forward, the entropy term in streaming_grads_finalized),
// wrapped in a LibTorch autograd Function with two outputs (log p_t and the entropy per row).
#include "log_probs_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "loss_reduction.h"
#include "streaming_ce.h"

namespace marginkern {
namespace {

// Per-row quantities of the target (log_probs.py _TemperatureLogits): z_t = softcap_{cap/T}((x_n·w_t)·(1/T) + b_t/T),
// rounded as the chunk loop rounds every logit (dot product times the row scale, plus the bias, capped), the
// softcap's slope there (undefined without one), and the spec's bias b/T and cap cap/T.
struct TemperatureLogits {
  at::Tensor valid, column, logit, row_scale, slope, bias;
  std::optional<double> softcap;

  TemperatureLogits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, double temperature,
                    int64_t ignore_index, const at::Tensor& head_bias, std::optional<double> head_softcap) {
    const at::ScalarType acc = accumulation_dtype(x.scalar_type());
    valid = target.ne(ignore_index);
    column = at::where(valid, target, -1);
    const at::Tensor safe = column.clamp_min(0);
    const at::Tensor raw = (x.to(acc) * w.index_select(0, safe).to(acc)).sum(1);
    row_scale = at::full_like(raw, 1.0 / temperature);
    logit = raw * row_scale;
    if (head_bias.defined()) {
      bias = head_bias.to(acc) * at::scalar_tensor(1.0 / temperature, raw.options());
      logit = logit + bias.index_select(0, safe);
    }
    if (head_softcap) {
      softcap = *head_softcap / temperature;
      const at::Tensor t = at::tanh(logit / *softcap);
      logit = *softcap * t;
      slope = 1.0 - t * t;
    }
    logit = at::where(valid, logit, at::zeros_like(logit));
  }

  std::optional<at::Tensor> optional_bias() const { return bias.defined() ? std::optional(bias) : std::nullopt; }
};

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be a finite number > 0, got ",
              temperature);
}

struct LogProbsRows : public torch::autograd::Function<LogProbsRows> {
  // bias_or_empty: the bias, or a (0,) placeholder when there is none (autograd's inputs must be defined)
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& w, const at::Tensor& target,
                                                const at::Tensor& bias_or_empty, bool has_bias, double temperature,
                                                std::optional<double> softcap, int64_t ignore_index,
                                                int64_t class_chunk) {
    const at::Tensor bias = has_bias ? bias_or_empty : at::Tensor();
    const auto [log_probs, entropy, lse, top1] =
        log_probs_entropy_rows(x, w, target, temperature, ignore_index, bias, softcap, false, class_chunk);
    ctx->save_for_backward({x, w, target, lse, log_probs, entropy, bias_or_empty});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["softcap"] = softcap ? c10::IValue(*softcap) : c10::IValue();
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["class_chunk"] = class_chunk;
    return {log_probs, entropy};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    loss::check_once_differentiable("marginkern::log_probs_and_entropy");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& lse = saved[3];
    const auto or_zero = [&](const at::Tensor& g) { return g.defined() ? g : at::zeros_like(lse); };
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_w = ctx->needs_input_grad(1), need_b = has_bias && ctx->needs_input_grad(3);
    const c10::IValue& cap = ctx->saved_data["softcap"];
    const std::optional<double> softcap = cap.isNone() ? std::nullopt : std::optional(cap.toDouble());
    const auto [grad_x, grad_w, grad_b] = log_probs_entropy_rows_backward(
        or_zero(grad_outputs[0]), or_zero(grad_outputs[1]), saved[0], saved[1], saved[2], lse, saved[4], saved[5],
        ctx->saved_data["temperature"].toDouble(), ctx->saved_data["ignore_index"].toInt(), need_w,
        has_bias ? saved[6] : at::Tensor(), softcap, need_b, ctx->saved_data["class_chunk"].toInt());
    return {grad_x,       need_w ? grad_w : at::Tensor(), at::Tensor(), need_b ? grad_b : at::Tensor(),
            at::Tensor(), at::Tensor(),                   at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, double temperature, int64_t ignore_index,
    const at::Tensor& bias, std::optional<double> softcap, bool top1, int64_t class_chunk) {
  const TemperatureLogits rows(x, w, target, temperature, ignore_index, bias, softcap);
  const int64_t chunk = loss::class_chunk(class_chunk, x.size(0), rows.logit.scalar_type());
  const auto [row_max, log_sum, entropy] = streaming_row_stats_with_entropy(
      x, w, rows.row_scale, rows.optional_bias(), rows.softcap, rows.column, rows.logit, chunk);
  // log p_t = (z_t − M) − log1p(S′): exact where z_t is the max (z_t − lse would round to ulp(lse))
  const at::Tensor log_probs = (rows.logit - row_max) - log_sum;
  const at::Tensor zero = at::zeros_like(log_probs);
  // a NaN input makes the entropy NaN too (the statistics carry it; this keeps the two outputs consistent)
  const at::Tensor h = at::where(log_probs.isnan(), log_probs, entropy);
  const at::Tensor lse = row_max + log_sum;
  // the target column holds the target logit in the statistics too: the max is that very value where it wins
  const at::Tensor is_top1 = top1 ? rows.valid & rows.logit.ge(row_max) & lse.isfinite()
                                  : at::empty({0}, x.options().dtype(at::kBool));
  return {at::where(rows.valid, log_probs, zero), at::where(rows.valid, h, zero), lse, is_top1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows_backward(
    const at::Tensor& grad_log_probs, const at::Tensor& grad_entropy, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& log_probs, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, bool need_weight_grad, const at::Tensor& bias,
    std::optional<double> softcap, bool need_bias_grad, int64_t class_chunk) {
  const TemperatureLogits rows(x, w, target, temperature, ignore_index, bias, softcap);
  const at::ScalarType acc = rows.logit.scalar_type();
  const at::Tensor zero = at::zeros_like(rows.logit);
  const at::Tensor g_lp = at::where(rows.valid, grad_log_probs.to(acc), zero);
  const at::Tensor g_h = at::where(rows.valid, grad_entropy.to(acc), zero);
  const at::Tensor log_pt = log_probs.to(acc), h = entropy.to(acc);
  // dL/dz_j = (−g_lp − g_h·H − g_h·log p_j)·p_j off the target; at the target g_lp·(1 − p_t) + g_h·p_t·(−log p_t − H),
  // chained by dz/da = (1/T)·(the softcap's slope) (log_probs.py)
  const at::Tensor coef_p = -g_lp - g_h * h;
  // p_t·(log p_t + H) is 0 where p_t = 0 (a −inf target logit: 0·(−inf) would be NaN)
  const at::Tensor p_t = at::exp(log_pt);
  const at::Tensor entropy_part = at::where(p_t.gt(0), p_t * (log_pt + h), at::zeros_like(p_t));
  at::Tensor target_grad = (-g_lp * at::expm1(log_pt) - g_h * entropy_part) * rows.row_scale;
  if (rows.slope.defined()) target_grad = target_grad * rows.slope;
  const int64_t chunk = loss::class_chunk(class_chunk, x.size(0), acc);
  need_bias_grad = need_bias_grad && bias.defined();
  // the bias enters as the dot product does (r·a + r·b), so dL/db_j = Σ_n dL/da_nj: the engine's bias gradient
  const auto [grad_x, grad_w, grad_b] = streaming_grads_finalized(
      x, w, rows.row_scale, std::nullopt, rows.optional_bias(), rows.softcap, rows.column, lse.to(acc), coef_p, zero,
      target_grad, need_bias_grad, need_weight_grad, chunk, WeightChunkFinalizer(), std::nullopt, std::nullopt,
      std::nullopt, std::nullopt, std::nullopt, Subcenters{}, g_h);
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0}),
          need_bias_grad ? grad_b.to(bias.scalar_type()) : w.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor> log_probs_and_entropy(const at::Tensor& x, const at::Tensor& w,
                                                         const at::Tensor& target, const at::Tensor& bias,
                                                         const LogProbsOptions& o) {
  constexpr const char* op = "marginkern::log_probs_and_entropy";
  loss::check_classification_inputs(op, x, w, target, o.ignore_index, "none");
  check_temperature(op, o.temperature);
  loss::check_bias(op, bias, w);
  loss::check_softcap(op, o.softcap);
  const auto rows = LogProbsRows::apply(x, w, target.to(at::kLong), bias.defined() ? bias : at::empty({0}, w.options()),
                                        bias.defined(), o.temperature, o.softcap, o.ignore_index, o.class_chunk);
  return {rows[0], rows[1]};
}

}  // namespace marginkern
