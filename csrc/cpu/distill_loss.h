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

// The generalized Jensen-Shannon divergence (GKD; TRL's generalized_jsd_loss), m = (1−β)·p + β·q:
//     JSD_β = β·KL(q‖m) + (1−β)·KL(p‖m),     dJSD/dz_j = (1−β)·p_j·(log(p_j/m_j) − KL(p‖m)),
// two streamed passes in the forward (both log-sum-exps, then the divergence's sums), one in the backward.
struct JSDOptions {
  double beta = 0.5;               // in (0, 1); for 0 and 1 (forward and reverse KL) call linear_kl_divergence
  double temperature = 1.0;        // > 0
  int64_t ignore_index = -100;
  std::string reduction = "mean";  // "mean" (over non-ignored rows; 0 when there are none), "sum", "none"
  int64_t class_chunk = 0;         // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits per head
};

// target (N,) integer or undefined (every row counts).
at::Tensor linear_jsd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x, const at::Tensor& teacher_w,
                      const at::Tensor& target, const JSDOptions& options = {});

// Its two halves (the ops torch.ops.marginkern.jsd_rows{,_backward}): (JSD, lse, lse^T, KL(p‖m)) per row, then
// (dL/dx, dL/dw or (0,)) for the per-row gradient of JSD.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jsd_rows(const at::Tensor& x, const at::Tensor& w,
                                                                    const at::Tensor& teacher_x,
                                                                    const at::Tensor& teacher_w,
                                                                    const at::Tensor& target, double beta,
                                                                    double temperature, int64_t ignore_index,
                                                                    int64_t class_chunk = 0);
std::tuple<at::Tensor, at::Tensor> jsd_rows_backward(
    const at::Tensor& grad_jsd, const at::Tensor& x, const at::Tensor& w, const at::Tensor& teacher_x,
    const at::Tensor& teacher_w, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& teacher_lse,
    const at::Tensor& kl_student_mixture, double beta, double temperature, int64_t ignore_index, bool need_weight_grad,
    int64_t class_chunk = 0);

}  // namespace marginkern
