// The C++ per-token log-probabilities and entropy (log_probs_loss.h) against a naive LibTorch computation in
// float64 with the whole N × C log-softmax and autograd: both outputs and the gradients of x and w for upstream
// gradients on both, on one only, ignored rows, a temperature, a bias (and its gradient), a softcap and several
// class chunks; then confident rows,
// where the entropy and log p_t must stay exact (≥ 0, relative error small against an exact float64
// rearrangement), and a bad temperature.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "log_probs_loss.h"
#include "loss_checks.h"

namespace {

using marginkern::LogProbsOptions;

std::pair<at::Tensor, at::Tensor> naive_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                             const at::Tensor& target, const at::Tensor& valid,
                                             const LogProbsOptions& o) {
  at::Tensor z = x.matmul(w.t());
  if (bias.defined()) z = z + bias;
  if (o.softcap) z = *o.softcap * at::tanh(z / *o.softcap);
  const at::Tensor log_p = at::log_softmax(z / o.temperature, 1);
  const at::Tensor log_pt = log_p.gather(1, at::where(valid, target, 0).unsqueeze(1)).squeeze(1);
  const at::Tensor entropy = -(at::exp(log_p) * log_p).sum(1);
  const at::Tensor zero = at::zeros_like(log_pt);
  return {at::where(valid, log_pt, zero), at::where(valid, entropy, zero)};
}

void check_case(const LogProbsOptions& o, at::ScalarType dtype, int N, int C, int D, bool grad_lp, bool grad_h,
                bool with_bias) {
  at::manual_seed(N * 31 + C);
  const at::Tensor x = (at::randn({N, D}, at::kDouble) * 2.0).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.4).to(dtype).requires_grad_();
  const at::Tensor bias = with_bias ? at::randn({C}, at::kDouble).to(dtype).requires_grad_() : at::Tensor();
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(2, N, 6)}, o.ignore_index);
  const auto [log_pt, entropy] = marginkern::log_probs_and_entropy(x, w, target, bias, o);
  const at::Tensor seed_lp = at::randn({N}, at::kDouble) * (grad_lp ? 1.0 : 0.0);
  const at::Tensor seed_h = at::randn({N}, at::kDouble) * (grad_h ? 1.0 : 0.0);
  const at::Tensor loss = (log_pt.to(at::kDouble) * seed_lp).sum() + (entropy.to(at::kDouble) * seed_h).sum();
  using Leaves = std::vector<at::Tensor>;
  const auto grads = torch::autograd::grad({loss}, with_bias ? Leaves{x, w, bias} : Leaves{x, w});
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor br = with_bias ? bias.detach().to(at::kDouble).requires_grad_() : at::Tensor();
  const auto [want_lp, want_h] = naive_rows(xr, wr, br, target, target.ne(o.ignore_index), o);
  const at::Tensor want = (want_lp * seed_lp).sum() + (want_h * seed_h).sum();
  const auto want_grads = torch::autograd::grad({want}, with_bias ? Leaves{xr, wr, br} : Leaves{xr, wr});
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;
  const std::string what = std::string("T=") + std::to_string(o.temperature) + (grad_lp ? ", d log p" : "") +
                           (grad_h ? ", d entropy" : "") + (o.class_chunk ? ", chunks" : "") +
                           (with_bias ? ", bias" : "") + (o.softcap ? ", softcap" : "") +
                           (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": log p_t", log_pt.detach(), want_lp.detach(), tol);
  expect_close(what + ": entropy", entropy.detach(), want_h.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
  if (with_bias) expect_close(what + ": grad bias", grads[2], want_grads[2], tol);
}

// Rows from uniform to very confident (H down to ~1e-25): against H = log1p(S′) + Σ e^{−d}·d/(1 + S′) in float64
// (d_j = M − z_j, S′ without the max), which −Σ p·log p of float64 log_softmax is not (it loses −p_t·log p_t
// below 1e-16).
void check_confident_rows() {
  at::manual_seed(3);
  const int N = 40, C = 97, D = 16;
  const at::Tensor w64 = at::randn({C, D}, at::kDouble);
  const at::Tensor target = at::randint(0, C, {N}, at::kLong);
  at::Tensor x64 = at::linspace(0.0, 6.0, N, at::kDouble).unsqueeze(1) * w64.index_select(0, target) +
                   0.1 * at::randn({N, D}, at::kDouble);
  const at::Tensor x = x64.to(at::kFloat), w = w64.to(at::kFloat);
  const at::Tensor z = x.to(at::kDouble).matmul(w.to(at::kDouble).t());
  const auto [top, where_top] = z.max(1);
  const at::Tensor d = top.unsqueeze(1) - z;
  const at::Tensor e = at::exp(-d);
  const at::Tensor others = e.scatter(1, where_top.unsqueeze(1), 0.0).sum(1);
  const at::Tensor want = at::log1p(others) + (e * d).sum(1) / (1.0 + others);
  const auto [log_pt, entropy] = marginkern::log_probs_and_entropy(x, w, target);
  const at::Tensor got = entropy.to(at::kDouble);
  EXPECT(got.ge(0).all().item<bool>(), "confident rows: negative entropy %.3e", got.min().item<double>());
  const at::Tensor counted = want.gt(1e-30);
  const double err = ((got - want).abs() / want).masked_select(counted).max().item<double>();
  EXPECT(err < 1e-3, "confident rows: entropy relative error %.2e (entropy down to %.1e)", err,
         want.min().item<double>());
  EXPECT(want.min().item<double>() < 1e-20, "confident rows: the case must reach confident rows");
  const at::Tensor on_top = where_top.eq(target);
  const at::Tensor want_lp = -at::log1p(at::exp(z - z.gather(1, target.unsqueeze(1))).scatter(1, target.unsqueeze(1), 0.0).sum(1));
  const at::Tensor lp_counted = on_top & want_lp.lt(-1e-30);
  const double lp_err =
      ((log_pt.to(at::kDouble) - want_lp).abs() / want_lp.abs()).masked_select(lp_counted).max().item<double>();
  EXPECT(lp_err < 1e-3, "confident rows: log p_t relative error %.2e", lp_err);
}

void check_bad_temperature() {
  const at::Tensor x = at::randn({3, 4}), w = at::randn({5, 4});
  const at::Tensor target = at::zeros({3}, at::kLong);
  for (double temperature : {0.0, -1.0}) {
    LogProbsOptions o;
    o.temperature = temperature;
    bool raised = false;
    try {
      marginkern::log_probs_and_entropy(x, w, target, at::Tensor(), o);
    } catch (const c10::Error& e) {
      raised = std::string(e.what()).find("temperature") != std::string::npos;
    }
    EXPECT(raised, "temperature %.1f: no error naming it", temperature);
  }
}

}  // namespace

int main() {
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    for (double temperature : {1.0, 0.6}) {
      for (int upstream = 0; upstream < 3; ++upstream) {
        for (int head = 0; head < 3; ++head) {  // plain; bias; bias and Gemma-2's softcap (a small one: it bites)
          LogProbsOptions o;
          o.temperature = temperature;
          if (head == 2) o.softcap = 3.0;
          const bool grad_lp = upstream != 2, grad_h = upstream != 1;
          check_case(o, dtype, 37, 301, 45, grad_lp, grad_h, head > 0);
          o.class_chunk = 7;
          check_case(o, dtype, 13, 50, 9, grad_lp, grad_h, head > 0);
        }
      }
    }
  }
  check_confident_rows();
  check_bad_temperature();
  return expect_exit_status("log_probs_and_entropy (C++) matches the naive float64 computation");
}
