"""SigLIP's per-chunk epilogues (marginkern/siglip.py has the math): each reads a chunk of raw dot products
d = x·k_cᵀ (fp32, from one cuBLAS GEMM) once, instead of PyTorch's handful of element-wise passes over it.

  row sums:   per row and block of BLOCK_C columns, Σ log(1 + e^{s}) and Σ ±σ(s) of the signed logits s (z = r·c·d + b,
              the row's positive cell negated), written to (N, blocks) partials that torch sums (a fixed order: the
              same bits every call, where atomics would not be);
  gradient:   G_ij = coef_i·σ(s_ij), negated on the positive cell (dL/dz), the backward GEMMs' operand.
"""
import torch
import triton
import triton.language as tl

from .cosent_scan import _softplus
from .chunk_tiles import gradient_buffer, launch_over_tiles, scaled_logit_tile, store_tile, tile_indices
from .device import cdiv

BLOCK_N, BLOCK_C = 32, 128


@triton.jit
def _signed(d_ptr, stride_d, bias_ptr, positive_ptr, row_scale_ptr, col_scale_ptr, rows, row_mask, cols, col_mask, c0):
    """(the tile's signed logits ±(r·c·d + b), whether each cell is its row's positive)."""
    bias = tl.load(bias_ptr)
    positive = tl.load(positive_ptr + rows, mask=row_mask, other=-1)
    z = scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask) + bias
    is_positive = positive[:, None] == (c0 + cols)[None, :]
    return tl.where(is_positive, -z, z), is_positive


@triton.jit
def _sigmoid(s):
    """σ(s) with e^{−|s|} (no overflow, full relative precision on both sides)."""
    e = tl.exp(-tl.abs(s))
    return tl.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def siglip_row_sums_kernel(d_ptr, stride_d, bias_ptr, positive_ptr, row_scale_ptr, col_scale_ptr, loss_ptr, grad_ptr,
                           N, CC, c0, blocks, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(N, CC, BLOCK_N, BLOCK_C)
    s, is_positive = _signed(d_ptr, stride_d, bias_ptr, positive_ptr, row_scale_ptr, col_scale_ptr, rows, row_mask,
                             cols, col_mask, c0)
    loss = tl.sum(tl.where(mask, _softplus(s), 0.0), axis=1)
    sig = _sigmoid(s)
    grad = tl.sum(tl.where(mask, tl.where(is_positive, -sig, sig), 0.0), axis=1)
    out = rows.to(tl.int64) * blocks + tl.program_id(0)
    tl.store(loss_ptr + out, loss, mask=row_mask)
    tl.store(grad_ptr + out, grad, mask=row_mask)


@triton.jit
def siglip_grad_kernel(d_ptr, stride_d, h_ptr, stride_h, bias_ptr, positive_ptr, row_scale_ptr, col_scale_ptr,
                       coef_ptr, N, CC, c0, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, row_mask, col_mask, mask = tile_indices(N, CC, BLOCK_N, BLOCK_C)
    s, is_positive = _signed(d_ptr, stride_d, bias_ptr, positive_ptr, row_scale_ptr, col_scale_ptr, rows, row_mask,
                             cols, col_mask, c0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    sig = _sigmoid(s)
    h = coef[:, None] * tl.where(is_positive, -sig, sig)
    store_tile(h_ptr, stride_h, rows, cols, h, mask)


def row_sums(d, bias, positive, row_scale, col_scale, c0):
    """((N,) Σ_j log(1 + e^{s_ij}), (N,) Σ_j dL_i/dz_ij) of the chunk whose raw fp32 dot products are d (N, CC); bias
    a 0-dim fp32 tensor (read on the device), positive (N,) int64 key index or −1, row_scale (N,) and the chunk's
    col_scale (CC,) fp32."""
    N, CC = d.shape
    blocks = cdiv(CC, BLOCK_C)
    loss = torch.zeros((N, blocks), dtype=torch.float32, device=d.device)
    grad = torch.zeros((N, blocks), dtype=torch.float32, device=d.device)
    launch_over_tiles(siglip_row_sums_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), bias, positive.contiguous(),
                      row_scale.contiguous(), col_scale.contiguous(), loss, grad, N, CC, c0, blocks)
    return loss.sum(1), grad.sum(1)


def grad_chunk(d, bias, positive, coef, row_scale, col_scale, c0, dtype):
    """G = dL/dz (N, CC) in `dtype` (written over d when that is fp32: each program reads its own tile first); coef
    (N,) fp32: each row's upstream gradient."""
    N, CC = d.shape
    h = gradient_buffer(d, dtype)
    launch_over_tiles(siglip_grad_kernel, d, BLOCK_N, BLOCK_C, d, d.stride(0), h, h.stride(0), bias,
                      positive.contiguous(), row_scale.contiguous(), col_scale.contiguous(), coef.contiguous(), N, CC,
                      c0)
    return h
