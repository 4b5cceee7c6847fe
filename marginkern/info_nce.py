"""In-batch InfoNCE streamed over chunks of keys, one direction or both (CLIP's symmetric loss) in one pass.

Logits z_ij = r_i·c_j·(x_i·k_j): r the rows' fp32 scales (the temperature over ‖x_i‖ for unit rows), c the keys'
(1/‖k_j‖), applied after the GEMM, so 16-bit inputs are not rounded again as scaled unit rows. Row i's positive is
key p_i = offset + i (with a process group, this rank's queries against every rank's keys); every other key is a
negative. With `symmetric` (offset 0) the key→query direction of the B positive keys reads the same logits: each chunk
of keys is one GEMM for both, its rows extending every query's streamed statistics, its columns whole (all B queries),
so each positive key's statistics are complete in it. 4 GEMMs per fwd+bwd instead of the two directions' 8, no B × M
tensor.

Per pair i, with t_i = z_i,p_i − δ (δ: the additive margin in logit units) and ε the label smoothing:

    row_i = lse_j(z_ij) − t_i,   col_i = lse_n(z_ni) − t_i   (the positive cell's z replaced by t)
    loss_i = row_i + ε·(t_i − Σ_j z_ij / M)      (symmetric: the mean of that and col_i + ε·(t_i − Σ_n z_ni / B))

Each of row_i and col_i is kept as log(1 + Σ_{others} e^{z − t}) with the others' running max: a confident pair's
value (≈ Σ e^{z−t}, far below the ulp of t) is not the difference lse − t, which rounds it away; the positive cell's
gradient p − 1 is expm1(−row_i) for the same reason. The backward GEMMs read G = dL/dz against the scaled operands c∘K
and r∘X; the scales' gradients are x_i·dX'_i and k_j·dK'_j of their fp32 results (chunked_epilogue.scaled_rows_backward),
and autograd carries them to the norms and the temperature.
"""
import torch

from .chunked_epilogue import (backward_gemm_dtype, chunk_dots, epilogue_tiles, key_chunks, max_and_sum,
                               merge_top_total, scaled_dots, scaled_rows_backward, set_own_cells_)
from .engine import accumulation_dtype, paired_row_dots


def _excess_over_target(target, top, total):
    """log Σ_j e^{z_j − t} over {t} ∪ the others (their max `top`, Σ e^{z − top} `total`), exact when t dominates:
    log1p(total·e^{top − t}) there, (top − t) + log(e^{t − top} + total) where another cell is larger."""
    gap = top - target
    dominated = gap <= 0
    near = torch.log1p(total * torch.exp(torch.where(dominated, gap, 0.0)))
    far = gap + torch.log(torch.exp(-torch.where(dominated, 1.0, gap)) + total)
    return torch.where(dominated, near, far)


def _positive_columns(B, c0, c1, symmetric):
    """How many of the chunk's keys [c0, c1) are some query's positive with a column term: keys < B, symmetric only."""
    return max(0, min(c1, B) - c0) if symmetric else 0


def _streamed_statistics(x, k, row_scale, col_scale, offset, symmetric, label_smoothing):
    """Per row the (max, Σ e^{z − max}) of its cells other than its positive (key offset + i), and with `symmetric`
    the same down each positive key's column, with label smoothing the raw sums Σ z of both: (target t_i (margin not
    taken off), row_top, row_total, col_top, col_total, row_sum, col_sum), (B,) each in the accumulation dtype (sums
    None without smoothing)."""
    acc = accumulation_dtype(x.dtype)
    (B, D), M = x.shape, k.shape[0]
    if x.device.type == "cpu" and x.dtype != acc:
        x = x.to(acc)  # once, not per chunk
    positive = torch.arange(offset, offset + B, device=x.device)
    target = paired_row_dots(x, k[offset:offset + B], acc) * row_scale * col_scale[offset:offset + B]
    row_top = torch.full((B,), -float("inf"), dtype=acc, device=x.device)
    row_total = torch.zeros(B, dtype=acc, device=x.device)
    col_top, col_total = torch.full_like(row_top, -float("inf")), torch.zeros_like(row_total)
    row_sum = torch.zeros(B, dtype=acc, device=x.device) if label_smoothing else None
    col_sum = torch.zeros(B, dtype=acc, device=x.device) if label_smoothing else None
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.info_nce import chunk_statistics
    upcast_rows = int(not k.is_cuda and k.dtype != acc)
    for c0, c1 in key_chunks(B, M, D, acc.itemsize, x.is_cuda, upcast_rows):
        columns = _positive_columns(B, c0, c1, symmetric)
        if triton_epilogue:
            (top, total, sums), (c_top, c_total, c_sums) = chunk_statistics(chunk_dots(x, k, c0, c1, acc), row_scale,
                                                                             col_scale[c0:c1], c0, offset)
            row_top, row_total = merge_top_total(row_top, row_total, top, total)
            col_top[c0:c0 + columns], col_total[c0:c0 + columns] = c_top[:columns], c_total[:columns]
            if label_smoothing:
                row_sum += sums
                col_sum[c0:c0 + columns] = c_sums[:columns]
            continue
        z = scaled_dots(x, k, c0, c1, row_scale, col_scale, acc)
        if label_smoothing:
            row_sum += z.sum(1)
            col_sum[c0:c0 + columns] = z[:, :columns].sum(0)
        set_own_cells_(z, positive, c0, c1, -float("inf"))  # the positives enter as t, apart
        row_top, row_total = merge_top_total(row_top, row_total, *max_and_sum(z, 1))
        if columns:
            col_top[c0:c0 + columns], col_total[c0:c0 + columns] = max_and_sum(z[:, :columns], 0)
        del z  # before the next chunk's GEMM allocates its own
    return target, row_top, row_total, col_top, col_total, row_sum, col_sum


def info_nce_forward(x, k, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing):
    """(loss_i (B,), t_i (B,), row_i (B,), col_i (B,): zeros unless symmetric) in the accumulation dtype (the module
    docstring's names)."""
    B, M = x.shape[0], k.shape[0]
    target, row_top, row_total, col_top, col_total, row_sum, col_sum = _streamed_statistics(
        x, k, row_scale, col_scale, offset, symmetric, label_smoothing)
    target = target - margin_logit
    row = _excess_over_target(target, row_top, row_total)
    loss = row.clone()  # an op's outputs must not alias each other
    if label_smoothing:  # the sums hold the positive's own z: its margin is taken off here
        loss = loss + label_smoothing * (target - (row_sum - margin_logit) / M)
    if not symmetric:
        return loss, target, row, torch.zeros_like(row)
    col = _excess_over_target(target, col_top, col_total)
    loss = loss + col
    if label_smoothing:
        loss = loss + label_smoothing * (target - (col_sum - margin_logit) / B)
    return loss / 2, target, row, col


def _grad_chunk(z, c0, c1, B, M, row_lse, col_lse, coef, positive_cell, eps, positive, symmetric):
    """dL/dz of the chunk (fp32) by PyTorch's element-wise ops; z is overwritten."""
    columns = _positive_columns(B, c0, c1, symmetric)
    g = (z - row_lse[:, None]).exp_().mul_(coef[:, None])
    if columns:
        cols = slice(c0, c0 + columns)
        g[:, :columns] += z[:, :columns].sub_(col_lse[None, cols]).exp_().mul_(coef[None, cols])
    if eps:
        g.sub_((eps / M) * coef[:, None])
        if columns:
            g[:, :columns].sub_((eps / B) * coef[None, c0:c0 + columns])
    return set_own_cells_(g, positive, c0, c1, positive_cell[:, None])


def _streamed_backward(x, k, row_scale, col_scale, offset, symmetric, row_lse, col_lse, coef, positive_cell, eps,
                       need_input_grad, need_key_grad, need_scale_grads):
    """scaled_rows_backward with G_ij = coef_i(e^{z − row_lse_i} − ε/M) [+ coef_j(e^{z − col_lse_j} − ε/B) for keys
    j < B when symmetric], positive_cell_i on row i's own cell (key offset + i)."""
    acc = accumulation_dtype(x.dtype)
    B, M = x.shape[0], k.shape[0]
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    positive = torch.arange(offset, offset + B, device=x.device)
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.info_nce import grad_chunk as triton_grad_chunk

    def grad_chunk(c0, c1):
        if triton_epilogue:
            return triton_grad_chunk(chunk_dots(x_acc, k, c0, c1, acc), c0, offset, symmetric, row_scale,
                                     col_scale[c0:c1], row_lse, col_lse, coef, positive_cell, eps / M,
                                     eps / max(B, 1), gemm)
        z = scaled_dots(x_acc, k, c0, c1, row_scale, col_scale, acc)
        return _grad_chunk(z, c0, c1, B, M, row_lse, col_lse, coef, positive_cell, eps, positive, symmetric)

    return scaled_rows_backward(x, x_acc, k, grad_chunk, row_scale, col_scale, need_input_grad,
                                need_key_grad, need_scale_grads)


def info_nce_backward(grad_pairs, x, k, row_scale, col_scale, offset, symmetric, target, row, col, margin_logit,
                      label_smoothing, need_input_grad=True, need_key_grad=True, need_scale_grads=True):
    """(dL/dx, dL/dk (each in its input's dtype, the scales held fixed), dL/drow_scale (B,), dL/dcol_scale (M,); each
    None when not asked for) for the per-pair upstream gradient grad_pairs (B,): per chunk the logits again,
    G_ij = dL/dz_ij = a·g_i(p_ij − ε/M) + a·g_j(q_ij − ε/B) (a = ½ symmetric, else 1 and no column term; q: the column
    softmax, j < B) with the positive cell exact, and scaled_rows_backward's GEMMs."""
    B, M = x.shape[0], k.shape[0]
    coef = grad_pairs.to(row.dtype) / (2 if symmetric else 1)
    eps = label_smoothing
    # the positive cell's dL/dz: a·g·((p − 1) + ε(1 − 1/M) [+ (q − 1) + ε(1 − 1/B)]), with p − 1 = expm1(−row)
    positive_cell = torch.expm1(-row) + eps * (1.0 - 1.0 / M)
    if symmetric:
        positive_cell = positive_cell + torch.expm1(-col) + eps * (1.0 - 1.0 / max(B, 1))
    positive_cell = coef * positive_cell
    row_lse = target + row
    col_lse = target + col if symmetric else torch.full_like(row, float("inf"))  # no column term
    return _streamed_backward(x, k, row_scale, col_scale, offset, symmetric, row_lse, col_lse, coef, positive_cell,
                              eps, need_input_grad, need_key_grad, need_scale_grads)
