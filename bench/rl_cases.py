"""RL policy-step cases: per-token log-probabilities of the sampled tokens and the entropy of the policy, both
differentiable (a PPO/GRPO step's ratio and entropy bonus), over an LM head.

The step's loss is mean(advantage·log p_t) + 0.01·mean(H) with a fixed random advantage per token, so both
outputs carry a gradient, as in a policy-gradient step with an entropy bonus.

Providers:
  marginkern      marginkern.log_probs_and_entropy (one forward pass: lse and entropy; the entropy term in the
                  backward's dL/da kernel)
  naive           what RL trainers do on materialised logits: fp32 logits / T, log_softmax, gather, −Σ p·log p
  torch.compile   torch.compile of that naive function
  3-GEMM floor    the three GEMMs of the plain LM-head CE of the same shapes
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, loss_step
from harness import Case

FLOOR = "3-GEMM floor"
TEMPERATURE = 0.9
ENTROPY_COEF = 0.01


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("rl-small-32k", 2048, 1024, 32_000, "bfloat16"),
                     Case("rl-llama3-8b", 8192, 4096, 128_256, "bfloat16")]
    else:
        all_cases = [Case("cpu-rl-16k", 512, 256, 16_384, "float32"),
                     Case("cpu-rl-200k", 512, 128, 200_000, "float32")]
    return all_cases[:1] if quick else all_cases


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


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern_log_probs_entropy, case, device),
    "naive": lambda case, device: loss_step(naive_log_probs_entropy, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_log_probs_entropy, device), case, device),
    FLOOR: gemm_floor,
}
