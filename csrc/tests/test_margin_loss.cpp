// The C++ margin loss (margin_loss.h) against a naive LibTorch computation of the same definition
// (DESIGN.md §4) in float64 with the whole N × C logits and autograd: loss and both gradients, for
// ArcFace, CosFace, SphereFace with label smoothing, the straight-through slope, unnormalized logits,
// ignored rows, every reduction, several class chunks, sub-centres (sub-center ArcFace: the max over each
// class's K cosines), A-Softmax's λ, per-row margins (AdaFace, MagFace: their gradient too); plus the error for an
// out-of-range target; hard negatives (CurricularFace, MV-Softmax).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "loss_checks.h"
#include "margin_loss.h"

namespace {

using marginkern::MarginLossOptions;
constexpr double kPi = 3.14159265358979323846;

// ψ with row n's margins m2 + Δm2_n, m3 + Δm3_n when row_margins (N, 2) is defined.
at::Tensor naive_psi(const at::Tensor& c, const MarginLossOptions& o, const at::Tensor& row_margins) {
  const at::Tensor c_in = o.exact_margin_grad ? c : c.detach();
  at::Tensor phi = o.m1 * at::acos(c_in) + o.m2;
  if (row_margins.defined()) phi = phi + row_margins.select(1, 0);
  const at::Tensor k = at::floor(phi / kPi).detach();
  at::Tensor psi = (1.0 - 2.0 * at::remainder(k, 2.0)) * at::cos(phi) - 2.0 * k - o.m3;
  if (row_margins.defined()) psi = psi - row_margins.select(1, 1);
  const at::Tensor margin = o.exact_margin_grad ? psi : psi + (c - c.detach());  // straight-through: dψ/dc := 1
  return (o.lambda * c + margin) / (1.0 + o.lambda);  // A-Softmax's λ (0: the margin itself)
}

// The definition with every logit materialised: float64, autograd for the gradients.
at::Tensor naive_loss(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const MarginLossOptions& o,
                      const at::Tensor& row_margins) {
  const at::Tensor valid = target.ne(o.ignore_index);
  const at::Tensor t = at::where(valid, target, 0).unsqueeze(1);
  const at::Tensor x_norm = x.norm(2, {1}, true), w_norm = w.norm(2, {1}, true);
  const at::Tensor raw = x.matmul(w.t());
  at::Tensor cos_all = raw / (x_norm * w_norm.t());
  if (o.subcenters > 1) cos_all = std::get<0>(cos_all.view({x.size(0), -1, o.subcenters}).max(2));
  const at::Tensor cos_t = cos_all.gather(1, t).squeeze(1).clamp(-1.0, 1.0);
  at::Tensor logits, target_logit;
  if (o.normalize) {
    const at::Tensor psi = naive_psi(cos_t, o, row_margins);
    if (o.hard_negatives) {  // the official heads' mask (no gradient) and re-weighting; the target cell is replaced
      // (above ψ, or above a fixed threshold: insightface's inter-class filtering)
      const auto [a, b, d] = *o.hard_negatives;
      const at::Tensor above = o.hard_negative_threshold ? at::full_like(psi, *o.hard_negative_threshold) : psi;
      const at::Tensor hard = cos_all.gt(above.detach().unsqueeze(1));
      cos_all = at::where(hard, a * cos_all * cos_all + b * cos_all + d, cos_all);
    }
    logits = o.scale * cos_all;
    target_logit = o.scale * psi;
  } else {
    logits = o.scale * raw;
    target_logit = o.scale * x_norm.squeeze(1) * w_norm.squeeze(1).index_select(0, t.squeeze(1)) *
                   naive_psi(cos_t, o, row_margins);
  }
  logits = logits.scatter(1, t, target_logit.unsqueeze(1));
  const double eps = o.label_smoothing, C = static_cast<double>(w.size(0) / o.subcenters);
  at::Tensor rows = at::logsumexp(logits, {1}) - (1.0 - eps) * target_logit - (eps / C) * logits.sum(1);
  rows = at::where(valid, rows, at::zeros_like(rows));
  if (o.reduction == "none") return rows;
  if (o.reduction == "sum") return rows.sum();
  return rows.sum() / valid.sum().clamp_min(1).to(at::kDouble);
}

void check_case(const char* name, MarginLossOptions o, at::ScalarType dtype, int N, int C, int D,
                bool with_row_margins = false) {
  at::manual_seed(N * 1000 + C);
  const at::Tensor x0 = at::randn({N, D}, at::kDouble), w0 = at::randn({C * o.subcenters, D}, at::kDouble) * 0.3;
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(0, N, 4)}, o.ignore_index);  // every 4th row ignored
  // per-row offsets: Δm2 of both signs, Δm3 in [0, 0.3)
  const at::Tensor margins0 = at::stack({at::rand({N}, at::kDouble) - 0.5, 0.3 * at::rand({N}, at::kDouble)}, 1);
  // marginkern on `dtype` inputs
  const at::Tensor x = x0.to(dtype).requires_grad_(), w = w0.to(dtype).requires_grad_();
  const at::Tensor margins = with_row_margins ? margins0.to(dtype).requires_grad_() : at::Tensor();
  const at::Tensor loss = marginkern::margin_cross_entropy(x, w, target, margins, o);
  const at::Tensor seed = at::rand(loss.sizes(), at::kDouble) + 0.5;  // a generic upstream gradient
  std::vector<at::Tensor> inputs{x, w};
  if (with_row_margins) inputs.push_back(margins);
  const auto grads = torch::autograd::grad({loss}, inputs, {seed.to(loss.scalar_type())});
  // naive in float64 on the same (rounded) values
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor mr = with_row_margins ? margins.detach().to(at::kDouble).requires_grad_() : at::Tensor();
  const at::Tensor want = naive_loss(xr, wr, target, o, mr);
  std::vector<at::Tensor> exact{xr, wr};
  if (with_row_margins) exact.push_back(mr);
  const auto want_grads = torch::autograd::grad({want}, exact, {seed});
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;
  const std::string what = std::string(name) + (with_row_margins ? ", per-row margins" : "") +
                           (dtype == at::kDouble ? " (float64)" : " (float32)");
  EXPECT(loss.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat), "%s: loss dtype", what.c_str());
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
  if (with_row_margins) expect_close(what + ": grad row margins", grads[2], want_grads[2], tol);
}

void test_against_naive() {
  struct Case {
    const char* name;
    MarginLossOptions o;
  };
  std::vector<Case> cases;
  MarginLossOptions arcface;  // defaults: s = 64, m2 = 0.5
  arcface.scale = 16.0;
  cases.push_back({"ArcFace", arcface});
  MarginLossOptions cosface = arcface;
  cosface.m2 = 0.0, cosface.m3 = 0.35, cosface.reduction = "sum";
  cases.push_back({"CosFace, sum", cosface});
  MarginLossOptions sphere = arcface;
  sphere.m1 = 4.0, sphere.m2 = 0.0, sphere.scale = 8.0, sphere.label_smoothing = 0.1, sphere.reduction = "none";
  cases.push_back({"SphereFace + label smoothing, none", sphere});
  MarginLossOptions straight = arcface;
  straight.exact_margin_grad = false, straight.m3 = 0.1;
  cases.push_back({"combined, straight-through", straight});
  MarginLossOptions raw = arcface;
  raw.normalize = false, raw.m1 = 3.0, raw.m2 = 0.0, raw.scale = 1.0;
  cases.push_back({"L-Softmax (unnormalized)", raw});
  MarginLossOptions sphere_lambda = sphere;
  sphere_lambda.lambda = 5.0, sphere_lambda.scale = 4.0;
  cases.push_back({"SphereFace with A-Softmax's lambda = 5", sphere_lambda});
  MarginLossOptions raw_lambda = raw;
  raw_lambda.lambda = 2.0, raw_lambda.exact_margin_grad = false;
  cases.push_back({"L-Softmax with lambda = 2, straight-through", raw_lambda});
  MarginLossOptions subcenter = arcface;
  subcenter.subcenters = 3, subcenter.label_smoothing = 0.1;
  cases.push_back({"sub-center ArcFace (K = 3) + label smoothing", subcenter});
  MarginLossOptions subcenter_cosface = cosface;
  subcenter_cosface.subcenters = 2;
  cases.push_back({"sub-center CosFace (K = 2), sum", subcenter_cosface});
  for (const auto& c : cases) {
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      MarginLossOptions o = c.o;
      check_case(c.name, o, dtype, 37, 301, 45);
      check_case(c.name, o, dtype, 37, 301, 45, /*with_row_margins=*/true);
      o.class_chunk = 7;  // many chunks, targets in different ones
      check_case(c.name, o, dtype, 13, 50, 9);
      check_case(c.name, o, dtype, 13, 50, 9, /*with_row_margins=*/true);
    }
  }
}

// Only the margins need a gradient (the backward then skips the pass over the classes): the same margin gradient as
// with x and w; and a NaN margin on an ignored row stays out of every gradient (unnormalized: the radial term).
void test_margins_alone_and_a_nan_margin_on_an_ignored_row() {
  at::manual_seed(7);
  MarginLossOptions o;
  o.normalize = false, o.m1 = 2.0, o.m2 = 0.0, o.scale = 1.0;
  const at::Tensor x = at::randn({6, 5}, at::kDouble), w = at::randn({9, 5}, at::kDouble);
  at::Tensor target = at::randint(0, 9, {6}, at::kLong);
  target[2] = o.ignore_index;
  at::Tensor margins = at::rand({6, 2}, at::kDouble);
  margins[2][0] = std::nan("");
  margins.requires_grad_();
  const at::Tensor xg = x.clone().requires_grad_(), wg = w.clone().requires_grad_();
  const auto all = torch::autograd::grad({marginkern::margin_cross_entropy(xg, wg, target, margins, o)},
                                         {xg, wg, margins});
  const auto alone = torch::autograd::grad({marginkern::margin_cross_entropy(x, w, target, margins, o)}, {margins});
  EXPECT(at::isfinite(all[0]).all().item<bool>() && at::isfinite(all[1]).all().item<bool>() &&
             at::isfinite(all[2]).all().item<bool>(),
         "a NaN margin on an ignored row reached a gradient");
  EXPECT(all[2][2].abs().sum().item<double>() == 0.0, "the ignored row's margin got a gradient");
  expect_close("margins alone: grad row margins", alone[0], all[2], 1e-15);
}

// Hard negatives (CurricularFace (1, t, 0), MV-Softmax (0, w, w − 1), any quadratic; insightface's inter-class
// filtering: (0, 0, 0) above a fixed threshold) with label smoothing, per-row margins, sub-centres; a case where every
// fourth row sits near its centre (few hard negatives there).
void test_hard_negatives() {
  struct Case {
    const char* name;
    std::array<double, 3> coefs;
    double m2, m3, smoothing;
    int64_t subcenters;
    std::optional<double> threshold;
  };
  const std::vector<Case> cases{{"CurricularFace", {1.0, 0.3, 0.0}, 0.5, 0.0, 0.0, 1, std::nullopt},
                                {"MV-AM-Softmax", {0.0, 1.12, 0.12}, 0.0, 0.35, 0.1, 1, std::nullopt},
                                {"any quadratic, sub-centres", {-0.5, 1.3, 0.25}, 0.3, 0.1, 0.0, 3, std::nullopt},
                                {"inter-class filtering", {0.0, 0.0, 0.0}, 0.5, 0.0, 0.1, 1, 0.1},
                                {"fixed threshold, sub-centres", {0.5, 0.8, 0.1}, 0.0, 0.35, 0.0, 3, 0.2}};
  for (const auto& c : cases) {
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      MarginLossOptions o;
      o.scale = 16.0, o.m2 = c.m2, o.m3 = c.m3, o.label_smoothing = c.smoothing, o.subcenters = c.subcenters;
      o.hard_negatives = c.coefs;
      o.hard_negative_threshold = c.threshold;
      o.class_chunk = 17;  // several chunks
      check_case(c.name, o, dtype, 37, 101, 12);
      check_case(c.name, o, dtype, 13, 50, 9, /*with_row_margins=*/true);
    }
  }
  // (0, 1, 0) is the plain loss
  MarginLossOptions plain;
  plain.scale = 16.0;
  MarginLossOptions identity = plain;
  identity.hard_negatives = std::array<double, 3>{0.0, 1.0, 0.0};
  const at::Tensor x = at::randn({9, 5}, at::kDouble), w = at::randn({20, 5}, at::kDouble);
  const at::Tensor target = at::randint(0, 20, {9}, at::kLong);
  expect_close("hard negatives (0, 1, 0)", marginkern::margin_cross_entropy(x, w, target, identity),
               marginkern::margin_cross_entropy(x, w, target, plain), 1e-15);
  bool threw = false;
  try {
    MarginLossOptions unnormalised = identity;
    unnormalised.normalize = false, unnormalised.m2 = 0.0;
    marginkern::margin_cross_entropy(x, w, target, unnormalised);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("hard_negatives needs normalize") != std::string::npos;
  }
  EXPECT(threw, "hard negatives without normalize must raise an error that names them");
  threw = false;
  try {
    MarginLossOptions threshold_alone = plain;
    threshold_alone.hard_negative_threshold = 0.3;
    marginkern::margin_cross_entropy(x, w, target, threshold_alone);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("hard_negative_threshold needs hard_negatives") != std::string::npos;
  }
  EXPECT(threw, "a hard-negative threshold without coefficients must raise an error that names both");
}

void test_all_rows_ignored_and_bad_target() {
  const at::Tensor x = at::randn({3, 4}, at::kDouble).requires_grad_(), w = at::randn({5, 4}, at::kDouble).requires_grad_();
  const at::Tensor loss = marginkern::margin_cross_entropy(x, w, at::full({3}, -100, at::kLong));
  const auto grads = torch::autograd::grad({loss}, {x, w});
  EXPECT(loss.item<double>() == 0.0 && grads[0].abs().max().item<double>() == 0.0 &&
             grads[1].abs().max().item<double>() == 0.0,
         "all rows ignored: loss %g, want 0 with zero gradients", loss.item<double>());
  bool threw = false;
  try {
    marginkern::margin_cross_entropy(x, w, at::tensor(std::vector<int64_t>{0, 5, 1}));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("target must hold class indices in [0, C=5)") != std::string::npos;
  }
  EXPECT(threw, "a target of 5 with C = 5 must raise an error that names target and the range");
  threw = false;
  try {
    MarginLossOptions degrees;
    degrees.m2 = 28.6;  // pytorch-metric-learning's ArcFace margin, in degrees
    marginkern::margin_cross_entropy(x, w, at::tensor(std::vector<int64_t>{0, 4, 1}), degrees);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("m2 is an angle in radians") != std::string::npos;
  }
  EXPECT(threw, "m2 = 28.6 (degrees) must raise an error that says radians");
}

}  // namespace

int main() {
  test_against_naive();
  test_margins_alone_and_a_nan_margin_on_an_ignored_row();
  test_hard_negatives();
  test_all_rows_ignored_and_bad_target();
  return expect_exit_status("margin_cross_entropy (C++) matches the naive float64 computation");
}
