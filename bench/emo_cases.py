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
from common_providers import compiled, gemm_floor, lm_head_cases, loss_step, on_backend

FLOOR = "3-GEMM floor"


def cases(device_type, quick):
    return lm_head_cases("emo", device_type, quick, tiny_cpu_case=True)


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
