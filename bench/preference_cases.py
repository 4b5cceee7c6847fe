"""Preference-optimisation cases: DPO on an LM head, the reference model's log-probabilities precomputed (TRL's
precompute_ref_log_probs), the N rows taken as N / T sequences of T = 128 tokens, half chosen, half rejected.

Providers, measured in one run on the same inputs:
  marginkern          marginkern.LinearDPOLoss: per-sequence log-probabilities from the fused log_probs pass, no
                      logits
  naive               TRL's DPOTrainer on the head's logits (model dtype): its selective_log_softmax (per sequence;
                      fp32 logits: label logit − logsumexp, 16-bit: log_softmax in that dtype), masked sums, sigmoid
  torch.compile       torch.compile of that naive function
  liger-kernel dpo    Liger's LigerFusedLinearDPOLoss, reference-free (its forward takes a reference model's
                      hidden states, not precomputed log-probabilities; the loss arithmetic is the same size; CUDA)
  3-GEMM floor        the three plain matmuls of the same shapes (common_providers.gemm_floor)
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, lm_head_cases, loss_step, peer_attribute
from harness import Skip

FLOOR = "3-GEMM floor"
SEQUENCE_LENGTH = 128
PROMPT_TOKENS = 32  # each sequence's first tokens are its prompt: ignore_index, as TRL's labels
BETA = 0.1


def cases(device_type, quick):
    return lm_head_cases("dpo", device_type, quick)


def _sequences(x, w, target):
    """(2B, T, D) hidden states and (2B, T) labels with the prompts ignored; a fixed reference log-probability per
    sequence (seeded by the shape, the same for every provider)."""
    T = SEQUENCE_LENGTH
    if x.shape[0] % (2 * T):
        raise Skip(f"the case's N = {x.shape[0]} rows are not an even number of {T}-token sequences")
    labels = target.reshape(-1, T).clone()
    labels[:, :PROMPT_TOKENS] = -100
    generator = torch.Generator(device="cpu").manual_seed(x.shape[0])
    ref = (-torch.rand(labels.shape[0], generator=generator) * (T - PROMPT_TOKENS) * 10).to(x.device)
    return x.reshape(-1, T, x.shape[1]), labels, ref


def selective_log_softmax(logits, index):
    """TRL's selective_log_softmax: in fp32/fp64 the label's logit minus each sequence's logsumexp; in 16-bit
    log_softmax per sequence, in the logits' dtype (its memory-saving loops)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index[..., None])[..., 0]
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, i[:, None])[:, 0] for row, i in zip(logits, index)])


def naive_dpo(x, w, target):
    x3, labels, ref = _sequences(x, w, target)
    logits = F.linear(x3, w)
    mask = labels != -100
    per_token = selective_log_softmax(logits, torch.where(mask, labels, 0))
    logps = (per_token * mask).sum(-1)
    pairs = logps.shape[0] // 2
    h = (logps[:pairs] - logps[pairs:]) - (ref[:pairs] - ref[pairs:])
    return -F.logsigmoid(BETA * h).mean()


_HEAD = marginkern.LinearDPOLoss(beta=BETA)


def marginkern_dpo(x, w, target):
    x3, labels, ref = _sequences(x, w, target)
    pairs = ref.shape[0] // 2
    return _HEAD(x3, w, labels, ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:]).loss


def _liger_dpo(case, device):
    liger_dpo = peer_attribute("liger-kernel", "liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss", device)
    loss_module = liger_dpo(beta=BETA, use_ref_model=False)

    def liger(x, w, target):
        x3, labels, _ = _sequences(x, w, target)
        out = loss_module(w, x3, labels)
        return out[0] if isinstance(out, tuple) else out  # newer versions return (loss, metrics)
    return loss_step(liger, case, device)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern_dpo, case, device),
    "naive": lambda case, device: loss_step(naive_dpo, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_dpo, device), case, device),
    "liger-kernel dpo": _liger_dpo,
    FLOOR: gemm_floor,
}
