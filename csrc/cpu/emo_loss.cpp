// emo_loss.h: the forward and backward of marginkern/emo.py in C++, over the streaming ops of
// streaming_ce.cpp (the expectation Σ_j p_j·ê_j from streaming_grad_logits chunks, the backward through
// streaming_grads' cost term), wrapped in a LibTorch autograd Function with two outputs (ce, emo per row).
#include "emo_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <utility>

#include "loss_reduction.h"
#include "streaming_ce.h"

namespace marginkern {
namespace {

constexpr double kEmoRatioEps = 1e-10;  // the official recipe's ce / (emo + 1e-10)

// Per-row quantities of the target (emo.py _EMOGeometry); ê_j = e_j·key_scale_j without a normalised copy.
struct EMOGeometry {
  at::Tensor valid, column, target_logit, row_scale, key_scale, query, query_scale, self_cosine;

  EMOGeometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const at::Tensor& cost,
              int64_t ignore_index) {
    const at::ScalarType acc = accumulation_dtype(x.scalar_type());
    valid = target.ne(ignore_index);
    column = at::where(valid, target, -1);
    const at::Tensor safe = column.clamp_min(0);
    target_logit = (x.to(acc) * w.index_select(0, safe).to(acc)).sum(1);
    row_scale = at::ones_like(target_logit);
    // the norms in the cost embedding's own accumulation dtype (an fp64 cost with fp32 inputs), then acc
    const at::Tensor cost_norms = loss::row_norms(cost, accumulation_dtype(cost.scalar_type()));
    key_scale = cost_norms.to(acc).clamp_min(loss::kNormEps).reciprocal();
    query = cost.index_select(0, safe);
    query_scale = key_scale.index_select(0, safe);
    // ê_t·ê_t: exactly 1 (not (‖e‖/‖e‖)², an ulp off, which would bring back the cancellation emo_rows
    // avoids), less for a (near-)zero e_t (normalised by kNormEps, as the cosines are)
    const at::Tensor target_norm = cost_norms.to(acc).index_select(0, safe);
    self_cosine = at::where(target_norm.ge(loss::kNormEps), at::ones_like(target_norm),
                            (target_norm / loss::kNormEps).pow(2));
  }
};

// (Σ_{j≠t} p_nj·key_scale_j·cost_j, (N, E), and Σ_{j≠t} p_nj): p rebuilt per class chunk by
// streaming_grad_logits with coef_p = 1, coef_u = 0 and 0 in the target column (engine.streaming_expectation).
std::pair<at::Tensor, at::Tensor> expectation(const at::Tensor& x, const at::Tensor& w, const EMOGeometry& geo,
                                              const at::Tensor& lse, const at::Tensor& cost, int64_t chunk) {
  const int64_t N = x.size(0), C = w.size(0);
  at::Tensor out = at::zeros({N, cost.size(1)}, lse.options());
  at::Tensor mass = at::zeros_like(lse);
  if (N == 0) return {out, mass};
  const at::Tensor ones = at::ones_like(lse), zeros = at::zeros_like(lse);
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    const at::Tensor p = streaming_grad_logits(x, w, geo.row_scale, std::nullopt, std::nullopt, std::nullopt,
                                               geo.column, lse, ones, zeros, zeros, c0, c1);
    const at::Tensor values = cost.narrow(0, c0, c1 - c0).to(lse.scalar_type()) *
                              geo.key_scale.narrow(0, c0, c1 - c0).unsqueeze(1);
    out.addmm_(p, values);
    mass.add_(p.sum(1));
  }
  return {out, mass};
}

struct EMORows : public torch::autograd::Function<EMORows> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& w, const at::Tensor& target, const at::Tensor& cost,
                                                int64_t ignore_index, int64_t class_chunk) {
    const auto [ce, emo, lse] = emo_rows(x, w, target, cost, ignore_index, class_chunk);
    ctx->save_for_backward({x, w, target, cost, lse, emo});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["class_chunk"] = class_chunk;
    return {ce, emo};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    loss::check_once_differentiable("marginkern::emo_loss");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& lse = saved[4];
    const auto or_zero = [&](const at::Tensor& g) { return g.defined() ? g : at::zeros_like(lse); };
    const bool need_w = ctx->needs_input_grad(1);
    const auto [grad_x, grad_w] = emo_rows_backward(or_zero(grad_outputs[0]), or_zero(grad_outputs[1]), saved[0],
                                                    saved[1], saved[2], saved[3], lse, saved[5],
                                                    ctx->saved_data["ignore_index"].toInt(), need_w,
                                                    ctx->saved_data["class_chunk"].toInt());
    return {grad_x, need_w ? grad_w : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (ce, emo, valid) per row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emo_rows(const char* op, const at::Tensor& x, const at::Tensor& w,
                                                        const at::Tensor& target, const at::Tensor& cost_embedding,
                                                        const EMOOptions& o) {
  loss::check_classification_inputs(op, x, w, target, o.ignore_index, o.reduction);
  const at::Tensor cost = cost_embedding.defined() ? cost_embedding : w.detach();
  TORCH_CHECK(cost.dim() == 2 && cost.size(0) == w.size(0) && cost.device().is_cpu() &&
                  at::isFloatingType(cost.scalar_type()),
              op, ": cost_embedding must be a floating-point (C=", w.size(0), ", E) CPU tensor, got ", cost.sizes());
  const at::Tensor t = target.to(at::kLong);
  const auto rows = EMORows::apply(x, w, t, cost.detach(), o.ignore_index, o.class_chunk);
  return {rows[0], rows[1], t.ne(o.ignore_index)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> emo_rows(const at::Tensor& x, const at::Tensor& w,
                                                        const at::Tensor& target, const at::Tensor& cost,
                                                        int64_t ignore_index, int64_t class_chunk) {
  const EMOGeometry geo(x, w, target, cost, ignore_index);
  const int64_t chunk = loss::class_chunk(class_chunk, x.size(0), geo.target_logit.scalar_type());
  const at::Tensor lse = std::get<0>(streaming_row_stats(x, w, geo.row_scale, std::nullopt, std::nullopt,
                                                         std::nullopt, geo.column, geo.target_logit, false, chunk));
  const auto [expected, other_mass] = expectation(x, w, geo, lse, cost, chunk);
  // Σ_{j≠t} p_j·(1 − ê_j·ê_t) + p_t·(1 − ê_t·ê_t): no cancellation as p_t → 1 (emo.py)
  // the sum over j ≠ t is ≥ 0 as the sum it stands for (near-duplicate cosines can round above 1); NaN kept
  const at::Tensor others =
      (other_mass - geo.query_scale * (expected * geo.query.to(expected.scalar_type())).sum(1)).clamp_min(0.0);
  const at::Tensor emo = others + at::exp(geo.target_logit - lse) * (1.0 - geo.self_cosine);
  const at::Tensor ce = lse - geo.target_logit;
  const at::Tensor zero = at::zeros_like(ce);
  return {at::where(geo.valid, ce, zero), at::where(geo.valid, emo, zero), lse};
}

std::tuple<at::Tensor, at::Tensor> emo_rows_backward(const at::Tensor& grad_ce, const at::Tensor& grad_emo,
                                                     const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                                     const at::Tensor& cost, const at::Tensor& lse,
                                                     const at::Tensor& emo, int64_t ignore_index,
                                                     bool need_weight_grad, int64_t class_chunk) {
  const EMOGeometry geo(x, w, target, cost, ignore_index);
  const at::ScalarType acc = geo.target_logit.scalar_type();
  const at::Tensor lse_acc = lse.to(acc), zero = at::zeros_like(lse_acc);
  const at::Tensor g_ce = at::where(geo.valid, grad_ce.to(acc), zero);
  const at::Tensor g_emo = at::where(geo.valid, grad_emo.to(acc), zero);
  // dL/dz_j = g_ce·(p_j − δ_jt) + g_emo·p_j·(1 − L_emo − ê_j·ê_t)
  const at::Tensor coef_p = g_ce + g_emo * (1.0 - emo.to(acc));
  // g_ce·(p_t − 1) + g_emo·p_t·((1 − ê_t·ê_t) − L_emo), written so that neither term is lost for a confident token:
  // g_ce·expm1(log p_t), and L_emo not through coef_p's 1 − L_emo (1 in fp32 for L_emo < 6e-8)
  const at::Tensor log_p_target = geo.target_logit - lse_acc;
  const at::Tensor p_target = at::exp(log_p_target);
  const at::Tensor target_grad = g_ce * at::expm1(log_p_target) +
                                 g_emo * p_target * ((1.0 - geo.self_cosine) - emo.to(acc));
  // the cost term needs a second N × chunk buffer (q·kᵀ): half the chunk keeps the same memory
  const int64_t chunk = class_chunk > 0 ? class_chunk : std::max<int64_t>(256, loss::class_chunk(0, x.size(0), acc) / 2);
  const auto [grad_x, grad_w, unused_bias] = streaming_grads_finalized(
      x, w, geo.row_scale, std::nullopt, std::nullopt, std::nullopt, geo.column, lse_acc, coef_p, zero, target_grad,
      /*need_bias_grad=*/false, need_weight_grad, chunk, WeightChunkFinalizer(), geo.query, geo.query_scale, cost,
      geo.key_scale, g_emo);
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0})};
}

at::Tensor emo_loss(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                    const at::Tensor& cost_embedding, const EMOOptions& o) {
  const auto [ce, emo, valid] = emo_rows("marginkern::emo_loss", x, w, target, cost_embedding, o);
  return loss::reduce(emo, valid, o.reduction);
}

at::Tensor emo_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                             const at::Tensor& cost_embedding, const EMOOptions& o) {
  const auto [ce, emo, valid] = emo_rows("marginkern::emo_cross_entropy", x, w, target, cost_embedding, o);
  const at::Tensor rows = 0.5 * (ce + (ce / (emo + kEmoRatioEps)).detach() * emo);
  return loss::reduce(rows, valid, o.reduction);
}

}  // namespace marginkern
