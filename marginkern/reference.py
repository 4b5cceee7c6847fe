"""Plain-PyTorch oracles: the definitions of DESIGN.md §4, differentiated by autograd.

They are what the kernels are tested against, written for clarity rather than speed. They still stream
over class chunks (each chunk under activation checkpointing), so even the oracle never holds the
N × C logits matrix: a CPU user can run them at full scale.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .engine import NORM_EPS, accumulation_dtype
from .margin import MarginPsi, margin_psi

CLASS_CHUNK = 8192


def reduce_rows(loss_rows, valid, reduction):
    """Reduction with torch's ignore_index semantics; a mean over zero rows is 0, not NaN."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def _chunk_stats(x, w_chunk, target_logit, is_target_chunk):
    """(logsumexp, sum) over one class chunk of logits whose target column is replaced."""
    z = torch.where(is_target_chunk, target_logit[:, None], x @ w_chunk.t())
    return torch.logsumexp(z, dim=1), z.sum(1)


def margin_cross_entropy(input, weight, target, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, normalize=True,
                         margin_grad="exact", label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         class_chunk=CLASS_CHUNK):
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    valid = target != ignore_index
    column = torch.where(valid, target, torch.full_like(target, -1))
    w_target = w[column.clamp_min(0)]
    if normalize:
        x = F.normalize(x, dim=1, eps=NORM_EPS)
        w = F.normalize(w, dim=1, eps=NORM_EPS)
        w_target = F.normalize(w_target, dim=1, eps=NORM_EPS)
    plain_target = (x * w_target).sum(1)
    norms = x.norm(dim=1).clamp_min(NORM_EPS) * w_target.norm(dim=1).clamp_min(NORM_EPS)
    cosine = plain_target / norms
    radius = 1.0 if normalize else norms  # L-Softmax keeps ‖x‖‖w_y‖ on the target logit
    if margin_grad == "exact":
        target_logit = radius * MarginPsi.apply(cosine, m1, m2, m3)
    else:  # straight-through: the margin is an offset that carries no gradient of its own
        margin_offset = radius * margin_psi(cosine.clamp(-1, 1), m1, m2, m3) - plain_target
        target_logit = plain_target + margin_offset.detach()
    x, target_logit = scale * x, scale * target_logit

    lse_parts, sum_parts = [], []
    for c0 in range(0, w.shape[0], class_chunk):
        w_chunk = w[c0:c0 + class_chunk]
        classes = torch.arange(c0, c0 + w_chunk.shape[0], device=x.device)
        is_target = column[:, None] == classes[None, :]
        lse_c, sum_c = checkpoint(_chunk_stats, x, w_chunk, target_logit, is_target, use_reentrant=False)
        lse_parts.append(lse_c)
        sum_parts.append(sum_c)
    lse = torch.logsumexp(torch.stack(lse_parts), dim=0)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing > 0:
        loss = loss - label_smoothing / w.shape[0] * torch.stack(sum_parts).sum(0)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce_rows(loss, valid, reduction)
