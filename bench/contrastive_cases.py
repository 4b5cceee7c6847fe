"""In-batch contrastive cases: B query embeddings (N = B, D) against B key embeddings (C = B, D), key i query i's
positive; the scale (and SigLIP's bias) learned, as in CLIP and SigLIP training.

Cases named siglip-* run SigLIP's sigmoid loss, clip-* CLIP's symmetric InfoNCE. Providers, in one run on the same
inputs:
  marginkern          marginkern.siglip_loss or marginkern.info_nce_loss(symmetric=True): per chunk of keys one GEMM
                      and its epilogue (Triton on CUDA; for CLIP both directions' statistics from the one GEMM),
                      recomputed in the backward pass: 4 GEMMs, no B × B tensor
  naive               open_clip's SigLipLoss or ClipLoss on one process: the B × B logits, for SigLIP its dense ±1
                      labels matrix and logsigmoid, for CLIP two cross-entropies over the logits and their transpose
  torch.compile       torch.compile of that naive function
  3-GEMM floor        the three plain matmuls of the same shapes (common_providers.gemm_floor): SigLIP's minimum;
                      CLIP's exact fwd+bwd needs the logits' row and column statistics, which one materialised GEMM
                      gives, so the same three
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, gemm_floor, make_inputs
from harness import Case, Step

FLOOR = "3-GEMM floor"
SCALE, BIAS = 10.0, -10.0


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("siglip-32k", 32768, 768, 32768, "bfloat16"), Case("clip-32k", 32768, 768, 32768, "bfloat16")]
    else:
        all_cases = [Case("cpu-siglip-8k", 8192, 256, 8192, "float32"), Case("cpu-clip-8k", 8192, 256, 8192, "float32")]
    return all_cases if not quick else all_cases[:1]


def naive_siglip(q, k, scale, bias):
    """open_clip's SigLipLoss._loss (one process): logits, the dense labels matrix, −logsigmoid summed / B."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = scale * q @ k.T + bias
    labels = 2 * torch.eye(q.shape[0], device=q.device, dtype=q.dtype) - torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum() / q.shape[0]


def naive_clip(q, k, scale, bias=None):
    """open_clip's ClipLoss (one process): logits_per_image and its transpose, two cross-entropies."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = scale * q @ k.T
    labels = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


def _marginkern_siglip(q, k, scale, bias):
    return marginkern.siglip_loss(q, k, scale=scale, bias=bias)


def _marginkern_clip(q, k, scale, bias=None):
    return marginkern.info_nce_loss(q, k, scale=scale, symmetric=True)


def _step(losses, compile_it=False):
    def build(case, device):
        loss_fn = losses[case.name.split("-")[-2]]
        if compile_it:
            loss_fn = compiled(loss_fn, device)
        q, k, _ = make_inputs(case, device)
        scale = torch.tensor(SCALE, device=device, requires_grad=True)
        bias = torch.tensor(BIAS, device=device, requires_grad=True)

        def fn():
            loss = loss_fn(q, k, scale, bias)  # a learned scale and bias: tensors with gradients
            loss.backward()
            return loss.detach()
        return Step(fn, [q, k, scale, bias])
    return build


NAIVE = {"siglip": naive_siglip, "clip": naive_clip}
PROVIDERS = {
    "marginkern": _step({"siglip": _marginkern_siglip, "clip": _marginkern_clip}),
    "naive": _step(NAIVE),
    "torch.compile": _step(NAIVE, compile_it=True),
    FLOOR: gemm_floor,
}
