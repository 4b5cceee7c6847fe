"""SupCon's per-chunk epilogues (marginkern/supcon.py has the math): each reads a chunk of raw dot products
d = x·k_cᵀ (fp32, from one cuBLAS GEMM) once; the logits are z = r_i·c_j·d_ij, a cell is row i's own (key offset + i,
left out), a positive (the same class) or a negative.

  statistics: per (BLOCK_N × BLOCK_C) tile and row, the positives' max, Σ e^{z − max}, Σ z and count, and the
              negatives' max and Σ e^{z − max}: (B, column blocks) partials that torch merges (a fixed order: the
              same bits every call);
  gradient:   G = coef_i·e^{a} on negatives, coef_i·(e^{a} − share_i) on positives (expm1(a) where share_i = 1: a
              single positive), 0 on the own cell, in the backward GEMMs' dtype; a = (z − M_i) − log Σ_i, the row's
              log-sum-exp kept as its max and the log of its sum (marginkern/supcon.py says why).
"""
import torch
import triton
import triton.language as tl

from .chunk_tiles import (gradient_buffer, launch_over_tiles, max_and_exp_sum, merged_partials, scaled_logit_tile,
                          store_tile, tile_indices)
from .device import cdiv

BLOCK_N, BLOCK_C = 64, 64


@triton.jit
def _cells(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, row_class_ptr, key_class_ptr, rows, cols, row_mask,
           col_mask, c0, offset):
    """(z, positive, own) of a tile: the logits, and which cells share the row's class (but for its own) or are
    its own key."""
    mask = row_mask[:, None] & col_mask[None, :]
    z = scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask)
    row_class = tl.load(row_class_ptr + rows, mask=row_mask, other=0)
    key_class = tl.load(key_class_ptr + cols, mask=col_mask, other=0)
    own = (offset + rows)[:, None] == (c0 + cols)[None, :]
    positive = mask & (row_class[:, None] == key_class[None, :]) & (own == 0)
    return z, positive, own


@triton.jit
def supcon_stats_kernel(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, row_class_ptr, key_class_ptr, out_ptr, B, CC,
                        c0, offset, col_blocks, plane, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(B, CC, BLOCK_N, BLOCK_C)
    z, positive, own = _cells(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, row_class_ptr, key_class_ptr, rows, cols,
                              row_mask, col_mask, c0, offset)
    p_top, p_total = max_and_exp_sum(tl.where(positive, z, -float("inf")), 1)
    n_top, n_total = max_and_exp_sum(tl.where(mask & (positive == 0) & (own == 0), z, -float("inf")), 1)
    # six (B, col_blocks) planes, `plane` = B·col_blocks apart (from the host: B.to() would not compile when the
    # launcher makes B = 1 a constant); the pointer steps one plane at a time, so no k·plane can overflow int32
    at = out_ptr + rows.to(tl.int64) * col_blocks + tl.program_id(0)
    tl.store(at, p_top, mask=row_mask)
    at += plane
    tl.store(at, p_total, mask=row_mask)
    at += plane
    tl.store(at, tl.sum(tl.where(positive, z, 0.0), axis=1), mask=row_mask)
    at += plane
    tl.store(at, tl.sum(positive.to(tl.float32), axis=1), mask=row_mask)
    at += plane
    tl.store(at, n_top, mask=row_mask)
    at += plane
    tl.store(at, n_total, mask=row_mask)


@triton.jit
def supcon_grad_kernel(d_ptr, stride_d, g_ptr, stride_g, row_scale_ptr, col_scale_ptr, row_class_ptr, key_class_ptr,
                       top_ptr, log_sum_ptr, coef_ptr, share_ptr, B, CC, c0, offset, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(B, CC, BLOCK_N, BLOCK_C)
    z, positive, own = _cells(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, row_class_ptr, key_class_ptr, rows, cols,
                              row_mask, col_mask, c0, offset)
    top = tl.load(top_ptr + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    share = tl.load(share_ptr + rows, mask=row_mask, other=0.0)
    a = (z - top[:, None]) - log_sum[:, None]  # ≤ 0 but on the own cell (left out of M_i), which is masked
    e = tl.exp(a)
    # expm1 without cancellation: its series below |a| = 0.35 (truncation a⁷/8! < 2e-8 relative), e^a − 1 above (ulp(1)
    # over |a| ≥ 0.35: < 4e-7); no e^{−a/2}, which overflows for a < −176
    series = a * (1.0 + a / 2.0 * (1.0 + a / 3.0 * (1.0 + a / 4.0 * (1.0 + a / 5.0 * (1.0 + a / 6.0 * (1.0 + a / 7.0))))))
    expm1 = tl.where(tl.abs(a) < 0.35, series, e - 1.0)
    g = tl.where(positive, tl.where(share[:, None] == 1.0, expm1, e - share[:, None]), e)
    g = tl.where(own, 0.0, coef[:, None] * g)
    store_tile(g_ptr, stride_g, rows, cols, g, mask)


def chunk_statistics(d, row_scale, col_scale, row_class, key_class, c0, offset):
    """((positives' max, Σ e^{z − max}, Σ z, count), (negatives' max, Σ e^{z − max})), (B,) fp32 each, of the chunk
    whose raw fp32 dot products are d (B, CC); col_scale and key_class: the chunk's."""
    B, CC = d.shape
    col_blocks = cdiv(CC, BLOCK_C)
    out = torch.zeros((6, B, col_blocks), dtype=torch.float32, device=d.device)
    out[0].fill_(-float("inf"))
    out[4].fill_(-float("inf"))
    launch_over_tiles(supcon_stats_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), row_scale.contiguous(),
                      col_scale.contiguous(), row_class.contiguous(), key_class.contiguous(), out, B, CC, c0, offset,
                      col_blocks, B * col_blocks)
    return (*merged_partials(out[0], out[1], 1), out[2].sum(1), out[3].sum(1)), merged_partials(out[4], out[5], 1)


def grad_chunk(d, row_scale, col_scale, row_class, key_class, c0, offset, top, log_sum, coef, positive_share, dtype):
    """G (B, CC) in `dtype` (written over d when that is fp32: each program reads its own tile first); top, log_sum,
    coef, positive_share (B,) fp32."""
    B, CC = d.shape
    g = gradient_buffer(d, dtype)
    launch_over_tiles(supcon_grad_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), g, g.stride(0), row_scale.contiguous(),
                      col_scale.contiguous(), row_class.contiguous(), key_class.contiguous(), top, log_sum, coef,
                      positive_share, B, CC, c0, offset)
    return g
