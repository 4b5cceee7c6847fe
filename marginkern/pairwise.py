"""Pairwise log-sum-exp losses in linear memory: CoSENT, multilabel categorical CE (ZLPR), Circle loss.

CoSENT (DESIGN.md §4): L = log(1 + Σ_{y_a < y_b} exp(s_a − s_b)), s = scale·cos. Sorting by label turns the
double sum into a prefix log-cum-sum-exp: for each b, LSE over all a with a strictly smaller label is the
prefix up to the first index of b's label (ties excluded). O(B log B) time, O(B) memory, never B × B.
"""
import torch

from .engine import NORM_EPS, accumulation_dtype, log1p_exp, row_blocks


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


# ZLPR's row blocks: this many bytes of one fp32 (rows × C) block at a time, so that only a few such temporaries
# exist beside the (N, C) gradient that the caller's logits need anyway.
ZLPR_BLOCK_BYTES = 8 << 20


def _zlpr_rows(logits):
    """(logits as (R, C) rows, the accumulation dtype, the row blocks (r0, r1) of ZLPR_BLOCK_BYTES each)."""
    C = logits.shape[-1]
    R = logits.shape[:-1].numel()  # (not reshape(-1, C): C = 0 has no -1)
    acc = accumulation_dtype(logits.dtype)
    blocks = row_blocks(R, max(1, ZLPR_BLOCK_BYTES // max(1, C * acc.itemsize)))
    return logits.reshape(R, C), acc, blocks


def _dense_labels(targets):
    """Dense 0/1 targets (..., C) → a function of a row block: (positive mask, rows whose targets are not all 0/1)."""
    y2 = targets.reshape(targets.shape[:-1].numel(), targets.shape[-1])  # (not reshape(-1, C): C = 0 has no -1)

    def block(r0, r1):
        y = y2[r0:r1]
        return y.to(torch.bool), ((y != 0) & (y != 1)).any(-1)
    return block


def _sparse_labels(positives, C, mask_zero, ignore_index):
    """Positive class indices (..., P) → a function of a row block: (its (rows, C) positive mask, rows naming a class
    outside [0, C)). Padding (ignore_index; index 0 too with mask_zero) names nothing, a class named twice is one
    positive. Only a block's mask exists at a time, never the (R, C) targets."""
    p2 = positives.reshape(positives.shape[:-1].numel(), positives.shape[-1]).long()

    def block(r0, r1):
        p = p2[r0:r1]
        named = named_positives(p, mask_zero, ignore_index)
        return positive_mask(p, named, 0, C), (named & ((p < 0) | (p >= C))).any(-1)
    return block


def named_positives(p, mask_zero, ignore_index):
    """Which entries of positive indices p name a class: not padding (ignore_index; 0 too with mask_zero)."""
    named = p != ignore_index
    return named & (p != 0) if mask_zero else named


def positive_mask(p, named, c0, c1):
    """The (rows, c1 − c0) bool mask of the named positives p (rows, P) that fall in columns [c0, c1): one block's
    targets, made from the indices alone (padding and the indices outside scatter into a spare column, dropped)."""
    inside = named & (p >= c0) & (p < c1)
    index = torch.where(inside, p - c0, c1 - c0)
    y = torch.zeros(p.shape[0], c1 - c0 + 1, dtype=torch.bool, device=p.device).scatter_(1, index, True)
    return y[:, :c1 - c0]


def _zlpr_block_terms(logits, y, bad, mask_zero):
    """A block of rows: (the logits in the accumulation dtype, negatives, positives, rows whose labels are bad).
    Logits equal to −inf (masked spans), and class 0 with mask_zero, are neither a negative nor a positive."""
    s = logits.to(accumulation_dtype(logits.dtype))  # (the caller's own tensor where it is fp32: never written)
    kept = s != -float("inf")
    if mask_zero and kept.shape[-1]:
        kept[:, 0] = False
    return s, kept & ~y, kept & y, bad


def _zlpr_forward(logits, labels_of_block, mask_zero):
    s2, acc, blocks = _zlpr_rows(logits)
    L_neg, L_pos = (s2.new_empty(s2.shape[0], dtype=acc) for _ in range(2))
    loss = s2.new_empty(s2.shape[0], dtype=acc)
    for r0, r1 in blocks:
        s, neg, pos, bad = _zlpr_block_terms(s2[r0:r1], *labels_of_block(r0, r1), mask_zero)
        L_neg[r0:r1] = log1p_exp(torch.logsumexp(s.masked_fill(~neg, -float("inf")), -1))
        L_pos[r0:r1] = log1p_exp(torch.logsumexp(torch.neg(s).masked_fill_(~pos, -float("inf")), -1))
        loss[r0:r1] = (L_neg[r0:r1] + L_pos[r0:r1]).masked_fill_(bad, float("nan"))
    return loss, L_neg, L_pos


def _zlpr_backward(grad_rows, logits, labels_of_block, mask_zero, L_neg, L_pos):
    s2, acc, blocks = _zlpr_rows(logits)
    grad = torch.empty(s2.shape, dtype=logits.dtype, device=logits.device)
    for r0, r1 in blocks:
        s, neg, pos, bad = _zlpr_block_terms(s2[r0:r1], *labels_of_block(r0, r1), mask_zero)
        g = grad_rows[r0:r1].to(acc).masked_fill(bad, 0.0)[:, None]
        as_negative = torch.sub(s, L_neg[r0:r1, None]).exp_().mul_(g).masked_fill_(~neg, 0.0)
        as_positive = torch.neg(s).sub_(L_pos[r0:r1, None]).exp_().mul_(g).masked_fill_(~pos, 0.0)
        grad[r0:r1] = as_negative.sub_(as_positive)
    return grad.reshape(logits.shape)


def multilabel_ce_rows(logits, targets):
    """ZLPR per row of the last dimension, by blocks of rows: (loss, L_neg, L_pos), each (R,) in the accumulation
    dtype for the R = numel / C rows, L_neg = log(1 + Σ_neg e^s), L_pos = log(1 + Σ_pos e^−s), loss = L_neg + L_pos.

    Each log(1 + Σ e^v) is log1p_exp(LSE v), which keeps a small loss's digits (log of 1 + x rounds x away); a side
    without members adds exactly 0. Logits equal to −inf (GlobalPointer's masked spans) are left out of both sums, as
    bert4keras's current form does, instead of turning into inf − inf. A target that is not 0/1 gives a NaN row: eager
    calls refuse it (checks.check_binary_targets), a compiled one cannot look at the values without a graph break.
    """
    return _zlpr_forward(logits, _dense_labels(targets), False)


def multilabel_ce_rows_backward(grad_rows, logits, targets, L_neg, L_pos):
    """dL/dlogits for the upstream gradient grad_rows (R,) of multilabel_ce_rows' losses, in the logits' dtype and
    shape: g·e^{s − L_neg} on the negatives, −g·e^{−s − L_pos} on the positives, 0 elsewhere (masked logits, and rows
    whose targets are not 0/1, whose loss is the constant NaN)."""
    return _zlpr_backward(grad_rows, logits, _dense_labels(targets), False, L_neg, L_pos)


def sparse_multilabel_ce_rows(logits, positives, mask_zero, ignore_index):
    """multilabel_ce_rows with the positives given as class indices (R, P) (bert4keras's sparse form): the same
    loss as the dense targets that mark those classes, computed as that (each side's sum over its own members),
    not as bert4keras's log(1 − e^{LSE_pos − LSE_all}), which cancels when the positives hold the mass. A row naming
    a class outside [0, C) is NaN (eager calls refuse it: checks.check_positive_indices)."""
    return _zlpr_forward(logits, _sparse_labels(positives, logits.shape[-1], mask_zero, ignore_index), mask_zero)


def sparse_multilabel_ce_rows_backward(grad_rows, logits, positives, L_neg, L_pos, mask_zero, ignore_index):
    """dL/dlogits of sparse_multilabel_ce_rows, as multilabel_ce_rows_backward (class 0 gets 0 with mask_zero)."""
    labels = _sparse_labels(positives, logits.shape[-1], mask_zero, ignore_index)
    return _zlpr_backward(grad_rows, logits, labels, mask_zero, L_neg, L_pos)


def _circle_block_terms(anchors, embeddings, anchor_labels, labels, anchor_index, m, gamma):
    """A block of anchors against the whole batch (the anchor itself excluded): the slopes dlogit/ds of its positive
    and negative logits (0 off their sets), the logits (−inf off their sets), their log-sum-exps, and whether each
    anchor has pairs. In place where it can: five block × B float tensors, not a dozen."""
    sim = anchors @ embeddings.t()
    positive = anchor_labels[:, None] == labels[None, :]
    negative = ~positive
    positive[torch.arange(len(anchor_index), device=sim.device), anchor_index] = False  # the anchor itself
    has_pairs = positive.any(1) & negative.any(1)
    # anchors without a positive or a negative rank nothing (loss 0); give them finite logits so that their
    # log-sum-exps are finite (their loss and gradient are then set to 0)
    positive |= ~has_pairs[:, None]
    negative |= ~has_pairs[:, None]
    # PML's weights α are constants of the gradient (detached): the logits' slopes are −γα_p and γα_n
    slope_p = torch.neg(sim).add_(1.0 + m).relu_().mul_(-gamma).masked_fill_(~positive, 0.0)
    slope_n = torch.add(sim, m).relu_().mul_(gamma).masked_fill_(~negative, 0.0)
    logit_p = torch.sub(sim, 1.0 - m).mul_(slope_p).masked_fill_(~positive, -float("inf"))
    logit_n = sim.sub_(m).mul_(slope_n).masked_fill_(~negative, -float("inf"))  # sim's last use
    return slope_p, slope_n, logit_p, logit_n, torch.logsumexp(logit_p, 1), torch.logsumexp(logit_n, 1), has_pairs


def _circle_block(anchors, embeddings, anchor_labels, labels, anchor_index, m, gamma):
    """(Circle loss, has pairs) of a block of anchors: softplus(LSE_p + LSE_n), 0 without pairs."""
    *_, lse_p, lse_n, has_pairs = _circle_block_terms(anchors, embeddings, anchor_labels, labels, anchor_index, m,
                                                      gamma)
    loss = log1p_exp(lse_p + lse_n)
    return torch.where(has_pairs, loss, torch.zeros_like(loss)), has_pairs


def _circle_block_grad(grad_rows, anchors, embeddings, anchor_labels, labels, anchor_index, m, gamma):
    """dL/dsim of a block of anchors for the upstream gradient grad_rows of their losses: per anchor
    g·σ(LSE_p + LSE_n)·(softmax_p·slope_p + softmax_n·slope_n), 0 without pairs."""
    slope_p, slope_n, logit_p, logit_n, lse_p, lse_n, has_pairs = _circle_block_terms(
        anchors, embeddings, anchor_labels, labels, anchor_index, m, gamma)
    coef = torch.where(has_pairs, grad_rows * torch.sigmoid(lse_p + lse_n), 0.0)[:, None]
    softmax_n_slope = logit_n.sub_(lse_n[:, None]).exp_().mul_(slope_n)
    return logit_p.sub_(lse_p[:, None]).exp_().mul_(slope_p).add_(softmax_n_slope).mul_(coef)


# Circle loss's block of anchors: one anchor_block × B fp32 similarity matrix within this budget (8× larger on a GPU);
# a block's forward and backward hold about six float tensors of that size at once (and four bool ones).
CIRCLE_BLOCK_BYTES = 8 << 20
GPU_CIRCLE_BLOCK_FACTOR = 8
MIN_CIRCLE_BLOCK = 16


def circle_anchor_block(embeddings):
    """The default anchor rows per block: the budget's worth of similarity rows, at least MIN_CIRCLE_BLOCK (a block of
    a few rows runs the block's dozen element-wise ops for little work each)."""
    B = embeddings.shape[0]
    budget = CIRCLE_BLOCK_BYTES * (GPU_CIRCLE_BLOCK_FACTOR if embeddings.is_cuda else 1)
    return max(1, min(B, max(MIN_CIRCLE_BLOCK, budget // max(1, B * accumulation_dtype(embeddings.dtype).itemsize))))


def _circle_blocks(x, labels, m, gamma, anchor_block, block_fn, *args):
    """(i0, i1, block_fn(*args[i0:i1], anchors, x, their labels, labels, their indexes, m, gamma)) for each block of
    anchors [i0, i1) of the normalised x (anchor_block 0: circle_anchor_block's); args are per-anchor tensors sliced
    to the block."""
    for i0, i1 in row_blocks(x.shape[0], anchor_block or circle_anchor_block(x)):
        idx = torch.arange(i0, i1, device=x.device)
        yield i0, i1, block_fn(*(a[i0:i1] for a in args), x[i0:i1], x, labels[i0:i1], labels, idx, m, gamma)


def circle_rows(embeddings, labels, m, gamma, anchor_block):
    """(per-anchor Circle loss, whether the anchor has a positive and a negative) (B,) each, the loss in the
    accumulation dtype, by blocks of `anchor_block` anchors: anchor_block × B similarities at a time."""
    x = torch.nn.functional.normalize(embeddings.to(accumulation_dtype(embeddings.dtype)), dim=1)
    loss = x.new_zeros(x.shape[0])
    valid = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for i0, i1, (loss_b, valid_b) in _circle_blocks(x, labels, m, gamma, anchor_block, _circle_block):
        loss[i0:i1], valid[i0:i1] = loss_b, valid_b
    return loss, valid


def circle_rows_backward(grad_rows, embeddings, labels, m, gamma, anchor_block):
    """dL/dembeddings for the upstream gradient grad_rows (B,) of circle_rows' losses, in the embeddings' dtype:
    each block's dL/dsim recomputed into the normalised embeddings' gradient (as anchors and as the batch), then
    chained through F.normalize's x/max(‖x‖, ε) once."""
    raw = embeddings.to(accumulation_dtype(embeddings.dtype)).contiguous()  # the gradient is contiguous (the fake's)
    norm = torch.linalg.vector_norm(raw, dim=1, keepdim=True)
    x = raw / norm.clamp_min(NORM_EPS)
    grad_x = torch.zeros_like(x)
    grad_rows = grad_rows.to(x.dtype)
    for i0, i1, g in _circle_blocks(x, labels, m, gamma, anchor_block, _circle_block_grad, grad_rows):
        grad_x[i0:i1] += g @ x
        grad_x.addmm_(g.t(), x[i0:i1])
    # d(x/‖x‖) projects out the radial part; below ε the denominator is the constant ε
    radial = torch.where(norm > NORM_EPS, x * (x * grad_x).sum(1, keepdim=True), 0.0)
    return ((grad_x - radial) / norm.clamp_min(NORM_EPS)).to(embeddings.dtype)
