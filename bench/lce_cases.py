"""LLM linear cross-entropy cases: hidden states (N, D) times a vocabulary head (C, D), then CE.

Providers: marginkern.linear_cross_entropy (default, the 3-GEMM knob, gradient filtering), naive PyTorch,
torch.compile of it, PyTorch's own torch.nn.functional.linear_cross_entropy (torch >= 2.13) in its chunked mode,
and the peers liger-kernel and cut-cross-entropy when importable (optional extras, never required: a missing one
is skipped with the reason recorded), plus the floor.
"""
import torch
import torch.nn.functional as F

import marginkern
from common_providers import compiled, cuda_graphed, gemm_floor, loss_step, on_backend, peer_attribute
from harness import Case, Skip

FLOOR = "3-GEMM floor"


def cases(device_type, quick):
    if device_type == "cuda":
        all_cases = [Case("llm-small-32k", 2048, 1024, 32_000, "bfloat16"),
                     Case("llama3-8b", 8192, 4096, 128_256, "bfloat16"),
                     Case("gemma2-2b", 8192, 2304, 256_000, "bfloat16")]
    else:
        all_cases = [Case("cpu-llm-4k", 64, 64, 4_096, "float32"),
                     Case("cpu-llm-16k", 512, 256, 16_384, "float32"),
                     # the csrc issue's CPU case: naive PyTorch grows RSS by ≈ 1.3 GB there
                     Case("cpu-llm-200k", 512, 128, 200_000, "float32")]
    return all_cases[:1] if quick else all_cases


def naive_lce(x, w, target):
    return F.cross_entropy(F.linear(x, w).float(), target)


def _marginkern(cuda_only=False, **knobs):
    """marginkern.linear_cross_entropy with the speed knobs `knobs` (README "Speed and memory knobs")."""
    def build(case, device):
        if cuda_only and device.type != "cuda":
            raise Skip("a GPU-sized logits buffer: measured on CUDA only")
        return loss_step(lambda x, w, target: marginkern.linear_cross_entropy(x, w, target, **knobs), case, device)
    return build


def _liger(case, device):
    loss_module = peer_attribute("liger-kernel", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss",
                                 device)()

    def liger(x, w, target):
        out = loss_module(w, x, target)  # liger's argument order: weight first
        return out[0] if isinstance(out, tuple) else out

    return loss_step(liger, case, device)


def _torch_chunked(case, device):
    """torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path, automatic
    chunking and precision policy: what a torch >= 2.13 user picks first); Skip on an older torch."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (2.13 and newer)")
    options = torch.nn.LinearCrossEntropyOptions()
    return loss_step(lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options), case, device)


def _cce(filter_eps):
    def build(case, device):
        linear_cross_entropy = peer_attribute("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy", device)
        kwargs = {} if filter_eps == "default" else {"filter_eps": filter_eps}
        return loss_step(lambda x, w, target: linear_cross_entropy(x, w, target, **kwargs), case, device)
    return build


PROVIDERS = {
    "marginkern": _marginkern(),                                         # exact, 4 GEMMs, O(N) memory
    "marginkern cuda": on_backend("cuda", _marginkern()),                 # csrc/cuda: cuBLAS + CUDA epilogue
    "marginkern graphed": cuda_graphed(_marginkern()),                    # replayed from a CUDA graph
    "marginkern 3-GEMM": _marginkern(logits_buffer_mb=256),               # no recompute; bf16 dW summed per block
    "marginkern 3-GEMM 4GB": _marginkern(cuda_only=True, logits_buffer_mb=4096),  # few row blocks (NOTES)
    "marginkern filtered": _marginkern(grad_filter_eps="auto"),           # CCE's default filter
    "naive": lambda case, device: loss_step(naive_lce, case, device),
    "torch.compile": lambda case, device: loss_step(compiled(naive_lce, device), case, device),
    "torch linear_cross_entropy": _torch_chunked,  # torch >= 2.13's own fused op, chunked mode
    "liger-kernel": _liger,
    "cut-cross-entropy": _cce("default"),         # its defaults: gradient filtering on (not exact)
    "cut-cross-entropy exact": _cce(None),        # filter_eps=None: every gradient tile computed
    FLOOR: gemm_floor,
}
