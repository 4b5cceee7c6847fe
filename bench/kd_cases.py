"""Knowledge-distillation cases: forward KL(teacher‖student) per token at temperature 2 between two LM heads over
the same vocabulary (the teacher's hidden states and head fixed, no gradient), mean over tokens.

Providers:
  marginkern      marginkern.linear_kl_divergence (one forward pass over both heads' logit tiles; the backward
                  recomputes both)
  naive           on materialised logits: fp32 student and teacher logits / T, log_softmax of
                  each, F.kl_div(log_target=True)
  torch.compile   torch.compile of that naive function
  3-GEMM floor    the three GEMMs of the student's plain LM-head CE (the teacher's logits GEMM comes on top)
Here the teacher has the student's width (Case.D); its hidden states are a fixed random tensor.
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, lm_head_cases, loss_step

FLOOR = "3-GEMM floor"
TEMPERATURE = 2.0


def cases(device_type, quick):
    return lm_head_cases("kd", device_type, quick)


def _teacher(x, w):
    """A fixed teacher of the same shapes, drawn once per (shape, dtype, device)."""
    key = (tuple(x.shape), tuple(w.shape), x.dtype, x.device)
    if key not in _TEACHERS:
        generator = torch.Generator(device="cpu").manual_seed(1234)
        _TEACHERS[key] = tuple(torch.randn(t.shape, generator=generator).mul_(t.detach().float().std()).to(t.dtype)
                               .to(t.device) for t in (x, w))
    return _TEACHERS[key]


_TEACHERS = {}


def naive_kd(x, w, target):
    x_t, w_t = _teacher(x, w)
    with torch.no_grad():
        log_q = torch.log_softmax(F.linear(x_t, w_t).float() / TEMPERATURE, dim=-1)
    log_p = torch.log_softmax(F.linear(x, w).float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def marginkern_kd(x, w, target):
    x_t, w_t = _teacher(x, w)
    return marginkern.linear_kl_divergence(x, w, x_t, w_t, temperature=TEMPERATURE)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern_kd, case, device),
    "naive": lambda case, device: loss_step(naive_kd, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_kd, device), case, device),
    FLOOR: gemm_floor,
}
