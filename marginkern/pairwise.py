"""Pairwise log-sum-exp losses in linear memory: CoSENT, multilabel categorical CE (ZLPR), Circle loss.

CoSENT (DESIGN.md §4): L = log(1 + Σ_{y_a < y_b} exp(s_a − s_b)), s = scale·cos. Sorting by label turns the
double sum into a prefix log-cum-sum-exp: for each b, LSE over all a with a strictly smaller label is the
prefix up to the first index of b's label (ties excluded). O(B log B) time, O(B) memory, never B × B.
"""
import torch

from .engine import accumulation_dtype, log1p_exp
from .reference import reduce_rows


def cosent_loss_and_grad(scores, labels, scale):
    """(L, dL/dscores) of CoSENT in the accumulation dtype, both in one pass (the op's PyTorch path; the
    Triton one, triton_kernels/cosent_scan.py, documents the math). In label order, with P_b the LSE of s
    over strictly smaller labels and R_a the LSE of −s over strictly larger ones, T_b = P_b − s_b:
    L = log(1 + Σ e^T), dL/ds_a = e^{s_a + R_a − L} − e^{T_a − L}."""
    s = scale * scores.to(accumulation_dtype(scores.dtype))
    B = s.shape[0]
    none = torch.full_like(s, -float("inf"))
    labels_sorted, order = torch.sort(labels, stable=True)
    s_sorted = s[order]
    first = torch.searchsorted(labels_sorted, labels_sorted, right=False)  # first index of the label group
    after = torch.searchsorted(labels_sorted, labels_sorted, right=True)   # one past its last index
    prefix = torch.logcumsumexp(s_sorted, 0)
    terms = torch.where(first > 0, prefix[(first - 1).clamp_min(0)] - s_sorted, none)
    # log(1 + Σ e^T) as log1p_exp(LSE T): a small loss keeps its digits (log of 1 + x rounds x away: 0 at x < 6e-8)
    loss = log1p_exp(torch.logsumexp(terms, 0))
    suffix = torch.logcumsumexp(-s_sorted.flip(0), 0).flip(0)  # LSE of −s over j ≥ i
    larger = torch.where(after < B, suffix[after.clamp_max(max(B - 1, 0))], none)
    grad = torch.empty_like(s)
    # without a larger label a pair has no "smaller" term at all: 0, not e^{+inf − inf} for an infinite score
    as_smaller = torch.where(after < B, torch.exp(s_sorted + larger - loss), torch.zeros_like(s_sorted))
    grad[order] = (as_smaller - torch.exp(terms - loss)) * scale
    return loss, grad


def multilabel_categorical_crossentropy(logits, targets, reduction):
    """ZLPR per row of the last dimension: log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s).

    Logits equal to −inf (GlobalPointer's masked spans) are left out of both sums, as bert4keras's
    current form does, instead of turning into inf − inf. Each log(1 + Σ e^v) is log1p_exp(LSE v), which keeps a
    small loss's digits (log of 1 + x rounds x away). A target that is not 0/1 gives a NaN row: eager calls
    refuse it (checks.check_binary_targets), a compiled one cannot look at the values without a graph break.
    """
    s = logits.float() if logits.dtype != torch.float64 else logits
    y = targets.to(torch.bool)
    kept = s != -float("inf")
    rows = _log1p_sum_exp(s, kept & ~y) + _log1p_sum_exp(-s, kept & y)
    rows = torch.where(((targets != 0) & (targets != 1)).any(-1), torch.nan, rows)
    rows = rows.reshape(-1) if rows.dim() else rows.reshape(1)
    out = reduce_rows(rows, torch.ones_like(rows, dtype=torch.bool), reduction)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def _log1p_sum_exp(v, member):
    """log(1 + Σ_{member} e^v) over the last dimension; 0 (with a zero, not NaN, gradient) where no entry is a
    member (the LSE then runs over finite stand-ins, its result unused)."""
    some = member.any(-1)
    lse = torch.logsumexp(torch.where(member, v, torch.where(some[..., None], -float("inf"), 0.0)), -1)
    return torch.where(some, log1p_exp(lse), 0.0)


def _circle_block(anchors, embeddings, anchor_labels, labels, anchor_index, m, gamma):
    """Circle loss of a block of anchors against the whole batch (the anchor itself excluded)."""
    sim = anchors @ embeddings.t()
    same = anchor_labels[:, None] == labels[None, :]
    self_pair = anchor_index[:, None] == torch.arange(embeddings.shape[0], device=sim.device)[None, :]
    none = torch.full_like(sim, -float("inf"))
    alpha_p = torch.relu(1.0 + m - sim.detach())
    alpha_n = torch.relu(sim.detach() + m)
    positive, negative = same & ~self_pair, ~same
    has_pairs = positive.any(1) & negative.any(1)
    # anchors without a positive or a negative rank nothing (loss 0); give them finite logits so that the
    # logsumexp backward of an all −inf row cannot produce NaN
    positive, negative = positive | ~has_pairs[:, None], negative | ~has_pairs[:, None]
    logit_p = torch.where(positive, -gamma * alpha_p * (sim - (1.0 - m)), none)
    logit_n = torch.where(negative, gamma * alpha_n * (sim - m), none)
    loss = log1p_exp(torch.logsumexp(logit_p, 1) + torch.logsumexp(logit_n, 1))
    return torch.where(has_pairs, loss, torch.zeros_like(loss)), has_pairs


def circle_loss(embeddings, labels, m, gamma, reduction, anchor_block):
    """In-batch Circle loss (Sun et al. 2020) on cosine similarities, streamed over blocks of anchors so
    that only anchor_block × B similarities exist at a time (recomputed in the backward pass)."""
    from torch.utils.checkpoint import checkpoint
    x = embeddings.float() if embeddings.dtype != torch.float64 else embeddings
    x = torch.nn.functional.normalize(x, dim=1)
    B = x.shape[0]
    losses, valid = [], []
    for i0 in range(0, B, anchor_block):
        idx = torch.arange(i0, min(B, i0 + anchor_block), device=x.device)
        loss_b, valid_b = checkpoint(_circle_block, x[i0:i0 + anchor_block], x, labels[i0:i0 + anchor_block],
                                     labels, idx, m, gamma, use_reentrant=False)
        losses.append(loss_b)
        valid.append(valid_b)
    if not losses:  # no anchors: 0 (an empty tensor for "none"), still part of the graph so that backward() works
        empty = x.sum(1)
        return reduce_rows(empty, torch.zeros(0, dtype=torch.bool, device=x.device), reduction)
    return reduce_rows(torch.cat(losses), torch.cat(valid), reduction)
