"""Launch helpers: where the Triton launchers run (the tensors' own GPU, not the current one: multi-GPU
processes), launch arguments made fp32 without a dispatcher call when they already are, and the grid
arithmetic in plain Python."""
import contextlib

import torch


def on_device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fp32(t):
    """t in fp32: `t.float()` is a dispatcher call (aten::to) even when t already is, ~10 per step on the
    host of a small-batch step, and the launch arguments almost always are fp32 already."""
    return t if t.dtype == torch.float32 else t.float()


# triton.cdiv and triton.next_power_of_2 are constexpr functions (Triton 3.6 and 3.9): 1.4 µs per host call
# on a CPU, against 0.02 µs for the integer arithmetic itself, and a small step makes ~17 such calls.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0  # as triton.next_power_of_2


# Every launch asks for FMA contraction itself instead of leaving it to Triton's default: Triton 3.9 warns at the first
# compile where a launch does not say (a UserWarning in the user's training log), and 3.10 turns the default off, which
# would change the kernels' rounding and instruction count with the installed Triton. On is what the kernels were
# measured with (Triton 3.6) and what their docstrings' GPU rounding notes describe (z − lse after a dot is one FMA);
# TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off. The interpreter ignores it (numpy does not fuse).
FP_FUSION = dict(enable_fp_fusion=True)

MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1 (axis 0 takes 2³¹ − 1)


def check_row_blocks(rows: int, block_n: int):
    """A launch with row blocks on grid axis 1 fits it, or a ValueError that says what to do."""
    if cdiv(rows, block_n) > MAX_GRID_Y:
        raise ValueError(f"the Triton epilogue takes at most {MAX_GRID_Y * block_n} rows per call, got {rows}; split "
                         "the batch, or run MARGINKERN_BACKEND=reference (PyTorch's epilogue)")
