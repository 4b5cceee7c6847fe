// The class-streaming steps of marginkern's engine (marginkern/engine.py) on the CPU.
//
// For row n and class j the logit is
//     z_nj = softcap(row_scale_n · col_scale_j · (x_n · w_j) + bias_j)     for j ≠ target_n
//     z_nj = target_logit_n                                                 for j = target_n
// (col_scale = 1, bias = 0 and no softcap when absent; target_n = −1 means no target column), and the
// gradient with respect to the raw dot product a_nj = x_n · w_j is
//     dL/da_nj = (coef_p_n · p_nj − coef_u_n) · dz_nj/da_nj    with p_nj = exp(z_nj − lse_n)
//     dL/da_nj = target_grad_n                                  for j = target_n.
// The optional EMO cost term (all five cost_* tensors, or none) replaces coef_p_n by
//     coef_p_n − cost_coef_n · cost_query_scale_n · cost_key_scale_j · (cost_query_n · cost_keys_j),
// a second, narrow GEMM per chunk (cost_query (N, E), cost_keys (C, E)).
// The entropy term (per-token entropy, marginkern/log_probs.py) adds −entropy_coef_n · p_nj · log p_nj to every
// dL/dz_nj off the target (p·log p taken as 0 where p = 0; chained through the softcap as the rest), and its
// forward keeps, per row, the max M,
// S′ = Σ_j e^{z_nj − M} without one maximal cell and T = Σ_j e^{z_nj − M}·(M − z_nj), all terms ≥ 0:
// lse = M + log1p(S′) and the entropy log1p(S′) + T/(1 + S′) are exact where p_t ≈ 1 (no 1 − p_t cancels).
// Every function streams over chunks of `class_chunk` classes with one GEMM per chunk into a reused
// N × chunk buffer: N × C never exists. Inputs are float32/float64, or float16/bfloat16 upcast to float32
// per chunk; results are in that accumulation dtype. These are the CPU kernels of the ops
// torch.ops.marginkern.streaming_{row_stats,grad_logits,grads}.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>

namespace marginkern {

// (lse, Σ_j z_nj), each (N,). The sum is computed only when need_sum_logits; otherwise it is empty (0,).
std::tuple<at::Tensor, at::Tensor> streaming_row_stats(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit,
    bool need_sum_logits, int64_t class_chunk);

// (lse, Σ_j z_nj or empty, each row's largest logit, the substituted target logit included), each (N,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_max(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit,
    bool need_sum_logits, int64_t class_chunk);

// dL/da for the classes [c0, c1), shape (N, c1 − c0).
at::Tensor streaming_grad_logits(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad, int64_t c0,
    int64_t c1,
    const std::optional<at::Tensor>& cost_query = std::nullopt,
    const std::optional<at::Tensor>& cost_query_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_keys = std::nullopt,
    const std::optional<at::Tensor>& cost_key_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_coef = std::nullopt);

// The engine's backward chunk loop: (dL/dx (N, D), dL/dw (C, D), or (0,) unless need_weight_grad (a
// frozen head skips the dW GEMM), dL/dbias (C,), or (0,) unless need_bias_grad), with dL/dx = G·W,
// dL/dw = Gᵀ·X, dL/dbias = Σ_n G for G = dL/da. dL/dw is the raw gradient in the accumulation dtype:
// the caller chains it through what the engine does not know about (row normalisation of w) and casts
// it to w's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_grads(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    bool need_bias_grad, bool need_weight_grad, int64_t class_chunk,
    const std::optional<at::Tensor>& cost_query = std::nullopt,
    const std::optional<at::Tensor>& cost_query_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_keys = std::nullopt,
    const std::optional<at::Tensor>& cost_key_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_coef = std::nullopt);

// Sub-centres (sub-center ArcFace): w (K·C, D) holds class j's K sub-centres in rows jK … jK+K−1, col_scale
// has K·C entries, and class j's logit is built as above from max_k col_scale_{jK+k}·(x_n · w_{jK+k}) (the
// first of equal ones wins; a NaN wins and stays). dL/da goes to the winning row only (times its col_scale),
// the target column's to row target_n·K + target_subcenter_n; the class's other rows get 0. Per chunk the
// GEMM writes N × chunk·K dot products, reduced to N × chunk before the epilogue and expanded after it.
// K = 1 is the plain logit above.
struct Subcenters {
  int64_t K = 1;
  at::Tensor target_subcenter;  // (N,) int64 in [0, K): needed by the backward pass
};

// Hard negatives (CurricularFace, MV-Softmax; marginkern/engine.py HardNegatives): every logit z_nj off the target
// column with z_nj > threshold_n becomes (α·z_nj + β)·z_nj + γ, and dz/da takes the factor 2α·z_nj + β there (the
// mask itself has no gradient). For cosine logits without a bias or softcap (the margin losses); absent when
// `threshold` is undefined.
struct HardNegatives {
  std::array<double, 3> coefs{0.0, 1.0, 0.0};  // (α, β, γ), in logit units
  at::Tensor threshold;                        // (N,): +inf where nothing is hard (an ignored row)
  bool present() const { return threshold.defined(); }
};

// (row max M, log_sum = lse − M, entropy), each (N,), of the logits softcap(row_scale_n·(x_n·w_j) + bias_j)
// (target column target_logit; no col_scale), in one pass over the classes (the entropy term above).
std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_entropy(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& target_logit, int64_t class_chunk);

// Distillation's teacher plane (marginkern/distill.py): the teacher's logits z^T_nj = row_scale_n·(x^T_n · w^T_j),
// its own hidden states (N, E) and head (C, E), no gradient. The forward pass keeps its log-sum-exp and the cross
// sums below; the backward pass adds −coef_q_n·q_nj + coef_log_q_n·p_nj·log q_nj to dL/dz_nj, q = exp(z^T − lse^T).
// With jsd_beta β (the generalized JSD, m = (1−β)·p + β·q) the backward's term is coef_log_q_n·p_nj·log(p_nj/m_nj)
// instead (coef_q unused).
struct Teacher {
  at::Tensor x, w;                   // (N, E), (C, E): any float dtype, computed in the accumulation dtype
  at::Tensor lse, coef_q, coef_log_q;  // (N,) each: the backward pass's (undefined in the forward)
  std::optional<double> jsd_beta = std::nullopt;
  bool present() const { return x.defined(); }
};

// The generalized JSD's second forward pass: with the student's `lse` and the teacher's (teacher.lse) known,
// (KL(p‖m), KL(q‖m)) per row, m = (1−β)·p + β·q with β = *teacher.jsd_beta, sums of p·log(p/m) and q·log(q/m)
// over one more pass of both heads' GEMMs (logits as in streaming_row_stats_with_teacher).
std::tuple<at::Tensor, at::Tensor> streaming_jsd_row_sums(const at::Tensor& x, const at::Tensor& w,
                                                          const at::Tensor& row_scale, const Teacher& teacher,
                                                          const at::Tensor& lse, int64_t class_chunk);

// (lse, lse^T, E_q[z^T − z], E_p[z − z^T]), each (N,), of the student logits row_scale_n·(x_n·w_j) (no target
// column, no col_scale, bias or softcap) and the teacher's, with p and q their softmaxes; in one pass, each
// mean kept as two sums with the same weights (no rounding of a log-sum-exp in it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> streaming_row_stats_with_teacher(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const Teacher& teacher,
    int64_t class_chunk);

// streaming_row_stats over sub-centres (no bias: sub-centres are cosine logits), and with `hard` its hard negatives
// (no softcap then).
std::tuple<at::Tensor, at::Tensor> streaming_row_stats_of_subcenters(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits, int64_t class_chunk, const Subcenters& subcenters,
    const HardNegatives& hard = {});

// streaming_grads for callers that chain dW further (the C++ losses): each chunk of the raw dW, rows
// [r0, r1) of w (the chunk's classes, K rows each), in the accumulation dtype, passes through
// `finalize(r0, r1, chunk)` (in place; may be empty), then is stored in w's dtype: a 16-bit w gets no
// (C, D) fp32 gradient beside its own. `entropy_coef` (N,), when defined, adds the entropy term (without a
// cost term or sub-centres), and `teacher` the teacher's (without a cost term, sub-centres, a col_scale, a bias or
// a softcap); `hard` the hard negatives (alone: no bias, softcap, cost, entropy or teacher term).
using WeightChunkFinalizer = std::function<void(int64_t r0, int64_t r1, at::Tensor& grad_w_chunk)>;
std::tuple<at::Tensor, at::Tensor, at::Tensor> streaming_grads_finalized(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
    std::optional<double> softcap, const at::Tensor& target, const at::Tensor& lse,
    const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    bool need_bias_grad, bool need_weight_grad, int64_t class_chunk, const WeightChunkFinalizer& finalize,
    const std::optional<at::Tensor>& cost_query = std::nullopt,
    const std::optional<at::Tensor>& cost_query_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_keys = std::nullopt,
    const std::optional<at::Tensor>& cost_key_scale = std::nullopt,
    const std::optional<at::Tensor>& cost_coef = std::nullopt, const Subcenters& subcenters = {},
    const at::Tensor& entropy_coef = at::Tensor(), const Teacher& teacher = {}, const HardNegatives& hard = {});

// The 3-GEMM path's epilogue over `dots` (N, C), the raw dot products x·wᵀ computed elsewhere, in the
// accumulation dtype: (lse, Σ_j z or (0,)) without changing dots, then dots ← dL/da in place.
std::tuple<at::Tensor, at::Tensor> row_stats_of_dots(
    const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits);
void grads_of_dots_(const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
                    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
                    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_u,
                    const at::Tensor& target_grad);

}  // namespace marginkern
