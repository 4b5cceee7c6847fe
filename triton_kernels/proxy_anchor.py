"""Proxy-Anchor's per-chunk epilogues (marginkern/proxy_anchor.py has the math): each reads a chunk of raw dot
products z = x·w_cᵀ (fp32, from one cuBLAS GEMM) once, instead of PyTorch's dozen element-wise passes over it.

  negative terms:  L_j = log(1 + Σ_{n: y_n ≠ j, not ignored} e^{a_nj}),  a_nj = α(z_nj/(‖x_n‖‖w_j‖) + δ),
                   a row's column being its class's index here, −1 ignored or −2 another rank's class,
                   one program per BLOCK_C columns walking down all N rows with an online max and sum;
  gradient:        G_nj = coef·e^{a_nj − L_j}/(‖x_n‖‖w_j‖) off the own-class cells, the row's own positive-term
                   gradient on them (own_cell_n), 0 on ignored rows: dL/d(x·w), the backward GEMMs' operand.
"""
import torch
import triton
import triton.language as tl

from .cosent_scan import _softplus
from .chunk_tiles import gradient_buffer, launch_over_tiles, store_tile, tile_indices
from .device import FP_FUSION, cdiv, on_device
from .streaming_ce import exp_shift

BLOCK_N, BLOCK_C = 64, 32  # 32 columns a program: 512 programs for a 16384-proxy chunk; 128-byte row segments


@triton.jit
def proxy_anchor_negative_terms_kernel(z_ptr, stride_z, inv_x_ptr, inv_w_ptr, column_ptr, out_ptr, N, CC, c0,
                                       alpha, margin, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < CC
    inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
    peak = tl.full((BLOCK_C,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_C,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
        # a row's class here, or −1 (IGNORED: no negative) or −2 (FOREIGN: another rank's class, a negative here)
        own = tl.load(column_ptr + rows, mask=row_mask, other=-1)
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        a = alpha * (z * inv_x[:, None] * inv_w[None, :] + margin)
        negative = row_mask[:, None] & (own[:, None] != -1) & (own[:, None] != (c0 + cols)[None, :])
        a = tl.where(negative, a, -float("inf"))
        new_peak = tl.maximum(peak, tl.max(a, axis=0))
        shift = exp_shift(new_peak)  # no negative yet: 0, not −inf − (−inf)
        total = total * tl.exp(peak - shift) + tl.sum(tl.exp(a - shift[None, :]), axis=0)
        peak = new_peak
    shift = exp_shift(peak)
    tl.store(out_ptr + cols, _softplus(shift + tl.log(total)), mask=col_mask)


@triton.jit
def proxy_anchor_grad_kernel(z_ptr, stride_z, g_ptr, stride_g, inv_x_ptr, inv_w_ptr, column_ptr, negative_ptr,
                             own_cell_ptr, coef_ptr, N, CC, c0, alpha, margin,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(N, CC, BLOCK_N, BLOCK_C)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
    own = tl.load(column_ptr + rows, mask=row_mask, other=-1)
    own_cell = tl.load(own_cell_ptr + rows, mask=row_mask, other=0.0)
    negative_term = tl.load(negative_ptr + cols, mask=col_mask, other=0.0)
    coef = tl.load(coef_ptr)
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    scale = inv_x[:, None] * inv_w[None, :]
    a = alpha * (z * scale + margin)
    g = coef * tl.exp(a - negative_term[None, :]) * scale
    is_own = own[:, None] == (c0 + cols)[None, :]
    g = tl.where(is_own, own_cell[:, None], tl.where(own[:, None] != -1, g, 0.0))
    store_tile(g_ptr, stride_g, rows, cols, g, mask)


def negative_terms(z, inv_x, inv_w, column, c0, alpha, margin):
    """(C_chunk,) fp32 L_j of the chunk whose raw fp32 dot products are z (N, C_chunk); inv_w: the chunk's."""
    N, CC = z.shape
    out = torch.empty(CC, dtype=torch.float32, device=z.device)
    if CC:
        with on_device(z):
            proxy_anchor_negative_terms_kernel[(cdiv(CC, BLOCK_C),)](
                z, z.stride(0), inv_x, inv_w, column, out, N, CC, c0, alpha, margin, BLOCK_N=BLOCK_N,
                BLOCK_C=BLOCK_C, **FP_FUSION)
    return out


def grad_chunk(z, inv_x, inv_w, column, negative, own_cell, coef, c0, alpha, margin, dtype):
    """G (N, C_chunk) in `dtype` (written over z when that is fp32); coef: a 0-dim fp32 tensor (α/C times the
    upstream gradient, read on the device)."""
    N, CC = z.shape
    g = gradient_buffer(z, dtype)
    launch_over_tiles(proxy_anchor_grad_kernel, z, BLOCK_N, BLOCK_C, z, z.stride(0), g, g.stride(0), inv_x, inv_w,
                      column, negative, own_cell, coef, N, CC, c0, alpha, margin)
    return g
