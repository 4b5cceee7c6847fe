"""GlobalPointer's block epilogues (marginkern/global_pointer.py has the math): each reads a block of span logits
(rows × query positions × L: raw fp32 dot products q·k from one batched cuBLAS GEMM, 16-bit operands as they are;
the positives already −inf) once, instead of PyTorch's scaling, masked fills, log-sum-exp and exponential over it.
The block is seen as (rows·mb, W) lines: line i is row r0 + i // mb's query position m0 + i % mb, column j key n0 + j.

  line sums:  per line and block of BLOCK_C keys, (max, Σ e^{z − max}) of z = scale·s over the negatives (left-out
              cells: padding at either end, n < m with TRIL, cell 0 with MASK_ZERO), written to (lines, blocks)
              partials that torch merges (a fixed order: the same bits every call);
  gradient:   G = e^{scale·s − L_neg} on the negatives, 0 elsewhere, in the backward GEMMs' dtype (over the block
              when that is fp32).
"""
import torch
import triton
import triton.language as tl

from .chunk_tiles import (gradient_buffer, launch_over_tiles, max_and_exp_sum, merged_partials, store_tile,
                          tile_indices)
from .device import cdiv

BLOCK_N, BLOCK_C = 32, 128


@triton.jit
def _negatives(s_ptr, stride_s, mask_ptr, stride_mask, r0, m0, n0, mb, N, W, scale, HAS_MASK: tl.constexpr,
               TRIL: tl.constexpr, MASK_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """(lines, columns, each line's row, the tile's logits scale·s with −inf off the negatives, its in-bounds mask);
    column j is key n0 + j."""
    lines, cols, line_mask, col_mask, mask = tile_indices(N, W, BLOCK_N, BLOCK_C)
    s = tl.load(s_ptr + lines.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=mask, other=-float("inf"))
    row = r0 + lines // mb
    m = m0 + lines % mb
    n = n0 + cols
    keep = mask
    if HAS_MASK:
        row_base = mask_ptr + row.to(tl.int64) * stride_mask
        query_ok = tl.load(row_base + m, mask=line_mask, other=0) != 0
        key_ok = tl.load(row_base[:, None] + n[None, :], mask=mask, other=0) != 0
        keep = keep & query_ok[:, None] & key_ok
    if TRIL:
        keep = keep & (n[None, :] >= m[:, None])
    if MASK_ZERO:
        keep = keep & ((m[:, None] != 0) | (n[None, :] != 0))
    return lines, cols, row, tl.where(keep, s * scale, -float("inf")), mask


@triton.jit
def global_pointer_line_sums_kernel(s_ptr, stride_s, mask_ptr, stride_mask, r0, m0, n0, mb, N, W, scale, top_ptr,
                                    total_ptr, blocks, HAS_MASK: tl.constexpr, TRIL: tl.constexpr,
                                    MASK_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    lines, _, _, z, _ = _negatives(s_ptr, stride_s, mask_ptr, stride_mask, r0, m0, n0, mb, N, W, scale, HAS_MASK,
                                   TRIL, MASK_ZERO, BLOCK_N, BLOCK_C)
    top, total = max_and_exp_sum(z, 1)
    out = lines.to(tl.int64) * blocks + tl.program_id(0)
    tl.store(top_ptr + out, top, mask=lines < N)
    tl.store(total_ptr + out, total, mask=lines < N)


@triton.jit
def global_pointer_grad_kernel(s_ptr, stride_s, mask_ptr, stride_mask, r0, m0, n0, mb, N, W, scale, lse_ptr, g_ptr,
                               HAS_MASK: tl.constexpr, TRIL: tl.constexpr, MASK_ZERO: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    lines, cols, row, z, mask = _negatives(s_ptr, stride_s, mask_ptr, stride_mask, r0, m0, n0, mb, N, W, scale,
                                           HAS_MASK, TRIL, MASK_ZERO, BLOCK_N, BLOCK_C)
    lse = tl.load(lse_ptr + row, mask=lines < N, other=0.0)
    # (g_ptr may be s_ptr: each program reads its own tile first)
    store_tile(g_ptr, stride_s, lines, cols, tl.exp(z - lse[:, None]), mask)


def _launch(kernel, s, mask, r0, m0, n0, scale, *args, tril, mask_zero):
    """kernel over the tiles of the block s (rows, mb, W) of raw dot products (keys n0 … n0 + W − 1) seen as (rows·mb,
    W) lines, then *args."""
    rows, mb, W = s.shape
    lines = s.view(rows * mb, W)
    mask_arg = lines if mask is None else mask.view(torch.uint8)  # (not read without HAS_MASK)
    stride_mask = 0 if mask is None else mask.stride(0)
    launch_over_tiles(kernel, lines, BLOCK_N, BLOCK_C, lines, W, mask_arg, stride_mask, r0, m0, n0, mb, rows * mb, W,
                      scale, *args, HAS_MASK=mask is not None, TRIL=tril, MASK_ZERO=mask_zero)


def block_log_sum_exp(s, mask, r0, m0, n0, scale, tril, mask_zero):
    """(rows,) log Σ e^{scale·s} over the negatives of the block s (rows, mb, W) of raw fp32 dot products,
    contiguous, the positives already −inf; mask (R, L) bool (or None) for all rows, the block's rows starting at r0,
    its query positions at m0, its keys at n0."""
    rows, mb, W = s.shape
    blocks = cdiv(W, BLOCK_C)
    top = torch.full((rows * mb, blocks), -float("inf"), dtype=torch.float32, device=s.device)
    total = torch.zeros((rows * mb, blocks), dtype=torch.float32, device=s.device)
    _launch(global_pointer_line_sums_kernel, s, mask, r0, m0, n0, scale, top, total, blocks, tril=tril,
            mask_zero=mask_zero)
    top, total = merged_partials(top.view(rows, mb * blocks), total.view(rows, mb * blocks), 1)
    return top + torch.log(total)


def block_gradient(s, mask, r0, m0, n0, scale, L_neg, tril, mask_zero, dtype):
    """G = e^{scale·s − L_neg} on the negatives of the block s (as block_log_sum_exp's), 0 elsewhere, in `dtype` (the
    backward GEMMs'; written over s when that is fp32); L_neg (R,) fp32 for all rows."""
    G = gradient_buffer(s, dtype)
    _launch(global_pointer_grad_kernel, s, mask, r0, m0, n0, scale, L_neg, G, tril=tril, mask_zero=mask_zero)
    return G
