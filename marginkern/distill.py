"""Knowledge distillation over a large vocabulary on the engine: the KL divergence between a teacher's and a
student's softmax at temperature T, fused with both LM heads, never materialising either N × C logits.

With z = (x·wᵀ)/T (student), z^T = (x^T·w^Tᵀ)/T (teacher: its own hidden states and head, no gradient),
p = softmax(z) and q = softmax(z^T), per row:

    forward KL(q‖p) = Σ_j q_j·(log q_j − log p_j) = E_q[z^T − z] − lse^T + lse      dKL/dz_j = p_j − q_j
    reverse KL(p‖q) = Σ_j p_j·(log p_j − log q_j) = E_p[z − z^T] − lse + lse^T      dKL/dz_j = p_j·(log p_j − log q_j − KL)

One forward pass gives both log-sum-exps and both cross expectations (engine.streaming_row_stats_with_teacher);
the backward recomputes the student's and the teacher's logit tiles (the engine's teacher term: −coef_q·q +
coef_log_q·p·log q, with the entropy term for reverse KL's p·log p). The value is a difference of terms of the
size of the logits: its rounding is ~ulp(lse) absolute (as a cross-entropy's), and a value that rounds below 0
is returned as 0 (KL ≥ 0). lse, lse^T and KL are saved for the backward pass.

The generalized Jensen-Shannon divergence (GKD, TRL's generalized_jsd_loss, Liger's fused linear JSD) mixes the two,
m = (1−β)·p + β·q, β ∈ (0, 1):

    JSD_β = β·KL(q‖m) + (1−β)·KL(p‖m)                       dJSD/dz_j = (1−β)·p_j·(log(p_j/m_j) − KL(p‖m))

(the mixture's own dependence on z cancels: Σ_k (log m_k + 1)·∂m_k/∂z_j = (1−β)·p_j·(log m_j − E_p[log m])).
log(p/m) = −log1p(β·expm1(log q − log p)) has no cancellation where p ≈ q. Both log-sum-exps must be known before
the divergence's sums, so its forward makes two passes over the classes (the teacher statistics, then
engine.streaming_jsd_row_sums); the backward one, with the teacher term coef·p·log(p/m) (TeacherSpec.jsd_beta).

Top-k distillation (a teacher stored as its top-k token ids and logits per position, as distillation pipelines
cache it): q = softmax(teacher_logits/T) over those k tokens, p the student's softmax over the whole vocabulary,

    KL(q‖p) = Σ_j q_j·(log q_j − z_{i_j} + lse)              dKL/dz_c = p_c − Σ_{j: i_j = c} q_j

one pass for lse, the k target logits gathered; the backward is the engine's dense p-term plus k sparse cells per
row (engine.SparseCells). A token listed twice in a row counts with its summed probability.
"""
import dataclasses

import torch

from .engine import (LogitSpec, SparseCells, TeacherSpec, accumulation_dtype, streaming_grads,
                     streaming_jsd_row_sums, streaming_row_stats, streaming_row_stats_with_teacher)


def _student_spec(x, temperature):
    """The student's LogitSpec: z = (x·wᵀ)/T, no target column (the distillation losses have none)."""
    N = x.shape[0]
    inv_temperature = torch.full((N,), 1.0 / temperature, dtype=accumulation_dtype(x.dtype), device=x.device)
    no_target = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    return LogitSpec(inv_temperature, None, None, None, no_target, torch.zeros_like(inv_temperature))


def _planes(x, w, x_t, w_t, temperature, lse_t=None, coef_q=None, coef_log_q=None):
    """The student's LogitSpec and the teacher's plane."""
    spec = _student_spec(x, temperature)
    return spec, TeacherSpec(x_t, w_t, spec.row_scale, lse_t, coef_q, coef_log_q)


def kl_forward(x, w, x_t, w_t, target, temperature, ignore_index, reverse, tiles, shard=None):
    """(KL, lse, lse^T) per row in the accumulation dtype; KL is 0 on ignored rows. With a `shard` (a vocab-parallel
    pair of heads: marginkern.distributed), w and w_t hold this rank's classes and `shard.merge_teacher_stats`
    merges the ranks' statistics."""
    spec, teacher = _planes(x, w, x_t, w_t, temperature)
    stats = streaming_row_stats_with_teacher(x, w, spec, teacher, tiles)
    lse, lse_t, mean_q, mean_p = stats if shard is None else shard.merge_teacher_stats(*stats)
    kl = (mean_p - lse + lse_t) if reverse else (mean_q - lse_t + lse)
    kl = kl.clamp_min(0.0)  # ≥ 0 as the sum it stands for; NaN stays NaN
    return torch.where(target != ignore_index, kl, 0.0), lse, lse_t


def kl_backward(grad_kl, x, w, x_t, w_t, target, lse, lse_t, kl, temperature, ignore_index, reverse, tiles,
                need_weight_grad=True, shard=None):
    """(dL/dx, dL/dw or None) for the per-row upstream gradient of KL (with a shard: dL/dx summed over the ranks,
    dL/dw of this rank's classes)."""
    g = torch.where(target != ignore_index, grad_kl.to(lse.dtype), 0.0)
    zero = torch.zeros_like(g)
    if reverse:  # p_j·(log p_j − log q_j − KL): the entropy term carries p·log p
        spec, teacher = _planes(x, w, x_t, w_t, temperature, lse_t, zero, -g)
        coef_p, entropy_coef = -g * kl, -g
    else:        # p_j − q_j
        spec, teacher = _planes(x, w, x_t, w_t, temperature, lse_t, g, zero)
        coef_p, entropy_coef = g, None
    grad_x, grad_w, _ = streaming_grads(x, w, spec, lse, coef_p, zero, zero, tiles, need_weight_grad=need_weight_grad,
                                        entropy_coef=entropy_coef, teacher=teacher)
    if shard is not None:
        grad_x = shard.sum_input_grad(grad_x)
    return grad_x.to(x.dtype), grad_w


def jsd_forward(x, w, x_t, w_t, target, temperature, ignore_index, beta, tiles, shard=None):
    """(JSD_β, lse, lse^T, KL(p‖m)) per row in the accumulation dtype, 0 on ignored rows (the last for the backward
    pass). With a `shard`, w and w_t hold this rank's classes; the ranks' statistics and sums are merged."""
    spec, teacher = _planes(x, w, x_t, w_t, temperature)
    stats = streaming_row_stats_with_teacher(x, w, spec, teacher, tiles)
    lse, lse_t, _, _ = stats if shard is None else shard.merge_teacher_stats(*stats)
    teacher = dataclasses.replace(teacher, lse=lse_t, jsd_beta=beta)
    kl_pm, kl_qm = streaming_jsd_row_sums(x, w, spec, teacher, lse, tiles)
    if shard is not None:
        kl_pm, kl_qm = shard.sum_rows(torch.stack([kl_pm, kl_qm])).unbind(0)
    # Each sum carries the rounding of both log-sum-exps to first order (−β·c and (1−β)·c for an offset c between
    # log q and log p), which cancels in their β-combination only as they are: clamping one at 0 would keep it.
    jsd = (beta * kl_qm + (1.0 - beta) * kl_pm).clamp_min(0.0)  # ≥ 0 as the divergence it is; NaN stays NaN
    valid = target != ignore_index
    return torch.where(valid, jsd, 0.0), lse, lse_t, torch.where(valid, kl_pm, 0.0)


def jsd_backward(grad_jsd, x, w, x_t, w_t, target, lse, lse_t, kl_pm, temperature, ignore_index, beta, tiles,
                 need_weight_grad=True, shard=None):
    """(dL/dx, dL/dw or None) for the per-row upstream gradient of JSD_β (with a shard: dL/dx summed over the ranks,
    dL/dw of this rank's classes)."""
    g = torch.where(target != ignore_index, grad_jsd.to(lse.dtype), 0.0) * (1.0 - beta)
    zero = torch.zeros_like(g)
    spec, teacher = _planes(x, w, x_t, w_t, temperature, lse_t, zero, g)
    teacher = dataclasses.replace(teacher, jsd_beta=beta)
    grad_x, grad_w, _ = streaming_grads(x, w, spec, lse, -g * kl_pm, zero, zero, tiles,
                                        need_weight_grad=need_weight_grad, teacher=teacher)
    if shard is not None:
        grad_x = shard.sum_input_grad(grad_x)
    return grad_x.to(x.dtype), grad_w


def _gathered_logits(x, w, token_ids, inv_temperature, acc, block_bytes=16 << 20):
    """(x_n·w_{token_ids_nj})/T for each row's k tokens, (N, k) in `acc`, by blocks of rows (a block's gathered
    rows of w ≤ block_bytes)."""
    N, k = token_ids.shape
    out = torch.empty(N, k, dtype=acc, device=x.device)
    block = max(1, block_bytes // max(1, k * x.shape[1] * acc.itemsize))
    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        out[r0:r1] = torch.einsum("rd,rkd->rk", x[r0:r1].to(acc), w[token_ids[r0:r1]].to(acc))
    return out * inv_temperature


def _merged_teacher(token_ids, q):
    """The teacher's top-k as a distribution over tokens: a token listed twice in a row counts with its summed
    probability. Returns (ids sorted per row, the merged probability of each sorted entry's token, whether the
    entry is its token's first, whether the row repeats a token, the sorting permutation)."""
    ids, order = token_ids.sort(stable=True, dim=1)
    q = q.gather(1, order)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    segment = first.cumsum(1) - 1
    merged = torch.zeros_like(q).scatter_add_(1, segment, q).gather(1, segment)
    return ids, merged, first, ~first.all(1), order


def _entropy_terms(q):
    return torch.where(q == 0, 0.0, q * torch.log(q))  # 0·log 0 = 0; a NaN q stays NaN


def _topk_spec(x, w, token_ids, teacher_logits, temperature, acc):
    """(the student's spec, its logits at the k tokens (N, k), log q (N, k)). The spec's target column is each row's most
    probable teacher token, with the gathered logit as its value: the log-sum-exp then sums the same rounding of it
    that log p takes (the GEMM's and the gather's roundings differ by ~ulp(z), which is all of 1 − p where the
    student is confident, as linear cross-entropy's target logit)."""
    spec = _student_spec(x, temperature)
    log_q = torch.log_softmax(teacher_logits.to(acc) * spec.row_scale[:, None], dim=1)
    logits = _gathered_logits(x, w, token_ids, spec.row_scale[:, None], acc)
    top = log_q.argmax(1, keepdim=True) if token_ids.shape[0] else token_ids[:, :1]
    spec = dataclasses.replace(spec, target=token_ids.gather(1, top).squeeze(1).long(),
                               target_logit=logits.gather(1, top).squeeze(1))
    return spec, logits, log_q


def topk_kl_forward(x, w, token_ids, teacher_logits, target, temperature, ignore_index, tiles):
    """(KL(q‖p) over the teacher's top-k, lse) per row in the accumulation dtype; 0 on ignored rows. A token listed
    twice counts with its summed probability (_merged_teacher): KL = Σ_c Q_c·(log Q_c − log p_c) ≥ 0."""
    acc = accumulation_dtype(x.dtype)
    spec, logits, log_q = _topk_spec(x, w, token_ids, teacher_logits, temperature, acc)
    lse, _ = streaming_row_stats(x, w, spec, False, tiles)
    q = torch.exp(log_q)
    log_p = logits - lse[:, None]
    kl = torch.where(q == 0, 0.0, q * (log_q - log_p)).sum(1)
    _, merged, first, repeats, _ = _merged_teacher(token_ids, q)
    # rows that repeat a token: Σ_c Q_c·log Q_c in place of Σ_j q_j·log q_j (the cross term is the same)
    duplicate_fix = (torch.where(first, _entropy_terms(merged), 0.0) - _entropy_terms(q)).sum(1)
    kl = (kl + torch.where(repeats, duplicate_fix, 0.0)).clamp_min(0.0)  # ≥ 0 as the KL it is; NaN stays NaN
    return torch.where(target != ignore_index, kl, 0.0), lse


def topk_kl_backward(grad_kl, x, w, token_ids, teacher_logits, target, lse, temperature, ignore_index, tiles,
                     need_weight_grad=True):
    """(dL/dx, dL/dw or None): the engine's g·p_c over all classes with, at the teacher's tokens, totals
    g·(p_c − Q_c): the most probable one as the spec's target column, the others as sparse cells
    (engine.SparseCells); dz/da = 1/T on all."""
    acc = lse.dtype
    valid = target != ignore_index
    g = torch.where(valid, grad_kl.to(acc), 0.0)
    spec, logits, log_q = _topk_spec(x, w, token_ids, teacher_logits, temperature, acc)
    scale = (g * spec.row_scale)[:, None]
    # ignored rows count for nothing, also where their cached teacher logits are all −inf (a NaN softmax)
    q = torch.where(valid[:, None], torch.exp(log_q), 0.0)
    ids, merged, first, _, order = _merged_teacher(token_ids, q)
    log_p = logits.gather(1, order) - lse[:, None]
    # p − Q as Q·expm1(log p − log Q): no cancellation where the student matches the teacher (p ≈ Q ≈ 1: the
    # cross-entropy's g·expm1(log p_t) at k = 1)
    taken = merged > 0
    log_ratio = log_p - torch.log(torch.where(taken, merged, 1.0))
    totals = scale * torch.where(taken, merged * torch.expm1(log_ratio), torch.exp(log_p))
    is_top = ids == spec.target[:, None]
    target_grad = torch.where(is_top & first, totals, 0.0).sum(1)
    cells = SparseCells(torch.where(first & ~is_top, ids, -1), totals, -scale * merged)
    zero = torch.zeros_like(g)
    grad_x, grad_w, _ = streaming_grads(x, w, spec, lse, g, zero, target_grad, tiles,
                                        need_weight_grad=need_weight_grad, sparse_cells=cells)
    return grad_x.to(x.dtype), grad_w
