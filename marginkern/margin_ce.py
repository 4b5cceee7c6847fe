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
"""
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from .engine import (NORM_EPS, LogitSpec, accumulation_dtype, row_grad_finisher, row_norms, streaming_grads,
                     streaming_row_stats, target_columns)
from .margin import margin_psi, margin_slope


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

    @classmethod
    def of(cls, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index):
        """From plain arguments of any int/float kind (an op's, or the public API's)."""
        return cls(float(scale), float(m1), float(m2), float(m3), bool(normalize), bool(exact_margin_grad),
                   float(label_smoothing), int(ignore_index))


class ClassShard(Protocol):
    """`w` holds classes [start, start + len(w)) of num_classes; the other slices live elsewhere."""

    start: int
    num_classes: int

    def merge_row_stats(self, lse: Tensor, sum_logits: Optional[Tensor], target_logit: Tensor):
        """Per-row (lse, Σ_j z_j or None, T) over this slice (T = 0 on rows not owned here) → over all C."""

    def sum_input_grad(self, grad_x: Tensor) -> Tensor:
        """This slice's part of dL/dx (before the chain through x's normalisation) → the sum over slices."""


def local_columns(column: Tensor, start: int, num_local: int) -> Tensor:
    """Global target column → column within the slice [start, start + num_local), −1 when elsewhere."""
    here = (column >= start) & (column < start + num_local)
    return torch.where(here, column - start, -1)


class _TargetGeometry:
    """Per-row quantities of the target column. The forward pass computes them and hands `saved()` (an
    (N, 4) row state and the (C,) class-centre norms, O(N + C)) to the backward pass, which would otherwise
    read all of W again for the norms and launch the same ~20 small per-row ops twice.

    Rows whose target is not in `w` (ignored rows, or held by another shard) get w_y = 0 and T = 0:
    finite placeholders that the callers mask out.
    """

    def __init__(self, x, w, target, opts: MarginOptions, class_start: Optional[int] = None, saved=None):
        """class_start: where w's slice of the classes starts when sharded (None: w holds all classes, and
        the op has checked every target to be in [0, C) or ignored)."""
        acc = accumulation_dtype(x.dtype)
        self._w = w
        self.valid, global_column = target_columns(target, opts.ignore_index)
        if class_start is None:
            self.column = global_column
        else:
            self.column = local_columns(global_column, class_start, w.shape[0])
        self.owned = self.column >= 0
        self._x, self._acc = x, acc
        self._xf = self._w_target = None
        if saved is None:
            self.x_norm = torch.linalg.vector_norm(self.xf, dim=1).clamp_min(NORM_EPS)
            self.w_target_norm = torch.linalg.vector_norm(self.w_target, dim=1).clamp_min(NORM_EPS)
            dot = (self.xf * self.w_target).sum(1)
            self.cosine = (dot / (self.x_norm * self.w_target_norm)).clamp(-1.0, 1.0)
            self.psi = margin_psi(self.cosine, opts.m1, opts.m2, opts.m3)
            self.col_norm = row_norms(w).clamp_min(NORM_EPS) if opts.normalize else None
        else:
            row_state, col_norm = saved
            self.x_norm, self.w_target_norm, self.cosine, self.psi = row_state.unbind(1)
            self.col_norm = col_norm if opts.normalize else None
        # 1/‖w_j‖: the logits' column scale and the dW projection's inverse norm, one (C,) vector for both
        self.col_scale = None if self.col_norm is None else 1.0 / self.col_norm
        if opts.normalize:
            self.row_scale = opts.scale / self.x_norm
            target_logit = opts.scale * self.psi
        else:
            self.row_scale = torch.full_like(self.x_norm, opts.scale)
            target_logit = opts.scale * self.x_norm * self.w_target_norm * self.psi
        self.target_logit = torch.where(self.owned, target_logit, torch.zeros_like(target_logit))

    @property
    def xf(self):
        """x in the accumulation dtype, made on first use (the normalised backward never needs it)."""
        if self._xf is None:
            self._xf = self._x.to(self._acc)
        return self._xf

    @property
    def w_target(self):
        """w_{y_n} in the accumulation dtype (zeros where this slice holds no target), gathered on first use."""
        if self._w_target is None:
            self._w_target = self._w[self.column.clamp_min(0)].to(self._acc) * self.owned[:, None]
        return self._w_target

    def saved(self):
        """What the backward pass needs from this forward geometry: ((N, 4) row state, (C,) norms or (0,))."""
        row_state = torch.stack([self.x_norm, self.w_target_norm, self.cosine, self.psi], 1)
        col_norm = self.col_norm if self.col_norm is not None else self.x_norm.new_empty((0,))
        return row_state, col_norm

    def spec(self):
        return LogitSpec(self.row_scale, self.col_scale, None, None, self.column, self.target_logit)


def _class_layout(w, shard: Optional[ClassShard]):
    """(first class held in w, total number of classes C)."""
    return (0, w.shape[0]) if shard is None else (shard.start, shard.num_classes)


def margin_ce_forward(x, w, target, opts: MarginOptions, tiles, shard: Optional[ClassShard] = None,
                      keep_geometry: bool = False):
    """Per-row loss (0 on ignored rows) and per-row log-sum-exp over all C classes, both in the
    accumulation dtype; with keep_geometry also the (row state, class norms) pair that margin_ce_backward
    takes as `saved` (_TargetGeometry.saved)."""
    class_start, num_classes = _class_layout(w, shard)
    geo = _TargetGeometry(x, w, target, opts, None if shard is None else class_start)
    eps = opts.label_smoothing
    lse, sum_logits = streaming_row_stats(x, w, geo.spec(), eps > 0, tiles)
    target_logit = geo.target_logit
    if shard is not None:
        lse, sum_logits, target_logit = shard.merge_row_stats(lse, sum_logits, target_logit)
    loss = lse - (1.0 - eps) * target_logit
    if eps > 0:
        loss = loss - (eps / num_classes) * sum_logits
    loss = torch.where(geo.valid, loss, torch.zeros_like(loss))
    return (loss, lse) + (geo.saved() if keep_geometry else ())


def margin_ce_backward(grad_loss, x, w, target, lse, opts: MarginOptions, tiles, need_weight_grad=True,
                       shard: Optional[ClassShard] = None, saved=None):
    """(dL/dx, dL/dw) for the per-row loss gradient `grad_loss`; with a shard, `lse` is the merged one
    and dL/dw is the gradient of this slice. `saved`: the forward's geometry (margin_ce_forward's
    keep_geometry), recomputed when None."""
    class_start, C = _class_layout(w, shard)
    geo = _TargetGeometry(x, w, target, opts, None if shard is None else class_start, saved)
    eps = opts.label_smoothing
    g = torch.where(geo.valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))
    p_target = torch.exp(geo.target_logit - lse)
    # The target column's terms belong to the slice that holds it (only there is T known).
    grad_target_logit = torch.where(geo.owned, g * (p_target - (1.0 - eps) - eps / C), torch.zeros_like(g))
    slope = margin_slope(geo.cosine, opts.m1, opts.m2, opts.exact_margin_grad)
    s = opts.scale

    if opts.normalize:
        # dT/da_y with the norms held fixed; the projections below chain through x̂ and ŵ.
        target_grad = grad_target_logit * s * slope / (geo.x_norm * geo.w_target_norm)

        # dL/dw = (I − ŵŵᵀ)·(dL/dŵ)/‖w‖, and the engine's raw dW already holds (dL/dŵ)/‖w‖.
        tangent_projection, finalize_weight_chunk = (w, geo.col_scale), None
    else:
        # T = s·‖x‖‖w_y‖·ψ(c) also depends on the norms: the cross term s·ψ'·w_y (resp. x) goes
        # through the target column, the radial terms s·(ψ − cψ')·(‖w_y‖/‖x‖)·x (resp. w_y) are added here
        # (straight-through: ψ' := 1 in both, as DESIGN.md §4 says).
        target_grad = grad_target_logit * s * slope
        radial = grad_target_logit * s * (geo.psi - geo.cosine * slope)
        w_radial = radial * geo.x_norm / geo.w_target_norm

        tangent_projection = None

        def finalize_weight_chunk(c0, c1, grad_w_raw):
            # masked instead of nonzero(): no host sync per chunk
            in_chunk = (geo.column >= c0) & (geo.column < c1)
            rows_in_chunk = (geo.column - c0).clamp(0, c1 - c0 - 1)
            contribution = torch.where(in_chunk, w_radial, torch.zeros_like(w_radial))[:, None] * geo.w_target
            return grad_w_raw.index_add_(0, rows_in_chunk, contribution.to(grad_w_raw.dtype))

    grad_x_raw, grad_w, _ = streaming_grads(
        x, w, geo.spec(), lse, g, g * (eps / C), target_grad, tiles, finalize_weight_chunk,
        need_weight_grad=need_weight_grad, tangent_projection=tangent_projection)

    if not opts.normalize:  # the radial x term, before the sum over slices: it is counted once, by the owner
        grad_x_raw = grad_x_raw + (radial * geo.w_target_norm / geo.x_norm)[:, None] * geo.xf
    if shard is not None:
        grad_x_raw = shard.sum_input_grad(grad_x_raw)
    # dL/dx = (I − x̂x̂ᵀ)·(dL/dx̂)/‖x‖ (the raw dX holds (dL/dx̂)/‖x‖), stored in x's dtype: one fused pass
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    projection = (x, 1.0 / geo.x_norm) if opts.normalize else ()
    row_grad_finisher(tiles)(grad_x_raw, grad_x_raw.new_ones(()), grad_x, *projection)
    return grad_x, grad_w
