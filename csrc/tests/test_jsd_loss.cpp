// The C++ generalized JSD (distill_loss.h, linear_jsd) against a naive LibTorch computation in float64 with both
// heads' whole N × C log-softmax, the mixture as TRL forms it (a log-sum-exp of the weighted log-probabilities) and
// autograd: loss and the gradients of x and w for several β, ignored rows, every reduction, a temperature and
// several class chunks; the teacher gets no gradient; β outside (0, 1) is refused.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <string>

#include "distill_loss.h"
#include "loss_checks.h"

namespace {

using marginkern::JSDOptions;

at::Tensor naive_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                      const at::Tensor& teacher_w, const at::Tensor& valid, const JSDOptions& o) {
  const at::Tensor log_p = at::log_softmax(x.matmul(w.t()) / o.temperature, 1);
  const at::Tensor log_q = at::log_softmax(teacher_x.matmul(teacher_w.t()) / o.temperature, 1);
  const at::Tensor log_m = at::logaddexp(log_p + std::log1p(-o.beta), log_q + std::log(o.beta));
  const at::Tensor jsd = (o.beta * at::exp(log_q) * (log_q - log_m) + (1 - o.beta) * at::exp(log_p) * (log_p - log_m))
                             .sum(1);
  return at::where(valid, jsd, at::zeros_like(jsd));
}

at::Tensor reduce(const at::Tensor& rows, const at::Tensor& valid, const std::string& reduction) {
  if (reduction == "none") return rows;
  if (reduction == "sum") return rows.sum();
  return rows.sum() / valid.sum().clamp_min(1).to(rows.scalar_type());
}

void check_case(const JSDOptions& o, at::ScalarType dtype, int N, int C, int D, int E) {
  at::manual_seed(N * 31 + C + static_cast<int>(o.beta * 10));
  const at::Tensor x = at::randn({N, D}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.4).to(dtype).requires_grad_();
  const at::Tensor teacher_x = at::randn({N, E}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor teacher_w = (at::randn({C, E}, at::kDouble) * 0.5).to(dtype);
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(2, N, 6)}, o.ignore_index);
  const at::Tensor loss = marginkern::linear_jsd(x, w, teacher_x, teacher_w, target, o);
  const at::Tensor seed = at::rand(loss.sizes(), at::kDouble) + 0.5;
  const auto grads = torch::autograd::grad({loss}, {x, w, teacher_x}, {seed.to(loss.scalar_type())}, false, false,
                                           /*allow_unused=*/true);
  EXPECT(!grads[2].defined() || grads[2].abs().max().item<double>() == 0, "the teacher got a gradient");
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor valid = target.ne(o.ignore_index);
  const at::Tensor want = reduce(naive_rows(xr, wr, teacher_x.detach().to(at::kDouble), teacher_w.to(at::kDouble),
                                            valid, o),
                                 valid, o.reduction);
  const auto want_grads = torch::autograd::grad({want}, {xr, wr}, {seed});
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-5;
  const std::string what = "beta=" + std::to_string(o.beta) + ", T=" + std::to_string(o.temperature) + ", " +
                           o.reduction + (o.class_chunk ? ", chunks" : "") +
                           (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
}

}  // namespace

int main() {
  for (double beta : {0.1, 0.5, 0.9}) {
    for (const char* reduction : {"mean", "sum", "none"}) {
      for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
        JSDOptions o;
        o.beta = beta, o.reduction = reduction, o.temperature = 1.7;
        check_case(o, dtype, 37, 301, 45, 20);
        o.class_chunk = 7, o.temperature = 0.8;
        check_case(o, dtype, 13, 50, 9, 12);
      }
    }
  }
  for (double beta : {0.0, 1.0, -0.5, std::nan("")}) {
    JSDOptions o;
    o.beta = beta;
    bool refused = false;
    try {
      marginkern::linear_jsd(at::randn({2, 3}), at::randn({4, 3}), at::randn({2, 2}), at::randn({4, 2}), at::Tensor(), o);
    } catch (const c10::Error&) {
      refused = true;
    }
    EXPECT(refused, "beta=%g was not refused", beta);
  }
  return expect_exit_status("linear_jsd (C++) matches the naive float64 computation");
}
