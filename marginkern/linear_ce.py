"""Linear cross-entropy for LLM vocabularies on the engine: z = softcap(x·wᵀ + b), never materialised.

Per row, with u = log p_t = z_t − lse and S = Σ_j z_j (DESIGN.md §4):

    L = (1−ε)·f(u) + ε·lse − (ε/C)·S + z_loss·lse²

    f(u) = −u                                   cross-entropy
         = −(1 − e^u)^γ · u                     focal_gamma = γ   (1 − p_t computed as −expm1(u))
         = −log(γ + (1−γ)·e^u) / (1−γ)          gamma_ce = γ      (γ-CE, TaiLr weighting integrated;
                                                  computed as −log1p(−(1−γ)(1 − e^u))/(1−γ), exact as γ → 1)

ε is torch's label smoothing: (1−ε)·NLL + (ε/C)·Σ_j −log p_j. Everything is a function of u and the
row statistics, so dL/dz_j = coef_p·p_j − coef_u + [j = t]·(1−ε)·f'(u) with per-row coefficients.

Two paths (DESIGN.md §2, README "Speed and memory knobs"): the default streams classes and recomputes
the logits in the backward pass (4 GEMMs, O(N) saved state; `grad_filter_eps` may skip classes there);
`linear_ce_buffered` runs row blocks of full logits in a bounded buffer and computes the gradients in
the forward pass (3 GEMMs).
"""
from dataclasses import dataclass

import torch

from .engine import (LogitSpec, buffered_loss_and_grads, streaming_grads, streaming_row_stats, target_columns,
                     target_dot)
from .margin_ce import local_columns


@dataclass(frozen=True)
class LinearCEOptions:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    focal_gamma: float
    gamma_ce: float


def target_term(log_pt, opts: LinearCEOptions):
    """f(u) and f'(u) of the module docstring, elementwise (f'(u) a number for plain CE)."""
    if opts.focal_gamma > 0:
        gamma = opts.focal_gamma
        q = -torch.expm1(log_pt)                                     # 1 − p_t without cancellation
        u_over_q = torch.where(q > 0, log_pt / q.clamp_min(1e-30), -torch.ones_like(q))  # → −1 as q → 0
        f = -(q ** gamma) * log_pt
        df = -(q ** gamma) + gamma * (q ** gamma) * torch.exp(log_pt) * u_over_q
        return f, df
    if opts.gamma_ce > 0:
        # γ + (1−γ)·p_t = 1 − (1−γ)·q with q = 1 − p_t: log1p keeps f exact as γ → 1, where the plain
        # log's rounding would be divided by 1 − γ (at γ = 1 − 1e-8 the fp32 loss was 0 instead of ≈ q)
        gamma = opts.gamma_ce
        damped = (1.0 - gamma) * -torch.expm1(log_pt)
        return -torch.log1p(-damped) / (1.0 - gamma), -torch.exp(log_pt) / (1.0 - damped)
    return -log_pt, -1.0  # f'(u) = −1: a number, not a tensor of −1 (the callers broadcast it)


class _TargetLogits:
    """z_t per row: the gathered dot product plus bias, soft-capped (and its softcap slope). With a `shard`, w
    (and bias) hold classes [shard.start, shard.start + len(w)): a row whose target lies elsewhere (or is
    ignored) has no target column here (−1) and target logit 0."""

    def __init__(self, x, w, target, bias, opts: LinearCEOptions, shard=None):
        self.valid, column = target_columns(target, opts.ignore_index)
        if shard is not None:
            column = local_columns(column, shard.start, w.shape[0])
        self.column = column
        raw = target_dot(x, w, column)
        if bias is not None:
            raw = raw + bias[column.clamp_min(0)].to(raw.dtype)
        raw = torch.where(column >= 0, raw, 0.0)
        self.slope = None  # dz_t/d(raw z_t): 1 without a softcap
        if opts.softcap is not None:
            t = torch.tanh(raw / opts.softcap)
            raw = opts.softcap * t
            self.slope = 1.0 - t * t
        self.logit = raw
        self.spec = LogitSpec(torch.ones_like(raw), None, bias, opts.softcap, self.column, self.logit)


ALL_ROWS = slice(None)


def _rows(t, rows):
    # no slice view for the whole batch: these per-row steps are a small step's host time
    return t if rows is ALL_ROWS else t[rows]


def _row_loss(tgt, rows, lse, sum_logits, opts: LinearCEOptions, num_classes):
    """L of the module docstring for rows `rows` (a slice) from their statistics; 0 on ignored rows."""
    eps = opts.label_smoothing
    f, _ = target_term(_rows(tgt.logit, rows) - lse, opts)
    loss = f if eps == 0 else (1.0 - eps) * f
    if eps > 0:
        loss = loss + eps * lse - (eps / num_classes) * sum_logits
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    return torch.where(_rows(tgt.valid, rows), loss, 0.0)


def _row_coefficients(tgt, rows, grad_loss, lse, opts: LinearCEOptions, num_classes):
    """(coef_p, coef_u, dL/da at the target column) of rows `rows` for the per-row loss gradient grad_loss."""
    eps = opts.label_smoothing
    g = torch.where(_rows(tgt.valid, rows), grad_loss if grad_loss.dtype == lse.dtype else grad_loss.to(lse.dtype),
                    0.0)
    log_pt = _rows(tgt.logit, rows) - lse
    coef_u = g * (eps / num_classes)
    if eps == 0 and opts.z_loss == 0 and opts.focal_gamma == 0 and opts.gamma_ce == 0:
        # plain CE: coef_p = g, and g·(p_t − 1) as g·expm1(log p_t), without cancellation as p_t → 1
        coef_p, grad_target_logit = g, g * torch.expm1(log_pt)
    else:
        _, df = target_term(log_pt, opts)
        weight_p = -(1.0 - eps) * df + eps
        if opts.z_loss > 0:
            weight_p = weight_p + 2.0 * opts.z_loss * lse
        coef_p = g * weight_p
        grad_target_logit = coef_p * torch.exp(log_pt) - coef_u + g * ((1.0 - eps) * df)
    return coef_p, coef_u, (grad_target_logit if tgt.slope is None else grad_target_logit * _rows(tgt.slope, rows))


def linear_ce_forward(x, w, target, bias, opts: LinearCEOptions, tiles, shard=None):
    """Per-row loss (0 on ignored rows) and per-row log-sum-exp, in the accumulation dtype. A vocab-parallel
    head (marginkern.distributed.sharded_linear_cross_entropy) passes its `shard` (margin_ce.ClassShard): w and
    bias hold its classes, and the ranks' (lse, Σ_j z, z_t) are merged before the per-row loss."""
    tgt = _TargetLogits(x, w, target, bias, opts, shard)
    lse, sum_logits = streaming_row_stats(x, w, tgt.spec, opts.label_smoothing > 0, tiles)
    num_classes = w.shape[0]
    if shard is not None:
        lse, sum_logits, tgt.logit = shard.merge_row_stats(lse, sum_logits, tgt.logit)
        num_classes = shard.num_classes
    return _row_loss(tgt, ALL_ROWS, lse, sum_logits, opts, num_classes), lse


def linear_ce_backward(grad_loss, x, w, target, bias, lse, opts: LinearCEOptions, tiles, need_weight_grad=True,
                       need_bias_grad=True, grad_filter_eps=None, shard=None):
    """(dL/dx, dL/dw or None, dL/dbias or None): 4 GEMMs, the logits recomputed class chunk by chunk. With a
    `shard`: dL/dx summed over the ranks, dL/dw and dL/dbias of this rank's classes."""
    tgt = _TargetLogits(x, w, target, bias, opts, shard)
    num_classes = w.shape[0]
    if shard is not None:  # z_t lives on one rank (0 on the others): the sum is the forward's z_t, bit for bit
        tgt.logit = shard.sum_rows(tgt.logit)
        num_classes = shard.num_classes
    coef_p, coef_u, target_grad = _row_coefficients(tgt, ALL_ROWS, grad_loss, lse, opts, num_classes)
    grad_x, grad_w, grad_bias = streaming_grads(
        x, w, tgt.spec, lse, coef_p, coef_u, target_grad, tiles,
        need_bias_grad=bias is not None and need_bias_grad, need_weight_grad=need_weight_grad,
        grad_filter_eps=grad_filter_eps)
    if shard is not None:
        grad_x = shard.sum_input_grad(grad_x)
    return grad_x.to(x.dtype), grad_w, (grad_bias.to(bias.dtype) if grad_bias is not None else None)


def linear_ce_buffered(x, w, target, bias, opts: LinearCEOptions, reduction, buffer_bytes, need_input_grad,
                       need_weight_grad, need_bias_grad, tiles=None):
    """The reduced loss ("mean" or "sum") and its gradients for a loss gradient of 1, computed together in
    the forward pass with 3 GEMMs over row blocks of a bounded logits buffer (engine.buffered_loss_and_grads).

    Returns (loss (0-dim), dL/dx or None, dL/dw or None, dL/dbias or None), in the accumulation dtype.
    """
    tgt = _TargetLogits(x, w, target, bias, opts)
    C = w.shape[0]
    row_weight = torch.ones_like(tgt.logit)
    if reduction == "mean":  # torch's ignore_index mean; 0 (not NaN) when every row is ignored
        row_weight = row_weight / tgt.valid.sum().clamp_min(1).to(row_weight.dtype)

    def row_terms(r0, r1, lse, sum_logits):
        rows = slice(r0, r1)
        return (_row_loss(tgt, rows, lse, sum_logits, opts, C),
                *_row_coefficients(tgt, rows, row_weight[rows], lse, opts, C))

    loss_rows, _, grad_x, grad_w, grad_bias = buffered_loss_and_grads(
        x, w, tgt.spec, row_terms, buffer_bytes, opts.label_smoothing > 0, need_input_grad, need_weight_grad,
        bias is not None and need_bias_grad, tiles)
    return (loss_rows * row_weight).sum(), grad_x, grad_w, grad_bias
