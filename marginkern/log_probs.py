"""Per-token log-probabilities and entropy of an LM head, on the engine (what RL trainers compute every step).

With z = softcap(x·wᵀ + b)/T (T the sampling temperature; the bias b and Gemma-2's softcap
cap·tanh(·/cap) optional: the model's logits, then the sampler's temperature), p = softmax(z), per row:

    log p_t = z_t − lse
    H = Σ_j p_j·(lse − z_j)                   (the softmax's entropy, a sum of non-negative terms)

    d log p_t/dz_j = [j = t] − p_j
    dH/dz_j = −p_j·(log p_j + H)

so for upstream gradients g_lp and g_H of a row, dL/dz_j = (coef_p − g_H·log p_j)·p_j off the target with
coef_p = −g_lp − g_H·H: the engine's entropy term (engine.py). The target column's dL/dz_t =
g_lp·(1 − p_t) + g_H·p_t·(−log p_t − H), with 1 − p_t = −expm1(log p_t) (no cancellation for a confident
token). The engine's spec has the temperature inside the softcap: z = softcap_{cap/T}(a/T + b/T), the same
function (cap/T)·tanh((a + b)/cap), so its row scale is 1/T, its bias b/T and its cap cap/T; a and b enter
alike, so dL/db_j = Σ_n dL/da_nj, the engine's bias gradient. One forward pass gives the row max M, S′ and T
(engine.streaming_row_stats_with_entropy), hence log_sum = lse − M = log1p(S′) and H, each exact for confident
rows, and log p_t = (z_t − M) − log_sum: where z_t is the max, log p_t = −log1p(S′) to the last bits, where
z_t − lse would round to a multiple of ulp(lse) (2e-6 at lse ≈ 30). lse, log p_t and H are saved for the backward pass.

A vocab-parallel head (marginkern.distributed.sharded_log_probs_and_entropy) passes a `shard`: this process
holds classes [shard.start, shard.start + C_local); `shard.merge_entropy_stats` merges the ranks' (M, S′, T)
and target logits, `shard.sum_input_grad` sums dL/dx over them.
"""
import torch

from .engine import (LogitSpec, entropy_of_max_sums, streaming_grads, streaming_row_stats_with_entropy,
                     target_dot)


class _TemperatureLogits:
    """The target logit z_t = softcap_{cap/T}((x·w_t)·(1/T) + b_t/T) per row and the spec of
    z = softcap(x·wᵀ + b)/T (module docstring; the kernels multiply the dot product by the row scale, add the bias
    and cap: the target logit is rounded the same way), and the softcap's slope at the target (None without one).
    w holds classes [class_start, class_start + len(w)): a row whose target lies elsewhere has no target column here
    and target logit 0."""

    def __init__(self, x, w, target, temperature, ignore_index, class_start=0, bias=None, softcap=None):
        self.valid = target != ignore_index
        local = target - class_start
        here = self.valid & (local >= 0) & (local < w.shape[0])
        self.column = torch.where(here, local, -1)
        raw = target_dot(x, w, self.column)
        inv_temperature = torch.full_like(raw, 1.0 / temperature)
        logit = raw * inv_temperature
        spec_bias = cap = self.slope = None
        if bias is not None:
            spec_bias = bias.detach().to(raw.dtype) * torch.tensor(1.0 / temperature, dtype=raw.dtype)
            logit = logit + spec_bias[self.column.clamp_min(0)]
        if softcap is not None:
            cap = softcap / temperature
            t = torch.tanh(logit / cap)
            logit, self.slope = cap * t, 1.0 - t * t
        self.logit = torch.where(here, logit, 0.0)
        self.spec = LogitSpec(inv_temperature, None, spec_bias, cap, self.column, self.logit)


def _class_start(shard):
    return 0 if shard is None else shard.start


def log_probs_forward(x, w, target, temperature, ignore_index, tiles, shard=None, bias=None, softcap=None,
                      top1=False):
    """(log p_t, H, lse) per row in the accumulation dtype; log p_t and H are 0 on ignored rows. With top1 a fourth
    result: per row whether the target's logit is the largest (ties count; False on ignored rows and where lse is not
    finite), from the same pass (the row max of the entropy statistics)."""
    rows = _TemperatureLogits(x, w, target, temperature, ignore_index, _class_start(shard), bias, softcap)
    state = streaming_row_stats_with_entropy(x, w, rows.spec, tiles)
    target_logit = rows.logit
    if shard is not None:
        state, target_logit = shard.merge_entropy_stats(state, target_logit)
    row_max, log_sum, entropy = entropy_of_max_sums(state)
    lse = row_max + log_sum
    log_pt = (target_logit - row_max) - log_sum
    # a +inf logit (∞ − ∞): NaN, as torch's log_softmax and the C++ kernels (H's sums would give −inf)
    log_pt = torch.where(row_max == float("inf"), float("nan"), log_pt)
    entropy = torch.where(torch.isnan(log_pt), log_pt, entropy)  # a NaN input makes H NaN too, not a finite sum
    outputs = torch.where(rows.valid, log_pt, 0.0), torch.where(rows.valid, entropy, 0.0), lse
    if top1:  # the target column holds target_logit in the statistics too: the max is that very value where it wins
        outputs += (rows.valid & (target_logit >= row_max) & torch.isfinite(lse),)
    return outputs


def log_probs_backward(grad_log_probs, grad_entropy, x, w, target, lse, log_pt, entropy, temperature, ignore_index,
                       tiles, need_weight_grad=True, shard=None, bias=None, softcap=None, need_bias_grad=False):
    """(dL/dx, dL/dw or None, dL/dbias or None) for per-row upstream gradients of log p_t and H, from the forward's
    lse, log p_t and H (with a shard: dL/dx summed over the ranks, dL/dw of this rank's classes)."""
    rows = _TemperatureLogits(x, w, target, temperature, ignore_index, _class_start(shard), bias, softcap)
    g_lp = torch.where(rows.valid, grad_log_probs.to(lse.dtype), 0.0)
    g_h = torch.where(rows.valid, grad_entropy.to(lse.dtype), 0.0)
    p_t = torch.exp(log_pt)
    coef_p = -g_lp - g_h * entropy
    # dL/da at the target column, chained by dz/da = 1/T
    # p_t·(log p_t + H) is 0 where p_t = 0 (a −inf target logit: 0·(−inf) would be NaN)
    entropy_part = torch.where(p_t > 0, p_t * (log_pt + entropy), 0.0)
    target_grad = (-g_lp * torch.expm1(log_pt) - g_h * entropy_part) * rows.spec.row_scale
    if rows.slope is not None:
        target_grad = target_grad * rows.slope
    grad_x, grad_w, grad_bias = streaming_grads(x, w, rows.spec, lse, coef_p, torch.zeros_like(lse), target_grad,
                                                tiles, need_weight_grad=need_weight_grad, entropy_coef=g_h,
                                                need_bias_grad=bias is not None and need_bias_grad)
    if shard is not None:
        grad_x = shard.sum_input_grad(grad_x)
    return grad_x.to(x.dtype), grad_w, grad_bias
