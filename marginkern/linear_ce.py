"""Linear cross-entropy for LLM vocabularies on the engine: z = softcap(x·wᵀ + b), never materialised.

Per row, with u = log p_t = z_t − lse and S = Σ_j z_j (DESIGN.md §4):

    L = (1−ε)·f(u) + ε·lse − (ε/C)·S + z_loss·lse²

    f(u) = −u                                   cross-entropy
         = −(1 − e^u)^γ · u                     focal_gamma = γ   (1 − p_t computed as −expm1(u))
         = −log(γ + (1−γ)·e^u) / (1−γ)          gamma_ce = γ      (γ-CE, TaiLr weighting integrated)

ε is torch's label smoothing: (1−ε)·NLL + (ε/C)·Σ_j −log p_j. Everything is a function of u and the
row statistics, so dL/dz_j = coef_p·p_j − coef_u + [j = t]·(1−ε)·f'(u) with per-row coefficients.
"""
from dataclasses import dataclass

import torch

from .engine import LogitSpec, streaming_grads, streaming_row_stats, target_columns, target_dot


@dataclass(frozen=True)
class LinearCEOptions:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    focal_gamma: float
    gamma_ce: float


def target_term(log_pt, opts: LinearCEOptions):
    """f(u) and f'(u) of the module docstring, elementwise."""
    if opts.focal_gamma > 0:
        gamma = opts.focal_gamma
        q = -torch.expm1(log_pt)                                     # 1 − p_t without cancellation
        u_over_q = torch.where(q > 0, log_pt / q.clamp_min(1e-30), -torch.ones_like(q))  # → −1 as q → 0
        f = -(q ** gamma) * log_pt
        df = -(q ** gamma) + gamma * (q ** gamma) * torch.exp(log_pt) * u_over_q
        return f, df
    if opts.gamma_ce > 0:
        gamma = opts.gamma_ce
        p = torch.exp(log_pt)
        mix = gamma + (1.0 - gamma) * p
        return -torch.log(mix) / (1.0 - gamma), -p / mix
    return -log_pt, -torch.ones_like(log_pt)


class _TargetLogits:
    """z_t per row: the gathered dot product plus bias, soft-capped (and its softcap slope)."""

    def __init__(self, x, w, target, bias, opts: LinearCEOptions):
        self.valid, self.column = target_columns(target, opts.ignore_index)
        raw = target_dot(x, w, self.column)
        if bias is not None:
            raw = raw + bias[self.column.clamp_min(0)].to(raw.dtype)
        self.slope = torch.ones_like(raw)
        if opts.softcap is not None:
            t = torch.tanh(raw / opts.softcap)
            raw = opts.softcap * t
            self.slope = 1.0 - t * t
        self.logit = raw
        self.spec = LogitSpec(torch.ones_like(raw), None, bias, opts.softcap, self.column, self.logit)


def linear_ce_forward(x, w, target, bias, opts: LinearCEOptions, tiles):
    """Per-row loss (0 on ignored rows) and per-row log-sum-exp, in the accumulation dtype."""
    tgt = _TargetLogits(x, w, target, bias, opts)
    eps = opts.label_smoothing
    lse, sum_logits = streaming_row_stats(x, w, tgt.spec, eps > 0, tiles)
    f, _ = target_term(tgt.logit - lse, opts)
    loss = (1.0 - eps) * f
    if eps > 0:
        loss = loss + eps * lse - (eps / w.shape[0]) * sum_logits
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    return torch.where(tgt.valid, loss, torch.zeros_like(loss)), lse


def linear_ce_backward(grad_loss, x, w, target, bias, lse, opts: LinearCEOptions, tiles, need_weight_grad=True,
                       need_bias_grad=True):
    """(dL/dx, dL/dw or None, dL/dbias or None)."""
    tgt = _TargetLogits(x, w, target, bias, opts)
    C = w.shape[0]
    eps = opts.label_smoothing
    g = torch.where(tgt.valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))
    log_pt = tgt.logit - lse
    _, df = target_term(log_pt, opts)
    coef_p = g * (-(1.0 - eps) * df + eps + 2.0 * opts.z_loss * lse)
    coef_u = g * (eps / C)
    grad_target_logit = coef_p * torch.exp(log_pt) - coef_u + g * (1.0 - eps) * df
    grad_x, grad_w, grad_bias = streaming_grads(
        x, w, tgt.spec, lse, coef_p, coef_u, grad_target_logit * tgt.slope, tiles,
        need_bias_grad=bias is not None and need_bias_grad, need_weight_grad=need_weight_grad)
    return grad_x.to(x.dtype), grad_w, (grad_bias.to(bias.dtype) if grad_bias is not None else None)
