"""GlobalPointer cases (GPLinker-style span heads): q and k (B, L, H, d) after RoPE, padding mask (B, L), positives
(B, H, P) as flattened spans m·L + n. A Case's N is B·L tokens, D is d and C is H (the shapes are in SHAPES).

Providers, measured in one run on the same inputs:
  marginkern        marginkern.global_pointer_loss: blocks of the span logits, recomputed in the backward pass;
                    never the (B, H, L, L) logits
  bert4keras        bert4keras's GlobalPointer + multilabel CE in PyTorch: the einsum logits, −inf masks for padding
                    and the lower triangle, / √d, the dense targets from the positives, the current form's masked
                    log-sum-exps with a zero appended
  torch.compile     torch.compile of that function
  3-bmm floor       the three batched GEMMs an exact fwd+bwd needs (logits, dq, dk), same shapes and dtype
"""
import math

import torch

import marginkern
from common_providers import compiled
from harness import Case, Step

FLOOR = "3-bmm floor"
P = 16  # positive spans listed per (batch, head), some of them padding
SHAPES = {  # name: (B, L, H, d)
    "gp-duie-512": (16, 512, 48, 64), "gp-long-2048": (4, 2048, 16, 64),
    "cpu-gp-256": (8, 256, 16, 64), "cpu-gp-1024": (2, 1024, 8, 64),
}


def cases(device_type, quick):
    names = ["gp-duie-512", "gp-long-2048"] if device_type == "cuda" else ["cpu-gp-256", "cpu-gp-1024"]
    dtype = "bfloat16" if device_type == "cuda" else "float32"
    all_cases = [Case(name, SHAPES[name][0] * SHAPES[name][1], SHAPES[name][3], SHAPES[name][2], dtype,
                      classifier=False) for name in names]
    return all_cases[:1] if quick else all_cases


def _inputs(case, device):
    B, L, H, d = SHAPES[case.name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, d, generator=g).to(device, case.torch_dtype).requires_grad_()
    k = torch.randn(B, L, H, d, generator=g).to(device, case.torch_dtype).requires_grad_()
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).to(device)
    starts = torch.randint(0, L, (B, H, P), generator=g)
    spans = starts * L + torch.minimum(starts + torch.randint(0, 8, (B, H, P), generator=g), torch.tensor(L - 1))
    positives = torch.where(torch.rand(B, H, P, generator=g) < 0.5, spans, -100).to(device)
    return q, k, mask, positives


def bert4keras_global_pointer(q, k, mask, positives):
    B, L, H, d = q.shape
    s = torch.einsum("bmhd,bnhd->bhmn", q, k).float() / math.sqrt(d)
    kept = mask[:, None, :, None] & mask[:, None, None, :] & torch.ones(L, L, dtype=torch.bool, device=q.device).triu()
    s = s.masked_fill(~kept, -float("inf")).reshape(B, H, L * L)
    named = positives != -100
    y = torch.zeros(B, H, L * L + 1, device=q.device).scatter_(-1, torch.where(named, positives, L * L), 1.0)
    y = y[..., :L * L]
    y_neg = torch.where(s != -float("inf"), s, -float("inf")) + torch.log(1 - y)
    y_pos = torch.where(s != -float("inf"), -s, -float("inf")) + torch.log(y)
    zeros = torch.zeros_like(s[..., :1])
    loss = torch.logsumexp(torch.cat([y_neg, zeros], -1), -1) + torch.logsumexp(torch.cat([y_pos, zeros], -1), -1)
    return loss.mean()


def _marginkern(q, k, mask, positives):
    return marginkern.global_pointer_loss(q, k, positives, mask=mask)


def _step(loss_fn, case, device):
    q, k, mask, positives = _inputs(case, device)

    def fn():
        loss = loss_fn(q, k, mask, positives)
        loss.backward()
        return loss.detach()

    return Step(fn, [q, k])


def bmm_floor(case, device):
    """logits = q·kᵀ, dq = G·k, dk = Gᵀ·q per (batch, head), with G a logits-sized tensor made beforehand; the
    logits are allocated per call."""
    B, L, H, d = SHAPES[case.name]
    q, k, _, _ = _inputs(case, device)
    q = q.detach().permute(0, 2, 1, 3).reshape(B * H, L, d)
    k = k.detach().permute(0, 2, 1, 3).reshape(B * H, L, d)
    g = torch.randn(B * H, L, L, device=device, dtype=case.torch_dtype)
    dq, dk = torch.empty_like(q), torch.empty_like(k)

    def fn():
        torch.bmm(q, k.transpose(1, 2))
        torch.bmm(g, k, out=dq)
        torch.bmm(g.transpose(1, 2), q, out=dk)

    return Step(fn, [])


PROVIDERS = {
    "marginkern": lambda case, device: _step(_marginkern, case, device),
    "bert4keras": lambda case, device: _step(bert4keras_global_pointer, case, device),
    "torch.compile": lambda case, device: _step(compiled(bert4keras_global_pointer, device), case, device),
    FLOOR: bmm_floor,
}
