// The C++ EMO losses (emo_loss.h) against a naive LibTorch computation in float64 with the whole N × C
// probabilities and autograd: emo_loss and the MLE-anchored emo_cross_entropy, loss and the gradients of x
// and w, with the default cost embedding (w, detached) and a narrower one of its own, ignored rows, every
// reduction and several class chunks.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "emo_loss.h"
#include "loss_checks.h"

namespace {

using marginkern::EMOOptions;

// (ce, emo) per row from the definitions, masked on ignored rows.
std::pair<at::Tensor, at::Tensor> naive_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                             const at::Tensor& cost, const at::Tensor& valid) {
  const at::Tensor t = at::where(valid, target, 0);
  const at::Tensor z = x.matmul(w.t());
  const at::Tensor log_p = at::log_softmax(z, 1);
  const at::Tensor e_hat = cost / cost.norm(2, {1}, true);
  const at::Tensor c = 1.0 - e_hat.matmul(e_hat.t()).index_select(1, t).t();  // c_nj = 1 − ê_j·ê_{t_n}
  const at::Tensor emo = (at::exp(log_p) * c).sum(1);
  const at::Tensor ce = -log_p.gather(1, t.unsqueeze(1)).squeeze(1);
  const at::Tensor zero = at::zeros_like(ce);
  return {at::where(valid, ce, zero), at::where(valid, emo, zero)};
}

void check_case(bool anchored, bool own_cost, const EMOOptions& o, at::ScalarType dtype, int N, int C, int D) {
  at::manual_seed(N * 31 + C);
  const at::Tensor x = at::randn({N, D}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.4).to(dtype).requires_grad_();
  const at::Tensor cost = own_cost ? at::randn({C, 7}, at::kDouble).to(dtype) : at::Tensor();
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(2, N, 6)}, o.ignore_index);
  const at::Tensor loss = anchored ? marginkern::emo_cross_entropy(x, w, target, cost, o)
                                   : marginkern::emo_loss(x, w, target, cost, o);
  const at::Tensor seed = at::rand(loss.sizes(), at::kDouble) + 0.5;
  const auto grads = torch::autograd::grad({loss}, {x, w}, {seed.to(loss.scalar_type())});
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor valid = target.ne(o.ignore_index);
  const auto [ce, emo] = naive_rows(xr, wr, target, own_cost ? cost.to(at::kDouble) : wr.detach(), valid);
  const at::Tensor rows = anchored ? 0.5 * (ce + (ce / (emo + 1e-10)).detach() * emo) : emo;
  const at::Tensor want = reduce_rows(rows, valid, o.reduction);
  const auto want_grads = torch::autograd::grad({want}, {xr, wr}, {seed});
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;
  const std::string what = std::string(anchored ? "emo_cross_entropy" : "emo_loss") +
                           (own_cost ? ", own cost embedding" : "") + ", " + o.reduction +
                           (o.class_chunk ? ", chunks" : "") + (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
}

}  // namespace

int main() {
  for (bool anchored : {false, true}) {
    for (bool own_cost : {false, true}) {
      for (const char* reduction : {"mean", "sum", "none"}) {
        for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
          EMOOptions o;
          o.reduction = reduction;
          check_case(anchored, own_cost, o, dtype, 37, 301, 45);
          o.class_chunk = 7;
          check_case(anchored, own_cost, o, dtype, 13, 50, 9);
        }
      }
    }
  }
  return expect_exit_status("emo_loss and emo_cross_entropy (C++) match the naive float64 computation");
}
