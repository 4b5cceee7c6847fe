"""In-batch contrastive losses over very large batches, without the B × M similarity matrix.

- `info_nce_loss`: softmax cross-entropy of each query against every key, its own key the class (InfoNCE; CLIP's
  loss, sentence-transformers' MultipleNegativesRankingLoss and its symmetric variant), on marginkern.info_nce: one
  pass over chunks of keys, both directions of the symmetric loss from each chunk's one GEMM.
- `siglip_loss`: SigLIP's sigmoid loss over every (query, key) pair, on marginkern.siglip.
- `supcon_loss`: supervised contrastive learning's loss (SupCon; with no labels SimCLR's NT-Xent) over every view of
  the batch, on marginkern.supcon: each row's log-sum-exp over all rows but itself and its positives' mean logit from
  the same pass.

All three take the rows as they are (16-bit stays 16-bit for the GEMMs) with fp32 logit scales per row and per key:
the temperature over each query's norm, one over each key's (`_logit_scales`, differentiable, so autograd carries the
scales' gradients to the norms and a learned temperature). Unit rows rounded back to 16-bit would be up to 0.4 logit
units off at scale 100 in bf16.

With a process group, each rank scores its own queries against the keys of every rank (gathered with their
gradient, distributed.gather_rows_summing_grads): open_clip's local_loss=True, gather_with_grad=True. The loss is
this rank's; DDP's averaging of the gradients then makes them those of the mean over the ranks' losses.
"""
import torch
from torch import nn

from .checks import check_bool, check_finite, check_float_tensor, check_reduction, check_tensor
from .engine import NORM_EPS, accumulation_dtype, row_norms
from .ops import call as call_op
from .process_groups import SharesProcessGroup
from .reference import reduce_rows


def _check_pair(query, key):
    check_float_tensor("query", query, dim=2)
    check_float_tensor("key", key, dim=2)
    if key.shape[1] != query.shape[1] or key.dtype != query.dtype or key.device != query.device:
        hint = "" if key.dtype == query.dtype else (
            "; cast one to the other's dtype (InfoNCELoss and SigLIPLoss cast both to the wider one, e.g. an fp32 and a "
            "bf16 encoder output under autocast)")
        raise ValueError(f"key must be (M, D={query.shape[1]}) of query's dtype and device, got "
                         f"{tuple(key.shape)} {key.dtype} {key.device} vs query {tuple(query.shape)} {query.dtype} "
                         f"{query.device}{hint}")
    if key.shape[0] < max(1, query.shape[0]):
        raise ValueError(f"key must hold at least one row, and one per query (key i is query i's positive): got "
                         f"{key.shape[0]} keys for {query.shape[0]} queries")


def _check_scalar_or_tensor(name, value, device, low=None):
    """A Python number (finite, > low when given) or a 0-dim floating-point tensor on `device` (a learned one)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point or value.device != device:
            raise ValueError(f"{name} must be a number or a 0-dim floating-point tensor on {device}, got a "
                             f"{tuple(value.shape)} {value.dtype} tensor on {value.device}")
        return value
    if low is None:
        check_finite(name, value)
    else:
        check_finite(name, value, low, low_open=True)
    return float(value)


def _gathered(local, group):
    """(local gathered from every rank with its gradient, this rank's row offset in it); (local, 0) without a group."""
    if group is None:
        return local, 0
    from .distributed import _rank_and_world_size, gather_rows_summing_grads
    rank, _ = _rank_and_world_size(group)
    return gather_rows_summing_grads(local, group), rank * local.shape[0]


def _positives(rows, offset, device):
    return torch.arange(offset, offset + rows, device=device)


def _logit_scales(t, scale, normalize):
    """(rows,) fp32 (fp64 for fp64) factor of each row's logits: scale/max(‖t_i‖, ε) (F.normalize's), or scale
    without normalize; differentiable in t and in a tensor scale."""
    acc = accumulation_dtype(t.dtype)
    if normalize:
        factor = row_norms(t).clamp_min(NORM_EPS).reciprocal()  # by blocks of rows on the CPU: no fp32 copy
    else:
        factor = torch.ones(t.shape[0], dtype=acc, device=t.device)
    if isinstance(scale, torch.Tensor):
        return factor * scale.to(acc)
    return factor * scale if scale != 1.0 else factor


def _info_nce_rows(rows, keys, offset, scale, margin, label_smoothing, normalize, symmetric=False):
    """Each row's loss from the info_nce op (symmetric: the pair's two directions' mean)."""
    return call_op("info_nce", rows, keys, _logit_scales(rows, scale, normalize), _logit_scales(keys, 1.0, normalize),
                   offset, symmetric, float(scale * margin) if margin else 0.0, float(label_smoothing))[0]


def info_nce_loss(query, key, *, scale=20.0, symmetric=False, margin=0.0, label_smoothing=0.0, normalize=True,
                  reduction="mean", group=None):
    """In-batch contrastive cross-entropy (InfoNCE) without the B × M similarity matrix.

    query (B, D), key (M, D) with M ≥ B, one float dtype: key i is query i's positive and every other key a negative
    (rows B.. are extra hard negatives: sentence-transformers' MultipleNegativesRankingLoss takes cat(positives,
    negatives) so). Logits scale·cos(query_i, key_j) (normalize=False: scale·query_i·key_j); margin m (AM-softmax,
    LaBSE's additive margin) lowers the positive's to scale·(cos − m) (scale·(dot − m)). label_smoothing as torch's,
    over the M keys. Each direction's loss is exact for confident pairs (kept as log(1 + Σ e^{z − t}), not lse − t).

    scale: a float (MNRL's 20), or a 0-dim tensor that gets its gradient (CLIP's `logit_scale.exp()`; a margin then
    is not offered). symmetric=True: the mean of the query→key loss and the loss of the B positive keys against the
    queries (CLIP's loss, MultipleNegativesSymmetricRankingLoss).
    group: a process group; each rank passes its own (B, D) and (M, D) (the same B and M on every rank) and scores
    its queries against every rank's keys (and its positives against every rank's queries): open_clip's
    local_loss=True with gather_with_grad=True. The result is this rank's loss; every rank must run backward.

    Returns fp32 (fp64 for fp64 inputs): the mean over the B queries, the sum, or "none": (B,), each query's loss
    (symmetric: the two directions' mean for pair i).
    """
    _check_pair(query, key)
    scale = _check_scalar_or_tensor("scale", scale, query.device, low=0.0)
    check_finite("margin", margin)
    check_finite("label_smoothing", label_smoothing, 0.0, 1.0)
    symmetric, normalize = check_bool("symmetric", symmetric), check_bool("normalize", normalize)
    check_reduction(reduction)
    if margin != 0.0 and isinstance(scale, torch.Tensor):
        raise ValueError(f"margin needs a float scale (it enters the op as scale·margin, a number), got margin={margin} "
                         "with a tensor scale")
    B, margin, label_smoothing = query.shape[0], float(margin), float(label_smoothing)
    if symmetric and group is None:  # both directions from one pass over the keys
        loss = _info_nce_rows(query, key, 0, scale, margin, label_smoothing, normalize, symmetric=True)
    else:
        keys, key_offset = _gathered(key, group)
        loss = _info_nce_rows(query, keys, key_offset, scale, margin, label_smoothing, normalize)
        if symmetric:  # this rank's positive keys against every rank's queries: not the transpose of the above
            queries, query_offset = _gathered(query, group)
            loss = (loss + _info_nce_rows(key[:B], queries, query_offset, scale, margin, label_smoothing,
                                          normalize)) / 2
    return reduce_rows(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def siglip_loss(query, key, *, scale=10.0, bias=-10.0, normalize=True, reduction="mean", group=None):
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) over every (query, key) pair without the B × M logits:

        L = 1/B Σ_i Σ_j log(1 + e^{−y_ij·(scale·cos(query_i, key_j) + bias)}),   y_ij = 1 for j = i, −1 otherwise

    (big_vision's and open_clip's SigLipLoss: the sum over keys, the mean over queries). query (B, D), key (M, D)
    with M ≥ B, one float dtype; keys B.. are negatives of every query. normalize=False: scale·query_i·key_j.
    scale and bias: floats, or 0-dim tensors that get their gradients (SigLIP learns both, from t' = log 10 with
    scale = exp(t'), and b = −10).
    group: a process group; each rank scores its queries against every rank's keys (gathered with gradient; the other
    ranks' keys are negatives): the same pairs as open_clip's neighbour exchange, with every rank's keys in memory at
    once. The result is this rank's loss; every rank must run backward.

    Returns fp32 (fp64 for fp64 inputs): the mean over the B queries of their sums, the sum, or "none": (B,).
    Streamed over chunks of keys (marginkern.siglip): 4 GEMMs and O(B + M) saved state, the inputs' rows as they are
    (fp32 logit scales: 16-bit rows are not rounded again as scaled unit rows).
    """
    _check_pair(query, key)
    scale = _check_scalar_or_tensor("scale", scale, query.device, low=0.0)
    bias = _check_scalar_or_tensor("bias", bias, query.device)
    normalize = check_bool("normalize", normalize)
    check_reduction(reduction)
    B = query.shape[0]
    keys, key_offset = _gathered(key, group)
    if not isinstance(bias, torch.Tensor):
        bias = torch.tensor(bias, dtype=accumulation_dtype(query.dtype), device=query.device)
    loss, _ = call_op("siglip", query, keys, _positives(B, key_offset, query.device), bias,
                      _logit_scales(query, scale, normalize), _logit_scales(keys, 1.0, normalize))
    return reduce_rows(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def _dense_class_ids(labels):
    """Each label's index among the distinct labels, in sorted order, without a host sync (torch.unique would sync on
    CUDA): (N,) int64 in [0, N)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.ones_like(sorted_labels, dtype=torch.long)
    starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    ids = torch.empty_like(order)
    ids[order] = torch.cumsum(starts, 0) - 1
    return ids


def supcon_loss(features, labels=None, *, temperature=0.07, base_temperature=0.07, contrast_mode="all", normalize=True,
                reduction="mean", group=None):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020; the official SupConLoss), with labels=None SimCLR's
    NT-Xent, without the N × N similarity matrix:

        L_i = (τ/τ_base)·(log Σ_{a≠i} e^{z_ia} − 1/|P(i)| Σ_{p∈P(i)} z_ip),   z_ia = cos(x_i, x_a)/τ

    over the N rows (every view of every sample; contrast_mode="one": over the first view's bsz rows, each scored
    against all N, as the official code's), P(i) the other rows of row i's label (0 where it has none, as the
    official code). features (bsz, n_views, ...) as the official code takes them (trailing dimensions flattened; rows
    in its order: view-major), labels (bsz,) or (bsz, 1) integer or None (each sample its own class: the views of one
    sample are each other's positives); or features (N, D) with labels (N,). normalize=True (the default) normalises
    the rows; the official code expects normalised features and does not: normalize=False is its arithmetic on raw
    ones, z = x_i·x_a/τ. Both terms come from one pass over the same logits (marginkern.supcon), so a confident
    pair's loss (NT-Xent: log1p of the negatives' share) is not the difference of two numbers of size 1/τ.
    group: a process group; each rank passes its own batch (the same shape on every rank), its rows are scored against
    every rank's (gathered with gradient). The result is this rank's loss; every rank must run backward.

    Returns fp32 (fp64 for fp64 inputs): the mean over the N rows (bsz for contrast_mode="one"), the sum, or "none":
    (N,) ((bsz,)).
    """
    check_float_tensor("features", features)
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    if features.dim() > 3:  # the official code's features.view(bsz, n_views, -1)
        features = features.reshape(features.shape[0], features.shape[1], -1)
    if labels is not None and labels.dim() == 2 and labels.shape[1] == 1:  # the official code's (bsz, 1) labels
        labels = labels.reshape(-1)
    if features.dim() == 3:
        bsz, n_views, D = features.shape
        if labels is None:  # each sample its own class, distinct across the ranks of a group
            first = 0
            if group is not None:
                from .distributed import _rank_and_world_size
                first = _rank_and_world_size(group)[0] * bsz
            labels = torch.arange(first, first + bsz, device=features.device)
        rows = features.transpose(0, 1).reshape(bsz * n_views, D)  # torch.cat(torch.unbind(features, 1))
        expected = (bsz,)
    elif features.dim() == 2:
        if labels is None:
            raise ValueError("labels must be given for (N, D) features; SimCLR's pairing of views needs features "
                             "shaped (bsz, n_views, D)")
        if contrast_mode == "one":
            raise ValueError("contrast_mode='one' takes its anchors from the first view: features must be shaped "
                             f"(bsz, n_views, ...), got shape {tuple(features.shape)}")
        rows, n_views, expected = features, 1, (features.shape[0],)
    else:
        raise ValueError(f"features must be (bsz, n_views, ...) or (N, D), got shape {tuple(features.shape)}")
    check_tensor("labels", labels)
    if tuple(labels.shape) != expected or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.device != features.device:
        raise ValueError(f"labels must be an integer {expected} tensor on {features.device}, got a "
                         f"{tuple(labels.shape)} {labels.dtype} tensor on {labels.device}")
    check_finite("temperature", temperature, 0.0, low_open=True)
    check_finite("base_temperature", base_temperature, 0.0, low_open=True)
    normalize = check_bool("normalize", normalize)
    check_reduction(reduction)
    labels = labels.long().repeat(n_views)
    keys, offset = _gathered(rows, group)
    all_labels = labels
    if group is not None:
        from .distributed import _all_gather_cat
        all_labels = _all_gather_cat(labels, group)
    key_class = _dense_class_ids(all_labels)
    # "one": the first view's rows are the first bsz of the view-major rows, anchor i's own key still offset + i
    anchors = rows if contrast_mode == "all" else rows[:features.shape[0]]
    loss = call_op("supcon", anchors, keys, _logit_scales(anchors, 1.0 / temperature, normalize),
                   _logit_scales(keys, 1.0, normalize), key_class[offset:offset + anchors.shape[0]].contiguous(),
                   key_class, offset)[0]
    loss = loss * (temperature / base_temperature)
    return reduce_rows(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def _in_wider_dtype(query, key):
    """query and key in the wider of their float dtypes (two encoders' outputs under autocast may differ: a final
    LayerNorm runs in fp32); the functions refuse the mix."""
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dtype != key.dtype
            and query.is_floating_point() and key.is_floating_point()):
        wider = torch.promote_types(query.dtype, key.dtype)
        return query.to(wider), key.to(wider)
    return query, key


class InfoNCELoss(SharesProcessGroup, nn.Module):
    """`info_nce_loss` as a module: forward(query, key). learnable_scale=True learns log(scale) (CLIP's logit_scale,
    initialised at log(scale): CLIP's scale is 1/0.07); clamp it as CLIP does after each optimiser step, e.g.
    `loss_fn.log_scale.data.clamp_(max=math.log(100))`."""

    def __init__(self, scale=20.0, *, learnable_scale=False, symmetric=False, margin=0.0, label_smoothing=0.0,
                 normalize=True, reduction="mean", group=None):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        check_finite("scale", scale, 0.0, low_open=True)
        check_finite("margin", margin)
        check_finite("label_smoothing", label_smoothing, 0.0, 1.0)
        symmetric, normalize = check_bool("symmetric", symmetric), check_bool("normalize", normalize)
        self.learnable_scale = check_bool("learnable_scale", learnable_scale)
        if self.learnable_scale and margin:
            raise ValueError("learnable_scale=True cannot take a margin (the margin enters as scale·margin, a number); "
                             f"got margin={margin}")
        if self.learnable_scale:
            self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())
        else:
            self.scale = float(scale)
        self.symmetric, self.margin, self.label_smoothing = symmetric, margin, label_smoothing
        self.normalize, self.group = normalize, group

    def forward(self, query, key):
        scale = self.log_scale.exp() if self.learnable_scale else self.scale
        query, key = _in_wider_dtype(query, key)
        return info_nce_loss(query, key, scale=scale, symmetric=self.symmetric, margin=self.margin,
                             label_smoothing=self.label_smoothing, normalize=self.normalize, reduction=self.reduction,
                             group=self.group)

    def extra_repr(self):
        scale = "learnable" if self.learnable_scale else f"scale={self.scale}"
        return (f"{scale}, symmetric={self.symmetric}, margin={self.margin}, label_smoothing={self.label_smoothing}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")


class SigLIPLoss(SharesProcessGroup, nn.Module):
    """`siglip_loss` as a module: forward(query, key). learnable=True (SigLIP's) learns log(scale) and the bias from
    their initial values (log 10 and −10)."""

    def __init__(self, scale=10.0, bias=-10.0, *, learnable=True, normalize=True, reduction="mean", group=None):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        check_finite("scale", scale, 0.0, low_open=True)
        check_finite("bias", bias)
        normalize = check_bool("normalize", normalize)
        self.learnable = check_bool("learnable", learnable)
        if self.learnable:
            self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.scale, self.bias = float(scale), float(bias)
        self.normalize, self.group = normalize, group

    def forward(self, query, key):
        scale = self.log_scale.exp() if self.learnable else self.scale
        query, key = _in_wider_dtype(query, key)
        return siglip_loss(query, key, scale=scale, bias=self.bias, normalize=self.normalize, reduction=self.reduction,
                           group=self.group)

    def extra_repr(self):
        return ("learnable" if self.learnable else f"scale={self.scale}, bias={self.bias}") + \
            f", normalize={self.normalize}, reduction={self.reduction!r}"


class SupConLoss(SharesProcessGroup, nn.Module):
    """`supcon_loss` as a module (the official SupConLoss's arguments and defaults): forward(features, labels=None)."""

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07, *, normalize=True,
                 reduction="mean", group=None):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        check_finite("temperature", temperature, 0.0, low_open=True)
        check_finite("base_temperature", base_temperature, 0.0, low_open=True)
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        self.temperature, self.base_temperature = float(temperature), float(base_temperature)
        self.contrast_mode = contrast_mode
        self.normalize, self.group = check_bool("normalize", normalize), group

    def forward(self, features, labels=None):
        return supcon_loss(features, labels, temperature=self.temperature, base_temperature=self.base_temperature,
                           contrast_mode=self.contrast_mode, normalize=self.normalize, reduction=self.reduction,
                           group=self.group)

    def extra_repr(self):
        return (f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
                f"base_temperature={self.base_temperature}, normalize={self.normalize}, reduction={self.reduction!r}")
