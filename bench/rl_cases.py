"""RL policy-step cases: per-token log-probabilities of the sampled tokens and the entropy of the policy, both
differentiable (a PPO/GRPO step's ratio and entropy bonus), over an LM head.

The step's loss is mean(advantage·log p_t) + 0.01·mean(H) with a fixed random advantage per token, so both
outputs carry a gradient, as in a policy-gradient step with an entropy bonus.

Providers:
  marginkern      marginkern.log_probs_and_entropy (one forward pass: lse and entropy; the entropy term in the
                  backward's dL/da kernel)
  naive           what RL trainers do on materialised logits: fp32 logits / T, log_softmax, gather, −Σ p·log p
  torch.compile   torch.compile of that naive function
  trl             TRL's fused LM head function (trl.kernels.chunked_logprob.ChunkedLogProbFunction, what its SFT,
                  GRPO, RLOO, DPO and KTO trainers run; 32768-class chunks, TRL's default; Triton on CUDA, PyTorch
                  tiles elsewhere), asked for the entropy as GRPO asks; marginkern.trl.patch_trl() puts the
                  marginkern provider's pass in its place
  3-GEMM floor    the three GEMMs of the plain LM-head CE of the same shapes
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, lm_head_cases, loss_step
from harness import Skip

FLOOR = "3-GEMM floor"
TEMPERATURE = 0.9
ENTROPY_COEF = 0.01


def cases(device_type, quick):
    return lm_head_cases("rl", device_type, quick)


def _advantage(target):
    """A fixed ±1 advantage per token (the same for every provider: seeded by the token count)."""
    generator = torch.Generator(device="cpu").manual_seed(target.numel())
    return (torch.randint(0, 2, target.shape, generator=generator) * 2 - 1).float().to(target.device)


def _policy_loss(log_pt, entropy, target):
    return (_advantage(target) * log_pt).mean() + ENTROPY_COEF * entropy.mean()


def naive_log_probs_entropy(x, w, target):
    log_p = torch.log_softmax(F.linear(x, w).float() / TEMPERATURE, dim=-1)
    log_pt = log_p.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return _policy_loss(log_pt, entropy, target)


def marginkern_log_probs_entropy(x, w, target):
    return _policy_loss(*marginkern.log_probs_and_entropy(x, w, target, temperature=TEMPERATURE), target)


TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def trl_step(case, device):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError as exc:
        raise Skip(f"trl not importable ({exc})")

    def trl_log_probs_entropy(x, w, target):
        log_pt, entropy = ChunkedLogProbFunction.apply(x, w, None, target, TEMPERATURE, TRL_CHUNK, None, 1.0,
                                                       ("entropy",))[:2]
        return _policy_loss(log_pt, entropy, target)
    return loss_step(trl_log_probs_entropy, case, device)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern_log_probs_entropy, case, device),
    "trl": trl_step,
    "naive": lambda case, device: loss_step(naive_log_probs_entropy, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_log_probs_entropy, device), case, device),
    FLOOR: gemm_floor,
}
