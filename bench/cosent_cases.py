"""CoSENT cases (issue: pairwise log-sum-exp): B sentence-pair embeddings (B, D) twice, gold scores (B,).
Here a Case's N is the number of pairs B and C is unused (1).

Providers:
  marginkern        marginkern.cosent_embedding_loss: fused pair cosines, sort + prefix logsumexp, O(B)
  sentence-transformers  its CoSENTLoss formulation: pairwise_cos_sim, then the B × B difference matrix
  read both once    the floor: one fp32-accumulated reduction over both batches (a·b summed per row),
                    forward only, i.e. the time to read both embedding batches once
"""
import torch
import torch.nn.functional as F

import marginkern
from harness import Case, Step

FLOOR = "read both once"


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("cosent-65k", 65_536, 768, 1, "bfloat16", classifier=False),
                     Case("cosent-1M", 1_000_000, 256, 1, "bfloat16", classifier=False)]
    else:
        all_cases = [Case("cpu-cosent-8k", 8_192, 256, 1, "float32", classifier=False),
                     Case("cpu-cosent-200k", 200_000, 64, 1, "float32", classifier=False)]
    return all_cases[:1] if quick else all_cases


def _inputs(case, device):
    a = torch.randn(case.N, case.D, device=device, dtype=case.torch_dtype).requires_grad_()
    b = torch.randn(case.N, case.D, device=device, dtype=case.torch_dtype).requires_grad_()
    labels = torch.randint(0, 6, (case.N,), device=device).float()
    return a, b, labels


def _step(loss_fn, case, device):
    a, b, labels = _inputs(case, device)

    def fn():
        loss = loss_fn(a, b, labels)
        loss.backward()
        return loss.detach()

    return Step(fn, [a, b])


def sentence_transformers_cosent(a, b, labels, scale=20.0):
    scores = F.cosine_similarity(a, b) * scale
    diff = scores[:, None] - scores[None, :]
    diff = diff - (labels[:, None] < labels[None, :]).logical_not().float() * 1e12
    return torch.logsumexp(torch.cat((diff.new_zeros(1), diff.view(-1))), dim=0)


def read_both_once(case, device):
    a, b, _ = _inputs(case, device)
    a, b = a.detach(), b.detach()

    def fn():
        torch.linalg.vecdot(a, b)

    return Step(fn, [])


PROVIDERS = {
    "marginkern": lambda case, device: _step(marginkern.cosent_embedding_loss, case, device),
    "sentence-transformers": lambda case, device: _step(sentence_transformers_cosent, case, device),
    FLOOR: read_both_once,
}
