"""InfoNCE's per-chunk epilogues (marginkern/info_nce.py has the math; one direction, or both in one pass): each reads a
chunk of raw dot products d = x·k_cᵀ (fp32, from one cuBLAS GEMM) once, instead of PyTorch's ~8 (forward) and ~18
(backward) element-wise passes over it; the logits are z = r_i·c_j·d_ij (fp32 row and column scales).

  statistics: per (BLOCK_N × BLOCK_C) tile, the max and Σ e^{z − max} of each row's and each column's cells other than
              the positives (row i's positive: key offset + i), and their raw sums Σ z (label smoothing): written as (B, column
              blocks) and (row blocks, chunk) partials that torch merges (a fixed order: the same bits every call);
  gradient:   G = dL/dz = ½g_i(e^{z − lse_i} − ε/M) + ½g_j(e^{z − lse'_j} − ε/B) (the column term for keys j < B when
              symmetric), the positive cell's exact value in place, written as H = r_i·c_j·G_ij in the backward GEMMs' dtype, with the
              scales' gradients Σ_j G·c·d and Σ_i G·r·d as partials the same way.
"""
import torch
import triton
import triton.language as tl

from .chunk_tiles import (gradient_buffer, launch_over_tiles, max_and_exp_sum, merged_partials, scaled_logit_tile,
                          store_tile, tile_indices)
from .device import cdiv

BLOCK_N, BLOCK_C = 64, 64


@triton.jit
def info_nce_stats_kernel(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, row_max_ptr, row_sum_ptr,
                                    row_z_ptr, col_max_ptr, col_sum_ptr, col_z_ptr, B, CC, c0, offset, col_blocks,
                                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(B, CC, BLOCK_N, BLOCK_C)
    z = scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask)
    row_out = rows.to(tl.int64) * col_blocks + tl.program_id(0)  # (B, column blocks) and (row blocks, CC) partials
    col_out = tl.program_id(1).to(tl.int64) * CC + cols
    tl.store(row_z_ptr + row_out, tl.sum(z, axis=1), mask=row_mask)
    tl.store(col_z_ptr + col_out, tl.sum(z, axis=0), mask=col_mask)
    others = tl.where(mask & ((offset + rows)[:, None] != (c0 + cols)[None, :]), z, -float("inf"))
    row_max, row_sum = max_and_exp_sum(others, 1)
    tl.store(row_max_ptr + row_out, row_max, mask=row_mask)
    tl.store(row_sum_ptr + row_out, row_sum, mask=row_mask)
    col_max, col_sum = max_and_exp_sum(others, 0)
    tl.store(col_max_ptr + col_out, col_max, mask=col_mask)
    tl.store(col_sum_ptr + col_out, col_sum, mask=col_mask)


@triton.jit
def info_nce_grad_kernel(d_ptr, stride_d, h_ptr, stride_h, row_scale_ptr, col_scale_ptr, row_lse_ptr, col_lse_ptr,
                         coef_ptr, positive_cell_ptr, B, CC, c0, offset, eps_over_m, eps_over_b,
                         SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(B, CC, BLOCK_N, BLOCK_C)
    z = scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask)
    key = c0 + cols
    row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)
    row_coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    g = row_coef[:, None] * (tl.exp(z - row_lse[:, None]) - eps_over_m)
    if SYMMETRIC:  # (offset 0) the keys < B are positives with a column term
        is_positive_key = col_mask & (key < B)
        col_lse = tl.load(col_lse_ptr + key, mask=is_positive_key, other=0.0)
        col_coef = tl.load(coef_ptr + key, mask=is_positive_key, other=0.0)
        g += tl.where(is_positive_key[None, :], col_coef[None, :] * (tl.exp(z - col_lse[None, :]) - eps_over_b), 0.0)
    positive_cell = tl.load(positive_cell_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where((offset + rows)[:, None] == key[None, :], positive_cell[:, None], g)
    store_tile(h_ptr, stride_h, rows, cols, g, mask)


def chunk_statistics(d, row_scale, col_scale, c0, offset):
    """((row max, row Σ e^{z − max}, row Σ z) (B,) each, (the same per column) (CC,) each) of the chunk whose raw fp32
    dot products are d (B, CC), z = r·c·d (row_scale (B,), the chunk's col_scale (CC,)), every positive cell (row i,
    key offset + i) left out of the max and exponential sums."""
    B, CC = d.shape
    col_blocks, row_blocks = cdiv(CC, BLOCK_C), cdiv(B, BLOCK_N)
    row_max = torch.full((B, col_blocks), -float("inf"), dtype=torch.float32, device=d.device)
    row_sum, row_z = torch.zeros_like(row_max), torch.zeros_like(row_max)
    col_max = torch.full((row_blocks, CC), -float("inf"), dtype=torch.float32, device=d.device)
    col_sum, col_z = torch.zeros_like(col_max), torch.zeros_like(col_max)
    launch_over_tiles(info_nce_stats_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), row_scale.contiguous(),
                      col_scale.contiguous(), row_max, row_sum, row_z, col_max, col_sum, col_z, B, CC, c0, offset,
                      col_blocks)
    return (*merged_partials(row_max, row_sum, 1), row_z.sum(1)), (*merged_partials(col_max, col_sum, 0), col_z.sum(0))


def grad_chunk(d, c0, offset, symmetric, row_scale, col_scale, row_lse, col_lse, coef, positive_cell, eps_over_m,
               eps_over_b, dtype):
    """G = dL/dz (B, CC) in `dtype` (written over d when that is fp32: each program reads its own tile first);
    row_lse, coef, positive_cell (B,), col_lse (B,) fp32: each positive key's column log-sum-exp (read when
    symmetric)."""
    B, CC = d.shape
    h = gradient_buffer(d, dtype)
    launch_over_tiles(info_nce_grad_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), h, h.stride(0), row_scale.contiguous(),
                      col_scale.contiguous(), row_lse, col_lse, coef, positive_cell, B, CC, c0, offset, eps_over_m,
                      eps_over_b, SYMMETRIC=symmetric)
    return h
