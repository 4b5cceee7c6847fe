// The margin-softmax cross-entropy family (ArcFace, CosFace, SphereFace / L-Softmax, the combined
// m1/m2/m3 margin) for C++ (LibTorch) callers, differentiable with LibTorch's autograd, on CPU tensors.
//
// The same math as marginkern/margin_ce.py + margin.py (DESIGN.md §4): with c = cos θ between x_n and its
// class centre w_y, the target logit is T = s·ψ(c), ψ(c) = (−1)^k cos(m1·θ + m2) − 2k − m3,
// k = ⌊(m1·θ + m2)/π⌋, every other logit s·cos; without `normalize`, logits are s·x·wᵀ and
// T = s·‖x‖‖w_y‖·ψ(c). It streams over class chunks through the CPU ops of streaming_ce.h, so the N × C
// logits never exist. The Python package runs the per-row halves below on the CPU (csrc/cpu/loss_ops.cpp
// registers them); tests: csrc/tests/test_margin_loss.cpp against a naive LibTorch computation, and the
// Python suite through the package's ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace marginkern {

struct MarginLossOptions {
  double scale = 64.0;
  double m1 = 1.0;  // multiplicative angular margin (SphereFace, L-Softmax)
  double m2 = 0.5;  // additive angular margin (ArcFace)
  double m3 = 0.0;  // additive cosine margin (CosFace)
  bool normalize = true;          // cosine logits; false: raw x·wᵀ logits
  bool exact_margin_grad = true;  // false: dψ/dc := 1 (straight-through)
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  std::string reduction = "mean";  // "mean" (over non-ignored rows; 0 when there are none), "sum", "none"
  int64_t class_chunk = 0;         // classes per streamed chunk; 0: a 16 MB chunk of fp32 logits
  // K > 1: sub-center ArcFace (needs normalize): w (K·C, D) holds class j's sub-centres in rows jK … jK+K−1
  // and cos θ_j is the largest of theirs; the gradient flows to that one (streaming_ce.h Subcenters)
  int64_t subcenters = 1;
  // λ ≥ 0 of A-Softmax / L-Softmax: ψ eased toward the plain cosine, (λ·c + ψ(c))/(1 + λ); 0: ψ itself
  double lambda = 0.0;
  // hard negatives (a, b, d) (CurricularFace (1, t, 0), MV-Softmax (0, w, w − 1); needs normalize): every non-target
  // cosine c above the row's target cosine ψ becomes a·c² + b·c + d, its gradient that quadratic's slope (the mask
  // has none); unset: none
  std::optional<std::array<double, 3>> hard_negatives;
  // with hard_negatives: the re-weighting acts on the non-target cosines above this fixed cosine τ instead of above
  // each row's ψ; hard_negatives (0, 0, 0) with τ is insightface's inter-class filtering (interclass_filtering_threshold)
  std::optional<double> hard_negative_threshold;
};

// x (N, D) and w (C, D) ((K·C, D) with K sub-centres) of one float dtype on the CPU, target (N,) integer.
// The result is fp32 (fp64 for fp64 inputs): a scalar, or (N,) per-row losses for reduction "none";
// gradients flow to x and w.
at::Tensor margin_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const MarginLossOptions& options = {});

// Per-sample margins (AdaFace, MagFace, ElasticFace): row_margins (N, 2), floating point, holds offsets (Δm2_n, Δm3_n)
// added to options.m2 and options.m3 on row n (m2 + Δm2 may take any sign). The loss is differentiable with respect
// to row_margins too.
at::Tensor margin_cross_entropy(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target,
                                const at::Tensor& row_margins, const MarginLossOptions& options);

// The two halves, per row and without autograd (the ops torch.ops.marginkern.margin_ce_rows{,_backward}
// that the Python package runs on the CPU; options.reduction and the argument checks are the caller's):
// (per-row loss, lse, (N, 4) target geometry [‖x‖, ‖w_y‖, cos θ, ψ] (with sub-centres (N, 5): w_y is the
// target class's best sub-centre, its index k_y the fifth column), (K·C,) class-centre norms or (0,)),
// then (dL/dx, dL/dw or (0,)) for the per-row loss gradient grad_rows. row_margins: undefined, or the per-row
// offsets above (the same in both halves).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_rows(const at::Tensor& x, const at::Tensor& w,
                                                                          const at::Tensor& target,
                                                                          const MarginLossOptions& options,
                                                                          const at::Tensor& row_margins = {});
std::tuple<at::Tensor, at::Tensor> margin_ce_rows_backward(const at::Tensor& grad_rows, const at::Tensor& x,
                                                           const at::Tensor& w, const at::Tensor& target,
                                                           const at::Tensor& lse, const at::Tensor& row_state,
                                                           const at::Tensor& col_norm, const MarginLossOptions& options,
                                                           bool need_weight_grad, const at::Tensor& row_margins = {});

}  // namespace marginkern
