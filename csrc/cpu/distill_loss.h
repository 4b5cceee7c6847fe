// Knowledge distillation over an LM head for C++ (LibTorch) callers, differentiable with LibTorch's autograd, on
// CPU tensors. The same math as marginkern/distill.py: with z = x·wᵀ/T (student) and z^T = x^T·w^Tᵀ/T (teacher,
// no gradient), p = softmax(z), q = softmax(z^T), per row
//     forward KL(q‖p) = E_q[z^T − z] − lse^T + lse,     reverse KL(p‖q) = E_p[z − z^T] − lse + lse^T,
// from one streamed pass over class chunks (both heads' GEMMs per chunk), never either N × C logits; 0 on rows
// whose target is ignore_index (the target only masks). The Python package runs the per-row halves below on
// the CPU (csrc/cpu/loss_ops.cpp). Tests: csrc/tests/test_distill_loss.cpp, and the Python suite.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace marginkern {

struct KLDivergenceOptions {
  double temperature = 1.0;        // > 0
  bool reverse = false;            // false: KL(teacher‖student); true: KL(student‖teacher)
  int64_t ignore_index = -100;
  std::string reduction = "mean";  // "mean" (over non-ignored rows; 0 when there are none), "sum", "none"
  int64_t class_chunk = 0;         // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits per head
};

// target (N,) integer or undefined (every row counts).
at::Tensor linear_kl_divergence(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
                                const at::Tensor& teacher_w, const at::Tensor& target,
                                const KLDivergenceOptions& options = {});

// The two halves, per row and without autograd (the ops torch.ops.marginkern.kl_divergence_rows{,_backward} that
// the Python package runs on the CPU; argument checks are the caller's; class_chunk 0: automatic):
// (KL, lse, lse^T) per row, then (dL/dx, dL/dw or (0,)) for the per-row gradient of KL.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_rows(const at::Tensor& x, const at::Tensor& w,
                                                                  const at::Tensor& teacher_x,
                                                                  const at::Tensor& teacher_w, const at::Tensor& target,
                                                                  double temperature, int64_t ignore_index,
                                                                  bool reverse, int64_t class_chunk = 0);
std::tuple<at::Tensor, at::Tensor> kl_divergence_rows_backward(
    const at::Tensor& grad_kl, const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
    const at::Tensor& teacher_w, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl, double temperature, int64_t ignore_index, bool reverse, bool need_weight_grad,
    int64_t class_chunk = 0);

}  // namespace marginkern
