// The C++ losses' per-row halves as torch.ops.marginkern.* ops with CPU kernels: the Python package's loss
// ops (marginkern/ops.py) run them on the `cpp` backend, so that a CPU step is C++ from the arguments to
// the gradients. Options arrive as the Python ops' scalars; the Python side has checked them.
#include <torch/library.h>

#include "margin_loss.h"

namespace marginkern {
namespace {

MarginLossOptions margin_options(double scale, double m1, double m2, double m3, bool normalize, bool exact_margin_grad,
                                 double label_smoothing, int64_t ignore_index) {
  MarginLossOptions o;
  o.scale = scale, o.m1 = m1, o.m2 = m2, o.m3 = m3, o.normalize = normalize;
  o.exact_margin_grad = exact_margin_grad, o.label_smoothing = label_smoothing, o.ignore_index = ignore_index;
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_rows_op(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target, double scale, double m1, double m2,
    double m3, bool normalize, bool exact_margin_grad, double label_smoothing, int64_t ignore_index) {
  return margin_ce_rows(input, weight, target.to(at::kLong),
                        margin_options(scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index));
}

std::tuple<at::Tensor, at::Tensor> margin_ce_rows_backward_op(
    const at::Tensor& grad_rows, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& row_state, const at::Tensor& col_norm, double scale, double m1, double m2,
    double m3, bool normalize, bool exact_margin_grad, double label_smoothing, int64_t ignore_index,
    bool need_weight_grad) {
  return margin_ce_rows_backward(
      grad_rows, input, weight, target.to(at::kLong), lse, row_state, col_norm,
      margin_options(scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index), need_weight_grad);
}

}  // namespace
}  // namespace marginkern

TORCH_LIBRARY_FRAGMENT(marginkern, m) {
  m.def(
      "margin_ce_rows(Tensor input, Tensor weight, Tensor target, float scale, float m1, float m2, float m3, "
      "bool normalize, bool exact_margin_grad, float label_smoothing, int ignore_index) "
      "-> (Tensor loss_rows, Tensor lse, Tensor row_state, Tensor col_norm)");
  m.def(
      "margin_ce_rows_backward(Tensor grad_rows, Tensor input, Tensor weight, Tensor target, Tensor lse, "
      "Tensor row_state, Tensor col_norm, float scale, float m1, float m2, float m3, bool normalize, "
      "bool exact_margin_grad, float label_smoothing, int ignore_index, bool need_weight_grad) "
      "-> (Tensor grad_input, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(marginkern, CPU, m) {
  m.impl("margin_ce_rows", TORCH_FN(marginkern::margin_ce_rows_op));
  m.impl("margin_ce_rows_backward", TORCH_FN(marginkern::margin_ce_rows_backward_op));
}
