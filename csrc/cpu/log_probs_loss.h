// Per-token log-probabilities and entropy of an LM head for C++ (LibTorch) callers, differentiable with
// LibTorch's autograd, on CPU tensors. The same math as marginkern/log_probs.py: with z = softcap(x·wᵀ + b)/T
// (the bias and the softcap optional) and p = softmax(z),
//     log_probs_n = z_{n,t_n} − lse_n,     entropy_n = Σ_j p_nj·(lse_n − z_nj),
// both from one streamed pass over class chunks (the row max M, S′ and T of streaming_ce.h: exact for confident
// tokens, where 1 − p_t is far below fp32's resolution of lse), never the N × C logits. Both are 0 on ignored
// rows. The Python package runs the per-row halves below on the CPU (csrc/cpu/loss_ops.cpp). Tests:
// csrc/tests/test_log_probs_loss.cpp, and the Python suite.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace marginkern {

struct LogProbsOptions {
  double temperature = 1.0;       // z = softcap(x·wᵀ + b) / temperature, > 0 (the sampler's, after the model's cap)
  std::optional<double> softcap;  // Gemma-2's final-logit soft-capping: softcap·tanh(z/softcap), > 0
  int64_t ignore_index = -100;
  int64_t class_chunk = 0;        // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits
};

// x (N, D) and w (C, D) of one float dtype on the CPU, target (N,) integer, bias (C,) or undefined.
// (log_probs, entropy), each (N,) in the accumulation dtype (float64 for float64 inputs, else float32); gradients
// flow to x, w and bias.
std::tuple<at::Tensor, at::Tensor> log_probs_and_entropy(const at::Tensor& x, const at::Tensor& w,
                                                         const at::Tensor& target,
                                                         const at::Tensor& bias = at::Tensor(),
                                                         const LogProbsOptions& options = {});

// The two halves, per row and without autograd (the ops torch.ops.marginkern.log_probs_entropy_rows{,_backward}
// that the Python package runs on the CPU; argument checks are the caller's; class_chunk 0: automatic):
// (log_probs, entropy, lse, top1) per row, top1 (with `top1`; else (0,)) whether the target's logit is the row's
// largest (ties count, ignored rows false), then (dL/dx, dL/dw or (0,), dL/dbias or (0,)) for per-row gradients of
// log_probs and entropy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, double temperature, int64_t ignore_index,
    const at::Tensor& bias = at::Tensor(), std::optional<double> softcap = std::nullopt, bool top1 = false,
    int64_t class_chunk = 0);
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_probs_entropy_rows_backward(
    const at::Tensor& grad_log_probs, const at::Tensor& grad_entropy, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& target, const at::Tensor& lse, const at::Tensor& log_probs, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, bool need_weight_grad, const at::Tensor& bias = at::Tensor(),
    std::optional<double> softcap = std::nullopt, bool need_bias_grad = false, int64_t class_chunk = 0);

}  // namespace marginkern
