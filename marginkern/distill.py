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
"""
import torch

from .engine import LogitSpec, TeacherSpec, accumulation_dtype, streaming_grads, streaming_row_stats_with_teacher


def _planes(x, w, x_t, w_t, temperature, lse_t=None, coef_q=None, coef_log_q=None):
    """The student's LogitSpec (no target column: the loss has none) and the teacher's plane."""
    N = x.shape[0]
    inv_temperature = torch.full((N,), 1.0 / temperature, dtype=accumulation_dtype(x.dtype), device=x.device)
    no_target = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    spec = LogitSpec(inv_temperature, None, None, None, no_target, torch.zeros_like(inv_temperature))
    return spec, TeacherSpec(x_t, w_t, inv_temperature, lse_t, coef_q, coef_log_q)


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
