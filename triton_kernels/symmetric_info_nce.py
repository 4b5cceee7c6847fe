"""The one-pass symmetric InfoNCE's per-chunk epilogues (marginkern/symmetric_info_nce.py has the math): each reads a
chunk of logits z = x·k_cᵀ (fp32, from one cuBLAS GEMM) once, instead of PyTorch's ~8 (forward) and ~18 (backward)
element-wise passes over it.

  statistics: per (BLOCK_N × BLOCK_C) tile, the max and Σ e^{z − max} of each row's and each column's cells other than
              the positives (row i's positive: key i), and their raw sums Σ z (label smoothing): written as (B, column
              blocks) and (row blocks, chunk) partials that torch merges (a fixed order: the same bits every call);
  gradient:   dL/dz = ½g_i(e^{z − lse_i} − ε/M) + ½g_j(e^{z − lse'_j} − ε/B) (the column term for keys j < B), the
              positive cell's exact value in place, written in the backward GEMMs' dtype.
"""
import torch
import triton
import triton.language as tl

from .device import cdiv, check_row_blocks, on_device

BLOCK_N, BLOCK_C = 64, 64


@triton.jit
def symmetric_info_nce_stats_kernel(z_ptr, stride_z, row_max_ptr, row_sum_ptr, row_z_ptr, col_max_ptr, col_sum_ptr,
                                    col_z_ptr, B, CC, c0, col_blocks, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # column blocks on grid axis 0 (2³¹ − 1 programs), row blocks on axis 1 (65535: B up to 4M)
    col_block, row_block = tl.program_id(0), tl.program_id(1)
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < B, cols < CC
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    tl.store(row_z_ptr + rows.to(tl.int64) * col_blocks + col_block, tl.sum(z, axis=1), mask=row_mask)
    tl.store(col_z_ptr + row_block.to(tl.int64) * CC + cols, tl.sum(z, axis=0), mask=col_mask)
    others = tl.where(mask & (rows[:, None] != (c0 + cols)[None, :]), z, -float("inf"))
    row_max = tl.max(others, axis=1)
    row_shift = tl.where(row_max == -float("inf"), 0.0, row_max)
    row_sum = tl.sum(tl.exp(others - row_shift[:, None]), axis=1)
    tl.store(row_max_ptr + rows.to(tl.int64) * col_blocks + col_block, row_max, mask=row_mask)
    tl.store(row_sum_ptr + rows.to(tl.int64) * col_blocks + col_block, row_sum, mask=row_mask)
    col_max = tl.max(others, axis=0)
    col_shift = tl.where(col_max == -float("inf"), 0.0, col_max)
    col_sum = tl.sum(tl.exp(others - col_shift[None, :]), axis=0)
    tl.store(col_max_ptr + row_block.to(tl.int64) * CC + cols, col_max, mask=col_mask)
    tl.store(col_sum_ptr + row_block.to(tl.int64) * CC + cols, col_sum, mask=col_mask)


@triton.jit
def symmetric_info_nce_grad_kernel(z_ptr, stride_z, g_ptr, stride_g, row_lse_ptr, col_lse_ptr, half_ptr,
                                   positive_cell_ptr, B, CC, c0, eps_over_m, eps_over_b,
                                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < B, cols < CC
    mask = row_mask[:, None] & col_mask[None, :]
    key = c0 + cols
    is_positive_key = col_mask & (key < B)  # a key with a column term: some query's positive
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)
    row_half = tl.load(half_ptr + rows, mask=row_mask, other=0.0)
    col_lse = tl.load(col_lse_ptr + key, mask=is_positive_key, other=0.0)
    col_half = tl.load(half_ptr + key, mask=is_positive_key, other=0.0)
    g = row_half[:, None] * (tl.exp(z - row_lse[:, None]) - eps_over_m)
    g += tl.where(is_positive_key[None, :], col_half[None, :] * (tl.exp(z - col_lse[None, :]) - eps_over_b), 0.0)
    positive_cell = tl.load(positive_cell_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where(rows[:, None] == key[None, :], positive_cell[:, None], g)
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


def _merged(top, total, dim):
    """(max, Σ e^{z − max}) over `dim` of per-block partials (max −inf, sum 0: an empty block)."""
    merged = top.amax(dim)
    shift = torch.where(merged == -float("inf"), 0.0, merged)
    return merged, (total * torch.exp(top - shift.unsqueeze(dim))).sum(dim)


def chunk_statistics(z, c0):
    """((row max, row Σ e^{z − max}, row Σ z) (B,) each, (the same per column) (CC,) each) of the chunk whose fp32
    logits are z (B, CC), every positive cell (row i, key i) left out of the max and exponential sums."""
    B, CC = z.shape
    col_blocks, row_blocks = cdiv(CC, BLOCK_C), cdiv(B, BLOCK_N)
    row_max = torch.full((B, col_blocks), -float("inf"), dtype=torch.float32, device=z.device)
    row_sum, row_z = torch.zeros_like(row_max), torch.zeros_like(row_max)
    col_max = torch.full((row_blocks, CC), -float("inf"), dtype=torch.float32, device=z.device)
    col_sum, col_z = torch.zeros_like(col_max), torch.zeros_like(col_max)
    check_row_blocks(B, BLOCK_N)
    if B and CC:
        with on_device(z):
            symmetric_info_nce_stats_kernel[(col_blocks, row_blocks)](
                z, z.stride(0), row_max, row_sum, row_z, col_max, col_sum, col_z, B, CC, c0, col_blocks,
                BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    return (*_merged(row_max, row_sum, 1), row_z.sum(1)), (*_merged(col_max, col_sum, 0), col_z.sum(0))


def grad_chunk(z, c0, row_lse, col_lse, half, positive_cell, eps_over_m, eps_over_b, dtype):
    """dL/dz (B, CC) in `dtype` (written over z when that is fp32); row_lse, half, positive_cell (B,), col_lse (B,)
    fp32: each positive key's column log-sum-exp."""
    B, CC = z.shape
    g = z if dtype == torch.float32 else torch.empty((B, CC), dtype=dtype, device=z.device)
    check_row_blocks(B, BLOCK_N)
    if B and CC:
        with on_device(z):
            symmetric_info_nce_grad_kernel[(cdiv(CC, BLOCK_C), cdiv(B, BLOCK_N))](
                z, z.stride(0), g, g.stride(0), row_lse, col_lse, half, positive_cell, B, CC, c0, eps_over_m,
                eps_over_b, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    return g
