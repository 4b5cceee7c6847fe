"""Margin losses that re-weight hard negatives: CurricularFace and MV-Softmax.

Both are CombinedMarginLoss (ArcFace's or CosFace's target logit, class centres, PartialFC sampling, sub-centres)
whose non-target classes with a cosine above the row's target cosine with its margin, c_j > ψ(cos θ_y), get a
larger cosine h(c_j): margin_cross_entropy's `hard_negatives` (a, b, d), h(c) = a·c² + b·c + d, an epilogue of the
streaming kernels, so the N × C logits (and the official heads' N × C masks and clones) never exist. The mixins
serve the class-sharded modules too (marginkern.distributed.ShardedCurricularFaceLoss, ShardedMVSoftmaxLoss).

The target logit is marginkern's monotone ψ (DESIGN.md §4), where the official heads switch to cos θ − m·sin m
(CurricularFace) or drop the margin (MV-Softmax's ArcFace variant, for cos θ_y ≤ 0) past θ_y + m = π; the mask uses
ψ as theirs uses cos(θ_y + m) (the same where θ_y + m ≤ π); MV-Softmax's CosFace variant drops the margin where
cos θ_y ≤ m, ψ = cos θ_y − m does not. Elsewhere they agree to rounding (tests/test_hard_negatives.py holds each
against its official formula). Under DistributedDataParallel t is each rank's own running mean of its local rows,
and DDP's default broadcast_buffers copies rank 0's over the others every step (the class-sharded module's is over
the whole gathered batch).
"""
import torch

from .adaptive_margins import _refuse_options
from .checks import check_angular_margin, check_finite, check_target_tensor
from .engine import accumulation_dtype
from .modules import (AngularMargin, CombinedMarginLoss, Float32Buffers, MarginOption, ReplayedStepOptions,
                      subcenter_cosines)


def _refuse_filtering(kwargs, loss):
    """Inter-class filtering is another threshold of the same re-weighting: only its off value (0, which arcface_torch
    configs carry) is taken, and dropped."""
    if kwargs.get("interclass_filtering_threshold", 0) != 0:
        raise TypeError(f"interclass_filtering_threshold cannot be set here: {loss} re-weights its hard negatives "
                        "itself, above each row's target cosine (0, off, is accepted)")
    kwargs.pop("interclass_filtering_threshold", None)


class CurricularFaceT(ReplayedStepOptions, Float32Buffers):
    """CurricularFace's running mean target cosine t and the coefficients (1, t, 0) it gives (CurricularFaceLoss; the
    sharded module sums the target cosines over the ranks that hold them)."""

    _float32_buffers = ("t",)

    @staticmethod
    def _check_curricular(margin, momentum, kwargs):
        check_angular_margin("margin", margin)
        check_finite("momentum", momentum, 0.0, 1.0)
        _refuse_options(kwargs, ("normalize",), "CurricularFace's logits are cosines")
        _refuse_filtering(kwargs, "CurricularFace")

    def _init_curricular(self, momentum):
        """After the base's __init__ (the buffer goes to the weight's device)."""
        self.momentum = float(momentum)  # (live; a hyperparameter, not saved in the state_dict, as the margin)
        acc = accumulation_dtype(self.weight.dtype)  # fp64 for an fp64 head, else fp32 (and so under casts)
        self.register_buffer("t", torch.zeros(1, dtype=acc, device=self.weight.device))

    def reset_parameters(self):
        """The class centres, and t back to 0 (also after deferred, meta-device initialisation)."""
        super().reset_parameters()
        if getattr(self, "t", None) is not None and not self.t.is_meta:  # (called by __init__ first)
            self.t.zero_()

    def _fresh_step_options(self, embeddings, target):
        check_target_tensor(target, embeddings.shape[0])
        t = self.t
        if self.training:  # the official head moves t before the re-weighting uses it (stored after the loss)
            t = self._updated_t(embeddings, target)
            self._pending_buffers = {"t": t}
        return {"hard_negatives": torch.cat([torch.ones_like(t), t, torch.zeros_like(t)])}

    @torch.no_grad()
    def _updated_t(self, embeddings, target):
        """t moved toward the valid rows' mean target cosine, without a host sync (masks, not indexing); a batch with a
        NaN or inf embedding leaves it as it was (that step's loss is NaN; the official head's t would stay NaN, and
        every later loss with it)."""
        total, count = self._target_cosine_sum(embeddings, target, target != self.options["ignore_index"])
        moved = self.momentum * total / count.clamp_min(1.0) + (1.0 - self.momentum) * self.t
        return torch.where((count >= 1) & torch.isfinite(moved), moved, self.t)

    def _target_cosine_sum(self, embeddings, target, valid):
        """(Σ cos θ_y over the valid rows, their count), in t's dtype (clamped to [−1, 1]; with sub-centres the best
        one's, as the loss's)."""
        labels, held = self._held_targets(target, valid)
        cosine = subcenter_cosines(embeddings, self.weight, self.subcenters, labels).amax(1)
        held = held.to(self.t.dtype)
        sums = torch.stack([(cosine.clamp(-1.0, 1.0).to(self.t.dtype) * held).sum(), held.sum()])
        return self._summed_over_shards(sums).unbind()

    def _held_targets(self, target, valid):
        """(each row's target class among this module's weight rows, clamped into range; whether the row counts here:
        valid)."""
        # out-of-range targets read a clamped class here; the loss raises on them before t is stored
        return torch.where(valid, target, 0).long().clamp(0, self.num_classes - 1), valid

    def _summed_over_shards(self, sums):
        """The (2,) sums over the modules that hold the classes (one here; the sharded module's ranks)."""
        return sums

    def extra_repr(self):
        return super().extra_repr() + f", momentum={self.momentum}"


class CurricularFaceLoss(AngularMargin, CurricularFaceT, CombinedMarginLoss):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace whose hard negatives (cos θ_j > cos(θ_y + m)) get the cosine
    c_j·(t + c_j), with t a running mean of the target cosine: early in training t ≈ 0 and hard negatives weigh
    less than plain ones (easy samples first), later t grows and they weigh more.

    t (buffer `t`, from 0 as the official head) moves by momentum·(this batch's mean cos θ_y − t) in every
    training-mode forward, over the non-ignored rows, before this step's re-weighting uses it, and is stored only
    once the step's loss is computed; eval mode leaves it as it is. It has no gradient (the official head's
    no_grad), and stays in fp32 under module casts. The defaults are the official head's (s = 64, m = 0.5,
    momentum 0.01). Other keyword arguments are CombinedMarginLoss's (normalize is always True); with sample_rate
    < 1 the re-weighting acts on the sampled classes.
    """

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, momentum=0.01, **kwargs):
        self._check_curricular(margin, momentum, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, margin, 0.0, scale=scale, **kwargs)
        self._init_curricular(momentum)


class MVSoftmaxCoefficients(MarginOption):
    """MV-Softmax's fixed coefficients (0, w, w − 1) as a buffer (MVSoftmaxLoss; the sharded module); `margin` is
    margin_type's option (m3 for "cos", m2 for "arc")."""

    @property
    def _margin_option(self):
        return "m2" if self.margin_type == "arc" else "m3"

    def _checked_margin(self, value):
        m2, m3 = self._check_mv(value, self.mv_weight, self.margin_type, {})
        return float(m2 if self.margin_type == "arc" else m3)

    @staticmethod
    def _check_mv(margin, mv_weight, margin_type, kwargs):
        """(m2, m3) of margin_type."""
        check_finite("margin", margin, 0.0)
        check_finite("mv_weight", mv_weight)
        if margin_type not in ("cos", "arc"):
            raise ValueError(f"margin_type must be 'cos' (CosFace's margin) or 'arc' (ArcFace's), got {margin_type!r}")
        if margin_type == "arc":
            check_angular_margin("margin", margin)
        _refuse_options(kwargs, ("normalize",), "MV-Softmax's logits are cosines")
        _refuse_filtering(kwargs, "MV-Softmax")
        return (0.0, margin) if margin_type == "cos" else (margin, 0.0)

    def _init_mv(self, mv_weight, margin_type):
        # mv_weight is live (its setter rebuilds the buffer) and, as the margin, a hyperparameter: not in the state_dict
        self.margin_type, self._mv_weight = margin_type, float(mv_weight)
        # a buffer, not saved but rebuilt from mv_weight (by every module cast and move, to_empty included): read on
        # the device each step without a host-to-device copy
        self.register_buffer("hard_negative_coefficients", torch.empty(3, device=self.weight.device), persistent=False)
        self._refresh_coefficients()

    @property
    def mv_weight(self):
        return self._mv_weight

    @mv_weight.setter
    def mv_weight(self, value):
        check_finite("mv_weight", value)
        self._mv_weight = float(value)
        self._refresh_coefficients()

    @torch.no_grad()
    def _refresh_coefficients(self):
        """hard_negative_coefficients ← (0, w, w − 1) in fp64 for an fp64 head, else fp32, on its device."""
        old = getattr(self, "hard_negative_coefficients", None)
        if old is None or old.is_meta:
            return
        w = self._mv_weight
        acc = accumulation_dtype(self.weight.dtype)
        self.hard_negative_coefficients = torch.tensor([0.0, w, w - 1.0], dtype=acc).to(old.device)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._refresh_coefficients()
        return self

    def _step_options(self, embeddings, target):
        return {"hard_negatives": self.hard_negative_coefficients}

    def extra_repr(self):
        return super().extra_repr() + f", mv_weight={self.mv_weight}, margin_type={self.margin_type!r}"


class MVSoftmaxLoss(MVSoftmaxCoefficients, CombinedMarginLoss):
    """MV-Softmax (Wang et al., AAAI 2020, "Mis-classified Vector Guided Softmax Loss"; FaceX-Zoo's MV_Softmax):
    CosFace's (margin_type="cos", the paper's MV-AM-Softmax) or ArcFace's ("arc", MV-Arc-Softmax) target logit,
    and every mis-classified negative (cos θ_j above the target's margin cosine) gets the cosine
    mv_weight·cos θ_j + mv_weight − 1 (the paper's (t + 1)·cos θ_j + t with t = mv_weight − 1). The defaults are
    FaceX-Zoo's (s = 32, m = 0.35, mv_weight = 1.12). Other keyword arguments are CombinedMarginLoss's (normalize is
    always True).
    """

    def __init__(self, embedding_dim, num_classes, scale=32.0, margin=0.35, mv_weight=1.12, margin_type="cos",
                 **kwargs):
        m2, m3 = self._check_mv(margin, mv_weight, margin_type, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, m2, m3, scale=scale, **kwargs)
        self._init_mv(mv_weight, margin_type)
