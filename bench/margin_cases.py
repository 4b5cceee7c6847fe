"""Face-recognition cases: ArcFace margin softmax over very many identities (DESIGN.md §7).

Providers, all measured in one run on the same inputs:
  marginkern      marginkern.margin_cross_entropy with ArcFace settings (its defaults)
  naive           insightface-style PyTorch: normalize, F.linear, fp32 logits, arccos/cos margin on the
                  target column, scale, F.cross_entropy (materializes several N×C tensors)
  marginkern cuda     the same on the hand-written CUDA backend (csrc/cuda)
  marginkern graphed  the marginkern step replayed from a CUDA graph (its GPU time without host overhead)
  marginkern no split-K  marginkern with the dX GEMM in one piece per chunk (MARGINKERN_SPLIT_K=1): what
                      engine.split_k_slices buys
  marginkern unfused dW  marginkern with each dW chunk as a cuBLAS GEMM into fp32 then the finishing pass
                      (MARGINKERN_FUSED_DW=0): what the fused Triton dW GEMM + projection buys
  torch.compile   torch.compile of that naive function
  3-GEMM floor    the three plain matmuls of the same shapes (common_providers.gemm_floor)
  marginkern sub-center, naive sub-center   sub-center ArcFace with K = 3 on the "subcenter3" cases, whose
                  C counts the weight's rows (C/3 classes; the floor's GEMMs are over all rows): marginkern's
                  margin_cross_entropy(subcenters=3) and pytorch-metric-learning's formulation (cosines of
                  all rows, max over each class's 3, then the naive ArcFace); skipped on the other cases
  marginkern adaface, naive adaface   AdaFace (per-row margins from the embedding norms, the module's initial
                  statistics) on the "adaface" cases: marginkern.margin_cross_entropy with (N,) m2/m3, and the
                  official head's formulation on the full logits (mk-minchul/AdaFace head.py); skipped elsewhere
  marginkern curricularface, naive curricularface   CurricularFace (hard negatives re-weighted by c·(t + c), t fixed
                  at 0.3) on the "curricular" cases: marginkern.margin_cross_entropy(hard_negatives=...) and the
                  official head's formulation (HuangYG123/CurricularFace head/metrics.py: the N × C cosines, their
                  clone, the mask); skipped elsewhere
"""
import math

import torch
import torch.nn.functional as F

import marginkern  # never guarded: the bench exists to measure it, so a broken import must fail loudly
from common_providers import compiled, cuda_graphed, gemm_floor, loss_step, on_backend, with_env
from harness import Case, Skip

ARCFACE = dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0)
FLOOR = "3-GEMM floor"


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("face-small-100k", 256, 512, 100_000, "bfloat16"),
                     Case("face-b1024-100k", 1024, 512, 100_000, "bfloat16"),
                     Case("arcface-1M", 1024, 512, 1_000_000, "bfloat16"),
                     Case("face-subcenter3-100k", 1024, 512, 300_000, "bfloat16"),
                     Case("face-adaface-100k", 1024, 512, 100_000, "bfloat16"),
                     Case("face-curricular-100k", 1024, 512, 100_000, "bfloat16")]
    else:  # small enough for a couple of minutes on 2 cores
        all_cases = [Case("cpu-face-5k", 64, 64, 5_000, "float32"),
                     Case("cpu-face-20k", 256, 128, 20_000, "float32"),
                     # the csrc issue's CPU case: naive PyTorch grows RSS by ≈ 1.3 GB there
                     Case("cpu-face-200k", 512, 128, 200_000, "float32"),
                     Case("cpu-subcenter3-20k", 256, 128, 60_000, "float32"),
                     Case("cpu-adaface-20k", 256, 128, 20_000, "float32"),
                     Case("cpu-curricular-20k", 256, 128, 20_000, "float32")]
    return all_cases[:1] if quick else all_cases


def naive_arcface(x, w, target, scale=ARCFACE["scale"], m2=ARCFACE["m2"]):
    """What insightface's ArcFace head does, differentiated by autograd (exact margin gradient)."""
    cosine = F.linear(F.normalize(x), F.normalize(w)).float().clamp(-1, 1)
    rows = torch.arange(x.shape[0], device=x.device)
    theta = torch.arccos(cosine[rows, target])
    cosine[rows, target] = torch.cos(theta + m2)  # margin on the target column only, in place
    return F.cross_entropy(cosine * scale, target)


def _marginkern(x, w, target):
    return marginkern.margin_cross_entropy(x, w, target, **ARCFACE)


SUBCENTERS = 3


def naive_subcenter_arcface(x, w, target):
    """pytorch-metric-learning's SubCenterArcFaceLoss: cosines of every sub-centre, the max over each class's
    K, then ArcFace (target // K: the case's targets index rows)."""
    cosine = F.linear(F.normalize(x), F.normalize(w)).float().unflatten(1, (-1, SUBCENTERS)).max(2).values
    target = target // SUBCENTERS
    rows = torch.arange(x.shape[0], device=x.device)
    theta = torch.arccos(cosine[rows, target].clamp(-1, 1))
    logits = cosine.clamp(-1, 1).index_put((rows, target), torch.cos(theta + ARCFACE["m2"]))
    return F.cross_entropy(logits * ARCFACE["scale"], target)


def _marginkern_subcenter(x, w, target):
    return marginkern.margin_cross_entropy(x, w, target // SUBCENTERS, subcenters=SUBCENTERS, **ARCFACE)


def only_on(word, build):
    """The provider on the cases whose name holds `word` only (the "subcenter3" cases, whose C is the weight's rows,
    a multiple of 3; the "adaface" cases)."""
    def build_if_named(case, device):
        if word not in case.name:
            raise Skip(f"these providers run on the {word} cases")
        return build(case, device)
    return build_if_named


ADAFACE = dict(margin=0.4, h=0.333, scale=64.0, eps=1e-3, mean=20.0, std=100.0)  # the official defaults


def adaface_quality(x):
    """AdaFace's ẑ per row from the norms and fixed statistics (no gradient)."""
    a = ADAFACE
    norms = x.detach().float().norm(dim=1).clamp(0.001, 100)
    return (a["h"] * (norms - a["mean"]) / (a["std"] + a["eps"])).clamp(-1, 1)


def naive_adaface(x, w, target):
    """The official AdaFace head on the full logits: every cosine clamped to ±(1 − ε), θ_y − m·ẑ clipped to
    [ε, π − ε], minus m·(1 + ẑ), scaled, cross-entropy."""
    a, z = ADAFACE, adaface_quality(x)
    cosine = F.linear(F.normalize(x), F.normalize(w)).float().clamp(-1 + a["eps"], 1 - a["eps"])
    rows = torch.arange(x.shape[0], device=x.device)
    theta = (torch.arccos(cosine[rows, target]) - a["margin"] * z).clamp(a["eps"], math.pi - a["eps"])
    cosine = cosine.index_put((rows, target), torch.cos(theta) - a["margin"] * (1 + z))
    return F.cross_entropy(cosine * a["scale"], target)


def _marginkern_adaface(x, w, target):
    a, z = ADAFACE, adaface_quality(x)
    return marginkern.margin_cross_entropy(x, w, target, scale=a["scale"], m2=-a["margin"] * z,
                                           m3=a["margin"] * (1 + z))


CURRICULAR_T = 0.3  # a mid-training value of CurricularFace's running mean target cosine


def naive_curricularface(x, w, target, t=CURRICULAR_T):
    """The official CurricularFace head on the full logits: cosines, their no_grad clone (the official head keeps
    one), the hard-negative mask and re-weighting, the target's margin with its th/mm fallback, cross-entropy."""
    m, s = ARCFACE["m2"], ARCFACE["scale"]
    cos_theta = F.linear(F.normalize(x), F.normalize(w)).float().clamp(-1, 1)
    with torch.no_grad():
        origin_cos = cos_theta.clone()  # noqa: F841 (the official head's, kept for its memory)
    rows = torch.arange(x.shape[0], device=x.device)
    target_logit = cos_theta[rows, target].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - target_logit ** 2)
    cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > math.cos(math.pi - m), cos_theta_m,
                                     target_logit - math.sin(math.pi - m) * m)
    cos_theta = torch.where(mask, cos_theta * (t + cos_theta), cos_theta)
    cos_theta = cos_theta.scatter(1, target.view(-1, 1), final_target_logit)
    return F.cross_entropy(cos_theta * s, target)


def _marginkern_curricularface(x, w, target):
    return marginkern.margin_cross_entropy(x, w, target, hard_negatives=(1.0, CURRICULAR_T, 0.0), **ARCFACE)


PROVIDERS = {
    "marginkern": lambda case, device: loss_step(_marginkern, case, device),
    # the hand-written CUDA backend (csrc/cuda): cuBLAS GEMMs + CUDA epilogue, opt-in
    "marginkern cuda": on_backend("cuda", lambda case, device: loss_step(_marginkern, case, device)),
    # the same step replayed from a CUDA graph: its GPU time without the host's share
    "marginkern graphed": cuda_graphed(lambda case, device: loss_step(_marginkern, case, device)),
    # every call through torch.library's op dispatch instead of the eager twins (ops.call): the host cost
    # that the twins save
    "marginkern via ops": with_env({"MARGINKERN_EAGER_TWINS": "0"},
                                   lambda case, device: loss_step(_marginkern, case, device)),
    "marginkern no split-K": with_env({"MARGINKERN_SPLIT_K": "1"},
                                      lambda case, device: loss_step(_marginkern, case, device)),
    "marginkern unfused dW": with_env({"MARGINKERN_FUSED_DW": "0"},
                                      lambda case, device: loss_step(_marginkern, case, device)),
    "naive": lambda case, device: loss_step(naive_arcface, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_arcface, device), case, device),
    FLOOR: gemm_floor,
    "marginkern sub-center": only_on("subcenter3", lambda case, device: loss_step(_marginkern_subcenter, case, device)),
    "naive sub-center": only_on("subcenter3", lambda case, device: loss_step(naive_subcenter_arcface, case, device)),
    "marginkern adaface": only_on("adaface", lambda case, device: loss_step(_marginkern_adaface, case, device)),
    "naive adaface": only_on("adaface", lambda case, device: loss_step(naive_adaface, case, device)),
    "marginkern curricularface": only_on("curricular",
                                         lambda case, device: loss_step(_marginkern_curricularface, case, device)),
    "naive curricularface": only_on("curricular", lambda case, device: loss_step(naive_curricularface, case, device)),
}
