"""In-batch contrastive losses over very large batches, without the B × M similarity matrix.

- `info_nce_loss`: softmax cross-entropy of each query against every key, its own key the class (InfoNCE; CLIP's
  loss, sentence-transformers' MultipleNegativesRankingLoss and its symmetric variant). It is a margin (CosFace)
  cross-entropy with the keys as class centres, so it runs on the margin engine (a float scale: the normalisations
  fused in) or on linear CE of the scaled unit queries (a learned scale, a tensor: its gradient comes through them).
- `siglip_loss`: SigLIP's sigmoid loss over every (query, key) pair, on its own chunked epilogue (marginkern.siglip).

With a process group, each rank scores its own queries against the keys of every rank (gathered with their
gradient, distributed.gather_rows_summing_grads): open_clip's local_loss=True, gather_with_grad=True. The loss is
this rank's; DDP's averaging of the gradients then makes them those of the mean over the ranks' losses.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_finite, check_float_tensor, check_reduction
from .engine import accumulation_dtype
from .functional import linear_cross_entropy, margin_cross_entropy
from .ops import call as call_op
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
    if key.shape[0] < query.shape[0]:
        raise ValueError(f"key must hold at least one row per query (key i is query i's positive): got "
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


def _unit_rows(t, normalize):
    return F.normalize(t, dim=1) if normalize else t


def _scaled_queries(query, scale, normalize):
    """scale·query (its unit rows with normalize) in query's dtype: a learned scale's gradient comes through it."""
    return (_unit_rows(query, normalize) * scale).to(query.dtype)


def _info_nce_rows(rows, classes, positive, scale, margin, label_smoothing, normalize):
    if isinstance(scale, float) and normalize:  # the margin engine: norms and scale fused, no scaled copy
        return margin_cross_entropy(rows, classes, positive, scale=scale, m1=1.0, m2=0.0, m3=margin,
                                    label_smoothing=label_smoothing, reduction="none")
    return linear_cross_entropy(_scaled_queries(rows, scale, normalize), _unit_rows(classes, normalize), positive,
                                label_smoothing=label_smoothing, reduction="none")


def info_nce_loss(query, key, *, scale=20.0, symmetric=False, margin=0.0, label_smoothing=0.0, normalize=True,
                  reduction="mean", group=None):
    """In-batch contrastive cross-entropy (InfoNCE) without the B × M similarity matrix.

    query (B, D), key (M, D) with M ≥ B, one float dtype: key i is query i's positive and every other key a negative
    (rows B.. are extra hard negatives: sentence-transformers' MultipleNegativesRankingLoss takes cat(positives,
    negatives) so). Logits scale·cos(query_i, key_j) (normalize=False: scale·query_i·key_j); margin m (AM-softmax,
    LaBSE's additive margin) lowers the positive's to scale·(cos − m). label_smoothing as torch's, over the M keys.

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
    if margin != 0.0 and not (isinstance(scale, float) and normalize):
        raise ValueError("margin needs a float scale and normalize=True (the margin is in cosine units, applied by the "
                         f"margin engine); got margin={margin} with "
                         + ("a tensor scale" if isinstance(scale, torch.Tensor) else "normalize=False"))
    B = query.shape[0]
    if symmetric and group is None:  # both directions from one pass over the keys (marginkern.symmetric_info_nce)
        loss = call_op("symmetric_info_nce", _scaled_queries(query, scale, normalize), _unit_rows(key, normalize),
                       float(scale * margin) if margin else 0.0, float(label_smoothing))[0]
        return reduce_rows(loss, torch.ones_like(loss, dtype=torch.bool), reduction)
    keys, key_offset = _gathered(key, group)
    loss = _info_nce_rows(query, keys, _positives(B, key_offset, query.device), scale, float(margin),
                          float(label_smoothing), normalize)
    if symmetric:
        queries, query_offset = _gathered(query, group)
        backward = _info_nce_rows(key[:B], queries, _positives(B, query_offset, query.device), scale, float(margin),
                                  float(label_smoothing), normalize)
        loss = (loss + backward) / 2
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
    Streamed over chunks of keys (marginkern.siglip): 4 GEMMs and O(B) saved state besides the unit rows.
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
    loss, _ = call_op("siglip", _scaled_queries(query, scale, normalize), _unit_rows(keys, normalize),
                      _positives(B, key_offset, query.device), bias)
    return reduce_rows(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def _in_wider_dtype(query, key):
    """query and key in the wider of their float dtypes (two encoders' outputs under autocast may differ: a final
    LayerNorm runs in fp32); the functions refuse the mix."""
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dtype != key.dtype
            and query.is_floating_point() and key.is_floating_point()):
        wider = torch.promote_types(query.dtype, key.dtype)
        return query.to(wider), key.to(wider)
    return query, key


class InfoNCELoss(nn.Module):
    """`info_nce_loss` as a module: forward(query, key). learnable_scale=True learns log(scale) (CLIP's logit_scale,
    initialised at log(scale): CLIP's scale is 1/0.07); clamp it as CLIP does after each optimiser step, e.g.
    `loss_fn.log_scale.data.clamp_(max=math.log(100))`."""

    def __init__(self, scale=20.0, *, learnable_scale=False, symmetric=False, margin=0.0, label_smoothing=0.0,
                 normalize=True, group=None):
        super().__init__()
        check_finite("scale", scale, 0.0, low_open=True)
        self.learnable_scale = check_bool("learnable_scale", learnable_scale)
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
                             label_smoothing=self.label_smoothing, normalize=self.normalize, group=self.group)

    def extra_repr(self):
        scale = "learnable" if self.learnable_scale else f"scale={self.scale}"
        return (f"{scale}, symmetric={self.symmetric}, margin={self.margin}, label_smoothing={self.label_smoothing}, "
                f"normalize={self.normalize}")


class SigLIPLoss(nn.Module):
    """`siglip_loss` as a module: forward(query, key). learnable=True (SigLIP's) learns log(scale) and the bias from
    their initial values (log 10 and −10)."""

    def __init__(self, scale=10.0, bias=-10.0, *, learnable=True, normalize=True, group=None):
        super().__init__()
        check_finite("scale", scale, 0.0, low_open=True)
        check_finite("bias", bias)
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
        return siglip_loss(query, key, scale=scale, bias=self.bias, normalize=self.normalize, group=self.group)

    def extra_repr(self):
        return ("learnable" if self.learnable else f"scale={self.scale}, bias={self.bias}") + \
            f", normalize={self.normalize}"
