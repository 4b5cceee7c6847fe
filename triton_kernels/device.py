"""Where the Triton launchers run: on the tensors' own GPU, not the current one (multi-GPU processes)."""
import contextlib

import torch


def on_device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
