"""Linear cross-entropy for LLM vocabularies on the engine: z = softcap(x·wᵀ + b), never materialised.

Per row, with u = log p_t = z_t − lse and S = Σ_j z_j (DESIGN.md §4):

    L = (1−ε)·f(u) + ε·lse − (ε/C)·S + z_loss·lse²

    f(u) = −u                                   cross-entropy
         = −(1 − e^u)^γ · u                     focal_gamma = γ   (1 − p_t computed as −expm1(u))
         = −log(γ + (1−γ)·e^u) / (1−γ)          gamma_ce = γ      (γ-CE, TaiLr weighting integrated;
                                                  computed as −log1p(−(1−γ)(1 − e^u))/(1−γ), exact as γ → 1)

ε is torch's label smoothing: (1−ε)·NLL + (ε/C)·Σ_j −log p_j. Everything is a function of u and the
row statistics, so dL/dz_j = coef_p·p_j − coef_u + [j = t]·(1−ε)·f'(u) with per-row coefficients.

Class weights c (torch's `weight` of cross_entropy, `ClassWeights`) scale row n's loss by c_t, except the
smoothing term, which weights each −log p_j by c_j as torch does:

    L = c_t·((1−ε)·f(u) + z_loss·lse²) + ε·c̄·lse − (ε/C)·Σ_j c_j·z_j,     c̄ = Σ_j c_j / C

With ε > 0 the term −(ε/C)·g·c_j of dL/dz_j is not a per-row coefficient; without a softcap z is linear in x, w
and b, so Σ_j c_j·z_j = x·v + b·c with v = Σ_j c_j·w_j, and that term's share of dX, dW and dbias are the rank-1
products −(ε/C)·g ⊗ v, −(ε/C)·c ⊗ Σ_n g_n·x_n and −(ε/C)·c·Σ_n g_n: no kernel needs to know about c.

Two paths (DESIGN.md §2, README "Speed and memory knobs"): the default streams classes and recomputes
the logits in the backward pass (4 GEMMs, O(N) saved state; `grad_filter_eps` may skip classes there);
`linear_ce_buffered` runs row blocks of full logits in a bounded buffer and computes the gradients in
the forward pass (3 GEMMs).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .engine import (LogitSpec, accumulation_dtype, buffered_loss_and_grads, row_block_matvec, row_block_vecmat,
                     streaming_grads, streaming_row_stats, streaming_row_stats_with_max, target_columns, target_dot)
from .margin_ce import local_columns
from .reference import weighted_mean_scale


@dataclass(frozen=True)
class LinearCEOptions:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    focal_gamma: float
    gamma_ce: float


def target_class_weights(class_weight, column, dtype, shard=None):
    """c_t per row in `dtype` for target columns within class_weight (−1: none here, or ignored: 0); with a `shard`
    (class_weight this rank's slice) the sum over the ranks, i.e. the weight of each row's target wherever it lives
    (one collective)."""
    weight = torch.where(column >= 0, class_weight.detach()[column.clamp_min(0)].to(dtype), 0.0)
    return weight if shard is None else shard.sum_rows(weight)


@dataclass(frozen=True)
class ClassWeights:
    """Per-class weights c of the module docstring, with what the smoothing term needs of them."""
    c: Tensor                       # (C,) accumulation dtype
    mean: Tensor                    # () c̄ = Σ_j c_j / C
    head: Optional[Tensor] = None   # (D,) v = Σ_j c_j·w_j: with label smoothing only
    bias_dot: Optional[Tensor] = None  # () b·c: with label smoothing and a bias only

    @staticmethod
    def of(class_weight, w, bias, opts: LinearCEOptions, shard=None):
        """ClassWeights for the tensor `class_weight` (C,), or None for None. With a `shard` (a vocab-parallel
        head), class_weight, w and bias are this rank's slices: c̄ sums over every rank's (one collective), while
        v and b·c stay local (the weighted sums merge as Σz does, the rank-1 gradient terms are local)."""
        if class_weight is None:
            return None
        acc = accumulation_dtype(w.dtype)
        c = class_weight.detach().to(acc)
        mean = c.mean() if shard is None else shard.sum_rows(c.sum().reshape(1))[0] / shard.num_classes
        if opts.label_smoothing == 0:
            return ClassWeights(c, mean)
        if opts.softcap is not None:  # Σ_j c_j·softcap(z_j) is not linear in x: checks.check_class_weight refuses it
            raise ValueError("class_weight with label_smoothing > 0 needs softcap=None")
        bias_dot = None if bias is None else torch.dot(bias.detach().to(acc), c)
        return ClassWeights(c, mean, row_block_vecmat(c, w.detach()), bias_dot)

    def of_targets(self, column, shard=None):
        """target_class_weights of c."""
        return target_class_weights(self.c, column, self.c.dtype, shard)

    def weighted_logit_sums(self, x):
        """Σ_j c_j·z_nj = x_n·v + b·c per row (N,)."""
        sums = row_block_matvec(x.detach(), self.head)
        return sums if self.bias_dot is None else sums + self.bias_dot

    def add_smoothing_grads_(self, smoothing_coef, x, grad_x, grad_bias):
        """The rank-1 terms of the module docstring that are not dW's (see weight_grad_finalizer): grad_x −= r ⊗ v,
        grad_bias −= c·Σ_n r_n, in place, for the per-row coefficient r = g·ε/C."""
        if grad_x is not None:
            grad_x.addr_(smoothing_coef.to(grad_x.dtype), self.head.to(grad_x.dtype), alpha=-1)
        if grad_bias is not None:
            grad_bias.sub_(self.c.to(grad_bias.dtype) * smoothing_coef.sum().to(grad_bias.dtype))

    def weight_grad_finalizer(self, smoothing_coef, x):
        """finalize(c0, c1, grad_w_chunk): adds dW's rank-1 term −c_j·Σ_n r_n·x_n to the rows of classes [c0, c1)
        in place (engine.streaming_grads' dW chunk finalizer)."""
        x_sum = row_block_vecmat(smoothing_coef, x.detach())

        def finalize(c0, c1, grad_w_chunk):
            return grad_w_chunk.addr_(self.c[c0:c1].to(grad_w_chunk.dtype), x_sum.to(grad_w_chunk.dtype), alpha=-1)
        return finalize


def target_term(log_pt, opts: LinearCEOptions):
    """f(u) and f'(u) of the module docstring, elementwise (f'(u) a number for plain CE)."""
    if opts.focal_gamma > 0:
        gamma = opts.focal_gamma
        # 1 − p_t without cancellation, ≥ 0: u = z_t − lse is > 0 on an ignored row whose lse is < 0 (its target
        # logit is a placeholder 0) and can round above 0 on a confident one, and q^γ of a q < 0 is NaN for a
        # fractional γ, which a zero upstream gradient does not cancel (0·NaN)
        q = (-torch.expm1(log_pt)).clamp_min(0.0)
        u_over_q = torch.where(q > 0, log_pt / q.clamp_min(1e-30), -torch.ones_like(q))  # → −1 as q → 0
        f = -(q ** gamma) * log_pt
        df = -(q ** gamma) + gamma * (q ** gamma) * torch.exp(log_pt) * u_over_q
        return f, df
    if opts.gamma_ce > 0:
        # m = γ + (1−γ)·p_t = 1 − (1−γ)·q with q = 1 − p_t. Where m ≥ 1/2, log1p(−(1−γ)·q) keeps f exact as γ → 1,
        # where the plain log's rounding would be divided by 1 − γ (at γ = 1 − 1e-8 the fp32 loss was 0 instead of
        # ≈ q); below, m as the sum of its two positive terms keeps it exact as γ → 0 and p_t → 0, where 1 − (1−γ)·q
        # subtracts two numbers within 1e-7 of 1 (at γ = 1e-7, p_t = 1e-7 the fp32 loss was 1% off, dL/dz_t 11%)
        gamma = opts.gamma_ce
        damped = (1.0 - gamma) * -torch.expm1(log_pt)
        near_one = damped <= 0.5
        mass = torch.where(near_one, 1.0 - damped, gamma + (1.0 - gamma) * torch.exp(log_pt))
        f = torch.where(near_one, -torch.log1p(-damped), -torch.log(mass)) / (1.0 - gamma)
        return f, -torch.exp(log_pt) / mass
    return -log_pt, -1.0  # f'(u) = −1: a number, not a tensor of −1 (the callers broadcast it)


class _TargetLogits:
    """z_t per row: the gathered dot product plus bias, soft-capped (and its softcap slope). With a `shard`, w
    (and bias) hold classes [shard.start, shard.start + len(w)): a row whose target lies elsewhere (or is
    ignored) has no target column here (−1) and target logit 0."""

    def __init__(self, x, w, target, bias, opts: LinearCEOptions, shard=None, weights: Optional[ClassWeights] = None):
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
        # c_t per row (None: unweighted), and the weighted sums Σ_j c_j·z_j that replace Σ_j z_j with smoothing
        self.class_weight = None if weights is None else weights.of_targets(column, shard)
        self.weights = weights


def token_scaling_weights(x, w, target, bias, lse, opts: LinearCEOptions, shard=None):
    """DFT's token weights (Liger-Kernel's use_token_scaling): each row's target probability p_t = exp(z_t − lse),
    detached, 0 on ignored rows. z_t is the gathered dot product of _TargetLogits (O(N·D), no logits), lse the
    forward's own; their roundings may put p_t a hair above 1, clamped. With a `shard`, z_t comes from the rank
    holding the target (one all-reduce of N)."""
    with torch.no_grad():
        tgt = _TargetLogits(x.detach(), w.detach(), target, None if bias is None else bias.detach(), opts, shard)
        logit = tgt.logit if shard is None else shard.sum_rows(tgt.logit)
        return torch.where(tgt.valid, torch.exp(logit.to(lse.dtype) - lse.detach()).clamp_max(1.0), 0.0)


ALL_ROWS = slice(None)


def _rows(t, rows):
    # no slice view for the whole batch: these per-row steps are a small step's host time
    return t if rows is ALL_ROWS else t[rows]


def _row_loss(tgt, rows, lse, sum_logits, opts: LinearCEOptions, num_classes):
    """L of the module docstring for rows `rows` (a slice) from their statistics; 0 on ignored rows. With class
    weights, sum_logits is Σ_j c_j·z_j."""
    eps = opts.label_smoothing
    f, _ = target_term(_rows(tgt.logit, rows) - lse, opts)
    loss = f if eps == 0 else (1.0 - eps) * f
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    if tgt.weights is not None:
        loss = loss * _rows(tgt.class_weight, rows)
    if eps > 0:
        lse_weight = eps if tgt.weights is None else eps * tgt.weights.mean
        loss = loss + lse_weight * lse - (eps / num_classes) * sum_logits
    return torch.where(_rows(tgt.valid, rows), loss, 0.0)


def _row_coefficients(tgt, rows, grad_loss, lse, opts: LinearCEOptions, num_classes, grad_lse=None):
    """(coef_p, coef_u, dL/da at the target column, r) of rows `rows` for the per-row loss gradient grad_loss (and
    grad_lse on the log-sum-exp, or None); r = g·ε/C is the coefficient of the class-weighted smoothing's rank-1
    terms (ClassWeights), None without."""
    eps = opts.label_smoothing
    g = torch.where(_rows(tgt.valid, rows), grad_loss if grad_loss.dtype == lse.dtype else grad_loss.to(lse.dtype),
                    0.0)
    g_target = g if tgt.weights is None else g * _rows(tgt.class_weight, rows)  # the c_t-scaled terms' g
    log_pt = _rows(tgt.logit, rows) - lse
    smoothing_coef = g * (eps / num_classes) if eps > 0 and tgt.weights is not None else None
    # the smoothing's −(ε/C)·g per class: uniform without class weights, the rank-1 terms with them
    coef_u = g * (eps / num_classes) if smoothing_coef is None else torch.zeros_like(g)
    if eps == 0 and opts.z_loss == 0 and opts.focal_gamma == 0 and opts.gamma_ce == 0:
        # plain CE: coef_p = g, and g·(p_t − 1) as g·expm1(log p_t), without cancellation as p_t → 1
        coef_p, grad_target_logit = g_target, g_target * torch.expm1(log_pt)
    else:
        _, df = target_term(log_pt, opts)
        weight_p = -(1.0 - eps) * df
        if opts.z_loss > 0:
            weight_p = weight_p + 2.0 * opts.z_loss * lse
        coef_p = g_target * weight_p
        if eps > 0:
            coef_p = coef_p + g * (eps if tgt.weights is None else eps * tgt.weights.mean)
        grad_target_logit = coef_p * torch.exp(log_pt) - coef_u + g_target * ((1.0 - eps) * df)
    if grad_lse is not None:  # d lse/dz_j = p_j: one more p-term (an ignored row has no target column to add to)
        grad_lse = _rows(grad_lse, rows).to(lse.dtype)
        coef_p = coef_p + grad_lse
        grad_target_logit = grad_target_logit + torch.where(_rows(tgt.valid, rows), grad_lse * torch.exp(log_pt), 0.0)
    if tgt.slope is not None:
        grad_target_logit = grad_target_logit * _rows(tgt.slope, rows)
    return coef_p, coef_u, grad_target_logit, smoothing_coef


def linear_ce_forward(x, w, target, bias, opts: LinearCEOptions, tiles, shard=None, class_weight=None,
                      token_accuracy=False):
    """Per-row loss (0 on ignored rows) and per-row log-sum-exp, in the accumulation dtype. A vocab-parallel
    head (marginkern.distributed.sharded_linear_cross_entropy) passes its `shard` (margin_ce.ClassShard): w and
    bias hold its classes, and the ranks' (lse, Σ_j z, z_t) are merged before the per-row loss. `class_weight`
    (C,) or None: ClassWeights (with a shard, this rank's slice). token_accuracy: a third result, per row whether the target's
    logit is the largest (ties count; False on ignored rows), from the same pass (with a shard: one more
    collective, shard.max_rows)."""
    weights = ClassWeights.of(class_weight, w, bias, opts, shard)
    tgt = _TargetLogits(x, w, target, bias, opts, shard, weights)
    weighted_sums = weights is not None and opts.label_smoothing > 0
    need_sum_logits = opts.label_smoothing > 0 and not weighted_sums
    if token_accuracy:
        lse, sum_logits, row_max = streaming_row_stats_with_max(x, w, tgt.spec, need_sum_logits, tiles)
    else:
        lse, sum_logits = streaming_row_stats(x, w, tgt.spec, need_sum_logits, tiles)
    if weighted_sums:
        sum_logits = weights.weighted_logit_sums(x)
    num_classes = w.shape[0]
    if shard is not None:
        lse, sum_logits, tgt.logit = shard.merge_row_stats(lse, sum_logits, tgt.logit)
        num_classes = shard.num_classes
    loss = _row_loss(tgt, ALL_ROWS, lse, sum_logits, opts, num_classes)
    if token_accuracy:
        if shard is not None:  # the largest logit over every rank's classes (the target logit is merged above)
            row_max = shard.max_rows(row_max)
        # a row whose lse is not finite (a NaN logit, which the Triton max skips; every logit −inf) is not correct
        return loss, lse, tgt.valid & (tgt.logit >= row_max) & torch.isfinite(lse)
    return loss, lse


def linear_ce_backward(grad_loss, x, w, target, bias, lse, opts: LinearCEOptions, tiles, need_weight_grad=True,
                       need_bias_grad=True, grad_filter_eps=None, shard=None, class_weight=None, grad_lse=None):
    """(dL/dx, dL/dw or None, dL/dbias or None): 4 GEMMs, the logits recomputed class chunk by chunk. With a
    `shard`: dL/dx summed over the ranks, dL/dw and dL/dbias of this rank's classes. grad_lse (N,) or None: a
    gradient on the log-sum-exp too (d lse/dz_j = p_j), on every row, ignored ones included."""
    weights = ClassWeights.of(class_weight, w, bias, opts, shard)
    tgt = _TargetLogits(x, w, target, bias, opts, shard, weights)
    num_classes = w.shape[0]
    if shard is not None:  # z_t lives on one rank (0 on the others): the sum is the forward's z_t, bit for bit
        tgt.logit = shard.sum_rows(tgt.logit)
        num_classes = shard.num_classes
    coef_p, coef_u, target_grad, smoothing_coef = _row_coefficients(tgt, ALL_ROWS, grad_loss, lse, opts, num_classes,
                                                                    grad_lse)
    finalize = None
    if smoothing_coef is not None and need_weight_grad:  # dW's rank-1 term, added to each chunk before it is stored
        finalize = weights.weight_grad_finalizer(smoothing_coef, x)
    need_bias_grad = bias is not None and need_bias_grad
    grad_x, grad_w, grad_bias = streaming_grads(
        x, w, tgt.spec, lse, coef_p, coef_u, target_grad, tiles, finalize,
        need_bias_grad=need_bias_grad, need_weight_grad=need_weight_grad, grad_filter_eps=grad_filter_eps)
    if smoothing_coef is not None:
        weights.add_smoothing_grads_(smoothing_coef, x, grad_x, grad_bias)
    if shard is not None:
        grad_x = shard.sum_input_grad(grad_x)
    return grad_x.to(x.dtype), grad_w, (grad_bias.to(bias.dtype) if grad_bias is not None else None)


def linear_ce_buffered(x, w, target, bias, opts: LinearCEOptions, reduction, buffer_bytes, need_input_grad,
                       need_weight_grad, need_bias_grad, tiles=None, class_weight=None):
    """The reduced loss ("mean" or "sum") and its gradients for a loss gradient of 1, computed together in
    the forward pass with 3 GEMMs over row blocks of a bounded logits buffer (engine.buffered_loss_and_grads).

    Returns (loss (0-dim), dL/dx or None, dL/dw or None, dL/dbias or None), in the accumulation dtype.
    """
    weights = ClassWeights.of(class_weight, w, bias, opts)
    tgt = _TargetLogits(x, w, target, bias, opts, weights=weights)
    C = w.shape[0]
    row_weight = torch.ones_like(tgt.logit)
    if reduction == "mean" and weights is None:  # torch's ignore_index mean; 0 (not NaN) when every row is ignored
        row_weight = row_weight / tgt.valid.sum().clamp_min(1).to(row_weight.dtype)
    elif reduction == "mean":
        row_weight = row_weight * weighted_mean_scale(tgt.valid, tgt.class_weight)
    weighted_sums = None
    if weights is not None and opts.label_smoothing > 0:
        weighted_sums = weights.weighted_logit_sums(x)
    smoothing_coefs = []

    def row_terms(r0, r1, lse, sum_logits):
        rows = slice(r0, r1)
        if weighted_sums is not None:
            sum_logits = weighted_sums[rows]
        coef_p, coef_u, target_grad, smoothing_coef = _row_coefficients(tgt, rows, row_weight[rows], lse, opts, C)
        smoothing_coefs.append(smoothing_coef)
        return _row_loss(tgt, rows, lse, sum_logits, opts, C), coef_p, coef_u, target_grad

    loss_rows, _, grad_x, grad_w, grad_bias = buffered_loss_and_grads(
        x, w, tgt.spec, row_terms, buffer_bytes, opts.label_smoothing > 0 and weighted_sums is None, need_input_grad,
        need_weight_grad, bias is not None and need_bias_grad, tiles)
    if weighted_sums is not None and smoothing_coefs:
        smoothing_coef = torch.cat(smoothing_coefs)
        weights.add_smoothing_grads_(smoothing_coef, x, grad_x, grad_bias)
        if grad_w is not None:  # in the gradient's dtype (bf16 on CUDA: one more rounding, as each row block's)
            weights.weight_grad_finalizer(smoothing_coef, x)(0, C, grad_w)
    return (loss_rows * row_weight).sum(), grad_x, grad_w, grad_bias
