"""Knowledge-distillation cases: forward KL(teacher‖student) per token at temperature 2 between two LM heads over
the same vocabulary (the teacher's hidden states and head fixed, no gradient), mean over tokens.

Providers:
  marginkern      marginkern.linear_kl_divergence (one forward pass over both heads' logit tiles; the backward
                  recomputes both)
  naive           on materialised logits: fp32 student and teacher logits / T, log_softmax of
                  each, F.kl_div(log_target=True)
  torch.compile   torch.compile of that naive function
  3-GEMM floor    the three GEMMs of the student's plain LM-head CE (the teacher's logits GEMM comes on top)
and the same for the generalized Jensen-Shannon divergence at β = 0.5 (GKD's default):
  marginkern jsd      marginkern.linear_jsd (two forward passes over both heads' tiles, one backward pass)
  naive jsd           TRL's generalized_jsd_loss on materialised fp32 logits (a log-sum-exp mixture, kl_div)
  torch.compile jsd   torch.compile of that
  liger-kernel jsd    Liger's LigerFusedLinearJSD (when importable, CUDA only)
Here the teacher has the student's width (Case.D); its hidden states are a fixed random tensor.
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, lm_head_cases, loss_step, peer_attribute

FLOOR = "3-GEMM floor"
TEMPERATURE = 2.0
JSD_BETA = 0.5


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


def naive_jsd(x, w, target):
    x_t, w_t = _teacher(x, w)
    with torch.no_grad():
        log_q = torch.log_softmax(F.linear(x_t, w_t).float() / TEMPERATURE, dim=-1)
    log_p = torch.log_softmax(F.linear(x, w).float() / TEMPERATURE, dim=-1)
    beta = torch.tensor(JSD_BETA, device=x.device)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-beta), log_q + torch.log(beta)]), dim=0)
    jsd = (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True))
    return jsd.sum(-1).mean()


def marginkern_jsd(x, w, target):
    x_t, w_t = _teacher(x, w)
    return marginkern.linear_jsd(x, w, x_t, w_t, beta=JSD_BETA, temperature=TEMPERATURE)


def _liger_jsd(case, device):
    liger_jsd = peer_attribute("liger-kernel", "liger_kernel.transformers", "LigerFusedLinearJSD", device)
    loss_module = liger_jsd(jsd_beta=JSD_BETA, temperature=TEMPERATURE)

    def liger(x, w, target):
        x_t, w_t = _teacher(x, w)
        return loss_module(x, w, x_t, w_t, None)  # shift_labels: positional, no default
    return loss_step(liger, case, device)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(marginkern_kd, case, device),
    "naive": lambda case, device: loss_step(naive_kd, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_kd, device), case, device),
    FLOOR: gemm_floor,
    "marginkern jsd": lambda case, device: loss_step(marginkern_jsd, case, device),
    "naive jsd": lambda case, device: loss_step(naive_jsd, case, device),
    "torch.compile jsd": lambda case, device: loss_step(compiled(naive_jsd, device), case, device),
    "liger-kernel jsd": _liger_jsd,
}
