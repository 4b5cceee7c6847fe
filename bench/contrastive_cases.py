"""In-batch contrastive cases: B query embeddings (N = B, D) against B key embeddings (C = B, D), key i query i's
positive; the scale (and SigLIP's bias) learned, as in CLIP and SigLIP training.

Cases named siglip-* run SigLIP's sigmoid loss, clip-* CLIP's symmetric InfoNCE, supcon-* SupCon over N/2 samples
× 2 views (C = N: every row against every row) with N/20 classes. Providers, in one run on the same inputs:
  marginkern          marginkern.siglip_loss or marginkern.info_nce_loss(symmetric=True): per chunk of keys one GEMM
                      and its epilogue (Triton on CUDA; for CLIP both directions' statistics from the one GEMM),
                      recomputed in the backward pass: 4 GEMMs, no B × B tensor
  naive               open_clip's SigLipLoss or ClipLoss on one process: the B × B logits, for SigLIP its dense ±1
                      labels matrix and logsigmoid, for CLIP two cross-entropies over the logits and their transpose;
                      the official SupConLoss (HobbitLong/SupContrast) on unit features
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
        all_cases = [Case("siglip-32k", 32768, 768, 32768, "bfloat16"), Case("clip-32k", 32768, 768, 32768, "bfloat16"),
                     Case("supcon-32k", 32768, 128, 32768, "bfloat16")]
    else:
        all_cases = [Case("cpu-siglip-8k", 8192, 256, 8192, "float32"), Case("cpu-clip-8k", 8192, 256, 8192, "float32"),
                     Case("cpu-supcon-8k", 8192, 128, 8192, "float32")]
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


def _views_and_labels(q):
    """(N/2 samples, 2 views, D) from the case's N rows, and N/20 classes."""
    N, D = q.shape
    return q[:N // 2 * 2].view(N // 2, 2, D), torch.arange(N // 2, device=q.device) % max(1, N // 20)


def naive_supcon(q, k, scale, bias=None, temperature=0.1):
    """The official SupConLoss.forward (contrast_mode="all") on unit features."""
    features, labels = _views_and_labels(q)
    features = F.normalize(features, dim=2)
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = torch.div(torch.matmul(contrast_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * 2, device=q.device).view(-1, 1),
                                0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    return -(temperature / 0.07) * mean_log_prob_pos.mean()


def _marginkern_supcon(q, k, scale, bias=None):
    features, labels = _views_and_labels(q)
    return marginkern.supcon_loss(features, labels, temperature=0.1)


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


NAIVE = {"siglip": naive_siglip, "clip": naive_clip, "supcon": naive_supcon}
PROVIDERS = {
    "marginkern": _step({"siglip": _marginkern_siglip, "clip": _marginkern_clip, "supcon": _marginkern_supcon}),
    "naive": _step(NAIVE),
    "torch.compile": _step(NAIVE, compile_it=True),
    FLOOR: gemm_floor,
}
