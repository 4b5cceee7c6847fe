// One case of a C++ distillation loss (distill_loss.h: KL or JSD) against its naive float64 rows, which the test
// writes with both heads' whole N × C log-softmax: loss and the gradients of x and w by autograd, under a random
// upstream gradient, with every sixth row from row 2 ignored; the teacher gets no gradient.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <string>

#include "loss_checks.h"

// loss(x, w, teacher_x, teacher_w, target, o) is the library's; naive_rows(x, w, teacher_x, teacher_w, valid, o)
// the float64 definition per row (0 on invalid rows). `name` leads the failure messages; `seed` the case's draws.
template <class Options, class Loss, class NaiveRows>
void check_distillation_case(const std::string& name, Loss loss_fn, NaiveRows naive_rows, const Options& o,
                             at::ScalarType dtype, int N, int C, int D, int E, int seed, double fp32_tol) {
  at::manual_seed(seed);
  const at::Tensor x = at::randn({N, D}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor w = (at::randn({C, D}, at::kDouble) * 0.4).to(dtype).requires_grad_();
  const at::Tensor teacher_x = at::randn({N, E}, at::kDouble).to(dtype).requires_grad_();
  const at::Tensor teacher_w = (at::randn({C, E}, at::kDouble) * 0.5).to(dtype);
  at::Tensor target = at::randint(0, C, {N}, at::kLong);
  target.index_put_({at::indexing::Slice(2, N, 6)}, o.ignore_index);
  const at::Tensor loss = loss_fn(x, w, teacher_x, teacher_w, target, o);
  const at::Tensor upstream = at::rand(loss.sizes(), at::kDouble) + 0.5;
  const auto grads = torch::autograd::grad({loss}, {x, w, teacher_x}, {upstream.to(loss.scalar_type())}, false, false,
                                           /*allow_unused=*/true);
  EXPECT(!grads[2].defined() || grads[2].abs().max().item<double>() == 0, "the teacher got a gradient");
  const at::Tensor xr = x.detach().to(at::kDouble).requires_grad_(), wr = w.detach().to(at::kDouble).requires_grad_();
  const at::Tensor valid = target.ne(o.ignore_index);
  const at::Tensor want = reduce_rows(naive_rows(xr, wr, teacher_x.detach().to(at::kDouble),
                                                 teacher_w.to(at::kDouble), valid, o),
                                      valid, o.reduction);
  const auto want_grads = torch::autograd::grad({want}, {xr, wr}, {upstream});
  const double tol = dtype == at::kDouble ? 1e-10 : fp32_tol;
  const std::string what = name + ", T=" + std::to_string(o.temperature) + ", " + o.reduction +
                           (o.class_chunk ? ", chunks" : "") + (dtype == at::kDouble ? " (float64)" : " (float32)");
  expect_close(what + ": loss", loss.detach(), want.detach(), tol);
  expect_close(what + ": grad input", grads[0], want_grads[0], tol);
  expect_close(what + ": grad weight", grads[1], want_grads[1], tol);
}
