"""Preference optimisation on an LM head without its logits: DPO and its variants, ORPO, CPO / SimPO, KTO.

Each of these losses reads the policy (and the reference model) only through per-sequence log-probabilities
log π(y | x) = Σ_t log p(y_t | ·) over a completion's tokens, or their mean. `sequence_log_probs` takes them from
`log_probs_and_entropy`: one fused pass over the vocabulary per head, never the B × T × V logits (TRL holds all of
them; Liger-Kernel's chunked preference losses one chunk of sequences). The rest is arithmetic on (B,) vectors,
as TRL defines it (DPOTrainer.dpo_loss, ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss, KTOTrainer.kto_loss),
computed in float32 (float64 for float64 inputs).

Exactness: a confident token's log p is −log1p(S′) (log_probs.py), not z_t − lse rounded to a multiple of
ulp(lse), so a near-certain completion's (mean) log-probability is, say, −4e-11 and not 0; ORPO's log(1 − p) is
log(−expm1(log p)) (`engine.log1m_exp`, as TRL since #4763; its older log1p(−exp(log p)) was −inf, the loss NaN, once
p rounded to 1: TRL #2564, #3237). With log p rounded to 0 first even log1mexp is −inf; here that needs p within
1e-30 of 1 (MAX_LOG_PROB).

Where these heads differ from TRL, by choice: ORPO's (and every head's) NLL counts the completion tokens, the
tokens the log-probabilities count (Liger's convention; TRL's ORPOTrainer counts the prompt too); the logit-mean
metrics average over the counted tokens for every head (TRL's DPO does; its ORPO and CPO average over all positions);
reference-free DPO takes the reference log-probabilities as 0 everywhere (TRL zeroes them in the main margin and
apo_* only); bco_pair (a running mean across steps) is not offered.

The paired losses take one batch of 2B sequences, the B chosen ones first and then the B rejected ones in the same
order (TRL's concatenated forward; Liger's layout): input (2B, T, D), target (2B, T) with the prompt's and the
padding's positions at ignore_index. The reference model's log-probabilities come either precomputed
(`ref_chosen_logps`, `ref_rejected_logps`; TRL's precompute_ref_log_probs) or from its hidden states and head
(`ref_input`, `ref_weight`), then under no_grad through the same fused pass.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .checks import (check_bool, check_finite, check_float_tensor, check_ignore_index, check_shift, check_softcap,
                     check_tensor)
from .engine import accumulation_dtype, log1m_exp, row_block_matvec
from .functional import _shift_targets, linear_cross_entropy, log_probs_and_entropy
from .modules import _autocast_like

DPO_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "hinge", "ipo", "nca_pair", "sppo_hard", "aot", "aot_pair",
                  "apo_zero", "apo_down", "discopop")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# the loss types whose formula has a label-smoothing term (TRL ignores label_smoothing for the others; here it is
# refused there rather than silently dropped)
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair", "simpo")
# exo_pair's formula needs 0 < ε (it takes log ε); TRL substitutes this for ε = 0
EXO_PAIR_DEFAULT_SMOOTHING = 1e-3
# ORPO's log p above −1e-30 (p rounds to exactly 1; or z_t − lse rounded to +ulp) is taken as −1e-30 (its gradient
# passed through): log(1 − p) then stays finite, and σ(−log odds) ≈ 1e-30·odds(rejected) a normal float32. Its loss
# term there is below β·1e-30·odds; the gradient's limit as log p → 0⁻ is −β·odds(rejected), which the pass-through
# gives.
MAX_LOG_PROB = -1e-30


def token_log_probs(input, weight, target, ignore_index, shift, temperature=1.0, what="sequences", softcap=None):
    """For a batch of sequences input (B, T, D) (a head in another dtype cast to input's under autocast): the (B, T)
    log p(target) and entropy (0 at ignored positions) and the (B, T) mask of the positions that count, of
    softcap(input·weightᵀ)/temperature. Shared by the preference heads and the GRPO head."""
    check_tensor("input", input)
    if input.dim() != 3:
        raise ValueError(f"input must have shape (B, T, D) (a batch of {what}), got shape {tuple(input.shape)}")
    log_probs, entropy = log_probs_and_entropy(input, _autocast_like(weight, input), target, temperature=temperature,
                                               softcap=softcap, ignore_index=ignore_index, shift=shift)
    valid = _shift_targets(target, shift, ignore_index) != ignore_index
    return log_probs, entropy, valid


def softcap_repr(softcap):
    """A head's softcap for its extra_repr: nothing where it has none."""
    return "" if softcap is None else f", softcap={softcap}"


def _sum_or_mean(log_probs, valid, average):
    total = log_probs.sum(-1)
    # a sequence with no counted token has log π = 0 (its mean is 0/1, where TRL and Liger give 0/0 = NaN)
    return total / valid.sum(-1).clamp_min(1) if average else total


def sequence_log_probs(input, weight, target, *, ignore_index=-100, shift=0, average=False, temperature=1.0,
                       softcap=None):
    """log π(y | x) per sequence: Σ_t log p(target_t) over the positions whose target is not ignore_index, or its
    mean over them (average=True; 0 for a sequence without such positions), p = softmax(softcap(input·weightᵀ) /
    temperature) (softcap: Gemma 2/3's final-logit softcap, or None). input (B, T, D), weight (V, D), target (B, T)
    integer; returns (B,) fp32 (fp64 for fp64 input), differentiable in input and weight. One fused pass over the
    vocabulary (`log_probs_and_entropy`); shift as in linear_cross_entropy."""
    ignore_index, shift = check_ignore_index(ignore_index), check_shift(shift)
    average = check_bool("average", average)
    log_probs, _, valid = token_log_probs(input, weight, target, ignore_index, shift, temperature, softcap=softcap)
    return _sum_or_mean(log_probs, valid, average)


def _as_vectors(**tensors):
    """The (B,) log-probability vectors of one call: float tensors of one shape and device, upcast to float32."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        check_float_tensor(name, t, dim=1)
        if first is None:
            first = (name, t)
        elif t.shape != first[1].shape or t.device != first[1].device:
            raise ValueError(f"{name} must match {first[0]} (shape {tuple(first[1].shape)} on {first[1].device}), "
                             f"got shape {tuple(t.shape)} on {t.device}")
    return [None if t is None else t.to(accumulation_dtype(t.dtype)) for t in tensors.values()]


def _check_smoothing(loss_type, label_smoothing, loss_types):
    if loss_type not in loss_types:
        raise ValueError(f"loss_type must be one of {loss_types}, got {loss_type!r}")
    check_finite("label_smoothing", label_smoothing, 0.0, 0.5, high_open=loss_type in ("robust", "exo_pair"))
    if label_smoothing != 0 and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"label_smoothing applies to loss_type in {SMOOTHED_LOSS_TYPES} only, got "
                         f"label_smoothing={label_smoothing!r} with loss_type={loss_type!r}")
    return float(label_smoothing)


def _check_beta(beta):
    check_finite("beta", beta, 0.0, low_open=True)
    return float(beta)


def _smoothed_sigmoid(u, eps):
    """−(1 − ε)·log σ(u) − ε·log σ(−u): the Bradley–Terry loss with labels flipped at rate ε (conservative DPO)."""
    return -torch.nn.functional.logsigmoid(u) * (1 - eps) - torch.nn.functional.logsigmoid(-u) * eps


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05):
    """DPO (Rafailov et al. 2023) and its pairwise variants, per pair, as TRL's DPOTrainer.dpo_loss.

    All arguments (B,) log π(y | x); without the reference's (both None) the loss is reference-free (TRL's
    reference_free=True). With h = (π_c − π_r) − (ref_c − ref_r) and the log-ratios c = π_c − ref_c, r = π_r − ref_r:
    sigmoid −(1−ε)·log σ(βh) − ε·log σ(−βh); robust ((1−ε)·(−log σ(βh)) + ε·log σ(−βh))/(1 − 2ε); exo_pair (EXO's
    reverse KL to the ε-smoothed labels; ε = 1e-3 when 0); hinge relu(1 − βh); ipo (h − 1/(2β))²; nca_pair
    −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr); sppo_hard (c − 1/(2β))² + (r + 1/(2β))²; aot / aot_pair the sigmoid loss
    on the difference of the batch-sorted log-ratios (of π_c − π_r against ref_c − ref_r / of c against r);
    apo_zero 1 − σ(βc) + σ(βr); apo_down σ(βc) + 1 − σ(β(c − r)); discopop (1 − σ(βh/τ))·(−log σ(βh)) +
    σ(βh/τ)·e^{−βh} with τ = discopop_tau, its second term as e^{−βh + log σ(βh/τ)} (TRL's e^{−βh}·σ(βh/τ) is inf·0 =
    NaN below βh ≈ −88).

    Returns (losses (B,), chosen_rewards β·c, rejected_rewards β·r), the rewards detached, float32 (float64 for
    float64 inputs). TRL's IPO averages log-probabilities over tokens: pass such log-probabilities
    (`sequence_log_probs(..., average=True)`; LinearDPOLoss does this for ipo).
    """
    beta = _check_beta(beta)
    eps = _check_smoothing(loss_type, label_smoothing, DPO_LOSS_TYPES)
    check_finite("discopop_tau", discopop_tau, 0.0, low_open=True)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together (or neither, for the "
                         "reference-free loss)")
    pc, pr, rc, rr = _as_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = (pc - pr) - (rc - rr)
    logsigmoid, sigmoid = torch.nn.functional.logsigmoid, torch.sigmoid
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * h, eps)
    elif loss_type == "robust":
        losses = (-logsigmoid(beta * h) * (1 - eps) + logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        eps = eps or EXO_PAIR_DEFAULT_SMOOTHING
        u = beta * h
        losses = (sigmoid(u) * (logsigmoid(u) - math.log1p(-eps))
                  + sigmoid(-u) * (logsigmoid(-u) - math.log(eps)))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "nca_pair":
        losses = (-logsigmoid(beta * chosen_ratio) - 0.5 * logsigmoid(-beta * chosen_ratio)
                  - 0.5 * logsigmoid(-beta * rejected_ratio))
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif loss_type == "aot":
        losses = _smoothed_sigmoid(beta * (torch.sort(pc - pr).values - torch.sort(rc - rr).values), eps)
    elif loss_type == "aot_pair":
        losses = _smoothed_sigmoid(beta * (torch.sort(chosen_ratio).values - torch.sort(rejected_ratio).values), eps)
    elif loss_type == "apo_zero":
        losses = (1 - sigmoid(beta * chosen_ratio)) + sigmoid(beta * rejected_ratio)
    elif loss_type == "apo_down":
        losses = sigmoid(beta * chosen_ratio) + (1 - sigmoid(beta * (chosen_ratio - rejected_ratio)))
    else:  # discopop
        u = beta * h
        modulation = sigmoid(u / discopop_tau)
        losses = -logsigmoid(u) * (1 - modulation) + torch.exp(logsigmoid(u / discopop_tau) - u)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def orpo_loss(chosen_logps, rejected_logps, *, beta=0.1):
    """ORPO's odds-ratio term (Hong et al. 2024), per pair: −β·log σ(log odds(c) − log odds(r)) with
    log odds(y) = log p − log(1 − p) of the token-averaged log-probabilities (TRL's ORPOTrainer.odds_ratio_loss,
    whose returned `losses` are the negative of these). log(1 − p) = log(−expm1(log p)) is exact as p → 1; a log p
    above −1e-30 (a completion that rounds to certain; one without counted tokens, whose mean is 0; a slightly
    positive one, as z_t − lse can round to) is taken as −1e-30 with its gradient passed through (MAX_LOG_PROB).

    Returns (losses (B,), chosen_rewards β·π_c, rejected_rewards β·π_r, log_odds (B,)), all but losses detached.
    ORPO's full objective adds the chosen sequences' NLL (LinearORPOLoss does).
    """
    beta = _check_beta(beta)
    pc, pr = _as_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    pc, pr = _below_certain(pc), _below_certain(pr)
    log_odds = (pc - pr) - (log1m_exp(pc) - log1m_exp(pr))
    losses = -beta * torch.nn.functional.logsigmoid(log_odds)
    return losses, (beta * pc).detach(), (beta * pr).detach(), log_odds.detach()


def _below_certain(log_p):
    """log_p with its values above MAX_LOG_PROB replaced by MAX_LOG_PROB in the forward pass only (the gradient
    passes through as the identity; elsewhere, −inf included, log_p as it is)."""
    return torch.where(log_p > MAX_LOG_PROB, log_p - log_p.detach() + MAX_LOG_PROB, log_p)


def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5):
    """CPO (Xu et al. 2024) and SimPO (Meng et al. 2024), per pair, as TRL's CPOTrainer.cpo_loss: DPO's losses
    with the reference left out, on h = π_c − π_r. sigmoid −(1−ε)·log σ(βh) − ε·log σ(−βh); hinge relu(1 − βh);
    ipo (h − 1/(2β))²; simpo the sigmoid loss of βh − γ (γ = simpo_gamma, the target reward margin; SimPO's
    log-probabilities are token averages). Returns (losses (B,), β·π_c, β·π_r), the rewards detached.
    """
    beta = _check_beta(beta)
    eps = _check_smoothing(loss_type, label_smoothing, CPO_LOSS_TYPES)
    check_finite("simpo_gamma", simpo_gamma)
    pc, pr = _as_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    h = pc - pr
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * h, eps)
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * h - float(simpo_gamma), eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * pc).detach(), (beta * pr).detach()


def kto_kl_estimate(policy_kl_logps, ref_kl_logps, *, process_group=None):
    """KTO's reference point z₀: the mean of π − ref over mismatched (prompt, completion) pairs, clamped at 0 and
    detached (TRL's KTOTrainer). With a torch.distributed `process_group`, TRL's: each rank's mean, averaged over
    the ranks (unweighted, as its gather of the per-rank values), then clamped — not a mean of per-rank clamped
    values."""
    pk, rk = _as_vectors(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    mean = (pk - rk).detach().mean()
    if process_group is None:
        return mean.clamp(min=0)
    mean = mean.clone()
    torch.distributed.all_reduce(mean, group=process_group)
    return (mean / torch.distributed.get_world_size(process_group)).clamp(min=0)


def kto_loss(logps, ref_logps, desirable, *, kl=0.0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024), per sequence, as TRL's KTOTrainer.kto_loss: with r = π − ref and the reference
    point z₀ = kl (a float or a 0-d tensor, see kto_kl_estimate), λ_D·(1 − σ(β(r − z₀))) for a desirable completion
    and λ_U·(1 − σ(β(z₀ − r))) for an undesirable one (TRL's apo_zero_unpaired is kl=0). logps, ref_logps (B,)
    float, desirable (B,) bool.
    Returns (losses (B,), rewards β·r detached); TRL's loss is their mean.
    """
    beta = _check_beta(beta)
    check_finite("desirable_weight", desirable_weight, 0.0)
    check_finite("undesirable_weight", undesirable_weight, 0.0)
    policy, ref = _as_vectors(logps=logps, ref_logps=ref_logps)
    check_tensor("desirable", desirable)
    if desirable.dtype != torch.bool or desirable.shape != policy.shape or desirable.device != policy.device:
        raise ValueError(f"desirable must be a bool tensor of logps's shape {tuple(policy.shape)} on {policy.device}, "
                         f"got {desirable.dtype} of shape {tuple(desirable.shape)} on {desirable.device}")
    if isinstance(kl, Tensor):
        if kl.numel() != 1:
            raise ValueError(f"kl must be a number or a one-element tensor, got shape {tuple(kl.shape)}")
        kl = kl.detach().to(policy.dtype).reshape(())
    else:
        check_finite("kl", kl)
    ratio = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, (beta * ratio).detach()


class PreferenceOutput(NamedTuple):
    """What a paired preference head returns: the loss and what TRL logs beside it (rewards/chosen is
    chosen_rewards.mean(), rewards/accuracies (chosen_rewards > rejected_rewards).float().mean(), ...)."""
    loss: Tensor                 # mean over pairs of the preference loss, + nll_weight · nll_loss (both weighted by
                                 # policy_weights, as TRL's WPO)
    pair_losses: Tensor          # (B,) the preference loss of each pair (times its policy weight, if any)
    chosen_logps: Tensor         # (B,) log π of the chosen completions (summed or averaged over tokens)
    rejected_logps: Tensor       # (B,)
    chosen_rewards: Tensor       # (B,) detached
    rejected_rewards: Tensor     # (B,) detached
    nll_loss: Tensor             # the chosen completions' token-mean negative log-likelihood
    chosen_logits_mean: Tensor   # mean logit over the chosen completions' counted tokens and the vocabulary, detached
    rejected_logits_mean: Tensor
    policy_weights: Optional[Tensor] = None  # (B,) WPO's pair weights (LinearDPOLoss(use_weighting=True)), detached


def mean_logits(x, w, bias=None, temperature=1.0, softcap=None):
    """Per row of x (N, D) the mean over the V classes of softcap(x·wᵀ + b)/temperature, without gradient and without
    the logits: TRL's logit-mean metrics. Without a softcap it is linear in the head, x·w̄ + b̄ (w̄ accumulated in fp32
    without an fp32 copy of the head; 16-bit rows upcast by blocks, not as a whole (N, D) copy); with one it takes a
    forward pass, as lse − (label-smoothed CE with ε = 1) = Σ_j z_j / V (to the resolution of lse)."""
    x, w, bias = x.detach(), w.detach(), None if bias is None else bias.detach()
    acc = accumulation_dtype(x.dtype)
    if softcap is None:
        mean = row_block_matvec(x, w.mean(0, dtype=acc))
        return (mean if bias is None else mean + bias.mean(dtype=acc)) / temperature
    any_class = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    smoothed, lse = linear_cross_entropy(x, w, any_class, bias, softcap=softcap, label_smoothing=1.0,
                                         reduction="none", return_lse=True, skip_ignored_rows=False)
    return (lse - smoothed) / temperature


def _mean_logits_of_parts(input, weight, valid, softcap, parts=(slice(None),)):
    """The mean logit over the counted positions (valid: their mask) of each part of input (B, ..., D) (slices of its
    first dimension: DPO's chosen and rejected halves) and all V classes: TRL's logits/chosen metrics without the
    logits, from one mean_logits over the whole input (one w̄, or one pass with a softcap)."""
    per_token = mean_logits(input.reshape(-1, input.shape[-1]), weight, softcap=softcap).reshape(valid.shape)
    return [(per_token[part] * valid[part]).sum() / valid[part].sum().clamp_min(1) for part in parts]


def reference_token_log_probs(ref_input, ref_weight, input, target, ignore_index, shift, temperature=1.0,
                              softcap=None):
    """The reference model's (B, T) per-token log-probabilities and the counted mask, from its hidden states (any
    width, input's other dimensions) and head, under no_grad. Shared by the preference heads and the GRPO head."""
    check_tensor("input", input)
    check_tensor("ref_input", ref_input)
    if ref_input.shape[:-1] != input.shape[:-1]:
        raise ValueError(f"ref_input must have shape {tuple(input.shape[:-1])} + (D_ref,) like input, got "
                         f"shape {tuple(ref_input.shape)}")
    with torch.no_grad():
        log_probs, _, valid = token_log_probs(ref_input, ref_weight, target, ignore_index, shift, temperature,
                                              softcap=softcap)
    return log_probs, valid


class _PairedPreferenceLoss(nn.Module):
    """A paired preference loss on an LM head: forward(input (2B, T, D), weight (V, D), target (2B, T), ...), the
    B chosen sequences first (module docstring). Subclasses set `average` (token-averaged log-probabilities),
    `uses_reference` and `pair_losses`."""

    uses_reference = False

    def __init__(self, *, nll_weight, nll_weight_name, ignore_index, shift, softcap):
        super().__init__()
        check_finite(nll_weight_name, nll_weight, 0.0)
        self.nll_weight = float(nll_weight)
        self.ignore_index, self.shift = check_ignore_index(ignore_index), check_shift(shift)
        self.softcap = check_softcap(softcap)

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        raise NotImplementedError

    def _reference_logps(self, input, target, ref_input, ref_weight, ref_chosen_logps, ref_rejected_logps):
        given = [t is not None for t in (ref_input, ref_weight, ref_chosen_logps, ref_rejected_logps)]
        for name, t in zip(("ref_input", "ref_weight", "ref_chosen_logps", "ref_rejected_logps"),
                           (ref_input, ref_weight, ref_chosen_logps, ref_rejected_logps)):
            if t is not None:
                check_tensor(name, t)
        if not self.uses_reference or getattr(self, "reference_free", False):
            if any(given):
                why = "uses no reference model" if not self.uses_reference else "was made with reference_free=True"
                raise ValueError(f"{type(self).__name__} {why}, got reference arguments")
            return None, None
        if given == [True, True, False, False]:
            log_probs, valid = reference_token_log_probs(ref_input, ref_weight, input, target, self.ignore_index,
                                                         self.shift, softcap=self.softcap)
            return _sum_or_mean(log_probs, valid, self.average).chunk(2)
        if given == [False, False, True, True]:
            return ref_chosen_logps.detach(), ref_rejected_logps.detach()
        raise ValueError("pass the reference model's ref_input and ref_weight, or its precomputed ref_chosen_logps "
                         "and ref_rejected_logps (one pair, not both)"
                         + ("" if any(given) else f"; or construct {type(self).__name__}(reference_free=True)"))

    def forward(self, input, weight, target, *, ref_input=None, ref_weight=None, ref_chosen_logps=None,
                ref_rejected_logps=None) -> PreferenceOutput:
        check_tensor("input", input)
        if input.dim() != 3 or input.shape[0] % 2 or input.shape[0] == 0:
            raise ValueError("input must have shape (2B, T, D): B ≥ 1 chosen sequences, then the B rejected ones; "
                             f"got shape {tuple(input.shape)}")
        # the reference first: its arguments are checked before the policy's pass runs
        ref_chosen, ref_rejected = self._reference_logps(input, target, ref_input, ref_weight, ref_chosen_logps,
                                                         ref_rejected_logps)
        per_token, _, valid = token_log_probs(input, weight, target, self.ignore_index, self.shift,
                                              softcap=self.softcap)
        chosen, rejected = self.sequence_logps(per_token, valid).chunk(2)
        losses, chosen_rewards, rejected_rewards = self.pair_losses(chosen, rejected, ref_chosen, ref_rejected)
        pairs = input.shape[0] // 2
        chosen_tokens = valid[:pairs]
        nll = -per_token[:pairs].sum() / chosen_tokens.sum().clamp_min(1)
        weights = self.pair_weights(input, weight, target, per_token, valid)
        # TRL: ((pair loss + nll_weight·nll)·weight).mean()
        nll_share = 1.0 if weights is None else weights.mean()
        losses = losses if weights is None else losses * weights
        loss = losses.mean() + self.nll_weight * nll * nll_share if self.nll_weight else losses.mean()
        with torch.no_grad():
            logit_means = _mean_logits_of_parts(input, weight, valid, self.softcap,
                                                (slice(0, pairs), slice(pairs, 2 * pairs)))
        return PreferenceOutput(loss, losses, chosen, rejected, chosen_rewards, rejected_rewards, nll, *logit_means,
                                weights)

    def sequence_logps(self, per_token, valid):
        """(2B,) log π of each sequence from its per-token log-probabilities (0 where not counted)."""
        return _sum_or_mean(per_token, valid, self.average)

    def pair_weights(self, input, weight, target, per_token, valid):
        """(B,) weights of the pairs' losses, or None (unweighted)."""
        return None


class LinearDPOLoss(_PairedPreferenceLoss):
    """DPO on an LM head (TRL's DPOTrainer loss; Liger's LigerFusedLinearDPOLoss), never the logits.

    forward(input (2B, T, D), weight (V, D), target (2B, T), *, ref_input, ref_weight | ref_chosen_logps,
    ref_rejected_logps) → PreferenceOutput. loss_type, label_smoothing and discopop_tau as `dpo_loss` (ipo on
    token-averaged log-probabilities, as TRL); rpo_alpha ≥ 0 adds that multiple of the chosen sequences' NLL (RPO,
    TRL's rpo_alpha); reference_free=True drops the reference model (and refuses reference arguments).

    ld_alpha (LD-DPO, Liu et al. 2024; TRL's option, the paper's definition): the policy's log π of each sequence is
    the sum over its first l_p counted tokens plus ld_alpha times the sum over the rest, l_p the shorter completion's
    token count in its pair (the reference's stays the plain sum, as TRL's). use_weighting=True (WPO, Zhou et al.
    2024; TRL's option): each pair's loss (with its share of the RPO term) is weighted by min(1, exp(w_chosen +
    w_rejected)), w the token mean of log p(y_t) − log Σ_v p_v² under the policy, without gradient: log p at
    temperature ½ minus log p, one more fused forward pass over the vocabulary at temperature ½ (no logits).
    """

    uses_reference = True

    def __init__(self, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0, reference_free=False,
                 discopop_tau=0.05, ld_alpha=None, use_weighting=False, ignore_index=-100, shift=0, softcap=None):
        super().__init__(nll_weight=rpo_alpha, nll_weight_name="rpo_alpha", ignore_index=ignore_index, shift=shift,
                         softcap=softcap)
        self.beta = _check_beta(beta)
        self.label_smoothing = _check_smoothing(loss_type, label_smoothing, DPO_LOSS_TYPES)
        check_finite("discopop_tau", discopop_tau, 0.0, low_open=True)
        self.loss_type, self.reference_free = loss_type, check_bool("reference_free", reference_free)
        self.discopop_tau = float(discopop_tau)
        self.average = loss_type == "ipo"
        if ld_alpha is not None:
            check_finite("ld_alpha", ld_alpha, 0.0, 1.0)
            if self.average:
                raise ValueError("ld_alpha weights the tokens of summed log-probabilities; loss_type='ipo' averages "
                                 "them (TRL's LD-DPO then drops the averaging): use one or the other")
            ld_alpha = float(ld_alpha)
        self.ld_alpha, self.use_weighting = ld_alpha, check_bool("use_weighting", use_weighting)

    def sequence_logps(self, per_token, valid):
        if self.ld_alpha is None:
            return super().sequence_logps(per_token, valid)
        counted = valid.sum(-1)
        pairs = counted.shape[0] // 2
        public = torch.minimum(counted[:pairs], counted[pairs:]).repeat(2)  # l_p, each pair's shorter completion
        front = valid & (valid.cumsum(-1) <= public[:, None])  # the first l_p counted tokens
        return torch.where(front, per_token, self.ld_alpha * per_token).sum(-1)

    def pair_weights(self, input, weight, target, per_token, valid):
        if not self.use_weighting:
            return None
        with torch.no_grad():
            # log p_t − log Σ_v p_v² = (2z_t − lse(2z)) − (z_t − lse(z)): log p at temperature ½ minus log p
            sharp, _, _ = token_log_probs(input.detach(), weight.detach(), target, self.ignore_index, self.shift,
                                          temperature=0.5, softcap=self.softcap)
            adjusted = ((sharp - per_token.detach()) * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            pairs = adjusted.shape[0] // 2
            return torch.exp(adjusted[:pairs] + adjusted[pairs:]).clamp(max=1.0)

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau)

    def extra_repr(self):
        tau = f", discopop_tau={self.discopop_tau}" if self.loss_type == "discopop" else ""
        options = (f", ld_alpha={self.ld_alpha}" if self.ld_alpha is not None else "") + (
            ", use_weighting=True" if self.use_weighting else "")
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}{tau}, "
                f"rpo_alpha={self.nll_weight}, reference_free={self.reference_free}{options}, "
                f"ignore_index={self.ignore_index}, shift={self.shift}{softcap_repr(self.softcap)}")


class LinearORPOLoss(_PairedPreferenceLoss):
    """ORPO on an LM head (TRL's ORPOTrainer; Liger's LigerFusedLinearORPOLoss): the chosen sequences' NLL plus
    `orpo_loss`'s odds-ratio term on token-averaged log-probabilities; no reference model. forward as LinearDPOLoss
    without the reference arguments."""

    average = True

    def __init__(self, *, beta=0.1, ignore_index=-100, shift=0, softcap=None):
        super().__init__(nll_weight=1.0, nll_weight_name="nll_weight", ignore_index=ignore_index, shift=shift,
                         softcap=softcap)
        self.beta = _check_beta(beta)

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return orpo_loss(chosen, rejected, beta=self.beta)[:3]

    def extra_repr(self):
        return f"beta={self.beta}, ignore_index={self.ignore_index}, shift={self.shift}{softcap_repr(self.softcap)}"


class LinearCPOLoss(_PairedPreferenceLoss):
    """CPO on an LM head (TRL's CPOTrainer; Liger's LigerFusedLinearCPOLoss): `cpo_loss` plus alpha (≥ 0) times the
    chosen sequences' NLL; no reference model; ipo and simpo on token-averaged log-probabilities (as TRL)."""

    GAMMA_NAME = "simpo_gamma"

    def __init__(self, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5, alpha=1.0,
                 ignore_index=-100, shift=0, softcap=None):
        super().__init__(nll_weight=alpha, nll_weight_name="alpha", ignore_index=ignore_index, shift=shift,
                         softcap=softcap)
        self.beta = _check_beta(beta)
        self.label_smoothing = _check_smoothing(loss_type, label_smoothing, CPO_LOSS_TYPES)
        check_finite(self.GAMMA_NAME, simpo_gamma)
        self.loss_type, self.simpo_gamma = loss_type, float(simpo_gamma)
        self.average = loss_type in ("ipo", "simpo")

    def pair_losses(self, chosen, rejected, ref_chosen, ref_rejected):
        return cpo_loss(chosen, rejected, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)

    def extra_repr(self):
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"simpo_gamma={self.simpo_gamma}, alpha={self.nll_weight}, ignore_index={self.ignore_index}, "
                f"shift={self.shift}{softcap_repr(self.softcap)}")


class LinearSimPOLoss(LinearCPOLoss):
    """SimPO (Meng et al. 2024) on an LM head: −log σ(β·(π̄_c − π̄_r) − γ) on token-averaged log-probabilities, no
    reference model; the paper's β = 2 and γ = 0.5 and no NLL by default (TRL's CPOConfig and Liger's SimPO default
    to β = 0.1 and an NLL weight of 1), alpha > 0 adds the chosen NLL (CPO-SimPO)."""

    GAMMA_NAME = "gamma"

    def __init__(self, *, beta=2.0, gamma=0.5, label_smoothing=0.0, alpha=0.0, ignore_index=-100, shift=0,
                 softcap=None):
        super().__init__(beta=beta, loss_type="simpo", label_smoothing=label_smoothing, simpo_gamma=gamma,
                         alpha=alpha, ignore_index=ignore_index, shift=shift, softcap=softcap)


class KTOOutput(NamedTuple):
    loss: Tensor          # mean over the batch of kto_loss's losses
    logps: Tensor         # (B,) log π of the completions
    rewards: Tensor       # (B,) β·(π − ref), detached
    logits_mean: Tensor   # mean logit over the counted tokens and the vocabulary, detached


class LinearKTOLoss(nn.Module):
    """KTO on an LM head (TRL's KTOTrainer; Liger's LigerFusedLinearKTOLoss), unpaired: forward(input (B, T, D),
    weight (V, D), target (B, T), desirable (B,) bool, *, ref_input, ref_weight | ref_logps, kl=0.0) → KTOOutput.
    kl is the reference point z₀ (`kto_kl_estimate` of the mismatched pairs' log-probabilities, which
    `sequence_log_probs` gives under no_grad)."""

    def __init__(self, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100, shift=0,
                 softcap=None):
        super().__init__()
        self.beta = _check_beta(beta)
        check_finite("desirable_weight", desirable_weight, 0.0)
        check_finite("undesirable_weight", undesirable_weight, 0.0)
        self.desirable_weight, self.undesirable_weight = float(desirable_weight), float(undesirable_weight)
        self.ignore_index, self.shift = check_ignore_index(ignore_index), check_shift(shift)
        self.softcap = check_softcap(softcap)

    def forward(self, input, weight, target, desirable, *, ref_input=None, ref_weight=None,
                ref_logps: Optional[Tensor] = None, kl=0.0) -> KTOOutput:
        for name, t in (("ref_input", ref_input), ("ref_weight", ref_weight), ("ref_logps", ref_logps)):
            if t is not None:
                check_tensor(name, t)
        if (ref_input is None) != (ref_weight is None) or (ref_input is None) == (ref_logps is None):
            raise ValueError("pass the reference model's ref_input and ref_weight, or its precomputed ref_logps "
                             "(one of the two)")
        if ref_logps is None:  # (before the policy's pass: its arguments are checked there)
            ref_token_log_probs, _ = reference_token_log_probs(ref_input, ref_weight, input, target, self.ignore_index,
                                                               self.shift, softcap=self.softcap)
            ref_logps = ref_token_log_probs.sum(-1)
        per_token, _, valid = token_log_probs(input, weight, target, self.ignore_index, self.shift,
                                              softcap=self.softcap)
        logps = per_token.sum(-1)
        losses, rewards = kto_loss(logps, ref_logps.detach(), desirable, kl=kl, beta=self.beta,
                                   desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        with torch.no_grad():
            logits_mean, = _mean_logits_of_parts(input, weight, valid, self.softcap)
        return KTOOutput(losses.mean(), logps, rewards, logits_mean)

    def extra_repr(self):
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}, ignore_index={self.ignore_index}, shift={self.shift}"
                f"{softcap_repr(self.softcap)}")
