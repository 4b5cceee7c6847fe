// margin_loss.h: the forward and backward of marginkern/margin_ce.py in C++, over the streaming ops of
// streaming_ce.cpp, wrapped in a LibTorch autograd Function.
#include "margin_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "loss_reduction.h"
#include "streaming_ce.h"

namespace marginkern {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kExactSlopeMinAngle = 1e-3;  // margin.py EXACT_SLOPE_MIN_ANGLE: bounds dψ/dc near θ = 0, π

// (−1)^k for k = ⌊φ/π⌋, and k, of φ = m1·θ + m2.
std::pair<at::Tensor, at::Tensor> branch(const at::Tensor& phi) {
  const at::Tensor k = at::floor(phi / kPi);
  return {1.0 - 2.0 * at::remainder(k, 2.0), k};
}

// t + m2 and t − m3 with each row's margins: the options' plus the per-row offsets row_margins (N, 2) when defined
// (margin_ce.py row_margin_values).
at::Tensor plus_m2(const at::Tensor& t, const MarginLossOptions& o, const at::Tensor& row_margins) {
  return row_margins.defined() ? t + (o.m2 + row_margins.select(1, 0).to(t.scalar_type())) : t + o.m2;
}
at::Tensor minus_m3(const at::Tensor& t, const MarginLossOptions& o, const at::Tensor& row_margins) {
  return row_margins.defined() ? t - (o.m3 + row_margins.select(1, 1).to(t.scalar_type())) : t - o.m3;
}

// ψ(c) (margin.py margin_psi), eased by λ (margin.py blend_psi).
at::Tensor margin_psi(const at::Tensor& cosine, const MarginLossOptions& o, const at::Tensor& row_margins) {
  const at::Tensor phi = plus_m2(o.m1 * at::acos(cosine.clamp(-1.0, 1.0)), o, row_margins);
  const auto [sign, k] = branch(phi);
  const at::Tensor psi = minus_m3(sign * at::cos(phi) - 2.0 * k, o, row_margins);
  return o.lambda == 0.0 ? psi : (o.lambda * cosine + psi) / (1.0 + o.lambda);
}

// dψ/dc, exact with θ clamped away from 0 and π, or 1 (margin.py margin_slope), eased by λ (blend_slope).
at::Tensor margin_slope(const at::Tensor& cosine, const MarginLossOptions& o, const at::Tensor& row_margins) {
  if (!o.exact_margin_grad) return at::ones_like(cosine);  // (λ + 1)/(1 + λ) = 1 too
  const at::Tensor theta = at::acos(cosine.clamp(-1.0, 1.0)).clamp(kExactSlopeMinAngle, kPi - kExactSlopeMinAngle);
  const at::Tensor phi = plus_m2(o.m1 * theta, o, row_margins);
  const at::Tensor sign = branch(phi).first;
  const at::Tensor slope = (sign * o.m1 * at::sin(phi) / at::sin(theta)).clamp_min(0.0);
  return o.lambda == 0.0 ? slope : (o.lambda + slope) / (1.0 + o.lambda);
}

// The per-row quantities of the target column (margin_ce.py target_rows), in the accumulation dtype.
// From scratch in the forward pass; in the backward pass from the forward's saved (N, 4) row state
// [‖x‖, ‖w_y‖, cos, ψ] ((N, 5) with sub-centres: + the target's sub-centre k_y) and (C,) class-centre
// norms, the same layout as the Python op's.
struct TargetGeometry {
  at::Tensor valid, column, xf, x_norm, w_target_norm, cosine, psi, col_norm, row_scale, target_logit;
  at::Tensor subcenter;  // (N,) int64 k_y with sub-centres, else undefined
  int64_t K = 1;

  TargetGeometry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const MarginLossOptions& o,
                 const at::Tensor& row_margins, const at::Tensor& row_state = at::Tensor(),
                 const at::Tensor& saved_col_norm = at::Tensor()) {
    const at::ScalarType acc = accumulation_dtype(x.scalar_type());
    K = o.subcenters;
    valid = target.ne(o.ignore_index);
    column = at::where(valid, target, -1);
    xf = x.to(acc);
    if (row_state.defined()) {
      const auto parts = row_state.to(acc).unbind(1);
      x_norm = parts[0], w_target_norm = parts[1], cosine = parts[2], psi = parts[3];
      if (K > 1) subcenter = parts[4].to(at::kLong);
      if (o.normalize) col_norm = saved_col_norm.to(acc);
    } else {
      if (K > 1) subcenter = best_subcenters(w, acc);
      const at::Tensor w_target = target_rows(w, acc);
      x_norm = at::linalg_vector_norm(xf, 2, {1}).clamp_min(loss::kNormEps);
      w_target_norm = at::linalg_vector_norm(w_target, 2, {1}).clamp_min(loss::kNormEps);
      cosine = ((xf * w_target).sum(1) / (x_norm * w_target_norm)).clamp(-1.0, 1.0);
      psi = margin_psi(cosine, o, row_margins);
      if (o.normalize) col_norm = loss::row_norms(w, acc).clamp_min(loss::kNormEps);
    }
    at::Tensor logit;
    if (o.normalize) {
      row_scale = o.scale / x_norm;
      logit = o.scale * psi;
    } else {
      row_scale = at::full_like(x_norm, o.scale);
      logit = o.scale * x_norm * w_target_norm * psi;
    }
    target_logit = at::where(valid, logit, at::zeros_like(logit));
  }

  // w_{y_n} in the accumulation dtype (with sub-centres: row y_n·K + k_y), zeros on ignored rows.
  at::Tensor target_rows(const at::Tensor& w, at::ScalarType acc) const {
    const at::Tensor rows = K == 1 ? column.clamp_min(0) : column.clamp_min(0) * K + subcenter;
    return w.index_select(0, rows).to(acc) * valid.unsqueeze(1);
  }

  // k_y: the target class's sub-centre of largest cosine to x_n (the first of equal ones; a NaN wins, as
  // torch.max), over blocks of rows: O(block·K·D), never N × C.
  at::Tensor best_subcenters(const at::Tensor& w, at::ScalarType acc) const {
    const int64_t N = xf.size(0), D = xf.size(1);
    at::Tensor out = at::empty({N}, column.options());
    const at::Tensor classes = w.view({-1, K, D});
    const int64_t block = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, K * D * 4));
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      const at::Tensor candidates = classes.index_select(0, column.narrow(0, r0, n).clamp_min(0)).to(acc);
      const at::Tensor cosines = at::linalg_vecdot(candidates, xf.narrow(0, r0, n).unsqueeze(1)) /
                                 at::linalg_vector_norm(candidates, 2, {2}).clamp_min(loss::kNormEps);
      out.narrow(0, r0, n).copy_(std::get<1>(cosines.max(1)));
    }
    return out;
  }

  std::optional<at::Tensor> col_scale() const {
    return col_norm.defined() ? std::optional<at::Tensor>(col_norm.reciprocal()) : std::nullopt;
  }

  at::Tensor row_state() const {
    if (K == 1) return at::stack({x_norm, w_target_norm, cosine, psi}, 1);
    return at::stack({x_norm, w_target_norm, cosine, psi, subcenter.to(x_norm.scalar_type())}, 1);
  }

  Subcenters subcenters() const { return {K, subcenter}; }
};

// The engine's hard negatives of the options (margin_ce.py hard_negative_spec): with z = s·c, s·(a·c² + b·c + d) =
// (a/s)·z² + b·z + d·s above the threshold T (or s·τ for a fixed cosine threshold τ), +inf on ignored rows (nothing is
// hard there).
HardNegatives hard_negatives_of(const MarginLossOptions& o, const TargetGeometry& geo) {
  if (!o.hard_negatives) return {};
  const auto [a, b, d] = *o.hard_negatives;
  const at::Tensor none = at::full_like(geo.target_logit, std::numeric_limits<double>::infinity());
  const at::Tensor above = o.hard_negative_threshold
                               ? at::full_like(geo.target_logit, o.scale * *o.hard_negative_threshold)
                               : geo.target_logit;
  return {{a / o.scale, b, d * o.scale}, at::where(geo.valid, above, none)};
}

// dL/dT per row for the per-row loss gradient g (0 on ignored rows; margin_ce.py _target_logit_grads).
at::Tensor target_logit_grads(const TargetGeometry& geo, const at::Tensor& g, const at::Tensor& lse,
                              const MarginLossOptions& o, double num_classes) {
  const double eps = o.label_smoothing;
  const at::Tensor p_target = at::exp(geo.target_logit - lse.to(g.scalar_type()));
  // masked, not just multiplied by g = 0: an ignored row may hold garbage (an inf norm would make 0·inf = NaN
  // and index_add it into class 0's gradient below)
  return at::where(geo.valid, g * (p_target - (1.0 - eps) - eps / num_classes), at::zeros_like(g));
}

// dL/d(row_margins) (N, 2) from dL/dT (margin_ce.py row_margin_grads): T = r·ψ_λ with r = s or s·‖x‖‖w_y‖,
// ∂ψ/∂m2 = −(−1)^k sin φ, ∂ψ/∂m3 = −1, ψ_λ = (λc + ψ)/(1 + λ).
at::Tensor row_margin_grads(const TargetGeometry& geo, const at::Tensor& grad_target_logit, const MarginLossOptions& o,
                            const at::Tensor& row_margins) {
  const at::Tensor radius = o.normalize ? at::full_like(geo.x_norm, o.scale) : o.scale * geo.x_norm * geo.w_target_norm;
  const at::Tensor grad_psi = grad_target_logit * radius / (1.0 + o.lambda);
  const at::Tensor phi = plus_m2(o.m1 * at::acos(geo.cosine.clamp(-1.0, 1.0)), o, row_margins);
  const at::Tensor dpsi_dm2 = -branch(phi).first * at::sin(phi);
  // masked: an ignored row's own (unused) margin may be NaN, and 0·NaN would be NaN
  const at::Tensor grads = at::stack({grad_psi * dpsi_dm2, -grad_psi}, 1);
  return at::where(geo.valid.unsqueeze(1), grads, at::zeros_like(grads)).to(row_margins.scalar_type());
}

// dL/dw = (I − ŵŵᵀ)·(dL/dŵ)/‖w‖ in place of the raw gradient (which holds (dL/dŵ)/‖w‖), over blocks of
// rows: a (C, D) temporary would double the backward pass's memory (engine.project_out_rows).
void project_out_rows_(const at::Tensor& grad_w, const at::Tensor& w, const at::Tensor& col_norm) {
  const int64_t C = w.size(0), D = std::max<int64_t>(1, w.size(1));
  const int64_t rows = std::max<int64_t>(1, (int64_t{4} << 20) / (D * grad_w.element_size()));
  for (int64_t c0 = 0; c0 < C; c0 += rows) {
    const int64_t n = std::min(rows, C - c0);
    at::Tensor g = grad_w.narrow(0, c0, n);
    const at::Tensor wf = w.narrow(0, c0, n).to(grad_w.scalar_type());
    g.sub_(wf * ((wf * g).sum(1) * col_norm.narrow(0, c0, n).pow(-2)).unsqueeze(1));
  }
}

// The options travel in the autograd context as plain IValues.
void save_options(torch::autograd::AutogradContext* ctx, const MarginLossOptions& o) {
  auto& d = ctx->saved_data;
  d["scale"] = o.scale, d["m1"] = o.m1, d["m2"] = o.m2, d["m3"] = o.m3, d["normalize"] = o.normalize;
  d["exact_margin_grad"] = o.exact_margin_grad, d["label_smoothing"] = o.label_smoothing;
  d["ignore_index"] = o.ignore_index, d["reduction"] = o.reduction, d["class_chunk"] = o.class_chunk;
  d["subcenters"] = o.subcenters, d["lambda"] = o.lambda;
  d["has_hard_negatives"] = o.hard_negatives.has_value();
  if (o.hard_negatives) {
    d["hard_a"] = (*o.hard_negatives)[0], d["hard_b"] = (*o.hard_negatives)[1], d["hard_d"] = (*o.hard_negatives)[2];
  }
  d["has_hard_threshold"] = o.hard_negative_threshold.has_value();
  if (o.hard_negative_threshold) d["hard_threshold"] = *o.hard_negative_threshold;
}

void check_row_margins(const char* op, const at::Tensor& x, const at::Tensor& row_margins);
void check_hard_negatives(const char* op, const MarginLossOptions& o);

MarginLossOptions saved_options(torch::autograd::AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  MarginLossOptions o;
  o.scale = d["scale"].toDouble(), o.m1 = d["m1"].toDouble(), o.m2 = d["m2"].toDouble(), o.m3 = d["m3"].toDouble();
  o.normalize = d["normalize"].toBool(), o.exact_margin_grad = d["exact_margin_grad"].toBool();
  o.label_smoothing = d["label_smoothing"].toDouble(), o.ignore_index = d["ignore_index"].toInt();
  o.reduction = d["reduction"].toStringRef(), o.class_chunk = d["class_chunk"].toInt();
  o.subcenters = d["subcenters"].toInt(), o.lambda = d["lambda"].toDouble();
  if (d["has_hard_negatives"].toBool()) {
    o.hard_negatives = std::array<double, 3>{d["hard_a"].toDouble(), d["hard_b"].toDouble(), d["hard_d"].toDouble()};
  }
  if (d["has_hard_threshold"].toBool()) o.hard_negative_threshold = d["hard_threshold"].toDouble();
  return o;
}

struct MarginCrossEntropy : public torch::autograd::Function<MarginCrossEntropy> {
  // row_margins: the (N, 2) offsets, or a (0,) placeholder for none (a Function's inputs must be defined tensors)
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& target, const at::Tensor& row_margins, const MarginLossOptions& o) {
    const auto [rows, lse, row_state, col_norm] =
        margin_ce_rows(x, w, target, o, row_margins.dim() == 2 ? row_margins : at::Tensor());
    ctx->save_for_backward({x, w, target, lse, row_state, col_norm, row_margins});
    save_options(ctx, o);
    return loss::reduce(rows, target.ne(o.ignore_index), o.reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    loss::check_once_differentiable("marginkern::margin_cross_entropy");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &target = saved[2];
    const MarginLossOptions o = saved_options(ctx);
    const at::ScalarType acc = saved[3].scalar_type();
    const at::Tensor g = loss::row_grads(grad_outputs[0], target.ne(o.ignore_index), o.reduction, acc);
    const bool need_w = ctx->needs_input_grad(1);
    const at::Tensor row_margins = saved[6].dim() == 2 ? saved[6] : at::Tensor();
    at::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0) || need_w) {  // (only the margins': O(N), no pass over the classes)
      std::tie(grad_x, grad_w) =
          margin_ce_rows_backward(g, x, w, target, saved[3], saved[4], saved[5], o, need_w, row_margins);
    }
    at::Tensor grad_margins;
    if (row_margins.defined() && ctx->needs_input_grad(3)) {
      const TargetGeometry geo(x, w, target, o, row_margins, saved[4], saved[5]);
      const double num_classes = static_cast<double>(w.size(0) / o.subcenters);
      grad_margins = row_margin_grads(geo, target_logit_grads(geo, g, saved[3], o, num_classes), o, row_margins);
    }
    return {grad_x, need_w ? grad_w : at::Tensor(), at::Tensor(), grad_margins, at::Tensor()};
  }
};

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const MarginLossOptions& o) {
  constexpr const char* op = "marginkern::margin_cross_entropy";
  TORCH_CHECK(o.subcenters >= 1 && w.dim() == 2 && w.size(0) % o.subcenters == 0, op,
              ": weight must have C·subcenters rows, got ", w.sizes(), " for subcenters=", o.subcenters);
  TORCH_CHECK(o.subcenters == 1 || o.normalize, op, ": subcenters > 1 needs normalize (sub-centres compete by cosine)");
  loss::check_classification_inputs(op, x, w, target, o.ignore_index, o.reduction, o.subcenters);
  TORCH_CHECK(std::isfinite(o.m1) && std::isfinite(o.m2) && std::isfinite(o.m3) && std::isfinite(o.scale) &&
                  o.m1 >= 1.0 && o.m2 >= 0.0 && o.scale > 0, op,
              ": the margins need m1 >= 1, m2 >= 0, finite m3 and a positive finite scale, got m1=", o.m1,
              " m2=", o.m2, " m3=", o.m3, " scale=", o.scale);
  // an angle in radians: pytorch-metric-learning's ArcFaceLoss takes degrees (28.6), 28.6 radians here (checks.py)
  TORCH_CHECK(o.m2 <= kPi, op, ": m2 is an angle in radians (ArcFace's 0.5) and must lie in [0, pi], got ", o.m2,
              "; in degrees, pass m2 * pi / 180 = ", o.m2 * kPi / 180.0);
  loss::check_label_smoothing(op, o.label_smoothing);
  TORCH_CHECK(std::isfinite(o.lambda) && o.lambda >= 0.0, op, ": lambda must be a finite number >= 0, got ",
              o.lambda);
  check_hard_negatives(op, o);
}

// Per-row margin offsets: undefined, or (N, 2) floating point (their values are not checked: a NaN margin gives a
// NaN loss row, as in Python).
void check_row_margins(const char* op, const at::Tensor& x, const at::Tensor& row_margins) {
  if (!row_margins.defined()) return;
  TORCH_CHECK(row_margins.dim() == 2 && row_margins.size(0) == x.size(0) && row_margins.size(1) == 2 &&
                  row_margins.is_floating_point() && row_margins.device() == x.device(),
              op, ": row_margins must be a floating-point (", x.size(0), ", 2) tensor on the input's device (per-row ",
              "offsets of m2 and m3), got ", row_margins.scalar_type(), " ", row_margins.sizes(), " on ",
              row_margins.device());
}

// (Their values are not checked: a NaN coefficient gives NaN losses, as on the other backends, e.g. CurricularFace's
// t after a NaN embedding.)
void check_hard_negatives(const char* op, const MarginLossOptions& o) {
  TORCH_CHECK(!o.hard_negatives || o.normalize, op, ": hard_negatives needs normalize (it re-weights cosines)");
  TORCH_CHECK(!o.hard_negative_threshold || o.hard_negatives, op,
              ": hard_negative_threshold needs hard_negatives (the coefficients it selects for)");
  TORCH_CHECK(!o.hard_negative_threshold || std::isfinite(*o.hard_negative_threshold), op,
              ": hard_negative_threshold must be a finite cosine, got ", o.hard_negative_threshold.value_or(0.0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_rows(const at::Tensor& x, const at::Tensor& w,
                                                                          const at::Tensor& target,
                                                                          const MarginLossOptions& o,
                                                                          const at::Tensor& row_margins) {
  check_row_margins("marginkern::margin_ce_rows", x, row_margins);
  check_hard_negatives("marginkern::margin_ce_rows", o);
  const TargetGeometry geo(x, w, target, o, row_margins);
  const double eps = o.label_smoothing, C = static_cast<double>(w.size(0) / o.subcenters);
  const int64_t chunk = loss::class_chunk(o.class_chunk, x.size(0), geo.xf.scalar_type(), o.subcenters);
  const auto [lse, sum_logits] = streaming_row_stats_of_subcenters(
      x, w, geo.row_scale, geo.col_scale(), std::nullopt, geo.column, geo.target_logit, eps > 0, chunk,
      geo.subcenters(), hard_negatives_of(o, geo));
  at::Tensor rows = lse - (1.0 - eps) * geo.target_logit;
  if (eps > 0) rows = rows - (eps / C) * sum_logits;
  rows = at::where(geo.valid, rows, at::zeros_like(rows));
  const at::Tensor col_norm = geo.col_norm.defined() ? geo.col_norm : geo.x_norm.new_empty({0});
  return {rows, lse, geo.row_state(), col_norm};
}

std::tuple<at::Tensor, at::Tensor> margin_ce_rows_backward(const at::Tensor& grad_rows, const at::Tensor& x,
                                                           const at::Tensor& w, const at::Tensor& target,
                                                           const at::Tensor& lse, const at::Tensor& row_state,
                                                           const at::Tensor& col_norm, const MarginLossOptions& o,
                                                           bool need_weight_grad, const at::Tensor& row_margins) {
  check_row_margins("marginkern::margin_ce_rows_backward", x, row_margins);
  check_hard_negatives("marginkern::margin_ce_rows_backward", o);
  const int64_t state_width = o.subcenters == 1 ? 4 : 5;
  TORCH_CHECK(row_state.dim() == 2 && row_state.size(0) == x.size(0) && row_state.size(1) == state_width,
              "marginkern::margin_ce_rows_backward: row_state must have shape (", x.size(0), ", ", state_width,
              ") (the forward's, for subcenters=", o.subcenters, "), got shape ", row_state.sizes());
  TORCH_CHECK(col_norm.dim() == 1 && col_norm.size(0) == (o.normalize ? w.size(0) : 0),
              "marginkern::margin_ce_rows_backward: col_norm must have shape (", (o.normalize ? w.size(0) : 0),
              ",) (the forward's), got shape ", col_norm.sizes());
  const TargetGeometry geo(x, w, target, o, row_margins, row_state, col_norm);
  const at::ScalarType acc = geo.xf.scalar_type();
  const double eps = o.label_smoothing, s = o.scale, C = static_cast<double>(w.size(0) / o.subcenters);
  const at::Tensor g = at::where(geo.valid, grad_rows.to(acc), at::zeros_like(geo.x_norm));
  const at::Tensor zero = at::zeros_like(g);
  const at::Tensor grad_target_logit = target_logit_grads(geo, g, lse, o, C);
  const at::Tensor slope = margin_slope(geo.cosine, o, row_margins);
  // dT/da_y with the norms held fixed (normalize: the projections below chain through x̂ and ŵ); without
  // normalize, T also depends on the norms: the radial terms s·(ψ − cψ')·(‖w_y‖/‖x‖)·x and ·w_y.
  const at::Tensor target_grad =
      o.normalize ? grad_target_logit * s * slope / (geo.x_norm * geo.w_target_norm) : grad_target_logit * s * slope;
  // What W's chunk of the gradient needs beyond Gᵀ·X, applied chunk by chunk before it is stored in w's dtype.
  WeightChunkFinalizer finalize;
  at::Tensor radial;
  if (o.normalize) {  // dL/dw = (I − ŵŵᵀ)·(dL/dŵ)/‖w‖; the raw gradient already holds (dL/dŵ)/‖w‖
    finalize = [&](int64_t r0, int64_t r1, at::Tensor& chunk) {
      project_out_rows_(chunk, w.narrow(0, r0, r1 - r0), geo.col_norm.narrow(0, r0, r1 - r0));
    };
  } else {
    // masked, not just multiplied by dL/dT = 0: an ignored row may hold a NaN ψ (a NaN margin)
    radial = at::where(geo.valid, grad_target_logit * s * (geo.psi - geo.cosine * slope), zero);
    if (need_weight_grad) {
      const at::Tensor w_radial = at::where(geo.valid, radial * geo.x_norm / geo.w_target_norm, zero);
      const at::Tensor contribution = w_radial.unsqueeze(1) * geo.target_rows(w, acc);
      finalize = [&, contribution](int64_t c0, int64_t c1, at::Tensor& chunk) {
        // the rows whose target lies in this chunk (masked, not gathered: no data-dependent shapes)
        const at::Tensor in_chunk = (geo.column >= c0) & (geo.column < c1);
        chunk.index_add_(0, (geo.column - c0).clamp(0, c1 - c0 - 1),
                         at::where(in_chunk.unsqueeze(1), contribution, at::zeros_like(contribution)));
      };
    }
  }
  const int64_t chunk = loss::class_chunk(o.class_chunk, x.size(0), acc, o.subcenters);
  auto [grad_x, grad_w, unused_bias] = streaming_grads_finalized(
      x, w, geo.row_scale, geo.col_scale(), std::nullopt, std::nullopt, geo.column, lse, g, g * (eps / C), target_grad,
      /*need_bias_grad=*/false, need_weight_grad, chunk, finalize, std::nullopt, std::nullopt, std::nullopt,
      std::nullopt, std::nullopt, geo.subcenters(), at::Tensor(), Teacher{}, hard_negatives_of(o, geo));
  if (o.normalize) {
    const at::Tensor x_hat = geo.xf / geo.x_norm.unsqueeze(1);
    grad_x = grad_x - (x_hat * grad_x).sum(1, true) * x_hat;
  } else {
    grad_x = grad_x + (radial * geo.w_target_norm / geo.x_norm).unsqueeze(1) * geo.xf;
  }
  return {grad_x.to(x.scalar_type()), need_weight_grad ? grad_w.to(w.scalar_type()) : w.new_empty({0})};
}

at::Tensor margin_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const MarginLossOptions& options) {
  return margin_cross_entropy(x, w, target, at::Tensor(), options);
}

at::Tensor margin_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const at::Tensor& row_margins, const MarginLossOptions& options) {
  check_inputs(x, w, target, options);
  check_row_margins("marginkern::margin_cross_entropy", x, row_margins);
  return MarginCrossEntropy::apply(x, w, target.to(at::kLong),
                                   row_margins.defined() ? row_margins : x.new_empty({0}), options);
}

}  // namespace marginkern
