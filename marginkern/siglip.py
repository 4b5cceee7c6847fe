"""SigLIP's pairwise sigmoid loss (Zhai, Mustafa, Kolesnikov, Beyer, ICCV 2023) streamed over chunks of keys.

With z_ij = x_i·k_j + b (x already scaled by the temperature t and, like k, normalised by the caller) and row i's
positive key p_i (−1: none; every other key is a negative of row i):

    L_i = Σ_{j≠p_i} log(1 + e^{z_ij}) + log(1 + e^{−z_i,p_i}),    dL_i/dz_ij = σ(z_ij) off p_i, −σ(−z_i,p_i) on it

(big_vision's and open_clip's −Σ_j log σ(y_ij·z_ij), y = +1 on the positive, −1 elsewhere). Both are taken of the
"signed" logit: the positive's cell negated before the element-wise functions. So a confident positive's term is
log1p(e^{−z}) itself, not softplus(z) − z, which rounds it away (softplus(15) − 15 = 3.1e-7, below fp32's ulp of 15),
and its gradient −σ(−z) is not σ(z) − 1.

The forward pass keeps two numbers per row, L_i and Σ_j dL_i/dz_ij (the bias's gradient: the scale's comes through
x, by autograd); the backward pass recomputes each chunk's dot products and feeds dL/dz to the dX and dK GEMMs (4
GEMMs in all, no N × M tensor). chunked_epilogue has the shared steps; triton_kernels/siglip.py the Triton
epilogues (the chunk read once per pass), else PyTorch's element-wise ops.
"""
import torch

from .chunked_epilogue import (backward_gemm_dtype, chunk_dots, epilogue_tiles, negate_own_cells_, plan_chunks)
from .engine import SplitKAccumulator, accumulation_dtype, log1p_exp, mm_accumulate, split_k_slices

# A chunk's fp32 dot products and one temporary beside them, plus a chunk × D fp32 copy of 16-bit key rows on the
# CPU (its GEMM cannot take them): as Proxy-Anchor's (marginkern.proxy_anchor), for the same reasons.
CHUNK_BYTES = 16 << 20
GPU_CHUNK_FACTOR = 8
MIN_CHUNK_CLASSES = 256


def key_chunks(N, M, D, acc_bytes, on_gpu=False, weight_rows=0):
    """[(c0, c1)] covering M keys within the chunk budget."""
    return plan_chunks(N, M, D, acc_bytes, CHUNK_BYTES * (GPU_CHUNK_FACTOR if on_gpu else 1), MIN_CHUNK_CLASSES,
                       weight_rows)


def _signed_logits(x, k, c0, c1, bias, positive, acc):
    """The chunk's z_ij = x_i·k_j + b, each row's positive cell negated."""
    return negate_own_cells_(chunk_dots(x, k, c0, c1, acc).add_(bias), positive, c0, c1)


def _signed_sigmoid_(z, positive, c0, c1):
    """dL/dz of the chunk from its signed logits, in place: σ(z), the positive cells negated."""
    return negate_own_cells_(z.sigmoid_(), positive, c0, c1)


def siglip_forward(x, k, positive, bias):
    """(L_i (N,), Σ_j dL_i/dz_ij (N,)) in the accumulation dtype; positive (N,) int64 key index or −1, bias a
    0-dim tensor; arguments checked by the caller."""
    acc = accumulation_dtype(x.dtype)
    (N, D), M = x.shape, k.shape[0]
    bias = bias.to(acc)
    _, triton_epilogue = epilogue_tiles(x)
    if x.device.type == "cpu" and x.dtype != acc:
        x = x.to(acc)  # once, not per chunk
    loss = torch.zeros(N, dtype=acc, device=x.device)
    bias_grad = torch.zeros(N, dtype=acc, device=x.device)
    if triton_epilogue:
        from .triton_kernels.siglip import row_sums
    upcast_rows = int(not k.is_cuda and k.dtype != acc)
    for c0, c1 in key_chunks(N, M, D, acc.itemsize, x.is_cuda, upcast_rows):
        if triton_epilogue:
            chunk_loss, chunk_grad = row_sums(chunk_dots(x, k, c0, c1, acc), bias, positive, c0)
            loss += chunk_loss
            bias_grad += chunk_grad
            continue
        z = _signed_logits(x, k, c0, c1, bias, positive, acc)
        loss += log1p_exp(z).sum(1)
        bias_grad += _signed_sigmoid_(z, positive, c0, c1).sum(1)
        del z  # before the next chunk's GEMM allocates its own
    return loss, bias_grad


def siglip_backward(grad_rows, x, k, positive, bias, need_input_grad=True, need_key_grad=True):
    """(dL/dx in x's dtype or None, dL/dk in k's dtype or None) for the per-row upstream gradient grad_rows (N,):
    per chunk the dot products again, G = grad_rows_i·dL_i/dz_ij, dX += G·K_c and dK_c = Gᵀ·X."""
    acc = accumulation_dtype(x.dtype)
    (N, D), M = x.shape, k.shape[0]
    bias = bias.to(acc)
    _, triton_epilogue = epilogue_tiles(x)
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    x_gemm = x_acc.to(gemm)
    coef = grad_rows.to(acc)[:, None]
    dk = torch.empty_like(k) if need_key_grad else None
    chunks = key_chunks(N, M, D, acc.itemsize, x.is_cuda, int(k.dtype != gemm) + int(need_key_grad))
    dx = None
    if need_input_grad:
        out = torch.zeros((N, D), dtype=acc, device=x.device)
        dx = SplitKAccumulator(out, split_k_slices(out, chunks[0][1] - chunks[0][0]) if chunks else 1)
    if triton_epilogue:
        from .triton_kernels.siglip import grad_chunk
    for c0, c1 in chunks:
        if triton_epilogue:
            g = grad_chunk(chunk_dots(x_acc, k, c0, c1, acc), bias, positive, coef, c0, gemm)
        else:
            z = _signed_logits(x_acc, k, c0, c1, bias, positive, acc)
            g = _signed_sigmoid_(z, positive, c0, c1).mul_(coef).to(gemm)
            del z
        k_chunk = k[c0:c1].to(gemm)  # the rows themselves when they are in the GEMMs' dtype
        if dx is not None:
            dx.add(g, k_chunk)
        if dk is not None:
            if g.dtype == dk.dtype:
                torch.mm(g.t(), x_gemm, out=dk[c0:c1])  # 16-bit CUDA GEMMs accumulate in fp32 inside
            else:
                dk[c0:c1] = mm_accumulate(g.t(), x_gemm, acc)
        del g, k_chunk  # before the next chunk allocates its own
    return (None if dx is None else dx.result().to(x.dtype)), dk
