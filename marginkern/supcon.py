"""SupCon's per-row loss (Khosla et al., NeurIPS 2020; with one positive per row, SimCLR's NT-Xent) streamed over chunks
of keys: logits z_ia = r_i·c_a·(x_i·k_a) (fp32 factors per row and per key, as marginkern.info_nce), row i's own key
offset + i left out, its positives P(i) the other keys of its class:

    L_i = log Σ_{a≠i} e^{z_ia} − m_i,   m_i = 1/|P(i)| Σ_{p∈P(i)} z_ip

Both terms come from the same pass over the same logits, so L_i is never the difference of two rounded numbers of
size 1/τ: per row the positives' and the negatives' (max, Σ e^{z − max}) and the positives' Σ z stream apart, then
L_i = logaddexp(log Σ_P e^{z − m_i}, log Σ_N e^{z − m_i}). With one positive, m_i is that cell's own z, its term is
exactly e^0 = 1, and a confident pair's L_i = log1p(Σ_N e^{z − m_i}) keeps all its digits; its gradient on the
positive is expm1(z − lse) (p − 1 without cancellation). A row without positives has L_i = 0 and no gradient (the
official code's current convention). The backward pass feeds G = dL/dz, formed per cell (positives
e^{z−lse} − 1/|P|, negatives e^{z−lse}), to scaled_rows_backward's GEMMs: the positives' pull and the softmax's push
cancel within each cell, not between two GEMM results. Two more things keep that gradient as exact as the official
code's fp32 arithmetic on clustered features (where a row's cells nearly cancel, it was 3× less exact before):
- the backward pass takes each row's log-sum-exp as (max M_i, log Σ e^{z − M_i}) and forms z − lse as (z − M_i) − log
  Σ: one fp32 number lse ≈ 1/τ + log N carries ulp(20) ≈ 2e-6 of error into every cell's e^{z − lse} (the official
  code's logits are shifted by their row max too); and a confident NT-Xent pair's positive gets expm1(−L_i) = −L_i,
  not expm1(0);
- with several positives, e^{z − lse} − 1/|P| is taken as it stands (each term ≤ 1/2 and near the other where they
  cancel: an exact subtraction), not as expm1(z − lse) + (1 − 1/|P|), which carries ulp(1)-sized errors into a
  difference of size ~1/|P|.
"""
import torch

from .chunked_epilogue import (backward_gemm_dtype, chunk_dots, epilogue_tiles, key_chunks, max_and_sum,
                               merge_top_total, scaled_dots, scaled_rows_backward)
from .engine import accumulation_dtype


def _cell_kinds(row_class, key_class, offset, c0, c1):
    """(positive (B, CC) bool, own (B, CC) bool) of the chunk's cells."""
    B = row_class.shape[0]
    own = (torch.arange(c0, c1, device=row_class.device)[None, :]
           == torch.arange(offset, offset + B, device=row_class.device)[:, None])
    return (row_class[:, None] == key_class[None, c0:c1]) & ~own, own


def supcon_forward(x, k, row_scale, col_scale, row_class, key_class, offset):
    """(L_i (B,), M_i (B,), log Σ_{a≠i} e^{z_ia − M_i} (B,), |P(i)| (B,)) in the accumulation dtype, M_i the row's
    largest logit but its own (lse_i = M_i + log Σ, kept apart for the backward pass); L_i = 0 where a row has no
    positive."""
    acc = accumulation_dtype(x.dtype)
    (B, D), M = x.shape, k.shape[0]
    if x.device.type == "cpu" and x.dtype != acc:
        x = x.to(acc)  # once, not per chunk
    full = dict(dtype=acc, device=x.device)
    pos_top, neg_top = torch.full((B,), -float("inf"), **full), torch.full((B,), -float("inf"), **full)
    pos_total, neg_total, pos_z, count = (torch.zeros(B, **full) for _ in range(4))
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.supcon import chunk_statistics
    upcast_rows = int(not k.is_cuda and k.dtype != acc)
    for c0, c1 in key_chunks(B, M, D, acc.itemsize, x.is_cuda, upcast_rows):
        if triton_epilogue:
            (p_top, p_total, p_z, p_count), (n_top, n_total) = chunk_statistics(
                chunk_dots(x, k, c0, c1, acc), row_scale, col_scale[c0:c1], row_class, key_class[c0:c1], c0, offset)
        else:
            z = scaled_dots(x, k, c0, c1, row_scale, col_scale, acc)
            positive, own = _cell_kinds(row_class, key_class, offset, c0, c1)
            p_z = torch.where(positive, z, 0.0).sum(1)
            p_count = positive.sum(1).to(acc)
            p_top, p_total = max_and_sum(torch.where(positive, z, -float("inf")), 1)
            n_top, n_total = max_and_sum(z.masked_fill_(positive | own, -float("inf")), 1)
            del z, positive, own
        pos_top, pos_total = merge_top_total(pos_top, pos_total, p_top, p_total)
        neg_top, neg_total = merge_top_total(neg_top, neg_total, n_top, n_total)
        pos_z += p_z
        count += p_count
    has_positive = count > 0
    mean = torch.where(has_positive, pos_z / count.clamp_min(1), 0.0)  # m_i
    # log Σ_P e^{z − m} and log Σ_N e^{z − m}: with one positive, its z is m itself and the first is log 1 = 0 exactly
    log_positive = pos_top - mean + torch.log(pos_total)
    log_negative = neg_top - mean + torch.log(neg_total)
    loss = torch.where(has_positive, torch.logaddexp(log_positive, log_negative), 0.0)
    # the backward pass's (M_i, log Σ e^{z − M_i}), for every row with a cell (a row without positives gets no
    # gradient, but its e^{z − lse} ≤ 1 must stay finite: 0·e^z at z > 88 was NaN, and the GEMMs spread it); (0, 0)
    # for a row with none (a single key, its own)
    top = torch.maximum(pos_top, neg_top)
    has_cells = top > -float("inf")
    top = torch.where(has_cells, top, 0.0)
    log_sum = torch.logaddexp(pos_top - top + torch.log(pos_total), neg_top - top + torch.log(neg_total))
    return loss, top, torch.where(has_cells, log_sum, 0.0), count


def supcon_backward(grad_rows, x, k, row_scale, col_scale, row_class, key_class, offset, top, log_sum, count,
                    need_input_grad=True, need_key_grad=True, need_scale_grads=True):
    """The gradients of supcon_forward's L (B,) for the upstream grad_rows: G_ij = g_i·(e^{z − lse_i} − [j∈P(i)]/|P(i)|)
    (0 on the own cell and on rows without positives), z − lse as (z − M_i) − log Σ (supcon_forward's by-products), a
    single positive's cell as expm1(z − lse)."""
    acc = accumulation_dtype(x.dtype)
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    coef = torch.where(count > 0, grad_rows.to(acc), 0.0)
    # each positive's share 1/|P| (exactly 1 for one positive: then p − 1 = expm1(z − lse))
    positive_share = torch.where(count > 0, 1.0 / count.clamp_min(1), 0.0)
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.supcon import grad_chunk as triton_grad_chunk

    def grad_chunk(c0, c1):
        if triton_epilogue:
            return triton_grad_chunk(chunk_dots(x_acc, k, c0, c1, acc), row_scale, col_scale[c0:c1], row_class,
                                     key_class[c0:c1], c0, offset, top, log_sum, coef, positive_share, gemm)
        a = scaled_dots(x_acc, k, c0, c1, row_scale, col_scale, acc).sub_(top[:, None]).sub_(log_sum[:, None])
        positive, own = _cell_kinds(row_class, key_class, offset, c0, c1)
        share = positive_share[:, None]
        e = torch.exp(a)  # ≤ 1 but on the own cell (left out of M_i), which is masked
        g = torch.where(positive, torch.where(share == 1.0, torch.expm1(a), e - share), e)
        return g.mul_(coef[:, None]).masked_fill_(own, 0.0)

    return scaled_rows_backward(x, x_acc, k, grad_chunk, row_scale, col_scale, need_input_grad,
                                need_key_grad, need_scale_grads)
