"""SigLIP's per-chunk epilogues (marginkern/siglip.py has the math): each reads a chunk of raw dot products
z = x·k_cᵀ (fp32, from one cuBLAS GEMM) once, instead of PyTorch's handful of element-wise passes over it.

  row sums:   per row and block of BLOCK_C columns, Σ log(1 + e^{s}) and Σ ±σ(s) of the signed logits s (z + b, the
              row's positive cell negated), written to (N, blocks) partials that torch sums (a fixed order: the
              same bits every call, where atomics would not be);
  gradient:   G_ij = coef_i·σ(s_ij), negated on the positive cell: dL/dz, the backward GEMMs' operand.
"""
import torch
import triton
import triton.language as tl

from .cosent_scan import _softplus
from .device import cdiv, check_row_blocks, on_device

BLOCK_N, BLOCK_C = 32, 128


@triton.jit
def _signed(z_ptr, stride_z, bias_ptr, positive_ptr, rows, row_mask, cols, c0, mask):
    """(the signed logits of a tile, whether each cell is its row's positive)."""
    bias = tl.load(bias_ptr)
    positive = tl.load(positive_ptr + rows, mask=row_mask, other=-1)
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=mask, other=0.0) + bias
    is_positive = positive[:, None] == (c0 + cols)[None, :]
    return tl.where(is_positive, -z, z), is_positive


@triton.jit
def _sigmoid(s):
    """σ(s) with e^{−|s|} (no overflow, full relative precision on both sides)."""
    e = tl.exp(-tl.abs(s))
    return tl.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def siglip_row_sums_kernel(z_ptr, stride_z, bias_ptr, positive_ptr, loss_ptr, grad_ptr, N, CC, c0, blocks,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # column blocks on grid axis 0 (2³¹ − 1 programs), rows on axis 1 (65535: N up to 2M rows)
    block = tl.program_id(0)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < CC)[None, :]
    s, is_positive = _signed(z_ptr, stride_z, bias_ptr, positive_ptr, rows, row_mask, cols, c0, mask)
    loss = tl.sum(tl.where(mask, _softplus(s), 0.0), axis=1)
    sig = _sigmoid(s)
    grad = tl.sum(tl.where(mask, tl.where(is_positive, -sig, sig), 0.0), axis=1)
    out = rows.to(tl.int64) * blocks + block
    tl.store(loss_ptr + out, loss, mask=row_mask)
    tl.store(grad_ptr + out, grad, mask=row_mask)


@triton.jit
def siglip_grad_kernel(z_ptr, stride_z, g_ptr, stride_g, bias_ptr, positive_ptr, coef_ptr, N, CC, c0,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < CC)[None, :]
    s, is_positive = _signed(z_ptr, stride_z, bias_ptr, positive_ptr, rows, row_mask, cols, c0, mask)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    sig = _sigmoid(s)
    g = coef[:, None] * tl.where(is_positive, -sig, sig)
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)


def row_sums(z, bias, positive, c0):
    """((N,) Σ_j log(1 + e^{s_ij}), (N,) Σ_j dL_i/dz_ij) of the chunk whose raw fp32 dot products are z (N, CC);
    bias a 0-dim fp32 tensor (read on the device), positive (N,) int64 key index or −1."""
    N, CC = z.shape
    blocks = cdiv(CC, BLOCK_C)
    loss = torch.zeros((N, blocks), dtype=torch.float32, device=z.device)
    grad = torch.zeros((N, blocks), dtype=torch.float32, device=z.device)
    check_row_blocks(N, BLOCK_N)
    if N and CC:
        with on_device(z):
            siglip_row_sums_kernel[(blocks, cdiv(N, BLOCK_N))](
                z, z.stride(0), bias, positive, loss, grad, N, CC, c0, blocks, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    return loss.sum(1), grad.sum(1)


def grad_chunk(z, bias, positive, coef, c0, dtype):
    """G (N, CC) in `dtype` (written over z when that is fp32); coef (N, 1) fp32: each row's upstream gradient."""
    N, CC = z.shape
    g = z if dtype == torch.float32 else torch.empty((N, CC), dtype=dtype, device=z.device)
    check_row_blocks(N, BLOCK_N)
    if N and CC:
        with on_device(z):
            siglip_grad_kernel[(cdiv(CC, BLOCK_C), cdiv(N, BLOCK_N))](
                z, z.stride(0), g, g.stride(0), bias, positive, coef.contiguous(), N, CC, c0, BLOCK_N=BLOCK_N,
                BLOCK_C=BLOCK_C)
    return g
