"""What the chunk epilogues of the in-batch contrastive losses share (marginkern/chunked_epilogue.py is their host
side): a program's tile of a chunk (column blocks on grid axis 0, row blocks on axis 1), a tile of logits
z = r_i·c_j·d_ij from the chunk's raw fp32 dot products d and the fp32 row and key factors, a streamed
(max, Σ e^{z − max}) along one axis of a tile, the gradient tile's store, and on the host the launch over a chunk's
tiles, the gradient's buffer and the merge of per-block partials."""
import torch
import triton
import triton.language as tl

from .. import engine
from .device import FP_FUSION, cdiv, check_row_blocks, on_device
from .streaming_ce import exp_shift

# Warps per tile program: 8 keeps a 4096-cell fp32 tile at ≤ 153 registers a thread on sm_90, where 4 warps need up
# to 255 and SupCon's gradient spilled (chunks whose width is not a multiple of 16: no vector loads), and never lowers
# the register-bound occupancy (bench/NOTES.md, "Twenty-second session": a compile, not yet measured on a GPU).
TILE_WARPS = 8


@triton.jit
def tile_indices(N, CC, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows, cols, row_mask, col_mask, mask) of this program's BLOCK_N × BLOCK_C tile of an (N, CC) chunk: column
    blocks on grid axis 0 (2³¹ − 1 programs), row blocks on axis 1 (65535; launch_over_tiles checks)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < N, cols < CC
    return rows, cols, row_mask, col_mask, row_mask[:, None] & col_mask[None, :]


@triton.jit
def store_tile(ptr, stride, rows, cols, values, mask):
    """values into the row-major tile at ptr (row stride `stride`), in ptr's dtype."""
    tl.store(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask):
    """z = r·c·d of a tile (0 outside the masks)."""
    mask = row_mask[:, None] & col_mask[None, :]
    d = tl.load(d_ptr + rows.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
    r = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    c = tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)
    return r[:, None] * c[None, :] * d


@triton.jit
def max_and_exp_sum(values, AXIS: tl.constexpr):
    """(max, Σ e^{v − max}) along AXIS; a line of −inf gives (−inf, 0)."""
    top = tl.max(values, axis=AXIS)
    shift = exp_shift(top)
    return top, tl.sum(tl.exp(values - tl.expand_dims(shift, AXIS)), axis=AXIS)


def merged_partials(top, total, dim):
    """(max, Σ e^{z − max}) over `dim` of per-block partials (max −inf, sum 0: an empty block)."""
    merged = top.amax(dim)
    shift = engine.exp_shift(merged)
    return merged, (total * torch.exp(top - shift.unsqueeze(dim))).sum(dim)


def launch_over_tiles(kernel, d, block_n, block_c, *args, **constexprs):
    """kernel(*args) over the (block_n × block_c) tiles of the chunk d (N, CC) as tile_indices lays them out; no launch
    for an empty chunk. d gives the grid and the device; the kernel takes it among args, as it names it."""
    N, CC = d.shape
    check_row_blocks(N, block_n)
    if N and CC:
        with on_device(d):
            kernel[(cdiv(CC, block_c), cdiv(N, block_n))](*args, BLOCK_N=block_n, BLOCK_C=block_c,
                                                          num_warps=TILE_WARPS, **constexprs, **FP_FUSION)


def gradient_buffer(d, dtype):
    """Where a gradient kernel writes G: over the fp32 chunk d itself when G is fp32 (each program reads its own tile
    first), else a new (N, CC) tensor of `dtype` (the backward GEMMs')."""
    return d if dtype == torch.float32 else torch.empty(d.shape, dtype=dtype, device=d.device)
