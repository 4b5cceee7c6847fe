// The C++ linear cross-entropy (linear_ce_loss.h) against a naive LibTorch computation of DESIGN.md §4 in
// float64 with the whole N × C logits and autograd: loss and the gradients of x, w and bias, for plain CE,
// label smoothing + z-loss, softcap, focal loss, γ-CE, ignored rows, every reduction and several class
// chunks; plus the errors for an out-of-range target and conflicting options.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <functional>
#include <cstdio>
#include <string>
#include <vector>

#include "loss_checks.h"
#include "linear_ce_loss.h"

namespace {

using Options = marginkern::LinearCrossEntropyOptions;

at::Tensor naive_loss(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const at::Tensor& bias,
                      const Options& o) {
  const at::Tensor valid = target.ne(o.ignore_index);
  const at::Tensor t = at::where(valid, target, 0).unsqueeze(1);
  at::Tensor z = x.matmul(w.t());
  if (bias.defined()) z = z + bias;
  if (o.softcap) z = *o.softcap * at::tanh(z / *o.softcap);
  const at::Tensor lse = at::logsumexp(z, {1});
  const at::Tensor log_pt = z.gather(1, t).squeeze(1) - lse;
  const at::Tensor p_t = at::exp(log_pt);
  at::Tensor f = -log_pt;                                                                     // cross-entropy
  if (o.focal_gamma > 0) f = -(1.0 - p_t).pow(o.focal_gamma) * log_pt;                         // focal loss
  if (o.gamma_ce > 0) f = -at::log(o.gamma_ce + (1.0 - o.gamma_ce) * p_t) / (1.0 - o.gamma_ce);  // γ-CE
  const double eps = o.label_smoothing, C = static_cast<double>(w.size(0));
  at::Tensor rows = (1.0 - eps) * f + eps * lse - (eps / C) * z.sum(1) + o.z_loss * lse * lse;
  rows = at::where(valid, rows, at::zeros_like(rows));
  if (o.reduction == "none") return rows;
  if (o.reduction == "sum") return rows.sum();
  return rows.sum() / valid.sum().clamp_min(1).to(at::kDouble);
}

void check_case(const std::string& name, const Options& o, bool with_bias, at::ScalarType dtype, int N, int C, int D) {
  at::manual_seed(N * 7919 + C);
  const at::Tensor x = (at::randn({N, D}, at::kDouble) * 2.0).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.5).to(dtype).requires_grad_();
  const at::Tensor b = with_bias ? at::randn({C}, at::kDouble).to(dtype).requires_grad_() : at::Tensor();
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(1, N, 5)}, o.ignore_index);  // every 5th row ignored
  const at::Tensor loss = marginkern::linear_cross_entropy(x, w, target, b, o);
  const at::Tensor seed = at::rand(loss.sizes(), at::kDouble) + 0.5;
  std::vector<at::Tensor> inputs{x, w};
  if (with_bias) inputs.push_back(b);
  const auto grads = torch::autograd::grad({loss}, inputs, {seed.to(loss.scalar_type())});
  std::vector<at::Tensor> ref_inputs;
  for (const auto& t : inputs) ref_inputs.push_back(t.detach().to(at::kDouble).requires_grad_());
  const at::Tensor want =
      naive_loss(ref_inputs[0], ref_inputs[1], target, with_bias ? ref_inputs[2] : at::Tensor(), o);
  const auto want_grads = torch::autograd::grad({want}, ref_inputs, {seed});
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;
  const std::string what = name + (with_bias ? " + bias" : "") + (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  const char* names[] = {"input", "weight", "bias"};
  for (size_t i = 0; i < grads.size(); ++i) expect_close(what + ": grad " + names[i], grads[i], want_grads[i], tol);
}

void test_against_naive() {
  std::vector<std::pair<std::string, Options>> cases;
  cases.push_back({"cross-entropy", Options{}});
  Options smooth;
  smooth.label_smoothing = 0.1, smooth.z_loss = 1e-3, smooth.reduction = "sum";
  cases.push_back({"label smoothing + z-loss, sum", smooth});
  Options capped;
  capped.softcap = 3.0, capped.reduction = "none";
  cases.push_back({"softcap, none", capped});
  Options focal;
  focal.focal_gamma = 2.0;
  cases.push_back({"focal", focal});
  Options gamma_ce;
  gamma_ce.gamma_ce = 0.3, gamma_ce.softcap = 5.0, gamma_ce.label_smoothing = 0.05;
  cases.push_back({"gamma-CE + softcap + smoothing", gamma_ce});
  for (const auto& [name, options] : cases) {
    for (bool with_bias : {false, true}) {
      for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
        Options o = options;
        check_case(name, o, with_bias, dtype, 37, 301, 45);
        o.class_chunk = 7;  // many chunks, targets in different ones
        check_case(name + ", chunks of 7", o, with_bias, dtype, 13, 50, 9);
      }
    }
  }
}

// A fractional focal γ with an ignored row whose logits are all negative (lse < 0): its placeholder target logit 0
// made 1 − p_t negative and q^γ NaN, which reached dW through the row's zero upstream gradient (0·NaN).
void test_fractional_focal_with_an_ignored_row_below_zero() {
  const at::Tensor x = at::ones({2, 1}, at::kDouble).requires_grad_();
  const at::Tensor w = at::tensor(std::vector<double>{-1.0, -2.0}).reshape({2, 1}).requires_grad_();
  const at::Tensor target = at::tensor(std::vector<int64_t>{0, -100});
  for (double gamma : {0.5, 3.7}) {
    Options o;
    o.focal_gamma = gamma, o.reduction = "sum";
    const at::Tensor loss = marginkern::linear_cross_entropy(x, w, target, at::Tensor(), o);
    const auto grads = torch::autograd::grad({loss}, {x, w});
    const at::Tensor xr = x.detach().requires_grad_(), wr = w.detach().requires_grad_();
    const auto want = torch::autograd::grad({naive_loss(xr, wr, target, at::Tensor(), o)}, {xr, wr});
    const std::string what = "focal gamma=" + std::to_string(gamma) + " with an ignored row of lse < 0";
    expect_close(what + ": grad input", grads[0], want[0], 1e-12);
    expect_close(what + ": grad weight", grads[1], want[1], 1e-12);
  }
}

bool throws_with(const std::string& needle, const std::function<void()>& call) {
  try {
    call();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

void test_errors() {
  const at::Tensor x = at::randn({3, 4}), w = at::randn({5, 4});
  EXPECT(throws_with("target must hold class indices in [0, C=5)",
                     [&] { marginkern::linear_cross_entropy(x, w, at::tensor(std::vector<int64_t>{0, 5, 1})); }),
         "an out-of-range target must raise an error naming target");
  Options both;
  both.focal_gamma = 2.0, both.gamma_ce = 0.3;
  EXPECT(throws_with("set at most one of them",
                     [&] { marginkern::linear_cross_entropy(x, w, at::zeros({3}, at::kLong), at::Tensor(), both); }),
         "focal_gamma with gamma_ce must raise");
}

}  // namespace

int main() {
  test_against_naive();
  test_fractional_focal_with_an_ignored_row_below_zero();
  test_errors();
  return expect_exit_status("linear_cross_entropy (C++) matches the naive float64 computation");
}
