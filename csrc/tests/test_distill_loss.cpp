// The C++ distillation loss (distill_loss.h) against a naive LibTorch computation in float64 with both heads'
// whole N × C log-softmax and autograd: forward and reverse KL, loss and the gradients of x and w, ignored rows,
// every reduction, a temperature and several class chunks; the teacher gets no gradient.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <string>

#include "distill_loss.h"
#include "loss_checks.h"

namespace {

using marginkern::KLDivergenceOptions;

at::Tensor naive_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                      const at::Tensor& teacher_w, const at::Tensor& valid, const KLDivergenceOptions& o) {
  const at::Tensor log_p = at::log_softmax(x.matmul(w.t()) / o.temperature, 1);
  const at::Tensor log_q = at::log_softmax(teacher_x.matmul(teacher_w.t()) / o.temperature, 1);
  const at::Tensor kl = o.reverse ? (at::exp(log_p) * (log_p - log_q)).sum(1) : (at::exp(log_q) * (log_q - log_p)).sum(1);
  return at::where(valid, kl, at::zeros_like(kl));
}

at::Tensor reduce(const at::Tensor& rows, const at::Tensor& valid, const std::string& reduction) {
  if (reduction == "none") return rows;
  if (reduction == "sum") return rows.sum();
  return rows.sum() / valid.sum().clamp_min(1).to(rows.scalar_type());
}

void check_case(const KLDivergenceOptions& o, at::ScalarType dtype, int N, int C, int D, int E) {
  at::manual_seed(N * 31 + C + o.reverse);
  const at::Tensor x = at::randn({N, D}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.4).to(dtype).requires_grad_();
  const at::Tensor teacher_x = at::randn({N, E}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor teacher_w = (at::randn({C, E}, at::kDouble) * 0.5).to(dtype);
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(2, N, 6)}, o.ignore_index);
  const at::Tensor loss = marginkern::linear_kl_divergence(x, w, teacher_x, teacher_w, target, o);
  const at::Tensor seed = at::rand(loss.sizes(), at::kDouble) + 0.5;
  const auto grads = torch::autograd::grad({loss}, {x, w, teacher_x}, {seed.to(loss.scalar_type())}, false, false,
                                           /*allow_unused=*/true);
  EXPECT(!grads[2].defined() || grads[2].abs().max().item<double>() == 0, "the teacher got a gradient");
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor want = reduce(naive_rows(xr, wr, teacher_x.detach().to(at::kDouble), teacher_w.to(at::kDouble),
                                            target.ne(o.ignore_index), o),
                                 target.ne(o.ignore_index), o.reduction);
  const auto want_grads = torch::autograd::grad({want}, {xr, wr}, {seed});
  // fp32: reverse KL's gradient subtracts log-probabilities of the logits' size before p weights them
  const double tol = dtype == at::kDouble ? 1e-10 : (o.reverse ? 8e-5 : 2e-5);
  const std::string what = std::string(o.reverse ? "reverse" : "forward") + ", T=" + std::to_string(o.temperature) +
                           ", " + o.reduction + (o.class_chunk ? ", chunks" : "") +
                           (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
}

}  // namespace

int main() {
  for (bool reverse : {false, true}) {
    for (const char* reduction : {"mean", "sum", "none"}) {
      for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
        KLDivergenceOptions o;
        o.reverse = reverse, o.reduction = reduction, o.temperature = 1.7;
        check_case(o, dtype, 37, 301, 45, 20);
        o.class_chunk = 7, o.temperature = 0.8;
        check_case(o, dtype, 13, 50, 9, 12);
      }
    }
  }
  return expect_exit_status("linear_kl_divergence (C++) matches the naive float64 computation");
}
