"""SigLIP's pairwise sigmoid loss (Zhai, Mustafa, Kolesnikov, Beyer, ICCV 2023) streamed over chunks of keys.

With z_ij = r_i·c_j·(x_i·k_j) + b (r: the rows' scales, the temperature over ‖x_i‖ for unit rows; c: the keys', 1/‖k_j‖;
both fp32, applied after the GEMM, so 16-bit inputs are not rounded again as scaled unit rows) and row i's positive key
p_i (−1: none; every other key is a negative of row i):

    L_i = Σ_{j≠p_i} log(1 + e^{z_ij}) + log(1 + e^{−z_i,p_i}),    G_ij = dL_i/dz_ij = σ(z_ij) off p_i, −σ(−z_i,p_i) on it

(big_vision's and open_clip's −Σ_j log σ(y_ij·z_ij), y = +1 on the positive, −1 elsewhere). Both are taken of the
"signed" logit: the positive's cell negated before the element-wise functions. So a confident positive's term is
log1p(e^{−z}) itself, not softplus(z) − z, which rounds it away (softplus(15) − 15 = 3.1e-7, below fp32's ulp of 15),
and its gradient −σ(−z) is not σ(z) − 1.

The forward pass keeps two numbers per row, L_i and Σ_j G_ij (the bias's gradient). The backward pass recomputes each
chunk's dot products and feeds G to the dX and dK GEMMs against the scaled operands c∘K and r∘X (4 GEMMs in all, no
N × M tensor; chunked_epilogue.scaled_rows_backward). The scales' gradients need no pass of their own: dL/dr_i =
Σ_j G_ij·c_j·(x_i·k_j) = x_i·dX'_i with dX' = G·(c∘K) the GEMM's fp32 result (and dL/dc_j = k_j·dK'_j); autograd
carries them to the norms and the temperature. chunked_epilogue has the shared steps; triton_kernels/siglip.py the Triton epilogues (the
chunk read once per pass), else PyTorch's element-wise ops.
"""
import torch

from .chunked_epilogue import (backward_gemm_dtype, chunk_dots, epilogue_tiles, key_chunks, negate_own_cells_,
                               scaled_dots, scaled_rows_backward)
from .engine import accumulation_dtype, log1p_exp


def _signed_logits(x, k, c0, c1, bias, positive, row_scale, col_scale, acc):
    """The chunk's z_ij = r_i·c_j·(x_i·k_j) + b, each row's positive cell negated."""
    return negate_own_cells_(scaled_dots(x, k, c0, c1, row_scale, col_scale, acc).add_(bias), positive, c0, c1)


def _signed_sigmoid_(z, positive, c0, c1):
    """G of the chunk from its signed logits, in place: σ(z), the positive cells negated."""
    return negate_own_cells_(z.sigmoid_(), positive, c0, c1)


def siglip_forward(x, k, positive, bias, row_scale, col_scale):
    """(L_i (N,), Σ_j G_ij (N,)) in the accumulation dtype; positive (N,) int64 key index or −1, bias a 0-dim tensor,
    row_scale (N,) and col_scale (M,) in the accumulation dtype; arguments checked by the caller."""
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
            chunk_loss, chunk_grad = row_sums(chunk_dots(x, k, c0, c1, acc), bias, positive, row_scale,
                                              col_scale[c0:c1], c0)
            loss += chunk_loss
            bias_grad += chunk_grad
            continue
        z = _signed_logits(x, k, c0, c1, bias, positive, row_scale, col_scale, acc)
        loss += log1p_exp(z).sum(1)
        bias_grad += _signed_sigmoid_(z, positive, c0, c1).sum(1)
        del z  # before the next chunk's GEMM allocates its own
    return loss, bias_grad


def siglip_backward(grad_rows, x, k, positive, bias, row_scale, col_scale, need_input_grad=True, need_key_grad=True,
                    need_scale_grads=True):
    """(dL/dx, dL/dk (each in its input's dtype, the scales held fixed), dL/drow_scale (N,), dL/dcol_scale (M,); each
    None when not asked for) for the per-row upstream gradient grad_rows (N,): per chunk the dot products again,
    G_ij = grad_rows_i·dL_i/dz_ij, and scaled_rows_backward's GEMMs."""
    acc = accumulation_dtype(x.dtype)
    bias = bias.to(acc)
    _, triton_epilogue = epilogue_tiles(x)
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    coef = grad_rows.to(acc)
    if triton_epilogue:
        from .triton_kernels.siglip import grad_chunk as triton_grad_chunk

    def grad_chunk(c0, c1):
        if triton_epilogue:
            return triton_grad_chunk(chunk_dots(x_acc, k, c0, c1, acc), bias, positive, coef, row_scale,
                                     col_scale[c0:c1], c0, gemm)
        z = _signed_logits(x_acc, k, c0, c1, bias, positive, row_scale, col_scale, acc)
        return _signed_sigmoid_(z, positive, c0, c1).mul_(coef[:, None])

    return scaled_rows_backward(x, x_acc, k, grad_chunk, row_scale, col_scale, need_input_grad,
                                need_key_grad, need_scale_grads)
