"""EMO cases (issue: EMO over large vocabularies): the official MLE-anchored EMO + CE per token,
0.5·(ce + sg(ce/emo)·emo), with the LM head itself (detached) as the cost embedding.

Providers:
  marginkern      marginkern.emo_cross_entropy (one fused pass: lse, Σ p·ê, cosines per tile)
  naive           the reference code's recipe on materialised fp32 logits: softmax, p @ Ê, gather ê_t
  torch.compile   torch.compile of that naive function
  3-GEMM floor    the three GEMMs of the plain LM-head CE of the same shapes (EMO needs more: see NOTES)
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, loss_step, on_backend
from harness import Case

FLOOR = "3-GEMM floor"


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("emo-small-32k", 2048, 1024, 32_000, "bfloat16"),
                     Case("emo-llama3-8b", 8192, 4096, 128_256, "bfloat16")]
    else:
        all_cases = [Case("cpu-emo-4k", 64, 64, 4_096, "float32"),
                     Case("cpu-emo-16k", 512, 256, 16_384, "float32"),
                     # the csrc issue's CPU case: naive PyTorch grows RSS by ≈ 1.3 GB there
                     Case("cpu-emo-200k", 512, 128, 200_000, "float32")]
    return all_cases[:1] if quick else all_cases


def naive_emo_ce(x, w, target):
    logits = F.linear(x, w).float()
    ce = F.cross_entropy(logits, target, reduction="none")
    cost = F.normalize(w.detach().float(), dim=1)
    expected = torch.softmax(logits, dim=1) @ cost
    emo = 1.0 - (expected * cost[target]).sum(1)
    return (0.5 * (ce + (ce / (emo + 1e-10)).detach() * emo)).mean()


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern.emo_cross_entropy, case, device),
    "marginkern cuda": on_backend("cuda", lambda case, device: loss_step(marginkern.emo_cross_entropy, case, device)),
    "naive": lambda case, device: loss_step(naive_emo_ce, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_emo_ce, device), case, device),
    FLOOR: gemm_floor,
}
