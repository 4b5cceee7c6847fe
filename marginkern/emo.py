"""EMO (Earth Mover Distance Optimization, Ren et al., ICLR 2024) on the engine, with CE in the same pass.

With Ê the row-normalised cost embedding (fixed: it never receives a gradient) and z = x·wᵀ:

    L_emo = Σ_j p_j·(1 − ê_j·ê_t) = 1 − ê_t·ȳ,      ȳ = Σ_j p_j·ê_j   (attention with Q = x, K = w, V = Ê)
    dL_emo/dz_j = p_j·(c_jt − L_emo),                 c_jt = 1 − ê_j·ê_t

computed as  L_emo = Σ_{j≠t} p_j·(1 − ê_j·ê_t) + p_t·(1 − ê_t·ê_t): 1 − ê_t·ȳ cancels as p_t → 1 (a
confident token: 1 − p_t is below fp32's resolution of an lse of ~30, and fp32 gave L_emo ≈ −6e-7 where it
is ≥ 0; the MLE-anchored ratio ce/emo, whose true value stays bounded there, then flipped sign or blew up).
The sum over j ≠ t is the softmax-weighted cost without the target column
(engine.streaming_row_stats_with_cost): on the GPU one forward pass yields it with the log-sum-exp (the
cosines ê_t·ê_j of each tile weighted inside the kernel, nothing (N, E)); elsewhere the lse pass plus one
streamed expectation. The backward pass adds the same cosines per tile (the engine's cost term) to the
usual dX/dW GEMMs. Only lse and L_emo are saved.
"""
import torch

from .engine import (NORM_EPS, CostSpec, LogitSpec, accumulation_dtype, row_norms, streaming_grads,
                     streaming_row_stats_with_cost, target_columns, target_dot)


class _EMOGeometry:
    def __init__(self, x, w, target, cost, ignore_index):
        acc = accumulation_dtype(x.dtype)
        self.valid, self.column = target_columns(target, ignore_index)
        safe = self.column.clamp_min(0)
        self.target_logit = target_dot(x, w, self.column)
        self.spec = LogitSpec(torch.ones_like(self.target_logit), None, None, None, self.column, self.target_logit)
        # ê_j = e_j / ‖e_j‖ without a normalised (C, E) copy: the norms ride along as scales, in fp32
        # (an fp16 cost embedding's norms would overflow in fp16).
        norms = row_norms(cost).to(acc)
        self.key_scale = norms.clamp_min(NORM_EPS).reciprocal_()
        # ê_t: rows of Ê by index (gathered per tile on the GPU, never as an (N, E) copy)
        self.query_rows = safe
        self.query_scale = self.key_scale[safe]
        # ê_t·ê_t: exactly 1 (not (‖e‖·(1/‖e‖))², one ulp off, which would reintroduce the cancellation),
        # less for a (near-)zero e_t (normalised by NORM_EPS, as the kernels' cosines are)
        target_norm = norms[safe]
        self.self_cosine = torch.where(target_norm >= NORM_EPS, 1.0, (target_norm / NORM_EPS) ** 2)


def cost_in_dtype(cost, dtype, block_bytes=16 << 20, normalise=False):
    """The cost embedding in the input's dtype: its cosines run as a second tensor-core dot beside the logits (an fp32
    cost with bf16 inputs would run on FMA units; fp64 does not compile). A cast is made of the row-normalised rows,
    normalised in fp64 by blocks of rows (no whole upcast copy): only directions matter, and a raw fp32 row of norm
    1e5 would overflow fp16 (NaN on every row, a review found). In the input's dtype already: as it is, unless
    `normalise` (then a normalised copy, which any later cast keeps finite)."""
    cost = cost.detach()
    if cost.dtype == dtype and not normalise:
        return cost
    out = torch.empty(cost.shape, dtype=dtype, device=cost.device)
    rows = max(1, block_bytes // max(1, cost.shape[1] * 8))
    for r0 in range(0, cost.shape[0], rows):
        block = cost[r0:r0 + rows].to(torch.float64)
        out[r0:r0 + rows] = block / torch.linalg.vector_norm(block, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return out


def emo_forward(x, w, target, cost, ignore_index, tiles):
    """(ce, emo, lse) per row; ce and emo are 0 on ignored rows."""
    geo = _EMOGeometry(x, w, target, cost, ignore_index)
    cosines = CostSpec(geo.query_rows, geo.query_scale, cost, geo.key_scale, torch.zeros_like(geo.query_scale))
    lse, other_cost = streaming_row_stats_with_cost(x, w, geo.spec, cosines, tiles)
    emo = other_cost + torch.exp(geo.target_logit - lse) * (1.0 - geo.self_cosine)
    ce = lse - geo.target_logit
    return torch.where(geo.valid, ce, 0.0), torch.where(geo.valid, emo, 0.0), lse


def emo_backward(grad_ce, grad_emo, x, w, target, cost, lse, emo, ignore_index, tiles, need_weight_grad=True):
    """(dL/dx, dL/dw) for per-row upstream gradients of ce and emo."""
    geo = _EMOGeometry(x, w, target, cost, ignore_index)
    zero = torch.zeros_like(lse)
    g_ce = torch.where(geo.valid, grad_ce if grad_ce.dtype == lse.dtype else grad_ce.to(lse.dtype), 0.0)
    g_emo = torch.where(geo.valid, grad_emo if grad_emo.dtype == lse.dtype else grad_emo.to(lse.dtype), 0.0)
    # dL/dz_j = g_ce·(p_j − δ_jt) + g_emo·p_j·(1 − L_emo − ê_j·ê_t)
    coef_p = g_ce + g_emo * (1.0 - emo)
    log_p_target = geo.target_logit - lse
    # g_ce·(p_t − 1) + g_emo·p_t·((1 − ê_t·ê_t) − L_emo), written so that neither term is lost for a confident token:
    # g_ce·expm1(log p_t), and L_emo not through coef_p's 1 − L_emo (1 in fp32 for L_emo < 6e-8: the target's
    # −g·p_t·L_emo was 0 there, a review found)
    target_grad = g_ce * torch.expm1(log_p_target) + g_emo * torch.exp(log_p_target) * ((1.0 - geo.self_cosine) - emo)
    cost_term = CostSpec(geo.query_rows, geo.query_scale, cost, geo.key_scale, g_emo)
    grad_x, grad_w, _ = streaming_grads(x, w, geo.spec, lse, coef_p, zero, target_grad, tiles, cost=cost_term,
                                        need_weight_grad=need_weight_grad)
    return grad_x.to(x.dtype), grad_w
