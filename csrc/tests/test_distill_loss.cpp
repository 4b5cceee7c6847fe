// The C++ distillation loss (distill_loss.h) against a naive LibTorch computation in float64 with both heads'
// whole N × C log-softmax and autograd: forward and reverse KL, loss and the gradients of x and w, ignored rows,
// every reduction, a temperature and several class chunks; the teacher gets no gradient.
#include <ATen/ATen.h>

#include "distill_checks.h"
#include "distill_loss.h"

namespace {

using marginkern::KLDivergenceOptions;

at::Tensor naive_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                      const at::Tensor& teacher_w, const at::Tensor& valid, const KLDivergenceOptions& o) {
  const at::Tensor log_p = at::log_softmax(x.matmul(w.t()) / o.temperature, 1);
  const at::Tensor log_q = at::log_softmax(teacher_x.matmul(teacher_w.t()) / o.temperature, 1);
  const at::Tensor kl = o.reverse ? (at::exp(log_p) * (log_p - log_q)).sum(1) : (at::exp(log_q) * (log_q - log_p)).sum(1);
  return at::where(valid, kl, at::zeros_like(kl));
}

void check_case(const KLDivergenceOptions& o, at::ScalarType dtype, int N, int C, int D, int E) {
  // fp32: reverse KL's gradient subtracts log-probabilities of the logits' size before p weights them
  check_distillation_case(o.reverse ? "reverse" : "forward", marginkern::linear_kl_divergence, naive_rows, o, dtype, N,
                          C, D, E, N * 31 + C + o.reverse, o.reverse ? 8e-5 : 2e-5);
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
