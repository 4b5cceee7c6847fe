// Linear cross-entropy for LLM vocabularies (z = softcap(x·wᵀ + b), then cross-entropy with label
// smoothing, z-loss, focal or γ-CE) for C++ (LibTorch) callers, differentiable with LibTorch's autograd,
// on CPU tensors. The same math as marginkern/linear_ce.py (DESIGN.md §4), with u = log p_t:
//     L = (1−ε)·f(u) + ε·lse − (ε/C)·Σ_j z_j + z_loss·lse²,
//     f(u) = −u (CE), −(1 − e^u)^γ·u (focal_gamma = γ), −log(γ + (1−γ)e^u)/(1−γ) (gamma_ce = γ).
// Streams over class chunks through the CPU ops of streaming_ce.h: the N × V logits never exist (the
// backward pass recomputes them: 4 GEMMs). The Python package runs the per-row halves below on the CPU
// (csrc/cpu/loss_ops.cpp). Tests: csrc/tests/test_linear_ce_loss.cpp, and the Python suite.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace marginkern {

struct LinearCrossEntropyOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  std::optional<double> softcap;  // Gemma-2's logit soft-capping: z = softcap·tanh(z/softcap)
  double focal_gamma = 0.0;       // at most one of focal_gamma and gamma_ce is non-zero
  double gamma_ce = 0.0;
  std::string reduction = "mean";  // "mean" (over non-ignored rows; 0 when there are none), "sum", "none"
  int64_t class_chunk = 0;         // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits
};

// x (N, D) hidden states and w (C, D) of one float dtype on the CPU, target (N,) integer, bias (C,) or
// undefined. fp32 result (fp64 for fp64 inputs); gradients flow to x, w and bias.
at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const at::Tensor& bias = at::Tensor(), const LinearCrossEntropyOptions& options = {});

// The two halves, per row and without autograd (the ops torch.ops.marginkern.linear_ce_rows{,_backward}
// that the Python package runs on the CPU; options.reduction and the argument checks are the caller's):
// (per-row loss, lse), then (dL/dx, dL/dw or (0,), dL/dbias or (0,)) for the per-row loss gradient.
std::tuple<at::Tensor, at::Tensor> linear_ce_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                                  const at::Tensor& bias, const LinearCrossEntropyOptions& options);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_rows_backward(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
    const at::Tensor& bias, const at::Tensor& lse, const LinearCrossEntropyOptions& options, bool need_weight_grad,
    bool need_bias_grad);

}  // namespace marginkern
