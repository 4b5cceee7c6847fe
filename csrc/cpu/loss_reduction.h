// What the C++ losses (margin_loss.cpp, linear_ce_loss.cpp) share around the streaming ops: the class
// chunk, the reduction of per-row losses and its inverse for the backward pass, and the check of the
// reduction / targets. Same semantics as marginkern/reference.py reduce_rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "../common/op_args.h"

namespace marginkern::loss {

constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize (engine.NORM_EPS)

// Classes per streamed chunk: `requested`, or a 16 MB chunk of N rows of accumulation-dtype logits, at least
// 256 GEMM columns. With `subcenters` K > 1 a class takes K columns of the chunk's GEMM and two more values of
// the reduction (streaming_ce.cpp), and the floor counts columns, not classes.
inline int64_t class_chunk(int64_t requested, int64_t N, at::ScalarType acc, int64_t subcenters = 1) {
  if (requested > 0) return requested;
  const int64_t bytes = acc == at::kDouble ? 8 : 4;
  const int64_t per_class = subcenters == 1 ? 1 : subcenters + 2;
  return std::max<int64_t>((256 + subcenters - 1) / subcenters,
                           (int64_t{16} << 20) / std::max<int64_t>(1, N * per_class * bytes));
}

// "mean" over the non-ignored rows (0 when there are none, not NaN), "sum", or "none" (per row).
inline at::Tensor reduce(const at::Tensor& loss_rows, const at::Tensor& valid, const std::string& reduction) {
  if (reduction == "none") return loss_rows;
  if (reduction == "sum") return loss_rows.sum();
  return loss_rows.sum() / valid.sum().clamp_min(1).to(loss_rows.scalar_type());
}

// dL/dloss_n from the gradient of the reduced loss: 0 on ignored rows.
inline at::Tensor row_grads(const at::Tensor& grad, const at::Tensor& valid, const std::string& reduction,
                            at::ScalarType acc) {
  at::Tensor g = grad.to(acc);
  if (reduction == "mean") g = g / valid.sum().clamp_min(1).to(acc);
  g = reduction == "none" ? g : g.expand(valid.sizes());
  return at::where(valid, g, at::zeros_like(g));
}

// ‖t_i‖ in `acc`, by blocks of rows: on the CPU linalg_vector_norm(dtype=fp32) of a 16-bit (C, D) tensor
// makes a whole fp32 copy first (engine.row_norms).
inline at::Tensor row_norms(const at::Tensor& t, at::ScalarType acc) {
  const int64_t rows = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, t.size(1) * 4));
  if (t.scalar_type() == acc || t.size(0) <= rows) return at::linalg_vector_norm(t, 2, {1}, false, acc);
  at::Tensor out = at::empty({t.size(0)}, t.options().dtype(acc));
  for (int64_t r0 = 0; r0 < t.size(0); r0 += rows) {
    const int64_t n = std::min(rows, t.size(0) - r0);
    out.narrow(0, r0, n).copy_(at::linalg_vector_norm(t.narrow(0, r0, n), 2, {1}, false, acc));
  }
  return out;
}

// Targets in [0, C) or ignore_index (−1 that is not ignore_index would silently mean "no target column").
inline void check_targets(const char* op, const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  if (target.numel() == 0) return;
  const at::Tensor t = target.to(at::kLong);
  const at::Tensor bad = t.ne(ignore_index) & (t.lt(0) | t.ge(num_classes));
  TORCH_CHECK(!bad.any().item<bool>(), op, ": target must hold class indices in [0, C=", num_classes,
              ") or ignore_index=", ignore_index, ", got ", t.masked_select(bad)[0].item<int64_t>());
}

// A head's bias: (C,) on the CPU, or undefined.
inline void check_bias(const char* op, const at::Tensor& bias, const at::Tensor& w) {
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(0) && bias.device().is_cpu()), op,
              ": bias must be a (C=", w.size(0), ",) CPU tensor or undefined, got ", bias.sizes());
}

// A logit softcap cap·tanh(z/cap): unset, or a finite number > 0.
inline void check_softcap(const char* op, std::optional<double> softcap) {
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0), op,
              ": softcap must be unset or a positive finite number, got ", softcap.value_or(0.0));
}

inline void check_label_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// The C++ losses are differentiable once: their backward passes write with out= GEMMs.
inline void check_once_differentiable(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": the gradient of this loss is not differentiable again (create_graph / double backward)");
}

// The arguments every C++ loss checks the same way: shapes, dtypes, CPU tensors, integer targets in
// [0, C) or ignore_index, a known reduction.
inline void check_classification_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& target, int64_t ignore_index, const std::string& reduction,
                                        int64_t rows_per_class = 1) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1), op,
              ": input must be (N, D) and weight (C, D) with the same D, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0), op, ": target must have shape (N=", x.size(0),
              ",), got ", target.sizes());
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()) && target.scalar_type() != at::kBool, op,
              ": target must be an integer tensor, got ", target.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && target.device().is_cpu(), op,
              ": this C++ entry point takes CPU tensors (the GPU kernels run from the Python package)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && w.scalar_type() == x.scalar_type(), op,
              ": input and weight must have one floating-point dtype, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction must be \"mean\", \"sum\" or \"none\", got \"", reduction, "\"");
  check_targets(op, target, w.size(0) / rows_per_class, ignore_index);
}

}  // namespace marginkern::loss
