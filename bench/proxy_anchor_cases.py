"""Proxy-Anchor cases (Kim et al. 2020) over many proxies: N embeddings (N, D), C proxies (C, D), labels (N,).

Providers, measured in one run on the same inputs:
  marginkern          marginkern.proxy_anchor_loss: per chunk of proxies one GEMM of raw dot products and its epilogue
                      (Triton on CUDA), recomputed in the backward pass: 4 GEMMs, no N × C tensor
  marginkern pytorch epilogue   the same with PyTorch's element-wise ops as the epilogue (MARGINKERN_BACKEND=reference):
                      what the Triton epilogue kernels buy
  naive               pytorch-metric-learning's ProxyAnchorLoss formulation: the N × C cosines, the one-hot positive
                      mask and its complement, masked log-sum-exps with a zero column appended (lmu.logsumexp)
  torch.compile       torch.compile of that naive function
  3-GEMM floor        the three plain matmuls of the same shapes (common_providers.gemm_floor)
"""
import torch
import torch.nn.functional as F

import marginkern  # never guarded: the bench exists to measure it
from common_providers import compiled, gemm_floor, loss_step, with_env
from harness import Case

FLOOR = "3-GEMM floor"
MARGIN, ALPHA = 0.1, 32.0


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("proxy-anchor-100k", 1024, 512, 100_000, "bfloat16"),
                     Case("proxy-anchor-1M", 1024, 512, 1_000_000, "bfloat16")]
    else:
        all_cases = [Case("cpu-proxy-anchor-20k", 256, 128, 20_000, "float32"),
                     Case("cpu-proxy-anchor-200k", 512, 128, 200_000, "float32")]
    return all_cases[:1] if quick else all_cases


def _masked_log1p_sum_exp(v, keep):
    """pytorch-metric-learning's lmu.logsumexp(v, keep_mask, add_one=True, dim=0): masked, a zero row appended, and
    0 for a column with nothing kept."""
    v = v.masked_fill(~keep, torch.finfo(v.dtype).min)
    v = torch.cat([v, v.new_zeros((1, v.shape[1]))], dim=0)
    return torch.logsumexp(v, dim=0, keepdim=True).masked_fill(~keep.any(0, keepdim=True), 0)


def naive_proxy_anchor(x, proxies, labels, margin=MARGIN, alpha=ALPHA):
    cos = F.linear(F.normalize(x), F.normalize(proxies)).float()
    pos_mask = F.one_hot(labels, proxies.shape[0]).float()
    neg_mask = 1 - pos_mask
    with_pos_proxies = (pos_mask.sum(0) != 0).sum()
    pos_term = _masked_log1p_sum_exp(alpha * (margin - cos), pos_mask.bool())
    neg_term = _masked_log1p_sum_exp(alpha * (cos + margin), neg_mask.bool())
    return pos_term.sum() / with_pos_proxies + neg_term.sum() / proxies.shape[0]


def _marginkern(x, proxies, labels):
    return marginkern.proxy_anchor_loss(x, proxies, labels, margin=MARGIN, alpha=ALPHA)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(_marginkern, case, device),
    "marginkern pytorch epilogue": with_env({"MARGINKERN_BACKEND": "reference"},
                                            lambda case, device: loss_step(_marginkern, case, device)),
    "naive": lambda case, device: loss_step(naive_proxy_anchor, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_proxy_anchor, device), case, device),
    FLOOR: gemm_floor,
}
