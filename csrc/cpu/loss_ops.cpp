// The C++ losses' per-row halves as torch.ops.marginkern.* ops with CPU kernels: the Python package's loss
// ops (marginkern/ops.py) run them on the `cpp` backend, so that a CPU step is C++ from the arguments to
// the gradients. Options arrive as the Python ops' scalars; the Python side has checked them, the forward
// ops check the targets again (free on the CPU): a stray −1 would silently mean "no target column".
#include <torch/library.h>

#include <array>
#include <cmath>

#include "distill_loss.h"
#include "emo_loss.h"
#include "linear_ce_loss.h"
#include "log_probs_loss.h"
#include "loss_reduction.h"
#include "margin_loss.h"

namespace marginkern {
namespace {

MarginLossOptions margin_options(const char* op, double scale, double m1, double m2, double m3, bool normalize,
                                 bool exact_margin_grad, double label_smoothing, int64_t ignore_index,
                                 int64_t subcenters, double lambda,
                                 const std::optional<at::Tensor>& hard_negatives = std::nullopt) {
  MarginLossOptions o;
  o.scale = scale, o.m1 = m1, o.m2 = m2, o.m3 = m3, o.normalize = normalize;
  o.exact_margin_grad = exact_margin_grad, o.label_smoothing = label_smoothing, o.ignore_index = ignore_index;
  TORCH_CHECK(subcenters >= 1 && (subcenters == 1 || normalize), op, ": subcenters must be >= 1, and > 1 only ",
              "with normalize; got ", subcenters);
  o.subcenters = subcenters;
  TORCH_CHECK(std::isfinite(lambda) && lambda >= 0.0, op, ": lambda_ must be a finite number >= 0, got ", lambda);
  o.lambda = lambda;
  if (hard_negatives) {  // (3,), or (4,) with a fixed threshold, on the CPU: read here, as the options' doubles
    const at::Tensor h = hard_negatives->to(at::kDouble).contiguous();
    TORCH_CHECK(h.dim() == 1 && (h.size(0) == 3 || h.size(0) == 4), op,
                ": hard_negatives must have shape (3,) (a, b, d) or (4,) (a, b, d, threshold), got ", h.sizes());
    const double* v = h.data_ptr<double>();
    o.hard_negatives = std::array<double, 3>{v[0], v[1], v[2]};
    if (h.size(0) == 4) o.hard_negative_threshold = v[3];
  }
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_rows_op(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, double scale, double m1, double m2,
    double m3, bool normalize, bool exact_margin_grad, double label_smoothing, int64_t ignore_index,
    int64_t subcenters, double lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& hard_negatives) {
  const MarginLossOptions o = margin_options("marginkern::margin_ce_rows", scale, m1, m2, m3, normalize,
                                             exact_margin_grad, label_smoothing, ignore_index, subcenters, lambda,
                                             hard_negatives);
  TORCH_CHECK(weight.size(0) % subcenters == 0, "marginkern::margin_ce_rows: weight must have C·subcenters rows, got ",
              weight.size(0), " rows for subcenters=", subcenters);
  loss::check_targets("marginkern::margin_ce_rows", target, weight.size(0) / subcenters, ignore_index);
  return margin_ce_rows(input, weight, target.to(at::kLong), o, row_margins.value_or(at::Tensor()));
}

std::tuple<at::Tensor, at::Tensor> margin_ce_rows_backward_op(
    const at::Tensor& grad_rows, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& row_state, const at::Tensor& col_norm, double scale, double m1, double m2,
    double m3, bool normalize, bool exact_margin_grad, double label_smoothing, int64_t ignore_index,
    bool need_weight_grad, int64_t subcenters, double lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& hard_negatives) {
  return margin_ce_rows_backward(
      grad_rows, input, weight, target.to(at::kLong), lse, row_state, col_norm,
      margin_options("marginkern::margin_ce_rows_backward", scale, m1, m2, m3, normalize, exact_margin_grad,
                     label_smoothing, ignore_index, subcenters, lambda, hard_negatives),
      need_weight_grad, row_margins.value_or(at::Tensor()));
}

LinearCrossEntropyOptions linear_options(int64_t ignore_index, double label_smoothing, double z_loss,
                                         std::optional<double> softcap, double focal_gamma, double gamma_ce) {
  LinearCrossEntropyOptions o;
  o.ignore_index = ignore_index, o.label_smoothing = label_smoothing, o.z_loss = z_loss, o.softcap = softcap;
  o.focal_gamma = focal_gamma, o.gamma_ce = gamma_ce;
  return o;
}

std::tuple<at::Tensor, at::Tensor> linear_ce_rows_op(const at::Tensor& input, const at::Tensor& weight,
                                                     const at::Tensor& target, const std::optional<at::Tensor>& bias,
                                                     int64_t ignore_index, double label_smoothing, double z_loss,
                                                     std::optional<double> softcap, double focal_gamma,
                                                     double gamma_ce) {
  loss::check_targets("marginkern::linear_ce_rows", target, weight.size(0), ignore_index);
  return linear_ce_rows(input, weight, target.to(at::kLong), bias.value_or(at::Tensor()),
                        linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_rows_backward_op(
    const at::Tensor& grad_rows, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, std::optional<double> softcap, double focal_gamma, double gamma_ce, bool need_weight_grad,
    bool need_bias_grad) {
  return linear_ce_rows_backward(grad_rows, input, weight, target.to(at::kLong), bias.value_or(at::Tensor()), lse,
                                 linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce),
                                 need_weight_grad, need_bias_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emo_rows_op(const at::Tensor& input, const at::Tensor& weight,
                                                           const at::Tensor& target, const at::Tensor& cost_embedding,
                                                           int64_t ignore_index) {
  loss::check_targets("marginkern::emo_rows", target, weight.size(0), ignore_index);
  return emo_rows(input, weight, target.to(at::kLong), cost_embedding, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> emo_rows_backward_op(const at::Tensor& grad_ce, const at::Tensor& grad_emo,
                                                        const at::Tensor& input, const at::Tensor& weight,
                                                        const at::Tensor& target, const at::Tensor& cost_embedding,
                                                        const at::Tensor& lse, const at::Tensor& emo,
                                                        int64_t ignore_index, bool need_weight_grad) {
  return emo_rows_backward(grad_ce, grad_emo, input, weight, target.to(at::kLong), cost_embedding, lse, emo,
                           ignore_index, need_weight_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows_op(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, double temperature,
    int64_t ignore_index, const std::optional<at::Tensor>& bias, std::optional<double> softcap, bool top1) {
  constexpr const char* op = "marginkern::log_probs_entropy_rows";
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be a finite number > 0, got ",
              temperature);
  loss::check_softcap(op, softcap);
  loss::check_targets(op, target, weight.size(0), ignore_index);
  return log_probs_entropy_rows(input, weight, target.to(at::kLong), temperature, ignore_index,
                                bias.value_or(at::Tensor()), softcap, top1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows_backward_op(
    const at::Tensor& grad_log_probs, const at::Tensor& grad_entropy, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& log_probs,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, bool need_weight_grad,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, bool need_bias_grad) {
  return log_probs_entropy_rows_backward(grad_log_probs, grad_entropy, input, weight, target.to(at::kLong), lse,
                                         log_probs, entropy, temperature, ignore_index, need_weight_grad,
                                         bias.value_or(at::Tensor()), softcap, need_bias_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_rows_op(const at::Tensor& input, const at::Tensor& weight,
                                                                     const at::Tensor& teacher_input,
                                                                     const at::Tensor& teacher_weight,
                                                                     const at::Tensor& target, double temperature,
                                                                     int64_t ignore_index, bool reverse) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "marginkern::kl_divergence_rows: temperature must be a "
              "finite number > 0, got ", temperature);
  return kl_divergence_rows(input, weight, teacher_input, teacher_weight, target.to(at::kLong), temperature,
                            ignore_index, reverse);
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_rows_backward_op(
    const at::Tensor& grad_kl, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& teacher_input,
    const at::Tensor& teacher_weight, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl, double temperature, int64_t ignore_index, bool reverse, bool need_weight_grad) {
  return kl_divergence_rows_backward(grad_kl, input, weight, teacher_input, teacher_weight, target.to(at::kLong), lse,
                                     teacher_lse, kl, temperature, ignore_index, reverse, need_weight_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jsd_rows_op(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
    const at::Tensor& target, double beta, double temperature, int64_t ignore_index) {
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "marginkern::jsd_rows: beta must lie in (0, 1), got ", beta);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "marginkern::jsd_rows: temperature must be a finite "
              "number > 0, got ", temperature);
  return jsd_rows(input, weight, teacher_input, teacher_weight, target.to(at::kLong), beta, temperature, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> jsd_rows_backward_op(
    const at::Tensor& grad_jsd, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& teacher_input,
    const at::Tensor& teacher_weight, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl_student_mixture, double beta, double temperature, int64_t ignore_index,
    bool need_weight_grad) {
  TORCH_CHECK(beta > 0.0 && beta < 1.0, "marginkern::jsd_rows_backward: beta must lie in (0, 1), got ", beta);
  return jsd_rows_backward(grad_jsd, input, weight, teacher_input, teacher_weight, target.to(at::kLong), lse,
                           teacher_lse, kl_student_mixture, beta, temperature, ignore_index, need_weight_grad);
}

}  // namespace
}  // namespace marginkern

TORCH_LIBRARY_FRAGMENT(marginkern, m) {
  m.def(
      "margin_ce_rows(Tensor input, Tensor weight, Tensor target, float scale, float m1, float m2, float m3, "
      "bool normalize, bool exact_margin_grad, float label_smoothing, int ignore_index, int subcenters=1, "
      "float lambda_=0.0, Tensor? row_margins=None, Tensor? hard_negatives=None) -> (Tensor loss_rows, Tensor lse, "
      "Tensor row_state, Tensor col_norm)");
  m.def(
      "margin_ce_rows_backward(Tensor grad_rows, Tensor input, Tensor weight, Tensor target, Tensor lse, "
      "Tensor row_state, Tensor col_norm, float scale, float m1, float m2, float m3, bool normalize, "
      "bool exact_margin_grad, float label_smoothing, int ignore_index, bool need_weight_grad, int subcenters=1, "
      "float lambda_=0.0, Tensor? row_margins=None, Tensor? hard_negatives=None) -> (Tensor grad_input, "
      "Tensor grad_weight)");
  m.def(
      "linear_ce_rows(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, float z_loss, float? softcap, float focal_gamma, float gamma_ce) "
      "-> (Tensor loss_rows, Tensor lse)");
  m.def(
      "linear_ce_rows_backward(Tensor grad_rows, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float? softcap, float focal_gamma, "
      "float gamma_ce, bool need_weight_grad, bool need_bias_grad) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "emo_rows(Tensor input, Tensor weight, Tensor target, Tensor cost_embedding, int ignore_index) "
      "-> (Tensor ce, Tensor emo, Tensor lse)");
  m.def(
      "emo_rows_backward(Tensor grad_ce, Tensor grad_emo, Tensor input, Tensor weight, Tensor target, "
      "Tensor cost_embedding, Tensor lse, Tensor emo, int ignore_index, bool need_weight_grad) "
      "-> (Tensor grad_input, Tensor grad_weight)");
  m.def(
      "log_probs_entropy_rows(Tensor input, Tensor weight, Tensor target, float temperature, int ignore_index, "
      "Tensor? bias=None, float? softcap=None, bool top1=False) "
      "-> (Tensor log_probs, Tensor entropy, Tensor lse, Tensor top1)");
  m.def(
      "log_probs_entropy_rows_backward(Tensor grad_log_probs, Tensor grad_entropy, Tensor input, Tensor weight, "
      "Tensor target, Tensor lse, Tensor log_probs, Tensor entropy, float temperature, int ignore_index, "
      "bool need_weight_grad, Tensor? bias=None, float? softcap=None, bool need_bias_grad=False) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "kl_divergence_rows(Tensor input, Tensor weight, Tensor teacher_input, Tensor teacher_weight, Tensor target, "
      "float temperature, int ignore_index, bool reverse) -> (Tensor kl, Tensor lse, Tensor teacher_lse)");
  m.def(
      "kl_divergence_rows_backward(Tensor grad_kl, Tensor input, Tensor weight, Tensor teacher_input, "
      "Tensor teacher_weight, Tensor target, Tensor lse, Tensor teacher_lse, Tensor kl, float temperature, "
      "int ignore_index, bool reverse, bool need_weight_grad) -> (Tensor grad_input, Tensor grad_weight)");
  m.def(
      "jsd_rows(Tensor input, Tensor weight, Tensor teacher_input, Tensor teacher_weight, Tensor target, float beta, "
      "float temperature, int ignore_index) -> (Tensor jsd, Tensor lse, Tensor teacher_lse, Tensor kl_student_mixture)");
  m.def(
      "jsd_rows_backward(Tensor grad_jsd, Tensor input, Tensor weight, Tensor teacher_input, Tensor teacher_weight, "
      "Tensor target, Tensor lse, Tensor teacher_lse, Tensor kl_student_mixture, float beta, float temperature, "
      "int ignore_index, bool need_weight_grad) -> (Tensor grad_input, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(marginkern, CPU, m) {
  m.impl("margin_ce_rows", TORCH_FN(marginkern::margin_ce_rows_op));
  m.impl("margin_ce_rows_backward", TORCH_FN(marginkern::margin_ce_rows_backward_op));
  m.impl("linear_ce_rows", TORCH_FN(marginkern::linear_ce_rows_op));
  m.impl("linear_ce_rows_backward", TORCH_FN(marginkern::linear_ce_rows_backward_op));
  m.impl("emo_rows", TORCH_FN(marginkern::emo_rows_op));
  m.impl("emo_rows_backward", TORCH_FN(marginkern::emo_rows_backward_op));
  m.impl("log_probs_entropy_rows", TORCH_FN(marginkern::log_probs_entropy_rows_op));
  m.impl("log_probs_entropy_rows_backward", TORCH_FN(marginkern::log_probs_entropy_rows_backward_op));
  m.impl("kl_divergence_rows", TORCH_FN(marginkern::kl_divergence_rows_op));
  m.impl("kl_divergence_rows_backward", TORCH_FN(marginkern::kl_divergence_rows_backward_op));
  m.impl("jsd_rows", TORCH_FN(marginkern::jsd_rows_op));
  m.impl("jsd_rows_backward", TORCH_FN(marginkern::jsd_rows_backward_op));
}
