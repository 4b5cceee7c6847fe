"""nn.Module losses that own their class centres, shape (C, D) like insightface's PartialFC."""
import collections
import math
import os
import sys
import warnings
import weakref

import torch
from torch import nn

from .checks import (check_angular_margin, check_bool, check_class_weight, check_class_weight_values,
                     check_cost_embedding, check_extra_outputs, check_finite, check_head_size, check_ignore_index,
                     check_jsd_beta, check_linear_ce_options, check_logits_buffer, check_margin_options,
                     check_module_embeddings, check_proxy_anchor_options, check_reduction, check_shift,
                     check_skip_ignored_rows, check_subcenters, check_temperature, check_tensor, check_token_scaling,
                     checked_class_targets,
                     interclass_filtering_options, margin_module_repr, resolve_grad_filter_eps)
from .engine import accumulation_dtype, row_blocks
from .functional import (cosent_embedding_loss, cosent_loss, emo_cross_entropy, emo_loss, linear_cross_entropy,
                         linear_jsd, linear_kl_divergence, margin_cross_entropy, proxy_anchor_loss)
from .sampling import IGNORED, num_sampled_classes, sample_classes, sampled_class_rows


class LambdaAnnealing(nn.Module):
    """A-Softmax's and L-Softmax's λ annealing (Liu et al.; their caffe MarginInnerProduct layer): the target's
    ψ eased toward the plain cosine, (λ·cos θ + ψ)/(1 + λ), with λ = max(lambda_min, lambda_base·(1 +
    lambda_gamma·t)^(−lambda_power)) at training step t (saved in the state dict). SphereFace's published schedule
    is the default: 1000, 0.12, 1, lambda_min 5. lambda_min None: no annealing (λ = 0, the plain margin).

    t counts optimizer steps, as caffe's solver iterations: every `step()` of a torch.optim optimizer that holds
    the module's weight (any number of micro-batches, forward and backward passes in between). So λ is constant
    between optimizer steps, and activation checkpointing's reruns, pipeline schedules and accumulation all see the
    λ of their step. Weights an optimizer does not hold as they are (e.g. flattened by FSDP1 or DeepSpeed) are not
    seen: then advance `lambda_step` yourself once per step (a warning says so after 1000 training-mode forward
    passes in which the step did not move). A step inside another optimizer's step counts with it, once."""

    _forwards_without_step = 0  # class defaults: modules pickled before these existed still load
    _step_seen = 0

    def _init_lambda(self, lambda_min, lambda_base, lambda_gamma, lambda_power):
        self.lambda_schedule = None
        if lambda_min is not None:
            schedule = dict(lambda_min=lambda_min, lambda_base=lambda_base, lambda_gamma=lambda_gamma,
                            lambda_power=lambda_power)
            for name, value in schedule.items():
                check_finite(name, value, 0.0)
            self.lambda_schedule = tuple(float(value) for value in schedule.values())
            # saved as "<prefix>lambda_step" only with a schedule: checkpoints of modules without one keep
            # their keys (strict loading of older checkpoints still works)
            self.register_state_dict_post_hook(_save_lambda_step)
            self.register_load_state_dict_pre_hook(_load_lambda_step)
        self.lambda_step = 0  # a Python int: reading a device buffer every step would sync with the GPU

    def _watch_lambda_steps(self):
        """Called by the constructors once the weight exists (a constructor that raises leaves nothing watched)."""
        if self.lambda_schedule is not None:
            _watch_optimizer_steps(self)

    def __setstate__(self, state):
        if "_lambda_steps" in state:  # pickled by a development version that counted backward passes
            state["lambda_step"] = state.pop("_lambda_steps") + int(state.pop("_lambda_pending", False))
        super().__setstate__(state)
        if getattr(self, "lambda_schedule", None) is not None:  # a copy, or a module unpickled or loaded whole
            _watch_optimizer_steps(self)

    def current_lambda(self):
        """λ of the next forward pass (0 without a schedule)."""
        if self.lambda_schedule is None:
            return 0.0
        lambda_min, base, gamma, power = self.lambda_schedule
        return max(lambda_min, base * (1.0 + gamma * self.lambda_step) ** -power)

    def _lambda_repr(self):
        if self.lambda_schedule is None:
            return ""
        return f", lambda (min, base, gamma, power)={self.lambda_schedule}, lambda_step={self.lambda_step}"

    def _lambda_options(self, options):
        """options with this step's λ (see the class docstring)."""
        if self.lambda_schedule is None:
            return options
        if self.training and not torch.compiler.is_compiling():
            if self.lambda_step != self._step_seen:  # counted, set by hand or loaded: the step moves
                self._step_seen, self._forwards_without_step = self.lambda_step, 0
            self._forwards_without_step += 1
            if self._forwards_without_step == 1000:
                warnings.warn(f"{type(self).__name__}: its λ schedule counts the steps of a torch.optim optimizer "
                              f"that holds its weight, and its step has not moved in 1000 training-mode forward "
                              f"passes (λ = {self.current_lambda():g}): give the optimizer this weight, or advance "
                              f"lambda_step yourself once per step", stacklevel=_caller_stacklevel())
        return {**options, "lambda_": self.current_lambda()}


def _caller_stacklevel():
    """warnings.warn's stacklevel of the first frame outside marginkern and torch.nn's module machinery."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.endswith(os.path.join("torch", "nn", "modules",
                                                                                    "module.py"))):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LAMBDA_MODULES = weakref.WeakSet()  # the modules with a λ schedule whose weight's optimizer steps are counted
_HELD_PARAMETERS = weakref.WeakKeyDictionary()  # optimizer → (its parameter count, the ids of its parameters)
_OPTIMIZER_HOOK = None


def _watch_optimizer_steps(module):
    global _OPTIMIZER_HOOK
    _LAMBDA_MODULES.add(module)
    if _OPTIMIZER_HOOK is None:  # one global hook, registered when the first schedule exists
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_count_optimizer_step)


def _count_optimizer_step(optimizer, args, kwargs):
    """After any torch.optim optimizer's step: one λ step for each module whose weight that optimizer holds. A step
    run inside another optimizer's step (ZeroRedundancyOptimizer's local one, a subclass's super().step()) is part of
    it: only the outermost counts."""
    modules = list(_LAMBDA_MODULES)
    if not modules:
        return
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    cached = _HELD_PARAMETERS.get(optimizer)
    if cached is None or cached[0] != count:  # (param groups only grow: add_param_group)
        cached = count, {id(p) for group in optimizer.param_groups for p in group["params"]}
        _HELD_PARAMETERS[optimizer] = cached
    # (the weight itself, not through a parametrization: no computation here)
    held = [m for m in modules if id(m._parameters.get("weight")) in cached[1]]
    if held and not _inside_an_outer_optimizer_step():
        for module in held:
            module.lambda_step += 1


def _inside_an_outer_optimizer_step():
    """Whether the optimizer step whose post-hook runs now was called from inside another one: torch calls the hooks
    from one wrapper of every Optimizer.step, so an outer step's wrapper is a frame further up the stack."""
    hook_caller = sys._getframe(2)  # the step wrapper (this function is called by the hook, the hook by it)
    frame = hook_caller.f_back
    while frame is not None:
        if frame.f_code is hook_caller.f_code:
            return True
        frame = frame.f_back
    return False


def _save_lambda_step(module, state_dict, prefix, local_metadata):
    state_dict[prefix + "lambda_step"] = torch.tensor(module.lambda_step)


def _load_lambda_step(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
    step = state_dict.pop(prefix + "lambda_step", None)  # absent in a checkpoint from before the schedule
    if step is not None:
        module.lambda_step = int(step)


class Float32Buffers:
    """Keeps the buffers named in `_float32_buffers` in fp32 (fp64 stays) through module casts (.half(),
    .to(torch.bfloat16)), at their values before the cast: running statistics whose small updates 16 bits would lose
    (AdaFace's μ and σ, CurricularFace's t). Moves between devices still apply."""

    _float32_buffers = ()

    def _apply(self, fn, *args, **kwargs):
        before = {name: getattr(self, name, None) for name in self._float32_buffers}
        super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            new = getattr(self, name, None)
            if old is None or new is None or new.dtype in (torch.float32, torch.float64):
                continue
            keep = old.is_floating_point() and old.dtype in (torch.float32, torch.float64) and not old.is_meta
            setattr(self, name, old.to(new.device, torch.float32) if keep else new.float())
        return self


def recomputing_in_backward():
    """Whether this forward runs inside a backward pass: activation checkpointing's recompute (reentrant or not).
    False while torch.compile traces (a compiled region's recompute is the compiler's own)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class ReplayedStepOptions:
    """Step options that read and move running statistics (AdaFace's μ and σ, CurricularFace's t), made safe under
    activation checkpointing: the recompute of a checkpointed forward runs inside the backward pass, where the
    statistics have moved on, so it takes the options its own forward computed, found by a fingerprint of the
    forward's inputs among the last `REPLAY_HISTORY` training forwards (two heads' calls summed into one loss, or
    micro-batches whose backward passes come later, each find theirs). The gradients are then those of the forward's
    loss and the statistics move once. The lookup syncs with the device once, in the recompute only; a recompute
    whose forward is no longer in the history raises. Under torch.compile, do not checkpoint the head: a compiled
    head cannot tell its recompute from a forward (the check is traced as a constant, so the statistics move twice),
    and dynamo cannot trace the statistics' update inside a checkpoint (torch.compile around checkpoint(head, ...)
    runs the head eagerly, or raises with fullgraph=True)."""

    REPLAY_HISTORY = 16
    _replays = None

    def forward(self, embeddings, target):
        # The statistics a step's options used (`_pending_buffers`, set by _fresh_step_options: buffer name → value)
        # are stored only once its loss is computed: a step that raises (on one rank of a sharded loss, say) leaves
        # them as they were, so that ranks do not drift apart.
        self._pending_buffers = {}
        loss = super().forward(embeddings, target)
        with torch.no_grad():
            for name, value in self._pending_buffers.items():
                getattr(self, name).copy_(value)
        self._pending_buffers = {}
        return loss

    def _step_options(self, embeddings, target):
        if not self.training or torch.compiler.is_compiling():  # (eval mode: the statistics stand still)
            return self._fresh_step_options(embeddings, target)
        if recomputing_in_backward():
            return self._replayed_step_options(embeddings, target)
        options = self._fresh_step_options(embeddings, target)
        if self._replays is None or self._replays.maxlen != self.REPLAY_HISTORY:  # (REPLAY_HISTORY may change)
            self._replays = collections.deque(self._replays or (), maxlen=self.REPLAY_HISTORY)
        self._replays.append((_step_fingerprint(embeddings, target), options))
        return options

    def _replayed_step_options(self, embeddings, target):
        fingerprint = _step_fingerprint(embeddings, target)
        candidates = [(k, options) for k, (seen, options) in enumerate(self._replays or ())
                      if seen.shape == fingerprint.shape and seen.device == fingerprint.device]
        if candidates:
            seen = torch.stack([self._replays[k][0] for k, _ in candidates])
            match = (seen == fingerprint).all(1)
            # the newest match (the same inputs may come back: a fixed batch, frozen features)
            order = torch.arange(1, len(candidates) + 1, device=match.device)
            found, index = torch.stack([match.any().long(), (match.long() * order).argmax()]).tolist()
            if found:
                return candidates[index][1]
        raise RuntimeError(
            f"{type(self).__name__}: the recompute of a checkpointed call (activation checkpointing) found no "
            f"forward with its inputs among the last {len(self._replays or ())} training forwards of this module: its "
            "running statistics have moved since, so it cannot reproduce that forward's loss. Either its forward is "
            "older than that (run the backward passes sooner, or raise REPLAY_HISTORY), or the recompute did not "
            "reproduce its inputs bit for bit (checkpoint's preserve_rng_state=False around dropout, or "
            "non-deterministic kernels in the checkpointed region)")

    def _fresh_step_options(self, embeddings, target):
        """This step's options from the inputs and the statistics; in training mode it also sets `_pending_buffers`."""
        raise NotImplementedError

    def __getstate__(self):  # the history holds tensors of past steps: not part of the module's state
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_replays", None)
        return state


def _step_fingerprint(embeddings, target):
    """A few numbers that tell one call's inputs from another's, on their device without a sync: the row count, and
    position-weighted sums of the embeddings and targets in float64 (a recompute reproduces its forward's inputs bit
    for bit, so its fingerprint is equal)."""
    x = embeddings.detach()
    weights = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    rows = torch.full((), float(x.shape[0]), dtype=torch.float64, device=x.device)  # (a fill: no host-to-device copy)
    return torch.stack([rows, (x.sum(1, dtype=torch.float64) * weights).sum(),
                        (x.float().square().sum(1, dtype=torch.float64) * weights).sum(),
                        (target.to(torch.float64) * weights).sum()])


@torch.no_grad()
def subcenter_cosines(embeddings, weight, subcenters, labels, block_rows=4096):
    """(N, K) cosines between each embedding and the K = `subcenters` centres of its class labels_n among weight's
    classes (weight (C·K, D), class-major; labels in [0, C)), in the weight's accumulation dtype, by blocks of rows:
    O(block_rows·K·D) memory, never N × C."""
    acc = accumulation_dtype(weight.dtype)
    centres = weight.detach().unflatten(0, (-1, subcenters))
    out = torch.empty(embeddings.shape[0], subcenters, dtype=acc, device=weight.device)
    for r0, r1 in row_blocks(embeddings.shape[0], block_rows):
        x = nn.functional.normalize(embeddings[r0:r1].detach().to(acc), dim=1)
        w = nn.functional.normalize(centres[labels[r0:r1]].to(acc), dim=2)
        out[r0:r1] = torch.linalg.vecdot(w, x[:, None, :])
    return out


class ScaleOption:
    """`scale` reads and assigns options["scale"] (pytorch-metric-learning's heads keep it as an attribute, and
    schedules assign it): an assignment is checked as the constructor checks it and takes effect at the next call."""

    @property
    def scale(self):
        return self.options["scale"]

    @scale.setter
    def scale(self, value):
        check_finite("scale", value, 0.0, low_open=True)
        self.options["scale"] = float(value)


class MarginOption:
    """`margin` reads and assigns the option that the loss calls its margin (_margin_option), as ScaleOption does
    `scale`: a margin warm-up that assigns `loss.margin` changes the loss from the next call on, in both modes. The
    value is checked to be a finite number ≥ _margin_at_least, or as _checked_margin says."""

    _margin_option = None
    _margin_at_least = -math.inf

    @classmethod
    def _checked_margin(cls, value):
        check_finite("margin", value, cls._margin_at_least)
        return float(value)

    @property
    def margin(self):
        return self.options[self._margin_option]

    @margin.setter
    def margin(self, value):
        self.options[self._margin_option] = self._checked_margin(value)


class AngularMargin(MarginOption):
    """ArcFace's margin: m2, an angle in radians in [0, π]."""

    _margin_option = "m2"

    @classmethod
    def _checked_margin(cls, value):
        check_angular_margin("margin", value)
        return float(value)


class AdditiveMargin(MarginOption):
    """CosFace's margin: m3, subtracted from the target cosine."""

    _margin_option = "m3"


class MultiplicativeMargin(MarginOption):
    """SphereFace's and L-Softmax's margin: m1 ≥ 1, the target angle's multiplier."""

    _margin_option = "m1"
    _margin_at_least = 1.0


class CombinedMarginLoss(ScaleOption, LambdaAnnealing):
    """Margin-softmax CE with target logit s·((−1)^k cos(m1·θ + m2) − 2k − m3) (DESIGN.md §4).

    The class centres are initialised N(0, 0.01) as in insightface's arcface_torch (partial_fc_v2.py).
    `sample_rate` < 1 samples the class centres in training mode (marginkern.sampling, PartialFC): the
    softmax of a step covers the batch's target classes plus random others, int(sample_rate·C) in all
    (0: the target classes alone).
    The weight's gradient stays dense (zero on the rows a step did not sample), as in PartialFC_V2.
    `subcenters` K > 1: sub-center ArcFace (Deng et al. 2020; PML's SubCenterArcFaceLoss): K centres per
    class, weight (C·K, D) with class j's in rows jK … jK+K−1, a class's cosine its best sub-centre's.
    `subcenter_counts` and `outliers` do the paper's cleaning step (drop samples far from their class's
    dominant sub-centre). `lambda_min` (None: off) anneals A-Softmax's λ (LambdaAnnealing).
    `interclass_filtering_threshold` τ in (0, 1] (0: off): insightface's inter-class filtering (arcface_torch's option
    of the same name): every non-target cosine above τ, likely the sample's own identity under another label, counts
    as cosine 0 and gets no gradient.
    """

    def __init__(self, embedding_dim, num_classes, m1=1.0, m2=0.5, m3=0.0, *, scale=64.0, normalize=True,
                 margin_grad="exact", label_smoothing=0.0, ignore_index=-100, reduction="mean",
                 sample_rate=1.0, subcenters=1, lambda_min=None, lambda_base=1000.0, lambda_gamma=0.12,
                 lambda_power=1.0, interclass_filtering_threshold=0.0, device=None, dtype=None):
        super().__init__()
        self.embedding_dim, self.num_classes = check_head_size(embedding_dim, num_classes)
        self._init_lambda(lambda_min, lambda_base, lambda_gamma, lambda_power)
        check_finite("sample_rate", sample_rate, 0.0, 1.0)  # 0: the batch's classes only
        self.sample_rate = float(sample_rate)
        normalize = check_bool("normalize", normalize)
        self.subcenters = check_subcenters(subcenters, normalize)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.subcenters, self.embedding_dim, device=device,
                                               dtype=dtype))
        check_margin_options(scale, m1, m2, m3, margin_grad, label_smoothing)
        check_reduction(reduction)
        # checked here, once: the sampled training path uses ignore_index before any loss function sees it
        self.options = dict(scale=scale, m1=m1, m2=m2, m3=m3, normalize=normalize,
                            margin_grad=margin_grad, label_smoothing=label_smoothing,
                            ignore_index=check_ignore_index(ignore_index), reduction=reduction,
                            **interclass_filtering_options(interclass_filtering_threshold, normalize))
        if self.subcenters > 1:
            self.options["subcenters"] = self.subcenters
        self.reset_parameters()
        self._watch_lambda_steps()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings, target):
        check_module_embeddings(embeddings, self.embedding_dim)
        return self._margin_loss(embeddings, target, self._step_options(embeddings, target))

    def _step_options(self, embeddings, target):
        """This step's options of margin_cross_entropy beside the fixed ones: per-row margins {"m2": (N,), "m3": (N,)}
        or a part of it, in place of the options' floats (AdaFace, MagFace, ElasticFace: marginkern.adaptive_margins),
        or {"hard_negatives": (3,)} (CurricularFace, MV-Softmax: marginkern.hard_negatives); none here."""
        return {}

    def _margin_loss(self, embeddings, target, step_options):
        """The loss of checked embeddings with `step_options` (see _step_options)."""
        weight, options = self.weight, {**self._lambda_options(self.options), **step_options}
        if self.training and self.sample_rate < 1.0:
            target = checked_class_targets(target, embeddings.shape[0], self.num_classes, options["ignore_index"])
            index, target = sample_classes(target, self.num_classes,
                                           num_sampled_classes(self.num_classes, self.sample_rate),
                                           options["ignore_index"])
            weight, options = sampled_class_rows(weight, index, self.subcenters), {**options, "ignore_index": IGNORED}
        if weight.dtype != embeddings.dtype:  # e.g. bf16 embeddings under autocast, fp32 master weights
            weight = weight.to(embeddings.dtype)
        return margin_cross_entropy(embeddings, weight, target, **options)

    def _checked_labels(self, embeddings, labels):
        """labels (N,) as int64 classes of this head, all of them (nothing is ignored here), after the embeddings'
        check."""
        check_module_embeddings(embeddings, self.embedding_dim)
        return checked_class_targets(labels, embeddings.shape[0], self.num_classes, None, "labels")

    @torch.no_grad()
    def subcenter_cosines(self, embeddings, labels, block_rows=4096):
        """(N, K) cosines between each embedding and its class's K sub-centres (fp32; fp64 for fp64 weights), by
        blocks of rows: O(block_rows·K·D) memory, never N × C."""
        return self._subcenter_cosines(embeddings, self._checked_labels(embeddings, labels), block_rows)

    @torch.no_grad()
    def subcenter_counts(self, embeddings, labels):
        """(C, K) int64: how many of the embeddings are closest to each sub-centre of their own class. Sum it
        over a dataset's batches; its argmax over K is each class's dominant sub-centre."""
        labels = self._checked_labels(embeddings, labels)
        return self._subcenter_counts(labels, self._subcenter_cosines(embeddings, labels))

    @torch.no_grad()
    def outliers(self, embeddings, labels, threshold=75.0, dominant=None):
        """(N,) bool: the embeddings more than `threshold` degrees from their class's dominant sub-centre
        (sub-center ArcFace's cleaning: drop them, then retrain; 75° in the paper and PML's get_outliers).
        `dominant` (C,): each class's dominant sub-centre, e.g. subcenter_counts summed over the dataset
        then argmax(1); default: from these embeddings alone."""
        check_finite("threshold", threshold, 0.0, 180.0)
        labels = self._checked_labels(embeddings, labels)
        if dominant is not None:
            if not (isinstance(dominant, torch.Tensor) and dominant.shape == (self.num_classes,)):
                raise ValueError(f"dominant must be a ({self.num_classes},) tensor of sub-centre indices, got "
                                 f"{tuple(dominant.shape) if isinstance(dominant, torch.Tensor) else type(dominant)}")
            dominant = checked_class_targets(dominant, self.num_classes, self.subcenters, None, "dominant")
        cosines = self._subcenter_cosines(embeddings, labels)
        if dominant is None:
            dominant = self._subcenter_counts(labels, cosines).argmax(1)
        cosine = cosines.gather(1, dominant.to(labels.device)[labels][:, None])
        return (torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0))) > threshold)[:, 0]

    def _subcenter_cosines(self, embeddings, labels, block_rows=4096):
        """subcenter_cosines for labels already checked."""
        return subcenter_cosines(embeddings, self.weight, self.subcenters, labels, block_rows)

    def _subcenter_counts(self, labels, cosines):
        """subcenter_counts from the embeddings' cosines to their class's sub-centres."""
        counts = torch.bincount(labels * self.subcenters + cosines.argmax(1),
                                minlength=self.num_classes * self.subcenters)
        return counts.view(self.num_classes, self.subcenters)

    def extra_repr(self):
        extra = f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else ""
        return margin_module_repr(self.embedding_dim, self.num_classes, self.options, extra + self._lambda_repr())


class ArcFaceLoss(AngularMargin, CombinedMarginLoss):
    """ArcFace: cos(θ_y + margin), made monotone past θ = π − margin."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, **kwargs):
        margin = self._checked_margin(margin)  # named as the caller knows it (it becomes m2)
        super().__init__(embedding_dim, num_classes, 1.0, margin, 0.0, scale=scale, **kwargs)


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (Deng et al., ECCV 2020): ArcFace over the best of `subcenters` centres per class
    (weight (C·subcenters, D)); see CombinedMarginLoss for the cleaning helpers."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, subcenters=3, **kwargs):
        super().__init__(embedding_dim, num_classes, scale=scale, margin=margin, subcenters=subcenters, **kwargs)


class CosFaceLoss(AdditiveMargin, CombinedMarginLoss):
    """CosFace / AM-Softmax: cos θ_y − margin."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.35, **kwargs):
        margin = self._checked_margin(margin)  # it becomes m3
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, margin, scale=scale, **kwargs)


class NormalizedSoftmaxLoss(CombinedMarginLoss):
    """NormSoftmax (Zhai & Wu 2019; pytorch-metric-learning's NormalizedSoftmaxLoss): softmax cross-entropy of the
    cosines divided by `temperature`, no margin: CombinedMarginLoss with (m1, m2, m3) = (1, 0, 0) and scale 1/T."""

    def __init__(self, embedding_dim, num_classes, temperature=0.05, **kwargs):
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, 0.0, scale=1.0 / check_temperature(temperature),
                         **kwargs)


class SphereFaceLoss(MultiplicativeMargin, CombinedMarginLoss):
    """SphereFace (A-Softmax) on normalised features: ψ(θ_y) with the angle multiplied by `margin`.

    The default scale 30 is opensphere's. The original A-Softmax's λ annealing (target logit
    (λ·cos θ + ψ(θ))/(1 + λ), λ decaying; face_margin_anchors.md: m = 4 rarely converges without it) is
    `lambda_min=5` (SphereFace's schedule, LambdaAnnealing); off by default. m1 also takes any real ≥ 1, so a
    schedule that raises it from 1 (assign `loss.margin` per step) is another way in.
    """

    def __init__(self, embedding_dim, num_classes, scale=30.0, margin=4, **kwargs):
        margin = self._checked_margin(margin)  # the angle multiplier m1
        super().__init__(embedding_dim, num_classes, margin, 0.0, 0.0, scale=scale, **kwargs)


class LargeMarginSoftmaxLoss(MultiplicativeMargin, CombinedMarginLoss):
    """L-Softmax: unnormalised logits ‖x‖‖w_j‖·cos θ_j, target ‖x‖‖w_y‖·ψ(θ_y) with ψ of multiplier `margin`."""

    def __init__(self, embedding_dim, num_classes, scale=1.0, margin=4, **kwargs):
        margin = self._checked_margin(margin)  # the angle multiplier m1
        super().__init__(embedding_dim, num_classes, margin, 0.0, 0.0, scale=scale, normalize=False,
                         **kwargs)


def _autocast_like(t, input):
    """t (a head's weight or bias) in input's dtype inside an autocast region: an fp32 head behind a bf16
    autocast backbone (Liger-Kernel #305); the cast's backward returns an fp32 gradient. (F.linear would cast
    both to the autocast dtype; here fp32 hidden states keep the loss in fp32.) Outside autocast a dtype
    mismatch stays an error (functional's checks)."""
    if (isinstance(t, torch.Tensor) and isinstance(input, torch.Tensor) and t.dtype != input.dtype
            and t.is_floating_point() and torch.is_autocast_enabled(input.device.type)):
        return t.to(input.dtype)
    return t


class LinearCrossEntropyLoss(nn.Module):
    """Fused LM-head cross-entropy: forward(hidden (N, D), lm_head_weight (V, D), target (N,), bias=None).

    It does not own the projection (LLMs tie or shard it); pass the model's weight. Options as
    `marginkern.linear_cross_entropy`. hidden may be (B, T, D) with target (B, T); shift=1 takes the causal LM's
    labels as they come (position i predicts label i + 1, no copy of hidden). `class_weight` (V,), if given, is
    kept as a buffer (it moves with .to()/.cuda() and is saved in the state dict), as torch's CrossEntropyLoss keeps
    its `weight` (its length is checked against the head's at each call). return_lse / return_token_accuracy: forward
    returns (loss, lse) / (loss, accuracy) / (loss, lse, accuracy), as the function.
    """

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
                 gamma_ce=0.0, reduction="mean", grad_filter_eps=None, logits_buffer_mb=None, shift=0,
                 class_weight=None, return_lse=False, return_token_accuracy=False, token_scaling=False,
                 skip_ignored_rows=None):
        super().__init__()
        check_linear_ce_options(label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
        return_lse, return_token_accuracy = check_extra_outputs(logits_buffer_mb, return_lse=return_lse,
                                                                return_token_accuracy=return_token_accuracy)
        token_scaling = check_token_scaling(token_scaling, logits_buffer_mb)
        skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows, return_lse)
        if class_weight is not None:
            check_tensor("class_weight", class_weight, "a torch.Tensor (C,) or None")
            check_class_weight(class_weight.detach(), class_weight.detach(), label_smoothing, softcap)
            check_class_weight_values(class_weight)
        self.register_buffer("class_weight", None if class_weight is None else class_weight.detach().clone())
        check_reduction(reduction)
        check_logits_buffer(logits_buffer_mb, reduction, resolve_grad_filter_eps(grad_filter_eps, torch.float32))
        self.options = dict(ignore_index=check_ignore_index(ignore_index), label_smoothing=label_smoothing, z_loss=z_loss,
                            softcap=softcap, focal_gamma=focal_gamma, gamma_ce=gamma_ce, reduction=reduction,
                            grad_filter_eps=grad_filter_eps, logits_buffer_mb=logits_buffer_mb,
                            shift=check_shift(shift), return_lse=return_lse,
                            return_token_accuracy=return_token_accuracy, token_scaling=token_scaling,
                            skip_ignored_rows=skip_ignored_rows)

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, _autocast_like(weight, input), target, _autocast_like(bias, input),
                                    class_weight=self.class_weight, **self.options)

    def extra_repr(self):
        weights = [] if self.class_weight is None else [f"class_weight=buffer {tuple(self.class_weight.shape)}"]
        return ", ".join([f"{k}={v!r}" for k, v in self.options.items()] + weights)


class EMOLoss(nn.Module):
    """EMO for LM training: forward(hidden (N, D), lm_head_weight (V, D), target (N,)).

    `cost_embedding` (V, E), if given, is stored as a fixed buffer (the paper takes it from a pre-trained
    LM head); otherwise the live `lm_head_weight`, detached, is the cost ("adaptive" variant).
    mode="mle_anchored" (default, the official recipe): 0.5·(ce + sg(ce/emo)·emo); mode="emo": EMO alone.
    shift and skip_ignored_rows as in LinearCrossEntropyLoss.
    """

    MODES = ("mle_anchored", "emo")

    def __init__(self, cost_embedding=None, *, mode="mle_anchored", ignore_index=-100, reduction="mean", shift=0,
                 skip_ignored_rows=None):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        check_reduction(reduction)
        if cost_embedding is not None:
            check_cost_embedding(cost_embedding)  # its C and device against the weight's at each call
        self.register_buffer("cost_embedding", None if cost_embedding is None else cost_embedding.detach().clone())
        self.mode, self.ignore_index, self.reduction = mode, check_ignore_index(ignore_index), reduction
        self.shift = check_shift(shift)
        self.skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)

    def forward(self, input, weight, target):
        fn = emo_cross_entropy if self.mode == "mle_anchored" else emo_loss
        return fn(input, _autocast_like(weight, input), target, cost_embedding=self.cost_embedding,
                  ignore_index=self.ignore_index, reduction=self.reduction, shift=self.shift,
                  skip_ignored_rows=self.skip_ignored_rows)

    def extra_repr(self):
        cost = "live weight" if self.cost_embedding is None else f"buffer {tuple(self.cost_embedding.shape)}"
        return (f"mode={self.mode!r}, cost={cost}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"shift={self.shift}, skip_ignored_rows={self.skip_ignored_rows}")


class LinearDistillationLoss(nn.Module):
    """Fused distillation between two LM heads over one vocabulary:
    forward(hidden (N, D), lm_head_weight (V, D), teacher_hidden (N, E), teacher_head_weight (V, E), target=None).

    divergence="forward_kl" (Hinton's; `linear_kl_divergence(direction="forward")`), "reverse_kl" (MiniLLM's) or
    "jsd" (GKD's generalized JSD with `beta`, default 0.5, `linear_jsd`; Liger's LigerFusedLinearJSD). It owns neither head;
    target only masks (ignore_index), as the functions. Inside an autocast region a head in another dtype than its
    hidden states is cast to theirs (the functions refuse it). Options and `shift` as the functions.
    """

    DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

    def __init__(self, divergence="forward_kl", *, beta=None, temperature=1.0, ignore_index=-100, reduction="mean",
                 shift=0, skip_ignored_rows=None):
        super().__init__()
        if divergence not in self.DIVERGENCES:
            raise ValueError(f"divergence must be one of {self.DIVERGENCES}, got {divergence!r}")
        if beta is not None and divergence != "jsd":
            raise ValueError(f"beta applies to divergence=\"jsd\" only (the KL directions have none), got beta={beta!r} "
                             f"with divergence={divergence!r}")
        check_reduction(reduction)
        self.divergence = divergence
        self.options = dict(temperature=check_temperature(temperature), ignore_index=check_ignore_index(ignore_index),
                            reduction=reduction, shift=check_shift(shift),
                            skip_ignored_rows=check_skip_ignored_rows(skip_ignored_rows))
        if divergence == "jsd":
            self.options["beta"] = check_jsd_beta(0.5 if beta is None else beta)
        else:
            self.options["direction"] = divergence[:-len("_kl")]

    def forward(self, input, weight, teacher_input, teacher_weight, target=None):
        fn = linear_jsd if self.divergence == "jsd" else linear_kl_divergence
        return fn(input, _autocast_like(weight, input), teacher_input, _autocast_like(teacher_weight, teacher_input),
                  target, **self.options)

    def extra_repr(self):
        return f"divergence={self.divergence!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                                                              if k != "direction")


class CoSENTLoss(nn.Module):
    """CoSENT (Su 2022), as sentence-transformers' CoSENTLoss but O(B log B) and O(B) memory.

    forward(scores, labels) on precomputed pair scores, or forward(embeddings_a, embeddings_b, labels), which
    fuses the pair cosines.
    """

    def __init__(self, scale=20.0):
        super().__init__()
        check_finite("scale", scale, 0.0, low_open=True)
        self.scale = float(scale)

    def forward(self, *args):
        if len(args) == 2:
            return cosent_loss(*args, scale=self.scale)
        if len(args) == 3:
            return cosent_embedding_loss(*args, scale=self.scale)
        raise TypeError(f"CoSENTLoss takes (scores, labels) or (embeddings_a, embeddings_b, labels), got {len(args)} "
                        "arguments")

    def extra_repr(self):
        return f"scale={self.scale}"


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020) with its own proxies, shape (C, D), initialised as the official code
    and pytorch-metric-learning's ProxyAnchorLoss do (kaiming_normal_, mode="fan_out"); defaults margin δ = 0.1,
    α = 32 as theirs. forward(embeddings, labels) → functional.proxy_anchor_loss, streamed over chunks of proxies
    (the N × C cosines never exist). The paper trains the proxies with a 100× larger learning rate than the backbone.
    """

    def __init__(self, embedding_dim, num_classes, margin=0.1, alpha=32.0, *, ignore_index=-100, device=None,
                 dtype=None):
        super().__init__()
        self.embedding_dim, self.num_classes = check_head_size(embedding_dim, num_classes)
        self.margin, self.alpha = check_proxy_anchor_options(margin, alpha)
        self.ignore_index = check_ignore_index(ignore_index)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings, labels):
        check_module_embeddings(embeddings, self.embedding_dim)
        proxies = self.proxies
        if proxies.dtype != embeddings.dtype:  # e.g. bf16 embeddings under autocast, fp32 proxies
            proxies = proxies.to(embeddings.dtype)
        return proxy_anchor_loss(embeddings, proxies, labels, margin=self.margin, alpha=self.alpha,
                                 ignore_index=self.ignore_index)

    def extra_repr(self):
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, margin={self.margin}, "
                f"alpha={self.alpha}")
