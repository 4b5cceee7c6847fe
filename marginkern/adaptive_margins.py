"""Margin losses whose margin differs per sample: AdaFace, MagFace, ElasticFace.

Each is CombinedMarginLoss (ArcFace's class centres, PartialFC sampling, sub-centres) with per-row m2/m3 tensors,
which the fused op takes as they are (margin_ce.py's row_margins): the N × C logits never exist, as for ArcFace.

The target logit is marginkern's monotone ψ (DESIGN.md §4) with the row's margins. The official implementations
clip or switch branches at the ends of [0, π] (AdaFace clips θ + m2 to [ε, π − ε] and every cosine to
±(1 − ε); MagFace's MagLinear defaults to the "easy margin", no margin where cos θ_y ≤ 0): ψ is continuous and
decreasing there instead. Where those do not act they agree to rounding (tests/test_adaptive_margins.py holds each
against its official formula).
"""
import torch

from .checks import check_angular_margin, check_finite, check_target_tensor
from .engine import accumulation_dtype
from .modules import AdditiveMargin, AngularMargin, CombinedMarginLoss, Float32Buffers, ReplayedStepOptions
from .reference import reduce_rows


def _refuse_options(kwargs, names, why):
    for name in names:
        if name in kwargs:
            raise TypeError(f"{name} cannot be set here: {why}")


class AdaFaceMargins(ReplayedStepOptions, Float32Buffers):
    """AdaFace's per-row margins from the embeddings' norms (AdaFaceLoss; marginkern.distributed.ShardedAdaFaceLoss,
    whose ranks see the same gathered embeddings and so keep the same statistics). Module casts leave μ and σ in
    fp32: in bf16 an update of t_alpha·(mean − μ) below half of μ's spacing (0.125 at 20) would be lost, and μ would
    never move."""

    _float32_buffers = ("batch_mean", "batch_std")

    @staticmethod
    def _check_adaface(margin, h, t_alpha, eps, kwargs):
        check_angular_margin("margin", margin)  # AdaFace's m (0.4): an angle, and the additive margin's scale
        check_finite("h", h, 0.0, low_open=True)
        check_finite("t_alpha", t_alpha, 0.0, 1.0)
        check_finite("eps", eps, 0.0, low_open=True)
        _refuse_options(kwargs, ("normalize",), "AdaFace's logits are cosines")

    def _init_adaface(self, margin, h, t_alpha, eps):
        """After the base's __init__ (the buffers go to the weight's device)."""
        self.margin, self.h, self.t_alpha, self.eps = margin, float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.full((1,), 20.0, device=self.weight.device))
        self.register_buffer("batch_std", torch.full((1,), 100.0, device=self.weight.device))

    @property
    def margin(self):
        """AdaFace's m, live: an assignment is checked as the constructor checks it (an angle in [0, π])."""
        return self._margin

    @margin.setter
    def margin(self, value):
        check_angular_margin("margin", value)
        self._margin = float(value)

    def reset_parameters(self):
        """The class centres, and μ, σ back to the official head's 20 and 100 (also after deferred, meta-device
        initialisation: to_empty leaves the buffers uninitialised)."""
        super().reset_parameters()
        if getattr(self, "batch_mean", None) is not None and not self.batch_mean.is_meta:  # (called by __init__ first)
            self.batch_mean.fill_(20.0)
            self.batch_std.fill_(100.0)

    def _fresh_step_options(self, embeddings, target):
        check_target_tensor(target, embeddings.shape[0])
        acc = accumulation_dtype(embeddings.dtype)
        norms = torch.linalg.vector_norm(embeddings.detach().to(acc), dim=1).clamp(0.001, 100.0)
        mean, std = self.batch_mean, self.batch_std
        if self.training:  # the official head moves them before its margins use them (stored after the loss)
            mean, std = self._updated_norm_statistics(norms, target != self.options["ignore_index"])
            self._pending_buffers = {"batch_mean": mean, "batch_std": std}
        quality = (self.h * (norms - mean) / (std + self.eps)).clamp(-1.0, 1.0)
        return {"m2": -self.margin * quality, "m3": self.margin * (1.0 + quality)}

    @torch.no_grad()
    def _updated_norm_statistics(self, norms, valid):
        """The running (μ, σ) moved by the valid rows' norms, without a host sync (masks, not indexing)."""
        weights = valid.to(norms.dtype)
        count = weights.sum()
        mean = (norms * weights).sum() / count.clamp_min(1.0)
        std = (((norms - mean) ** 2 * weights).sum() / (count - 1.0).clamp_min(1.0)).sqrt()
        a = self.t_alpha
        # a NaN or inf embedding leaves them as they were (that step's loss is NaN; NaN statistics would make every
        # later margin NaN)
        finite = torch.isfinite(mean) & torch.isfinite(std)
        return (torch.where((count >= 1) & finite, a * mean + (1.0 - a) * self.batch_mean, self.batch_mean),
                torch.where((count >= 2) & finite, a * std + (1.0 - a) * self.batch_std, self.batch_std))

    def extra_repr(self):
        return (super().extra_repr() + f", margin={self.margin}, h={self.h}, t_alpha={self.t_alpha}, "
                f"eps={self.eps}")


class AdaFaceLoss(AdaFaceMargins, CombinedMarginLoss):
    """AdaFace (Kim, Jain and Liu, CVPR 2022): the margin follows image quality, proxied by the embedding's norm.

    With ‖x_n‖ clipped to [0.001, 100] and running statistics μ, σ of the norms, ẑ_n = clip(h·(‖x_n‖ − μ)/(σ + eps),
    −1, 1) and the target logit is s·(cos(θ_y − m·ẑ_n) − m·(1 + ẑ_n)): high-norm (clear) samples get an angular
    margin (ArcFace-like, up to m), low-norm ones an additive one (CosFace-like, up to 2m). ẑ carries no gradient.

    μ and σ (buffers `batch_mean`, `batch_std`, starting at 20 and 100 as the official head) move by
    t_alpha·(this batch's − theirs) in every training-mode forward, before the margins use them, over the
    non-ignored rows; σ is the unbiased standard deviation and only moves with two rows or more (the official head
    takes std() of a one-row batch: NaN, and NaN margins from then on). Eval mode leaves them as they are.
    The defaults are the official training's (m = 0.4, h = 0.333, s = 64, t_alpha = 0.01). Other keyword arguments
    are CombinedMarginLoss's (normalize is always True).

    Unlike the official head where θ_y < m·ẑ (a clear sample already within m·ẑ of its centre: cos θ_y > 0.92 at
    ẑ = 1, common late in training): the official head clips θ_y − m·ẑ at ε, so its target logit saturates at
    s·(1 − m(1 + ẑ)) with no gradient on θ_y; here ψ = 2 − cos(θ_y − m·ẑ) − m(1 + ẑ) keeps growing and keeps
    pulling the sample in (module docstring of marginkern.adaptive_margins).
    """

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.4, h=0.333, t_alpha=0.01, eps=1e-3,
                 **kwargs):
        self._check_adaface(margin, h, t_alpha, eps, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, 0.0, scale=scale, **kwargs)
        self._init_adaface(margin, h, t_alpha, eps)


class MagFaceMargins:
    """MagFace's norm-dependent margin and regulariser (MagFaceLoss; marginkern.distributed.ShardedMagFaceLoss)."""

    @staticmethod
    def _check_magface(lower_margin, upper_margin, lower_norm, upper_norm, lambda_g, kwargs):
        check_angular_margin("lower_margin", lower_margin)  # ArcFace margins (radians) at the two norms
        check_angular_margin("upper_margin", upper_margin)
        check_finite("upper_margin", upper_margin, lower_margin)
        check_finite("lower_norm", lower_norm, 0.0, low_open=True)
        check_finite("upper_norm", upper_norm, lower_norm, low_open=True)
        check_finite("lambda_g", lambda_g, 0.0)
        _refuse_options(kwargs, ("normalize",), "MagFace's logits are cosines")

    def _init_magface(self, lower_margin, upper_margin, lower_norm, upper_norm, lambda_g):
        self.lower_margin, self.upper_margin = float(lower_margin), float(upper_margin)
        self.lower_norm, self.upper_norm, self.lambda_g = float(lower_norm), float(upper_norm), float(lambda_g)

    def margins(self, norms):
        """m(a) for norms a already clamped to [lower_norm, upper_norm]."""
        slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
        return self.lower_margin + slope * (norms - self.lower_norm)

    def forward(self, embeddings, target):
        if not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
                and embeddings.shape[1] == self.embedding_dim):
            return super().forward(embeddings, target)  # the base names the error (on every rank, when sharded)
        acc = accumulation_dtype(embeddings.dtype)
        norms = torch.linalg.vector_norm(embeddings.to(acc), dim=1).clamp(self.lower_norm, self.upper_norm)
        loss = self._margin_loss(embeddings, target, {"m2": self.margins(norms)})
        regulariser = norms / self.upper_norm ** 2 + 1.0 / norms  # target checked by _margin_loss
        valid = target != self.options["ignore_index"]
        regulariser = torch.where(valid, regulariser, torch.zeros_like(regulariser))
        return loss + self.lambda_g * reduce_rows(regulariser, valid, self.options["reduction"])

    def extra_repr(self):
        return (super().extra_repr() + f", margins=({self.lower_margin}, {self.upper_margin}), "
                f"norms=({self.lower_norm}, {self.upper_norm}), lambda_g={self.lambda_g}")


class MagFaceLoss(MagFaceMargins, CombinedMarginLoss):
    """MagFace (Meng et al., CVPR 2021): ArcFace with a margin that grows with the embedding's norm, plus a
    regulariser that pulls the norm up, so that the norm becomes a quality score.

    a_n = clamp(‖x_n‖, lower_norm, upper_norm); m(a) = lower_margin + (upper_margin − lower_margin)·(a − lower_norm)
    /(upper_norm − lower_norm); per row: CE with the target logit s·ψ(θ_y; m2 = m(a_n)) + lambda_g·(a_n/upper_norm² +
    1/a_n), reduced as `reduction` says (mean: the official CE mean + lambda_g × the mean regulariser). The gradient
    flows through m(a) and the regulariser into ‖x‖, as in the official MagLinear. The defaults are the official
    training's (s = 64, margins 0.45 … 0.8 over norms 10 … 110, lambda_g = 35); ψ is marginkern's monotone one,
    not MagLinear's easy-margin default (which drops the margin where cos θ_y ≤ 0). Other keyword arguments are
    CombinedMarginLoss's (normalize is always True).
    """

    def __init__(self, embedding_dim, num_classes, scale=64.0, lower_margin=0.45, upper_margin=0.8, lower_norm=10.0,
                 upper_norm=110.0, lambda_g=35.0, **kwargs):
        self._check_magface(lower_margin, upper_margin, lower_norm, upper_norm, lambda_g, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, 0.0, scale=scale, **kwargs)
        self._init_magface(lower_margin, upper_margin, lower_norm, upper_norm, lambda_g)


class ElasticMargins:
    """ElasticFace's per-row margins, drawn from N(margin, std²) in each training-mode forward (ElasticArcFaceLoss,
    ElasticCosFaceLoss; the class-sharded ones, whose ranks must draw the same margins: `_shared_draws`)."""

    @classmethod
    def _check_elastic(cls, margin, std, kwargs):
        """(m2, m3) of the base's options: the mean margin (ArcFace's in [0, π] as a float; each drawn one may take
        any sign) in the one this loss draws (its MarginOption's, which `margin` reads and assigns)."""
        margin = cls._checked_margin(margin)
        check_finite("std", std, 0.0)
        _refuse_options(kwargs, ("normalize",), "ElasticFace's logits are cosines")
        return (margin, 0.0) if cls._margin_option == "m2" else (0.0, margin)

    def _init_elastic(self, margin, std):
        self.std = float(std)

    def _step_options(self, embeddings, target):
        if not self.training:
            return {}
        acc = accumulation_dtype(embeddings.dtype)
        draws = torch.randn(embeddings.shape[0], dtype=acc, device=embeddings.device)
        return {self._margin_option: self.margin + self.std * self._shared_draws(draws)}

    def _shared_draws(self, draws):
        """This step's N(0, 1) draws as every module computing the loss uses them (here: this one's)."""
        return draws

    def extra_repr(self):
        return super().extra_repr() + f", std={self.std}"


class _ElasticMargin(ElasticMargins, CombinedMarginLoss):
    """ElasticFace (Boutros et al., CVPRW 2022): in each training-mode forward every row's margin is drawn from
    N(margin, std²); eval mode uses `margin` itself (a deterministic validation loss). std's default 0.05 is the
    official training configs'. Other keyword arguments are CombinedMarginLoss's."""

    def __init__(self, embedding_dim, num_classes, scale, margin, std, **kwargs):
        m2, m3 = self._check_elastic(margin, std, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, m2, m3, scale=scale, **kwargs)
        self._init_elastic(margin, std)


class ElasticArcFaceLoss(AngularMargin, _ElasticMargin):
    """ElasticFace-Arc: ArcFace whose angular margin is drawn per row from N(margin, std²) (see _ElasticMargin)."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, std=0.05, **kwargs):
        super().__init__(embedding_dim, num_classes, scale, margin, std, **kwargs)


class ElasticCosFaceLoss(AdditiveMargin, _ElasticMargin):
    """ElasticFace-Cos: CosFace whose additive margin is drawn per row from N(margin, std²) (see _ElasticMargin)."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.35, std=0.05, **kwargs):
        super().__init__(embedding_dim, num_classes, scale, margin, std, **kwargs)
