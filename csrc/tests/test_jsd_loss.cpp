// The C++ generalized JSD (distill_loss.h, linear_jsd) against a naive LibTorch computation in float64 with both
// heads' whole N × C log-softmax, the mixture as TRL forms it (a log-sum-exp of the weighted log-probabilities) and
// autograd: loss and the gradients of x and w for several β, ignored rows, every reduction, a temperature and
// several class chunks; the teacher gets no gradient; β outside (0, 1) is refused.
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "distill_checks.h"
#include "distill_loss.h"

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

void check_case(const JSDOptions& o, at::ScalarType dtype, int N, int C, int D, int E) {
  check_distillation_case("beta=" + std::to_string(o.beta), marginkern::linear_jsd, naive_rows, o, dtype, N, C, D, E,
                          N * 31 + C + static_cast<int>(o.beta * 10), 2e-5);
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
