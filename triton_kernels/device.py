"""Launch helpers: where the Triton launchers run (the tensors' own GPU, not the current one: multi-GPU
processes), and launch arguments made fp32 without a dispatcher call when they already are."""
import contextlib

import torch


def on_device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fp32(t):
    """t in fp32: `t.float()` is a dispatcher call (aten::to) even when t already is, ~10 per step on the
    host of a small-batch step, and the launch arguments almost always are fp32 already."""
    return t if t.dtype == torch.float32 else t.float()
