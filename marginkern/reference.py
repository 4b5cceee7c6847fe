"""Plain-PyTorch oracles: the definitions of DESIGN.md §4, differentiated by autograd.

They are what the kernels are tested against, written for clarity rather than speed. They still stream
over class chunks (each chunk under activation checkpointing), so even the oracle never holds the
N × C logits matrix: a CPU user can run them at full scale.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .engine import NORM_EPS, accumulation_dtype
from .margin import MarginPsi, blend_psi

CLASS_CHUNK = 8192


def weighted_mean_scale(valid, target_weight):
    """1 / Σ c_t over non-ignored rows, the factor of a class-weighted "mean" (torch's divisor), and 0 where that sum
    is 0 (every row ignored or weighted 0): the mean is then 0 with zero gradients, not NaN (torch) nor the sum."""
    total = torch.where(valid, target_weight, 0.0).sum()
    positive = total > 0
    return positive / torch.where(positive, total, torch.ones_like(total))


def reduce_rows(loss_rows, valid, reduction, target_weight=None):
    """Reduction with torch's ignore_index (and class `weight`) semantics; a mean over zero rows is 0, not NaN."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if target_weight is not None:
        return total * weighted_mean_scale(valid, target_weight)
    return total / valid.sum().clamp_min(1)  # int64 count: true division gives total's dtype


def _chunk_stats(x, w_chunk, bias_chunk, softcap, target_logit, is_target_chunk, subcenters=1, class_weight=None,
                 hard_coefs=None, hard_threshold=None):
    """(logsumexp, sum) over one class chunk of logits whose target column is replaced; with K sub-centres
    w_chunk holds K rows per class and a class's logit is the largest of its K (its gradient goes to that one).
    class_weight (the chunk's): the sum is Σ_j c_j·z_j. hard_coefs (α, β, γ) and hard_threshold (N,), constants:
    a non-target logit z above its row's threshold becomes α·z² + β·z + γ."""
    z = x @ w_chunk.t()
    if subcenters > 1:
        z = z.unflatten(1, (-1, subcenters)).max(2).values
    if bias_chunk is not None:
        z = z + bias_chunk
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if hard_coefs is not None:
        alpha, beta, gamma = hard_coefs
        hard = (z > hard_threshold[:, None]) & ~is_target_chunk
        z = torch.where(hard, alpha * z * z + beta * z + gamma, z)
    z = torch.where(is_target_chunk, target_logit[:, None], z)
    return torch.logsumexp(z, dim=1), (z.sum(1) if class_weight is None else z @ class_weight)


def streamed_lse_and_sum(x, w, column, target_logit, bias=None, softcap=None, class_chunk=CLASS_CHUNK,
                         subcenters=1, class_weight=None, hard_coefs=None, hard_threshold=None):
    """Per-row logsumexp and Σ_j z_j (Σ_j c_j·z_j with class_weight c) of z = softcap(x·wᵀ + b) with the target
    column replaced by target_logit (column −1: none), chunk by chunk; each chunk is recomputed in the backward
    pass. subcenters K: w has K rows per class (_chunk_stats)."""
    lse_parts, sum_parts = [], []
    K = subcenters
    for c0 in range(0, w.shape[0] // K, class_chunk):
        w_chunk = w[c0 * K:(c0 + class_chunk) * K]
        bias_chunk = None if bias is None else bias[c0:c0 + class_chunk]
        classes = torch.arange(c0, c0 + w_chunk.shape[0] // K, device=x.device)
        is_target = column[:, None] == classes[None, :]
        weight_chunk = None if class_weight is None else class_weight[c0:c0 + class_chunk]
        lse_c, sum_c = checkpoint(_chunk_stats, x, w_chunk, bias_chunk, softcap, target_logit, is_target, K,
                                  weight_chunk, hard_coefs, hard_threshold, use_reentrant=False)
        lse_parts.append(lse_c)
        sum_parts.append(sum_c)
    return torch.logsumexp(torch.stack(lse_parts), dim=0), torch.stack(sum_parts).sum(0)


def margin_cross_entropy(input, weight, target, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, normalize=True,
                         margin_grad="exact", label_smoothing=0.0, ignore_index=-100, reduction="mean",
                         subcenters=1, lambda_=0.0, hard_negatives=None, hard_negative_threshold=None,
                         class_chunk=CLASS_CHUNK):
    """hard_negatives (a, b, d) (floats or a (3,) tensor, no gradient): a non-target cosine c above the row's ψ, or above
    hard_negative_threshold τ when given, becomes a·c² + b·c + d (functional.margin_cross_entropy)."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    K = subcenters
    if K > 1 and not normalize:
        raise ValueError(f"subcenters={K} needs normalize=True (sub-centres compete by cosine)")
    valid = target != ignore_index
    column = torch.where(valid, target, torch.full_like(target, -1))
    if normalize:
        x = F.normalize(x, dim=1, eps=NORM_EPS)
        w = F.normalize(w, dim=1, eps=NORM_EPS)
    if K == 1:
        w_target = w[column.clamp_min(0)]
        plain_target = (x * w_target).sum(1)
        if normalize:  # x̂·ŵ_y is the cosine: dividing by their norms again would divide a zero vector's by 1e-12 twice
            cosine, norms = plain_target, None
        else:
            norms = x.norm(dim=1).clamp_min(NORM_EPS) * w_target.norm(dim=1).clamp_min(NORM_EPS)
            cosine = plain_target / norms
    else:  # sub-center ArcFace (normalize=True): the target's cosine is its best sub-centre's
        cosine = torch.linalg.vecdot(w.unflatten(0, (-1, K))[column.clamp_min(0)], x[:, None, :]).max(1).values
        norms = None
    radius = 1.0 if normalize else norms  # L-Softmax keeps ‖x‖‖w_y‖ on the target logit
    # m2, m3: floats, or (N,) per-row margins (AdaFace, MagFace), which get their exact gradients
    m2, m3 = (m.to(acc) if isinstance(m, torch.Tensor) else m for m in (m2, m3))
    # straight-through: dψ/dc := 1, i.e. ψ(c) = c + an offset (the norms stay differentiable)
    psi = MarginPsi.apply(cosine, m1, m2, m3, margin_grad != "exact")
    # A-Softmax's λ eases the target toward the plain cosine (of the clamped one, as ψ sees it)
    target_logit = radius * (blend_psi(psi, cosine.clamp(-1, 1), lambda_) if lambda_ else psi)
    x, target_logit = scale * x, scale * target_logit
    hard_coefs = hard_threshold = None
    if hard_negatives is not None:  # in logit units, z = s·c: s·(a·c² + b·c + d) = (a/s)·z² + b·z + d·s
        if not normalize:
            raise ValueError("hard_negatives needs normalize=True: it re-weights cosines")
        a, b, d = (torch.as_tensor(hard_negatives, dtype=acc, device=x.device).detach()).unbind()
        hard_coefs = (a / scale, b, d * scale)
        above = target_logit.detach() if hard_negative_threshold is None else torch.full_like(
            target_logit, scale * float(hard_negative_threshold))
        hard_threshold = torch.where(valid, above, torch.full_like(target_logit, math.inf))
    elif hard_negative_threshold is not None:
        raise ValueError("hard_negative_threshold needs hard_negatives")

    lse, sum_logits = streamed_lse_and_sum(x, w, column, target_logit, class_chunk=class_chunk, subcenters=K,
                                           hard_coefs=hard_coefs, hard_threshold=hard_threshold)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing > 0:
        loss = loss - label_smoothing / (w.shape[0] // K) * sum_logits
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce_rows(loss, valid, reduction)


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, focal_gamma=0.0, gamma_ce=0.0, reduction="mean", class_weight=None,
                         class_chunk=CLASS_CHUNK):
    """class_weight c (C,): torch's per-class `weight` (row loss × c_t, the smoothing term Σ_j c_j·(−log p_j)/C, the
    mean over Σ c_t); unlike the library, also with a softcap."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    b = None if bias is None else bias.to(acc)
    c = None if class_weight is None else class_weight.detach().to(acc)
    valid = target != ignore_index
    column = torch.where(valid, target, torch.full_like(target, -1))
    safe = column.clamp_min(0)
    z_target = (x * w[safe]).sum(1) + (0.0 if b is None else b[safe])
    if softcap is not None:
        z_target = softcap * torch.tanh(z_target / softcap)
    lse, sum_logits = streamed_lse_and_sum(x, w, column, z_target, b, softcap, class_chunk, class_weight=c)
    log_pt = z_target - lse
    if focal_gamma > 0:
        q = -torch.expm1(log_pt)  # 1 − p_t; at q = 0 the slope of q^γ (γ < 1) is infinite, times log p_t = 0
        q_safe = torch.where(q > 0, q, torch.ones_like(q))
        nll = torch.where(q > 0, -(q_safe ** focal_gamma) * log_pt, torch.zeros_like(q))
    elif gamma_ce > 0:
        # = −log(γ + (1−γ)p_t)/(1−γ): log1p(−(1−γ)(1−p_t)) where that is ≥ 1/2 (as γ → 1 a plain log's rounding
        # would be divided by 1 − γ), the log of the two positive terms' sum below (γ → 0 with p_t → 0)
        # (each branch takes a harmless argument where it is not used: torch.where's zero gradient times the unused
        # branch's infinite slope, e.g. log1p's at damped = 1 when γ < 3e-8 rounds 1 − γ to 1, would be NaN)
        damped = (1.0 - gamma_ce) * -torch.expm1(log_pt)
        near_one = damped <= 0.5
        mass = gamma_ce + (1.0 - gamma_ce) * torch.exp(log_pt)
        nll = torch.where(near_one, -torch.log1p(-torch.where(near_one, damped, 0.0)),
                          -torch.log(torch.where(near_one, 1.0, mass))) / (1.0 - gamma_ce)
    else:
        nll = -log_pt
    # torch's label smoothing: (1−ε)·NLL + (ε/C)·Σ_j −log p_j, and Σ_j −log p_j = C·lse − Σ_j z_j
    # (only when ε > 0: a −inf logit, e.g. a masked vocabulary tail, makes Σ_j z_j −inf, and 0·inf is NaN)
    loss = (1.0 - label_smoothing) * nll + z_loss * lse ** 2
    if c is not None:
        loss = loss * c[safe]
    if label_smoothing > 0:
        mean_weight = 1.0 if c is None else c.mean()
        loss = loss + label_smoothing * (mean_weight * lse - sum_logits / w.shape[0])
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce_rows(loss, valid, reduction, None if c is None else c[safe])


def _chunk_expectation(x, w_chunk, cost_chunk, lse):
    """Σ_j p_j·ê_j over one class chunk."""
    p = torch.exp(x @ w_chunk.t() - lse[:, None])
    return p @ F.normalize(cost_chunk, dim=1, eps=NORM_EPS)


def emo_rows(input, weight, target, cost_embedding=None, ignore_index=-100, class_chunk=CLASS_CHUNK):
    """Per-row (ce, emo) of DESIGN.md §4, 0 on ignored rows; the cost embedding is detached."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    cost = (weight if cost_embedding is None else cost_embedding).detach().to(acc)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    z_target = (x * w[safe]).sum(1)
    no_substitution = torch.full_like(target, -1)
    lse, _ = streamed_lse_and_sum(x, w, no_substitution, z_target, class_chunk=class_chunk)
    expected = sum(checkpoint(_chunk_expectation, x, w[c0:c0 + class_chunk], cost[c0:c0 + class_chunk], lse,
                              use_reentrant=False) for c0 in range(0, w.shape[0], class_chunk))
    emo = 1.0 - (expected * F.normalize(cost[safe], dim=1, eps=NORM_EPS)).sum(1)
    ce = lse - z_target
    zero = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), torch.where(valid, emo, zero)


def emo_loss(input, weight, target, *, cost_embedding=None, ignore_index=-100, reduction="mean",
             class_chunk=CLASS_CHUNK):
    _, emo = emo_rows(input, weight, target, cost_embedding, ignore_index, class_chunk)
    return reduce_rows(emo, target != ignore_index, reduction)


def emo_cross_entropy(input, weight, target, *, cost_embedding=None, ignore_index=-100, reduction="mean",
                      class_chunk=CLASS_CHUNK):
    """MLE-anchored EMO, per token: 0.5·(ce + sg(ce/(emo + 1e-10))·emo)."""
    ce, emo = emo_rows(input, weight, target, cost_embedding, ignore_index, class_chunk)
    return reduce_rows(0.5 * (ce + (ce / (emo + 1e-10)).detach() * emo), target != ignore_index, reduction)


def _tempered_logits(x, w, bias, softcap, temperature):
    """softcap(x·wᵀ + b)/T (the model's logits, then the sampler's temperature)."""
    z = x @ w.t() if bias is None else x @ w.t() + bias
    return (z if softcap is None else softcap * torch.tanh(z / softcap)) / temperature


def _chunk_lse(x, w_chunk, bias_chunk, softcap, temperature):
    return torch.logsumexp(_tempered_logits(x, w_chunk, bias_chunk, softcap, temperature), dim=1)


def _chunk_entropy(x, w_chunk, bias_chunk, softcap, temperature, lse):
    """Σ_j −p_j·log p_j over one class chunk (a p that underflows to 0 adds 0)."""
    log_p = _tempered_logits(x, w_chunk, bias_chunk, softcap, temperature) - lse[:, None]
    return -(log_p.exp() * log_p).sum(1)


def log_probs_and_entropy(input, weight, target, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100,
                          class_chunk=CLASS_CHUNK):
    """Per-row (log p_t, entropy) of p = softmax(softcap(input·weightᵀ + bias) / temperature), both 0 on ignored
    rows."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), weight.to(acc)
    b = None if bias is None else bias.to(acc)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    z_target = (x * w[safe]).sum(1) + (0.0 if b is None else b[safe])
    z_target = (z_target if softcap is None else softcap * torch.tanh(z_target / softcap)) / temperature
    chunks = [(w[c0:c0 + class_chunk], None if b is None else b[c0:c0 + class_chunk])
              for c0 in range(0, w.shape[0], class_chunk)]
    lse = torch.logsumexp(torch.stack([checkpoint(_chunk_lse, x, w_c, b_c, softcap, temperature, use_reentrant=False)
                                       for w_c, b_c in chunks]), dim=0)
    entropy = sum(checkpoint(_chunk_entropy, x, w_c, b_c, softcap, temperature, lse, use_reentrant=False)
                  for w_c, b_c in chunks)
    zero = torch.zeros_like(lse)
    return torch.where(valid, z_target - lse, zero), torch.where(valid, entropy, zero)


def _chunk_divergences(x, w_chunk, x_t, w_t_chunk, lse, lse_t):
    """Σ_j q_j·(log q_j − log p_j) and Σ_j p_j·(log p_j − log q_j) over one class chunk."""
    log_p = x @ w_chunk.t() - lse[:, None]
    log_q = x_t @ w_t_chunk.t() - lse_t[:, None]
    return (log_q.exp() * (log_q - log_p)).sum(1), (log_p.exp() * (log_p - log_q)).sum(1)


def _distillation_rows(input, weight, teacher_input, teacher_weight, target, temperature, ignore_index, class_chunk):
    """Both heads' rows scaled by 1/T in the accumulation dtype (the teacher's detached), the target (None: every row
    counts) and both log-sum-exps: (x, w, x_t, w_t, target, lse, lse^T)."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc) / temperature, weight.to(acc)
    x_t, w_t = teacher_input.detach().to(acc) / temperature, teacher_weight.detach().to(acc)
    if target is None:  # every row counts
        target = torch.full((x.shape[0],), int(ignore_index == 0), dtype=torch.int64, device=x.device)
    no_target = torch.full_like(target, -1)
    lse, _ = streamed_lse_and_sum(x, w, no_target, torch.zeros_like(x[:, 0]), class_chunk=class_chunk)
    lse_t, _ = streamed_lse_and_sum(x_t, w_t, no_target, torch.zeros_like(x[:, 0]), class_chunk=class_chunk)
    return x, w, x_t, w_t, target, lse, lse_t


def linear_kl_divergence(input, weight, teacher_input, teacher_weight, target=None, *, temperature=1.0,
                         direction="forward", ignore_index=-100, reduction="mean", class_chunk=CLASS_CHUNK):
    """KL(q‖p) ("forward") or KL(p‖q) ("reverse") per row, p = softmax(input·weightᵀ/T), q the teacher's
    (detached); 0 where target == ignore_index."""
    x, w, x_t, w_t, target, lse, lse_t = _distillation_rows(input, weight, teacher_input, teacher_weight, target,
                                                            temperature, ignore_index, class_chunk)
    which = 0 if direction == "forward" else 1
    kl = sum(checkpoint(_chunk_divergences, x, w[c0:c0 + class_chunk], x_t, w_t[c0:c0 + class_chunk], lse, lse_t,
                        use_reentrant=False)[which] for c0 in range(0, w.shape[0], class_chunk))
    valid = target != ignore_index
    return reduce_rows(torch.where(valid, kl, torch.zeros_like(kl)), valid, reduction)


def _chunk_jsd(x, w_chunk, x_t, w_t_chunk, lse, lse_t, beta):
    """β·Σ_j q_j·(log q_j − log m_j) + (1−β)·Σ_j p_j·(log p_j − log m_j) over one class chunk, log m as TRL's
    generalized_jsd_loss forms it (a log-sum-exp of the two weighted log-probabilities)."""
    log_p = x @ w_chunk.t() - lse[:, None]
    log_q = x_t @ w_t_chunk.t() - lse_t[:, None]
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    # 0·log 0 = 0, with no inf left in the unselected branches (whose zero gradient times inf would be NaN)
    p_in, q_in = log_p > -math.inf, log_q > -math.inf
    safe_m = torch.where(p_in | q_in, log_m, 0.0)
    kl_qm = torch.where(q_in, log_q.exp() * (torch.where(q_in, log_q, 0.0) - safe_m), 0.0).sum(1)
    kl_pm = torch.where(p_in, log_p.exp() * (torch.where(p_in, log_p, 0.0) - safe_m), 0.0).sum(1)
    return beta * kl_qm + (1.0 - beta) * kl_pm


def linear_jsd(input, weight, teacher_input, teacher_weight, target=None, *, beta=0.5, temperature=1.0,
               ignore_index=-100, reduction="mean", class_chunk=CLASS_CHUNK):
    """The generalized Jensen-Shannon divergence β·KL(q‖m) + (1−β)·KL(p‖m), m = (1−β)·p + β·q, per row, p the
    student's softmax(input·weightᵀ/T), q the teacher's (detached); β = 0 and 1 are forward and reverse KL (as TRL
    and Liger define the endpoints); 0 where target == ignore_index."""
    if beta in (0, 1):
        return linear_kl_divergence(input, weight, teacher_input, teacher_weight, target, temperature=temperature,
                                    direction="forward" if beta == 0 else "reverse", ignore_index=ignore_index,
                                    reduction=reduction, class_chunk=class_chunk)
    x, w, x_t, w_t, target, lse, lse_t = _distillation_rows(input, weight, teacher_input, teacher_weight, target,
                                                            temperature, ignore_index, class_chunk)
    jsd = sum(checkpoint(_chunk_jsd, x, w[c0:c0 + class_chunk], x_t, w_t[c0:c0 + class_chunk], lse, lse_t,
                         float(beta), use_reentrant=False) for c0 in range(0, w.shape[0], class_chunk))
    valid = target != ignore_index
    return reduce_rows(torch.where(valid, jsd, torch.zeros_like(jsd)), valid, reduction)


def linear_topk_kl_divergence(input, weight, teacher_token_ids, teacher_logits, target=None, *, temperature=1.0,
                              ignore_index=-100, reduction="mean", class_chunk=CLASS_CHUNK):
    """KL(q‖p) per row with q = softmax(teacher_logits/T) over the teacher's top-k tokens and p the student's softmax
    over every class (log p at the k tokens gathered from the student's logits); 0 where target == ignore_index."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc) / temperature, weight.to(acc)
    if target is None:  # every row counts
        target = torch.full((x.shape[0],), int(ignore_index == 0), dtype=torch.int64, device=x.device)
    no_target = torch.full_like(target, -1)
    lse, _ = streamed_lse_and_sum(x, w, no_target, torch.zeros_like(x[:, 0]), class_chunk=class_chunk)
    # q as a distribution over tokens: a token listed twice in a row counts with its summed probability (a sparse
    # (N, C) tensor's coalescing adds duplicates); 0·log 0 = 0
    ids = teacher_token_ids.long()
    q = torch.softmax(teacher_logits.detach().to(acc) / temperature, dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    merged = torch.sparse_coo_tensor(torch.stack([rows.flatten(), ids.flatten()]), q.flatten(),
                                     (ids.shape[0], w.shape[0]), check_invariants=True).coalesce()
    (n, c), big_q = merged.indices(), merged.values()
    log_p = (x[n] * w[c]).sum(-1) - lse[n]
    terms = torch.where(big_q == 0, 0.0, big_q * (torch.log(torch.where(big_q == 0, 1.0, big_q)) - log_p))
    kl = torch.zeros_like(lse).index_add(0, n, terms)
    valid = target != ignore_index
    return reduce_rows(torch.where(valid, kl, torch.zeros_like(kl)), valid, reduction)


def _log1p_masked_sum_exp(v, keep):
    """log(1 + Σ_{keep} e^v) down each column (pytorch-metric-learning's logsumexp(add_one=True)): a zero row
    appended stands for the 1."""
    v = torch.cat([v.masked_fill(~keep, -float("inf")), v.new_zeros((1, v.shape[1]))])
    return torch.logsumexp(v, dim=0)


def _proxy_anchor_chunk(x, w_chunk, is_positive, is_negative, margin, alpha):
    """(Σ positive terms, Σ negative terms) of a chunk of proxies."""
    cos = F.normalize(x, dim=1) @ F.normalize(w_chunk, dim=1).t()
    positive = _log1p_masked_sum_exp(-alpha * (cos - margin), is_positive)
    negative = _log1p_masked_sum_exp(alpha * (cos + margin), is_negative)
    return positive.sum(), negative.sum()


def proxy_anchor_loss(input, proxies, target, *, margin=0.1, alpha=32.0, ignore_index=-100, class_chunk=CLASS_CHUNK):
    """Proxy-Anchor (Kim et al. 2020) as its definition: per proxy, log(1 + Σ e^{−α(s − δ)}) over its positive rows
    (averaged over the proxies that have one) and log(1 + Σ e^{α(s + δ)}) over its negative rows (averaged over all C
    proxies); ignored rows are neither. Streamed over chunks of proxies under activation checkpointing."""
    acc = accumulation_dtype(input.dtype)
    x, w = input.to(acc), proxies.to(acc)
    valid = target != ignore_index
    positive = negative = x.new_zeros(())
    for c0 in range(0, w.shape[0], class_chunk):
        w_chunk = w[c0:c0 + class_chunk]
        classes = torch.arange(c0, c0 + w_chunk.shape[0], device=x.device)
        is_positive = (target[:, None] == classes[None, :]) & valid[:, None]
        is_negative = (target[:, None] != classes[None, :]) & valid[:, None]
        pos_c, neg_c = checkpoint(_proxy_anchor_chunk, x, w_chunk, is_positive, is_negative, margin, alpha,
                                  use_reentrant=False)
        positive, negative = positive + pos_c, negative + neg_c
    with_positives = torch.unique(target[valid]).numel()
    return positive / max(with_positives, 1) + negative / w.shape[0]
