// EMO (Earth Mover Distance Optimization, Ren et al. 2024) over a large vocabulary for C++ (LibTorch)
// callers, differentiable with LibTorch's autograd, on CPU tensors. The same math as marginkern/emo.py:
// with p = softmax(x·wᵀ) and Ê the row-normalised cost embedding (default w, detached; it never receives
// a gradient),
//     emo_n = Σ_j p_nj·(1 − ê_j·ê_{t_n}) = 1 − ê_t·(Σ_j p_nj·ê_j),    ce_n = lse_n − z_{n,t_n},
// the expectation streamed over class chunks (an attention with Q = x, K = w, V = Ê): the N × C
// probabilities never exist. The Python package runs the per-row halves below on the CPU
// (csrc/cpu/loss_ops.cpp). Tests: csrc/tests/test_emo_loss.cpp, and the Python suite.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace marginkern {

struct EMOOptions {
  int64_t ignore_index = -100;
  std::string reduction = "mean";  // "mean" (over non-ignored rows; 0 when there are none), "sum", "none"
  int64_t class_chunk = 0;         // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits
};

// EMO alone. cost_embedding (C, E) of any width, or undefined for w itself.
at::Tensor emo_loss(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                    const at::Tensor& cost_embedding = at::Tensor(), const EMOOptions& options = {});

// The official recipe's MLE-anchored combination 0.5·(ce + sg(ce/(emo + 1e-10))·emo): its value is the
// cross-entropy, its gradient 0.5·(∇ce + (ce/emo)·∇emo) (marginkern.emo_cross_entropy).
at::Tensor emo_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                             const at::Tensor& cost_embedding = at::Tensor(), const EMOOptions& options = {});

// The two halves, per row and without autograd (the ops torch.ops.marginkern.emo_rows{,_backward} that
// the Python package runs on the CPU; argument checks are the caller's; class_chunk 0: automatic):
// (ce, emo, lse) per row, then (dL/dx, dL/dw or (0,)) for per-row gradients of ce and emo.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emo_rows(const at::Tensor& x, const at::Tensor& w,
                                                        const at::Tensor& target, const at::Tensor& cost,
                                                        int64_t ignore_index, int64_t class_chunk = 0);
std::tuple<at::Tensor, at::Tensor> emo_rows_backward(const at::Tensor& grad_ce, const at::Tensor& grad_emo,
                                                     const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                                     const at::Tensor& cost, const at::Tensor& lse,
                                                     const at::Tensor& emo, int64_t ignore_index,
                                                     bool need_weight_grad, int64_t class_chunk = 0);

}  // namespace marginkern
