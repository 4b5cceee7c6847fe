"""Margin-softmax cross-entropy (ArcFace, CosFace, SphereFace, L-Softmax, combined m1/m2/m3) on the engine.

Per row the loss is  lse − (1−ε)·T − (ε/C)·Σ_j z_j  with T the margin target logit (DESIGN.md §4):
    normalize=True:   z_j = s·x̂·ŵ_j,          T = s·ψ(c_y)
    normalize=False:  z_j = s·x·w_j,           T = s·‖x‖‖w_y‖·ψ(c_y)        (L-Softmax)
Everything here is O(N·D) per-row work; the O(N·C·D) work is the engine's.

Class sharding (marginkern.distributed): `w` may be one contiguous slice [start, start + len(w)) of the C
classes, described by a `ClassShard`. Each row's target geometry (c_y, ψ, T, the radial terms) is then
computed only where its target class lives ("owned" rows; every non-ignored row without sharding); the
shard merges the per-row statistics (lse, Σ_j z_j, T) across slices after the forward pass and sums the
partial dL/dx before the chain through x's normalisation. Every other step is the same code.

Hard negatives (CurricularFace, MV-Softmax): `hard_negatives` (3,) = (a, b, d) re-weights every non-target cosine c
above the row's target cosine ψ (eased toward c by λ when lambda_ > 0, as T is) into a·c² + b·c + d
(engine.HardNegatives holds it in logit units, threshold T); (4,) = (a, b, d, τ) does it above the fixed cosine τ
instead (insightface's inter-class filtering is (0, 0, 0, τ)).

Per-row margins (AdaFace, MagFace, ElasticFace): `row_margins` (N, 2) in the accumulation dtype holds offsets
(Δm2_n, Δm3_n) added to the options' m2 and m3 on row n; `row_margin_grads` gives the loss's gradient with respect
to them.
"""
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from .checks import check_bool, check_finite, check_ignore_index, check_margin_scalars, check_subcenters
from .engine import (NORM_EPS, HardNegatives, LogitSpec, accumulation_dtype, row_grad_finisher, row_norms,
                     streaming_grads, streaming_row_stats, target_columns)
from .margin import blend_psi, blend_slope, margin_psi, margin_psi_dm2, margin_slope


@dataclass(frozen=True)
class MarginOptions:
    scale: float
    m1: float
    m2: float
    m3: float
    normalize: bool
    exact_margin_grad: bool
    label_smoothing: float
    ignore_index: int
    subcenters: int = 1  # K sub-centres per class (sub-center ArcFace): w has K·C rows, class-major
    lambda_: float = 0.0  # A-Softmax's λ: the target's ψ eased toward the plain cosine (margin.blend_psi)

    @classmethod
    def of(cls, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index, subcenters=1,
           lambda_=0.0):
        """From plain arguments of any int/float kind (an op's, or the public API's), checked: the raw ops
        are public too (torch.ops.marginkern.*)."""
        check_margin_scalars(scale, m1, m2, m3, label_smoothing)
        check_finite("lambda_", lambda_, 0.0)
        normalize = check_bool("normalize", normalize)
        return cls(float(scale), float(m1), float(m2), float(m3), normalize,
                   check_bool("exact_margin_grad", exact_margin_grad), float(label_smoothing),
                   check_ignore_index(ignore_index), check_subcenters(subcenters, normalize), float(lambda_))


class ClassShard(Protocol):
    """`w` holds classes [start, start + len(w)) of num_classes; the other slices live elsewhere."""

    start: int
    num_classes: int

    def merge_row_stats(self, lse: Tensor, sum_logits: Optional[Tensor], target_logit: Tensor):
        """Per-row (lse, Σ_j z_j or None, T) over this slice (T = 0 on rows not owned here) → over all C."""

    def sum_input_grad(self, grad_x: Tensor) -> Tensor:
        """This slice's part of dL/dx (before the chain through x's normalisation) → the sum over slices."""

    def sum_rows(self, values: Tensor) -> Tensor:
        """A per-row value held by one slice (0 on the others, e.g. the target logit) → the sum over slices."""

    def max_rows(self, values: Tensor) -> Tensor:
        """A per-row maximum over this slice (the largest logit: token accuracy) → the maximum over slices."""


def local_columns(column: Tensor, start: int, num_local: int) -> Tensor:
    """Global target column → column within the slice [start, start + num_local), −1 when elsewhere."""
    here = (column >= start) & (column < start + num_local)
    return torch.where(here, column - start, -1)


@dataclass(frozen=True)
class TargetRows:
    """The forward's per-row target geometry, O(N)."""
    column: Tensor        # (N,) int64: the target's class within w; −1 where ignored or held by another slice
    # (N, 4) accumulation dtype: ‖x‖, ‖w_y‖, c_y, ψ(c_y), saved for the backward pass; with sub-centres
    # (N, 5): w_y is the target class's sub-centre of largest cosine, whose index k_y is the fifth column
    row_state: Tensor
    row_scale: Tensor     # (N,) the logits' row scale: s/‖x‖ (normalize) or s
    target_logit: Tensor  # (N,) T; 0 where column < 0


@dataclass(frozen=True)
class TargetGradRows:
    """The backward's per-row coefficients of the engine (streaming_grads), from the saved row state."""
    column: Tensor
    row_scale: Tensor
    target_logit: Tensor
    coef_p: Tensor        # g: the loss gradient, 0 on ignored rows
    coef_u: Tensor        # g·ε/C (label smoothing)
    target_grad: Tensor   # dL/da_y through the margin (chained through the norms when normalize)
    radial: Tensor        # normalize=False: s·(ψ − c·ψ')·dL/dT, the radial part of the norms' gradient; else 0


def _columns(target, opts: MarginOptions, class_start: Optional[int], num_local: int):
    """(valid, column) of target_columns, the column local to w's slice when sharded."""
    valid, column = target_columns(target, opts.ignore_index)
    if class_start is not None:
        column = local_columns(column, class_start, num_local)
    return valid, column


def _logit_terms(x_norm, w_target_norm, psi, owned, opts: MarginOptions):
    """(row scale, target logit T with 0 where the row's target is not in w)."""
    if opts.normalize:
        row_scale, target_logit = opts.scale / x_norm, opts.scale * psi
    else:
        row_scale = torch.full_like(x_norm, opts.scale)
        target_logit = opts.scale * x_norm * w_target_norm * psi
    return row_scale, torch.where(owned, target_logit, torch.zeros_like(target_logit))


def _gathered_target_rows(x, w, column):
    """(x, w_{column_n}) in the accumulation dtype, zero rows of w where column < 0."""
    acc = accumulation_dtype(x.dtype)
    return x.to(acc), w[column.clamp_min(0)].to(acc) * (column >= 0)[:, None]


def _winning_subcenters(xf, w, column, K, block_bytes=4 << 20):
    """(w's row of the target class's sub-centre with the largest cosine to x_n (the first of equal ones),
    that sub-centre's index k_y as a float) per row; by blocks of rows whose (rows, K, D) candidates fit
    block_bytes: O(block·K·D) memory, never N × C."""
    classes = w.unflatten(0, (-1, K))
    block = max(1, block_bytes // max(1, K * w.shape[1] * xf.element_size()))
    subcenter = torch.empty_like(column)
    for r0 in range(0, column.shape[0], block):
        candidates = classes[column[r0:r0 + block].clamp_min(0)].to(xf.dtype)  # (rows, K, D)
        norms = torch.linalg.vector_norm(candidates, dim=2).clamp_min(NORM_EPS)
        # NaN wins, as torch.max's
        subcenter[r0:r0 + block] = (torch.linalg.vecdot(candidates, xf[r0:r0 + block, None, :]) / norms).max(1).indices
    return column.clamp_min(0) * K + subcenter, subcenter.to(xf.dtype)


def row_margin_values(opts: MarginOptions, row_margins: Optional[Tensor]):
    """(m2, m3): the options' floats, or per-row tensors with the offsets of row_margins (N, 2) added."""
    if row_margins is None:
        return opts.m2, opts.m3
    return opts.m2 + row_margins[:, 0], opts.m3 + row_margins[:, 1]


def target_rows(x, w, target, opts: MarginOptions, class_start: Optional[int] = None,
                row_margins: Optional[Tensor] = None) -> TargetRows:
    """The forward's target geometry in PyTorch (~20 small ops; TritonTiles.margin_target_rows is one launch).
    class_start: where w's slice of the classes starts when sharded (None: w holds all classes, and the op
    has checked every target to be in [0, C) or ignored)."""
    K = opts.subcenters
    _, column = _columns(target, opts, class_start, w.shape[0] // K)
    if K == 1:
        xf, w_target = _gathered_target_rows(x, w, column)
    else:
        xf = x.to(accumulation_dtype(x.dtype))
        weight_row, subcenter = _winning_subcenters(xf, w, column, K)
        w_target = w[weight_row].to(xf.dtype) * (column >= 0)[:, None]
    x_norm = torch.linalg.vector_norm(xf, dim=1).clamp_min(NORM_EPS)
    w_target_norm = torch.linalg.vector_norm(w_target, dim=1).clamp_min(NORM_EPS)
    cosine = ((xf * w_target).sum(1) / (x_norm * w_target_norm)).clamp(-1.0, 1.0)
    m2, m3 = row_margin_values(opts, row_margins)
    psi = margin_psi(cosine, opts.m1, m2, m3)
    if opts.lambda_:
        psi = blend_psi(psi, cosine, opts.lambda_)
    row_scale, target_logit = _logit_terms(x_norm, w_target_norm, psi, column >= 0, opts)
    state = [x_norm, w_target_norm, cosine, psi] + ([] if K == 1 else [subcenter])
    return TargetRows(column, torch.stack(state, 1), row_scale, target_logit)


def _target_logit_grads(row_state, lse, grad_loss, target, opts: MarginOptions, num_classes: int, num_local: int,
                        class_start: Optional[int]):
    """(column, row scale, T, g = the loss gradient (0 on ignored rows), dL/dT) per row, from the row state's
    four geometry columns."""
    valid, column = _columns(target, opts, class_start, num_local)
    owned = column >= 0
    x_norm, w_target_norm, _, psi = row_state.unbind(1)
    row_scale, target_logit = _logit_terms(x_norm, w_target_norm, psi, owned, opts)
    eps = opts.label_smoothing
    g = torch.where(valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))
    # The target column's terms belong to the slice that holds it (only there is T known).
    p_target = torch.exp(target_logit - lse)
    grad_target_logit = torch.where(owned, g * (p_target - (1.0 - eps) - eps / num_classes), torch.zeros_like(g))
    return column, row_scale, target_logit, g, grad_target_logit


def target_grad_rows(row_state, lse, grad_loss, target, opts: MarginOptions, num_classes: int, num_local: int,
                     class_start: Optional[int] = None, row_margins: Optional[Tensor] = None) -> TargetGradRows:
    """The backward's per-row coefficients in PyTorch (TritonTiles.margin_target_grad_rows: one launch), from
    the row state's four geometry columns (margin_ce_backward leaves out a sub-centre index)."""
    column, row_scale, target_logit, g, grad_target_logit = _target_logit_grads(
        row_state, lse, grad_loss, target, opts, num_classes, num_local, class_start)
    x_norm, w_target_norm, cosine, psi = row_state.unbind(1)
    eps, s = opts.label_smoothing, opts.scale
    slope = margin_slope(cosine, opts.m1, row_margin_values(opts, row_margins)[0], opts.exact_margin_grad)
    if opts.lambda_:
        slope = blend_slope(slope, opts.lambda_)
    if opts.normalize:  # dT/da_y with the norms held fixed; the tangent projections chain through x̂ and ŵ
        target_grad = grad_target_logit * s * slope / (x_norm * w_target_norm)
        radial = torch.zeros_like(g)
    else:  # T = s·‖x‖‖w_y‖·ψ(c): the cross term through the target column, the radial terms by the caller
        target_grad = grad_target_logit * s * slope
        # masked, not just multiplied by dL/dT = 0: a row without its target here may hold a NaN ψ (a NaN margin)
        radial = torch.where(column >= 0, grad_target_logit * s * (psi - cosine * slope), 0.0)
    return TargetGradRows(column, row_scale, target_logit, g, g * (eps / num_classes), target_grad, radial)


def row_margin_grads(row_state, lse, grad_loss, target, opts: MarginOptions, num_classes: int,
                     row_margins: Tensor, num_local: Optional[int] = None, class_start: Optional[int] = None) -> Tensor:
    """dL/d(row_margins) (N, 2) for the per-row loss gradient grad_loss: dL/dT·dT/dm with T = r·ψ_λ, r = s
    (normalize) or s·‖x‖‖w_y‖, ∂ψ/∂m2 = −(−1)^k sin φ, ∂ψ/∂m3 = −1 and ψ_λ = (λc + ψ)/(1 + λ). The same with either
    margin_grad: straight-through concerns dψ/dc alone. O(N), in PyTorch on every backend. Sharded (class_start
    given, w holding num_local classes): 0 on the rows whose target lives elsewhere (ClassShard.sum_rows sums them)."""
    column, *_, grad_target_logit = _target_logit_grads(row_state[:, :4], lse, grad_loss, target, opts, num_classes,
                                                        num_classes if num_local is None else num_local, class_start)
    x_norm, w_target_norm, cosine, _ = row_state[:, :4].unbind(1)
    radius = opts.scale if opts.normalize else opts.scale * x_norm * w_target_norm
    grad_psi = grad_target_logit * radius / (1.0 + opts.lambda_)
    dpsi_dm2 = margin_psi_dm2(cosine, opts.m1, row_margin_values(opts, row_margins)[0])
    # masked: an ignored row's own (unused) margin may be NaN, and 0·NaN would be NaN
    return torch.where((column >= 0)[:, None], torch.stack([grad_psi * dpsi_dm2, -grad_psi], 1), 0.0)


def hard_negative_spec(hard_negatives: Optional[Tensor], target_logit: Tensor, target: Tensor, opts: MarginOptions,
                       shard: Optional[ClassShard] = None) -> Optional[HardNegatives]:
    """The engine's HardNegatives for cosine coefficients (a, b, d) (ops' (3,)), or (a, b, d, τ) (ops' (4,)): with
    z = s·c, s·(a·c² + b·c + d) = (a/s)·z² + b·z + d·s; the threshold is each row's T (sharded: summed from the slice
    that holds its target, one all-reduce of (N,) floats: the other slices' T is 0), or s·τ, and +inf on ignored rows
    (nothing is hard there)."""
    if hard_negatives is None:
        return None
    s = opts.scale
    a, b, d = hard_negatives[:3].unbind()
    if hard_negatives.shape[0] == 4:  # a fixed cosine threshold: no row's T needed
        threshold = (hard_negatives[3] * s).expand_as(target_logit)
    else:
        threshold = target_logit if shard is None else shard.sum_rows(target_logit)  # exact: one non-zero term a row
    threshold = torch.where(target != opts.ignore_index, threshold, torch.full_like(target_logit, float("inf")))
    return HardNegatives(torch.stack([a / s, b, d * s]), threshold, abs(s))


def _class_layout(w, shard: Optional[ClassShard], subcenters=1):
    """(first class held in w, total number of classes C)."""
    return (0, w.shape[0] // subcenters) if shard is None else (shard.start, shard.num_classes)


def margin_ce_forward(x, w, target, opts: MarginOptions, tiles, shard: Optional[ClassShard] = None,
                      keep_geometry: bool = False, row_margins: Optional[Tensor] = None,
                      hard_negatives: Optional[Tensor] = None):
    """Per-row loss (0 on ignored rows) and per-row log-sum-exp over all C classes, both in the
    accumulation dtype; with keep_geometry also the (row state, class norms) pair that margin_ce_backward
    takes as `saved`."""
    class_start, num_classes = _class_layout(w, shard, opts.subcenters)
    rows = getattr(tiles, "margin_target_rows", target_rows)(x, w, target, opts,
                                                              None if shard is None else class_start, row_margins)
    col_norm = row_norms(w).clamp_min(NORM_EPS) if opts.normalize else None
    # torch.reciprocal, not 1.0 / t: one op instead of two (reciprocal, then mul) on a host-bound small step
    spec = LogitSpec(rows.row_scale, None if col_norm is None else torch.reciprocal(col_norm), None, None,
                     rows.column, rows.target_logit, opts.subcenters,
                     hard_negatives=hard_negative_spec(hard_negatives, rows.target_logit, target, opts, shard))
    eps = opts.label_smoothing
    lse, sum_logits = streaming_row_stats(x, w, spec, eps > 0, tiles)
    target_logit = rows.target_logit
    if shard is not None:
        lse, sum_logits, target_logit = shard.merge_row_stats(lse, sum_logits, target_logit)
    loss = lse.sub(target_logit, alpha=1.0 - eps)
    if eps > 0:
        loss = loss.sub_(sum_logits, alpha=eps / num_classes)
    loss = torch.where(target != opts.ignore_index, loss, 0.0)
    if not keep_geometry:
        return loss, lse
    return loss, lse, rows.row_state, col_norm if col_norm is not None else lse.new_empty((0,))


def margin_ce_backward(grad_loss, x, w, target, lse, opts: MarginOptions, tiles, need_weight_grad=True,
                       shard: Optional[ClassShard] = None, saved=None, row_margins: Optional[Tensor] = None,
                       hard_negatives: Optional[Tensor] = None):
    """(dL/dx, dL/dw) for the per-row loss gradient `grad_loss`; with a shard, `lse` is the merged one
    and dL/dw is the gradient of this slice. `saved`: the forward's (row state, class norms)
    (margin_ce_forward's keep_geometry), recomputed when None."""
    K = opts.subcenters
    class_start, C = _class_layout(w, shard, K)
    local_start = None if shard is None else class_start
    if saved is None:
        row_state = getattr(tiles, "margin_target_rows", target_rows)(x, w, target, opts, local_start,
                                                                      row_margins).row_state
        col_norm = row_norms(w).clamp_min(NORM_EPS) if opts.normalize else None
    else:
        row_state, col_norm = saved
    rows = getattr(tiles, "margin_target_grad_rows", target_grad_rows)(
        row_state[:, :4], lse, grad_loss, target, opts, C, w.shape[0] // K, local_start, row_margins)
    # 1/‖w_j‖: the logits' column scale and the dW projection's inverse norm, one (K·C,) vector for both
    col_scale = torch.reciprocal(col_norm) if opts.normalize else None
    spec = LogitSpec(rows.row_scale, col_scale, None, None, rows.column, rows.target_logit, K,
                     None if K == 1 else row_state[:, 4].long(),
                     hard_negative_spec(hard_negatives, rows.target_logit, target, opts, shard))

    if opts.normalize:
        # dL/dw = (I − ŵŵᵀ)·(dL/dŵ)/‖w‖, and the engine's raw dW already holds (dL/dŵ)/‖w‖.
        tangent_projection, finalize_weight_chunk = (w, col_scale), None
    else:
        # The radial terms s·(ψ − cψ')·(‖w_y‖/‖x‖)·x (resp. w_y) of T = s·‖x‖‖w_y‖·ψ(c) are added here
        # (straight-through: ψ' := 1 in both, as DESIGN.md §4 says).
        x_norm, w_target_norm = row_state[:, 0], row_state[:, 1]
        xf, w_target = _gathered_target_rows(x, w, rows.column)
        w_radial = rows.radial * x_norm / w_target_norm
        tangent_projection = None

        def finalize_weight_chunk(c0, c1, grad_w_raw):
            # masked instead of nonzero(): no host sync per chunk
            in_chunk = (rows.column >= c0) & (rows.column < c1)
            rows_in_chunk = (rows.column - c0).clamp(0, c1 - c0 - 1)
            contribution = torch.where(in_chunk, w_radial, torch.zeros_like(w_radial))[:, None] * w_target
            return grad_w_raw.index_add_(0, rows_in_chunk, contribution.to(grad_w_raw.dtype))

    grad_x_raw, grad_w, _ = streaming_grads(
        x, w, spec, lse, rows.coef_p, rows.coef_u, rows.target_grad, tiles, finalize_weight_chunk,
        need_weight_grad=need_weight_grad, tangent_projection=tangent_projection)

    if not opts.normalize:  # the radial x term, before the sum over slices: it is counted once, by the owner
        grad_x_raw = grad_x_raw + (rows.radial * w_target_norm / x_norm)[:, None] * xf
    if shard is not None:
        grad_x_raw = shard.sum_input_grad(grad_x_raw)
    # dL/dx = (I − x̂x̂ᵀ)·(dL/dx̂)/‖x‖ (the raw dX holds (dL/dx̂)/‖x‖), stored in x's dtype: one fused pass
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    projection = (x, torch.reciprocal(row_state[:, 0])) if opts.normalize else ()
    row_grad_finisher(tiles)(grad_x_raw, grad_x_raw.new_ones(()), grad_x, *projection)
    return grad_x, grad_w
