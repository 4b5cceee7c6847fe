// The CPU ops of csrc/cpu against a naive computation with plain ATen: the whole N × C logits and
// dL/da materialised in float64 on small, odd shapes. Called directly and through the dispatcher (which
// checks the op registration). Prints every failed check; exit status 1 if any.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "expect.h"
#include "streaming_ce.h"

namespace {

// max |actual − expected| ≤ tol · max(max |expected|, floor), and actual finite.
void check_close(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what,
                 double floor = 1.0) {
  const bool same_shape = actual.sizes() == expected.sizes();
  EXPECT(same_shape, "%s: shape mismatch", what.c_str());
  if (!same_shape || expected.numel() == 0) return;
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  EXPECT(a.isfinite().all().item<bool>(), "%s: non-finite values", what.c_str());
  const double err = (a - e).abs().max().item<double>() / std::max(e.abs().max().item<double>(), floor);
  EXPECT(err <= tol, "%s: relative error %.3e > %.1e", what.c_str(), err, tol);
}

struct Case {
  int64_t N, C, D;
  bool col_scale, bias;
  std::optional<double> softcap;
  bool cost;
  at::ScalarType dtype;
  int64_t class_chunk;

  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "N=%ld C=%ld D=%ld col_scale=%d bias=%d softcap=%g cost=%d %s chunk=%ld",
                  static_cast<long>(N), static_cast<long>(C), static_cast<long>(D), col_scale, bias,
                  softcap.value_or(0.0), cost, c10::toString(dtype), static_cast<long>(class_chunk));
    return buf;
  }
};

// Random inputs of one case; the per-row and per-class vectors in the accumulation dtype.
struct Inputs {
  at::Tensor x, w, row_scale, target, target_logit, lse, coef_p, coef_u, target_grad;
  std::optional<at::Tensor> col_scale, bias;
  std::optional<at::Tensor> cost_query, cost_query_scale, cost_keys, cost_key_scale, cost_coef;

  explicit Inputs(const Case& c) {
    const auto acc = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
    const auto f = at::TensorOptions().dtype(acc);
    x = at::randn({c.N, c.D}).to(c.dtype);
    w = at::randn({c.C, c.D}).to(c.dtype);
    row_scale = at::rand({c.N}, f) + 0.5;
    target = at::randint(-1, c.C, {c.N}, at::kLong);  // −1: a row without a target column
    target_logit = at::randn({c.N}, f) * 3;
    lse = at::randn({c.N}, f) + 4;
    coef_p = at::rand({c.N}, f);
    coef_u = at::rand({c.N}, f) * 0.1;
    target_grad = at::randn({c.N}, f);
    if (c.col_scale) col_scale = at::rand({c.C}, f) + 0.5;
    if (c.bias) bias = at::randn({c.C}, f);
    if (c.cost) {
      cost_query = at::randn({c.N, 3}).to(c.dtype);
      cost_query_scale = at::rand({c.N}, f) + 0.5;
      cost_keys = at::randn({c.C, 3}).to(c.dtype);
      cost_key_scale = at::rand({c.C}, f) + 0.5;
      cost_coef = at::randn({c.N}, f);
    }
  }
};

// The naive computation, float64: z (N, C) with the target column substituted, and G = dL/da (N, C).
struct Naive {
  at::Tensor z, grad;
};

Naive naive(const Case& c, const Inputs& in) {
  const auto d = at::kDouble;
  at::Tensor scale = in.row_scale.to(d).unsqueeze(1);
  if (in.col_scale) scale = scale * in.col_scale->to(d).unsqueeze(0);
  at::Tensor z = at::mm(in.x.to(d), in.w.to(d).t()) * scale;
  if (in.bias) z = z + in.bias->to(d);
  at::Tensor chain = scale.expand_as(z);
  if (c.softcap) {
    const at::Tensor t = at::tanh(z / *c.softcap);
    z = *c.softcap * t;
    chain = chain * (1 - t * t);
  }
  const at::Tensor is_target = in.target.unsqueeze(1) == at::arange(c.C, at::kLong).unsqueeze(0);
  z = at::where(is_target, in.target_logit.to(d).unsqueeze(1), z);
  at::Tensor weight_p = in.coef_p.to(d).unsqueeze(1).expand_as(z);
  if (c.cost) {
    const at::Tensor cosines = at::mm(in.cost_query->to(d), in.cost_keys->to(d).t()) *
                               in.cost_query_scale->to(d).unsqueeze(1) * in.cost_key_scale->to(d).unsqueeze(0);
    weight_p = weight_p - in.cost_coef->to(d).unsqueeze(1) * cosines;
  }
  const at::Tensor p = at::exp(z - in.lse.to(d).unsqueeze(1));
  at::Tensor grad = (weight_p * p - in.coef_u.to(d).unsqueeze(1)) * chain;
  grad = at::where(is_target, in.target_grad.to(d).unsqueeze(1), grad);
  return {z, grad};
}

void test_case(const Case& c) {
  const Inputs in(c);
  const Naive want = naive(c, in);
  const double tol = c.dtype == at::kDouble ? 1e-10 : 2e-5;  // both compute in fp32 for 16-bit inputs
  const std::string name = c.name();

  if (!c.cost) {  // the forward op has no cost term
    const auto [lse, sum_logits] =
        marginkern::streaming_row_stats(in.x, in.w, in.row_scale, in.col_scale, in.bias, c.softcap, in.target,
                                        in.target_logit, /*need_sum_logits=*/true, c.class_chunk);
    check_close(lse, at::logsumexp(want.z, {1}), tol, name + ": lse");
    check_close(sum_logits, want.z.sum(1), tol, name + ": sum of logits", static_cast<double>(c.C));
    const auto [lse_too, no_sum, row_max] =
        marginkern::streaming_row_stats_with_max(in.x, in.w, in.row_scale, in.col_scale, in.bias, c.softcap,
                                                 in.target, in.target_logit, /*need_sum_logits=*/false, c.class_chunk);
    check_close(lse_too, lse, 0.0, name + ": lse beside the row max");
    check_close(row_max, std::get<0>(want.z.max(1)), tol, name + ": row max");
    EXPECT(no_sum.numel() == 0, "%s: a sum of logits nobody asked for", name.c_str());
  }

  for (const auto& [c0, c1] : std::vector<std::pair<int64_t, int64_t>>{{0, c.C}, {c.C / 3, c.C}, {c.C / 2, c.C / 2}}) {
    const at::Tensor got = marginkern::streaming_grad_logits(
        in.x, in.w, in.row_scale, in.col_scale, in.bias, c.softcap, in.target, in.lse, in.coef_p, in.coef_u,
        in.target_grad, c0, c1, in.cost_query, in.cost_query_scale, in.cost_keys, in.cost_key_scale, in.cost_coef);
    check_close(got, want.grad.slice(1, c0, c1), tol, name + ": dL/da[" + std::to_string(c0) + ":" +
                                                          std::to_string(c1) + "]");
  }

  const auto [grad_x, grad_w, grad_bias] = marginkern::streaming_grads(
      in.x, in.w, in.row_scale, in.col_scale, in.bias, c.softcap, in.target, in.lse, in.coef_p, in.coef_u,
      in.target_grad, /*need_bias_grad=*/true, /*need_weight_grad=*/true, c.class_chunk, in.cost_query,
      in.cost_query_scale, in.cost_keys, in.cost_key_scale, in.cost_coef);
  check_close(grad_x, at::mm(want.grad, in.w.to(at::kDouble)), tol, name + ": grad x");
  check_close(grad_w, at::mm(want.grad.t(), in.x.to(at::kDouble)), tol, name + ": grad w");
  check_close(grad_bias, want.grad.sum(0), tol, name + ": grad bias");

  if (!c.cost) {  // the 3-GEMM path's block epilogue over dot products computed elsewhere
    const auto acc = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor dots = at::mm(in.x.to(acc), in.w.to(acc).t()).contiguous();
    const at::Tensor dots_before = dots.clone();
    const auto [lse, sum_logits] = marginkern::row_stats_of_dots(dots, in.row_scale, in.col_scale, in.bias,
                                                                 c.softcap, in.target, in.target_logit, true);
    check_close(lse, at::logsumexp(want.z, {1}), tol, name + ": row_stats_of_dots lse");
    check_close(sum_logits, want.z.sum(1), tol, name + ": row_stats_of_dots sum", static_cast<double>(c.C));
    EXPECT(at::equal(dots, dots_before), "%s: row_stats_of_dots changed its input", name.c_str());
    marginkern::grads_of_dots_(dots, in.row_scale, in.col_scale, in.bias, c.softcap, in.target, in.lse,
                               in.coef_p, in.coef_u, in.target_grad);
    check_close(dots, want.grad, tol, name + ": grads_of_dots_");
  }
}

// The registration: the same results through c10::Dispatcher, as Python's torch.ops sees them.
void test_dispatcher() {
  const Case c{9, 50, 7, true, true, 4.0, false, at::kFloat, 16};
  const Inputs in(c);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("marginkern::streaming_row_stats", "")
                      .typed<decltype(marginkern::streaming_row_stats)>();
  const auto [lse, sum_logits] = op.call(in.x, in.w, in.row_scale, in.col_scale, in.bias, c.softcap, in.target,
                                         in.target_logit, false, c.class_chunk);
  check_close(lse, at::logsumexp(naive(c, in).z, {1}), 2e-5, "dispatcher: lse");
  EXPECT(sum_logits.numel() == 0, "dispatcher: sum_logits must be empty when not asked for");
  for (const char* name : {"marginkern::streaming_grad_logits", "marginkern::streaming_grads"}) {
    EXPECT(c10::Dispatcher::singleton().findSchema({name, ""}).has_value(), "%s is not registered", name);
  }
}

// Bad arguments raise c10::Error naming the argument.
void test_errors() {
  const Case c{4, 6, 3, false, false, std::nullopt, false, at::kFloat, 16};
  const Inputs in(c);
  const auto expect_error = [&](const char* what, auto&& call) {
    try {
      call();
      EXPECT(false, "no error for %s", what);
    } catch (const c10::Error& e) {
      const std::string message = e.what_without_backtrace();
      EXPECT(message.find(what) != std::string::npos, "error for %s does not name it: %s", what, message.c_str());
    }
  };
  expect_error("w must have shape", [&] {
    marginkern::streaming_row_stats(in.x, at::randn({6, 4}), in.row_scale, std::nullopt, std::nullopt,
                                    std::nullopt, in.target, in.target_logit, false, 16);
  });
  expect_error("target must hold class indices", [&] {
    marginkern::streaming_row_stats(in.x, in.w, in.row_scale, std::nullopt, std::nullopt, std::nullopt,
                                    at::full({4}, 6, at::kLong), in.target_logit, false, 16);
  });
  expect_error("softcap", [&] {
    marginkern::streaming_grads(in.x, in.w, in.row_scale, std::nullopt, std::nullopt, 0.0, in.target, in.lse,
                                in.coef_p, in.coef_u, in.target_grad, false, true, 16);
  });
  expect_error("cost_query, cost_query_scale", [&] {
    marginkern::streaming_grads(in.x, in.w, in.row_scale, std::nullopt, std::nullopt, std::nullopt, in.target,
                                in.lse, in.coef_p, in.coef_u, in.target_grad, false, true, 16, at::randn({4, 2}));
  });
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::vector<Case> cases;
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    cases.push_back({37, 301, 45, true, false, std::nullopt, false, dtype, 64});
    cases.push_back({17, 33, 16, false, true, 5.0, false, dtype, 7});
    cases.push_back({70, 129, 3, true, true, 2.0, false, dtype, 1000});
    cases.push_back({23, 97, 11, false, false, std::nullopt, true, dtype, 20});
  }
  cases.push_back({1, 1, 1, false, false, std::nullopt, false, at::kFloat, 1});
  cases.push_back({0, 5, 4, true, true, 1.0, false, at::kFloat, 2});
  cases.push_back({6, 9, 0, false, true, std::nullopt, true, at::kFloat, 4});  // D = 0: logits are the bias
  for (const Case& c : cases) test_case(c);
  test_dispatcher();
  test_errors();
  return expect_exit_status(("all " + std::to_string(cases.size()) + " cases passed").c_str());
}
