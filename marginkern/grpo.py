"""GRPO and its relatives (DAPO, Dr. GRPO, BNPO, CISPO, GSPO's sequence-level ratios) on an LM head, without its logits.

A GRPO step reads the policy through the per-token log-probabilities of the sampled completion tokens (and, for its
metrics, the policy's entropy): `log_probs_and_entropy` gives both in one fused pass over the vocabulary, never the
B × T × V logits (TRL materialises them; Liger-Kernel's LigerFusedLinearGRPOLoss one chunk of them). `grpo_loss`
is then TRL's GRPOTrainer arithmetic on (B, T) tensors:

    ratio  r = exp(log π − log π_old)           (token level; "sequence": exp of its masked mean, GSPO)
    token loss = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·KL     (r capped at δ first when δ is given)
              = −sg(min(r, ε_high))·A·log π + β·KL                     (cispo)
    KL = exp(ref − log π) − (ref − log π) − 1  (the k3 estimator; only with β ≠ 0)

aggregated by loss_type: grpo the mean over sequences of each sequence's token mean; bnpo the mean over the batch's
tokens; dr_grpo the sum over (B · max_completion_length); dapo and cispo the sum over num_items_in_batch (TRL: the
counted tokens of the whole accumulated batch over all processes, divided by the number of processes; default: this
batch's counted tokens, which is bnpo; Liger's dapo all-reduces that count over the processes itself, and divides
a given num_items_in_batch by the world size: pass it divided here). TRL also divides the grpo, bnpo and dr_grpo
losses by the gradient-accumulation steps: a training loop does that itself. Positions outside the mask contribute
exactly 0 whatever log-probabilities sit there (−inf padding included: they are masked before exp). Not offered:
sapo, luspo, vLLM's importance-sampling correction, entropy masking (TRL's top_entropy_quantile), an LM-head bias:
build them on `log_probs_and_entropy` directly.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .checks import (check_finite, check_float_tensor, check_ignore_index, check_int, check_shift, check_softcap,
                     check_tensor)
from .engine import accumulation_dtype
from .preference import reference_token_log_probs, softcap_repr, token_log_probs

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class GRPOOutput(NamedTuple):
    """The loss and what TRL's GRPOTrainer logs beside it (all but loss and per_token_loss detached)."""
    loss: Tensor
    per_token_loss: Tensor      # (B, T), 0 where the mask is off
    kl: Tensor                  # masked mean of the k3 KL to the reference, whenever one is given (else 0)
    clip_ratio_low: Tensor      # share of counted tokens (sequences, at sequence level) clipped below with A < 0
    clip_ratio_high: Tensor     # ... clipped above with A > 0 (cispo: weights capped at ε_high with A > 0)
    clip_ratio_region: Tensor   # either
    entropy: Optional[Tensor]   # masked mean of the policy's entropy (the heads fill it; grpo_loss leaves None)


def _check_options(loss_type, importance_sampling_level, beta, epsilon, epsilon_high, delta, max_completion_length):
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got "
                         f"{importance_sampling_level!r}")
    check_finite("beta", beta, 0.0)
    check_finite("epsilon", epsilon, 0.0, 1.0, high_open=True)
    if loss_type == "cispo" and epsilon_high is None:
        # TRL would cap the weights at ε_high = ε (0.2), far below the ratios CISPO means to keep
        raise ValueError("loss_type='cispo' needs epsilon_high (its ε_max, the cap on the importance weights; the "
                         "ScaleRL paper recommends 5.0)")
    if epsilon_high is not None:
        check_finite("epsilon_high", epsilon_high, 0.0)
    if delta is not None:
        if loss_type == "cispo":
            raise ValueError("delta caps the ratio of the clipped losses; loss_type='cispo' caps its weights at "
                             "epsilon_high instead: leave delta None")
        check_finite("delta", delta, 1.0, low_open=True)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normaliser)")
        if check_int("max_completion_length", max_completion_length) < 1:
            raise ValueError(f"max_completion_length must be ≥ 1, got {max_completion_length}")


def grpo_loss(log_probs, advantages, mask, *, old_log_probs=None, ref_log_probs=None, beta=0.0, epsilon=0.2,
              epsilon_high=None, delta=None, loss_type="dapo", importance_sampling_level="token",
              max_completion_length=None, num_items_in_batch=None) -> GRPOOutput:
    """TRL's GRPO loss (module docstring) on per-token log-probabilities.

    log_probs (B, T) of the sampled tokens under the policy, differentiable; advantages (B,) (one per completion, as
    GRPO's group-normalised rewards) or (B, T); mask (B, T) bool or 0/1 (the counted tokens); old_log_probs (B, T),
    the sampling policy's (default: log_probs detached, the on-policy first iteration: ratio 1); ref_log_probs (B, T),
    the reference model's, needed when beta > 0. Defaults as TRL's GRPOConfig (loss_type "dapo", ε = 0.2, β = 0);
    epsilon_high defaults to epsilon (cispo needs it given). Returns GRPOOutput; the loss in float32 (float64 for
    float64 log_probs).
    """
    _check_options(loss_type, importance_sampling_level, beta, epsilon, epsilon_high, delta, max_completion_length)
    check_float_tensor("log_probs", log_probs, dim=2)
    acc = accumulation_dtype(log_probs.dtype)
    shape, device = log_probs.shape, log_probs.device
    check_tensor("mask", mask)
    if mask.shape != shape or mask.device != device or mask.dtype.is_complex:
        raise ValueError(f"mask must be a bool or 0/1 tensor of log_probs's shape {tuple(shape)} on {device}, got "
                         f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}")
    check_float_tensor("advantages", advantages)
    if advantages.shape not in ((shape[0],), (shape[0], 1), shape) or advantages.device != device:
        raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)} on {device}, got shape "
                         f"{tuple(advantages.shape)} on {advantages.device}")
    for name, t in (("old_log_probs", old_log_probs), ("ref_log_probs", ref_log_probs)):
        if t is not None:
            check_float_tensor(name, t, dim=2)
            if t.shape != shape or t.device != device:
                raise ValueError(f"{name} must match log_probs (shape {tuple(shape)} on {device}), got shape "
                                 f"{tuple(t.shape)} on {t.device}")
    if beta and ref_log_probs is None:
        raise ValueError(f"beta={beta!r} needs ref_log_probs (the reference model's per-token log-probabilities)")
    if num_items_in_batch is not None:
        if loss_type not in ("dapo", "cispo"):
            raise ValueError(f"num_items_in_batch is the normaliser of loss_type 'dapo' and 'cispo', got it with "
                             f"loss_type={loss_type!r}")
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            num_items_in_batch = num_items_in_batch.detach().to(acc).reshape(())
        else:
            check_finite("num_items_in_batch", num_items_in_batch, 0.0, low_open=True)
    counts = mask != 0
    log_probs = torch.where(counts, log_probs.to(acc), 0.0)
    weight = counts.to(acc)
    advantages = advantages.detach().to(acc)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    old = log_probs.detach() if old_log_probs is None else old_log_probs.detach().to(acc)
    eps_high = epsilon if epsilon_high is None else float(epsilon_high)

    tokens_per_sequence = weight.sum(-1).clamp(min=1.0)
    log_ratio = torch.where(counts, log_probs - old, 0.0)  # before exp: −inf padding must not make 0·inf
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / tokens_per_sequence)[:, None]  # (0 where nothing counts)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * advantages * log_probs
        high = (ratio > eps_high) & (advantages > 0)
        low = torch.zeros_like(high)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=float(delta))
        per_token = -torch.minimum(capped * advantages, clipped * advantages)
        low = (capped < 1 - epsilon) & (advantages < 0)  # the capped ratio, as TRL's flags
        high = (capped > 1 + eps_high) & (advantages > 0)
    per_token = per_token.expand(shape)
    counted = weight.sum()
    if ref_log_probs is not None:
        ref_minus = torch.where(counts, ref_log_probs.detach().to(acc) - log_probs, 0.0)
        kl_per_token = torch.exp(ref_minus) - ref_minus - 1
        if beta:
            per_token = per_token + beta * kl_per_token
        kl = ((kl_per_token * weight).sum() / counted.clamp(min=1.0)).detach()
    else:
        kl = torch.zeros((), dtype=acc, device=device)
    per_token = per_token * weight
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / tokens_per_sequence).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / counted.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (shape[0] * max_completion_length)
    else:  # dapo, cispo
        normaliser = counted.clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / normaliser

    def share(flags):  # TRL's masked_batch_mean: over counted tokens, or over sequences where the flags are one per
        # sequence (sequence level; TRL tells by a width of 1 alone, which one-token completions have at token level)
        flags = flags.to(acc)
        if importance_sampling_level == "sequence" and flags.shape[1] == 1:
            return flags.mean()
        return (flags * weight).sum() / counted.clamp(min=1.0)

    return GRPOOutput(loss, per_token, kl, share(low).detach(), share(high).detach(), share(low | high).detach(),
                      None)


class LinearGRPOLoss(nn.Module):
    """GRPO on an LM head (TRL's GRPOTrainer loss; Liger's LigerFusedLinearGRPOLoss), never the logits:
    forward(input (B, T, D), weight (V, D), target (B, T), advantages (B,) or (B, T), *, old_log_probs=None,
    ref_log_probs=None | ref_input=None, ref_weight=None, num_items_in_batch=None) → GRPOOutput.

    target holds the sampled completion tokens, ignore_index where nothing counts (the prompt, the padding); shift=1
    takes them as a causal LM's labels (position t scores token t + 1). The policy's log-probabilities of
    softmax(input·weightᵀ / temperature) (TRL's sampling temperature; softcap(input·weightᵀ) with the model's
    final-logit `softcap`, Gemma 2/3's) and its entropy come from one fused pass; the reference model's either
    precomputed (ref_log_probs) or from its hidden states and head (under no_grad, with the same softcap). Options
    as `grpo_loss`.
    """

    def __init__(self, *, beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo",
                 importance_sampling_level="token", max_completion_length=None, temperature=1.0, ignore_index=-100,
                 shift=0, softcap=None):
        super().__init__()
        _check_options(loss_type, importance_sampling_level, beta, epsilon, epsilon_high, delta, max_completion_length)
        self.options = dict(beta=float(beta), epsilon=float(epsilon), epsilon_high=epsilon_high, delta=delta,
                            loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                            max_completion_length=max_completion_length)
        check_finite("temperature", temperature, 0.0, low_open=True)
        self.temperature = float(temperature)
        self.ignore_index, self.shift = check_ignore_index(ignore_index), check_shift(shift)
        self.softcap = check_softcap(softcap)

    def _log_probs(self, input, weight, target):
        return token_log_probs(input, weight, target, self.ignore_index, self.shift, self.temperature, "completions",
                               self.softcap)

    def forward(self, input, weight, target, advantages, *, old_log_probs=None, ref_log_probs=None, ref_input=None,
                ref_weight=None, num_items_in_batch=None) -> GRPOOutput:
        if (ref_input is None) != (ref_weight is None) or (ref_input is not None and ref_log_probs is not None):
            raise ValueError("pass the reference model's ref_input and ref_weight, or its precomputed ref_log_probs "
                             "(one of the two, or neither)")
        if ref_input is not None:  # (before the policy's pass: its arguments are checked there)
            ref_log_probs, _ = reference_token_log_probs(ref_input, ref_weight, input, target, self.ignore_index,
                                                         self.shift, self.temperature, self.softcap)
        log_probs, entropy, mask = self._log_probs(input, weight, target)
        out = grpo_loss(log_probs, advantages, mask, old_log_probs=old_log_probs, ref_log_probs=ref_log_probs,
                        num_items_in_batch=num_items_in_batch, **self.options)
        with torch.no_grad():
            weight_mask = mask.to(entropy.dtype)
            mean_entropy = (entropy * weight_mask).sum() / weight_mask.sum().clamp(min=1.0)
        # field by field: torch 2.6's dynamo traces neither out._replace(...) nor GRPOOutput(*out[:-1], ...)
        return GRPOOutput(out.loss, out.per_token_loss, out.kl, out.clip_ratio_low, out.clip_ratio_high,
                          out.clip_ratio_region, mean_entropy)

    def extra_repr(self):
        return ", ".join([f"{k}={v!r}" for k, v in self.options.items()]
                         + [f"temperature={self.temperature}", f"ignore_index={self.ignore_index}",
                            f"shift={self.shift}{softcap_repr(self.softcap)}"])
