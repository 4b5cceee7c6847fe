"""CLIP's symmetric InfoNCE in one pass over chunks of keys: the query→key and the key→query cross-entropies read the
same logits z_ij = x_i·k_j (x the scaled unit queries, k the unit keys; key i query i's positive, keys B.. extra
negatives of the first direction only), so each chunk of keys is one GEMM for both: its rows extend every query's
streamed statistics, its columns are whole (all B queries), so each positive key's statistics are complete in it.
4 GEMMs per fwd+bwd instead of the two directions' 8, no B × M tensor.

Per pair i, with t_i = z_ii − δ (δ: the additive margin in logit units) and ε the label smoothing:

    row_i = lse_j(z_ij) − t_i,   col_i = lse_n(z_ni) − t_i   (the positive cell's z replaced by t)
    loss_i = ½·(row_i + ε·(t_i − Σ_j z_ij / M) + col_i + ε·(t_i − Σ_n z_ni / B))

Each of row_i and col_i is kept as log(1 + Σ_{others} e^{z − t}) with the others' running max: a confident pair's
value (≈ Σ e^{z−t}, far below the ulp of t) is not the difference lse − t, which rounds it away; the positive cell's
gradient p − 1 is expm1(−row_i) for the same reason.
"""
import torch

from .chunked_epilogue import backward_gemm_dtype, chunk_dots, epilogue_tiles, plan_chunks, set_own_cells_
from .engine import SplitKAccumulator, accumulation_dtype, mm_accumulate, split_k_slices, target_dot

# A chunk's fp32 logits and one temporary beside them (the exponentials, then the backward's dL/dz), plus a chunk × D
# fp32 copy of 16-bit key rows on the CPU: as Proxy-Anchor's and SigLIP's budget.
CHUNK_BYTES = 16 << 20
GPU_CHUNK_FACTOR = 8
MIN_CHUNK_CLASSES = 256


def key_chunks(B, M, D, acc_bytes, on_gpu=False, weight_rows=0):
    return plan_chunks(B, M, D, acc_bytes, CHUNK_BYTES * (GPU_CHUNK_FACTOR if on_gpu else 1), MIN_CHUNK_CLASSES,
                       weight_rows)


def _merge(top, total, chunk_top, chunk_total):
    """The (max, Σ e^{z − max}) of two sets of cells from each one's; an empty set has max −inf and sum 0."""
    new_top = torch.maximum(top, chunk_top)
    shift = torch.where(new_top == -float("inf"), 0.0, new_top)
    return new_top, total * torch.exp(top - shift) + chunk_total * torch.exp(chunk_top - shift)


def _max_and_sum(z, dim):
    top = z.amax(dim)
    shift = torch.where(top == -float("inf"), 0.0, top)
    return top, torch.exp(z - shift.unsqueeze(dim)).sum(dim)


def _excess_over_target(target, top, total):
    """log Σ_j e^{z_j − t} over {t} ∪ the others (their max `top`, Σ e^{z − top} `total`), exact when t dominates:
    log1p(total·e^{top − t}) there, (top − t) + log(e^{t − top} + total) where another cell is larger."""
    gap = top - target
    dominated = gap <= 0
    near = torch.log1p(total * torch.exp(torch.where(dominated, gap, 0.0)))
    far = gap + torch.log(torch.exp(-torch.where(dominated, 1.0, gap)) + total)
    return torch.where(dominated, near, far)


def symmetric_info_nce_forward(x, k, margin_logit, label_smoothing):
    """(loss_i (B,), t_i (B,), row_i (B,), col_i (B,)) in the accumulation dtype (the module docstring's names)."""
    acc = accumulation_dtype(x.dtype)
    (B, D), M = x.shape, k.shape[0]
    if x.device.type == "cpu" and x.dtype != acc:
        x = x.to(acc)  # once, not per chunk
    positive = torch.arange(B, device=x.device)
    target = target_dot(x, k, positive).to(acc) - margin_logit
    row_top = torch.full((B,), -float("inf"), dtype=acc, device=x.device)
    row_total = torch.zeros(B, dtype=acc, device=x.device)
    col_top, col_total = torch.empty_like(row_top), torch.empty_like(row_total)
    row_sum = torch.zeros(B, dtype=acc, device=x.device) if label_smoothing else None
    col_sum = torch.zeros(B, dtype=acc, device=x.device) if label_smoothing else None
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.symmetric_info_nce import chunk_statistics
    upcast_rows = int(not k.is_cuda and k.dtype != acc)
    for c0, c1 in key_chunks(B, M, D, acc.itemsize, x.is_cuda, upcast_rows):
        z = chunk_dots(x, k, c0, c1, acc)
        columns = max(0, min(c1, B) - c0)  # the chunk's keys that are some query's positive
        if triton_epilogue:
            (top, total, sums), (c_top, c_total, c_sums) = chunk_statistics(z, c0)
            row_top, row_total = _merge(row_top, row_total, top, total)
            col_top[c0:c0 + columns], col_total[c0:c0 + columns] = c_top[:columns], c_total[:columns]
            if label_smoothing:
                row_sum += sums
                col_sum[c0:c0 + columns] = c_sums[:columns]
            continue
        if label_smoothing:
            row_sum += z.sum(1)
            col_sum[c0:c0 + columns] = z[:, :columns].sum(0)
        set_own_cells_(z, positive, c0, c1, -float("inf"))  # the positives enter as t, apart
        row_top, row_total = _merge(row_top, row_total, *_max_and_sum(z, 1))
        if columns:
            col_top[c0:c0 + columns], col_total[c0:c0 + columns] = _max_and_sum(z[:, :columns], 0)
        del z  # before the next chunk's GEMM allocates its own
    row = _excess_over_target(target, row_top, row_total)
    col = _excess_over_target(target, col_top, col_total)
    loss = row + col
    if label_smoothing:  # the sums hold the positive's raw z: its margin is taken off here
        loss = loss + label_smoothing * ((target - (row_sum - margin_logit) / M) + (target - (col_sum - margin_logit) / B))
    return loss / 2, target, row, col


def _grad_chunk(z, c0, c1, B, M, row_lse, col_lse, half, positive_cell, eps, positive):
    """dL/dz of the chunk (fp32) by PyTorch's element-wise ops; z is overwritten."""
    columns = max(0, min(c1, B) - c0)
    g = (z - row_lse[:, None]).exp_().mul_(half[:, None])
    if columns:
        cols = slice(c0, c0 + columns)
        g[:, :columns] += z[:, :columns].sub_(col_lse[None, cols]).exp_().mul_(half[None, cols])
    if eps:
        g.sub_((eps / M) * half[:, None])
        if columns:
            g[:, :columns].sub_((eps / B) * half[None, c0:c0 + columns])
    return set_own_cells_(g, positive, c0, c1, positive_cell[:, None])


def symmetric_info_nce_backward(grad_pairs, x, k, target, row, col, margin_logit, label_smoothing,
                                need_input_grad=True, need_key_grad=True):
    """(dL/dx in x's dtype or None, dL/dk in k's dtype or None) for the per-pair upstream gradient grad_pairs (B,):
    per chunk the logits again, dL/dz_ij = ½g_i(p_ij − ε/M) + ½g_j(q_ij − ε/B) (q: the column softmax, j < B) with the
    positive cell exact, then dX += G·K_c and dK_c = Gᵀ·X."""
    acc = accumulation_dtype(x.dtype)
    (B, D), M = x.shape, k.shape[0]
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    x_gemm = x_acc.to(gemm)
    half = grad_pairs.to(acc) / 2
    row_lse, col_lse = target + row, target + col
    eps = label_smoothing
    # the positive cell's dL/dz: ½g·((p − 1) + ε(1 − 1/M) + (q − 1) + ε(1 − 1/B)), with p − 1 = expm1(−row)
    positive_cell = half * (torch.expm1(-row) + torch.expm1(-col) + eps * (2.0 - 1.0 / M - 1.0 / max(B, 1)))
    positive = torch.arange(B, device=x.device)
    dk = torch.empty_like(k) if need_key_grad else None
    chunks = key_chunks(B, M, D, acc.itemsize, x.is_cuda, int(k.dtype != gemm) + int(need_key_grad))
    dx = None
    if need_input_grad:
        out = torch.zeros((B, D), dtype=acc, device=x.device)
        dx = SplitKAccumulator(out, split_k_slices(out, chunks[0][1] - chunks[0][0]) if chunks else 1)
    _, triton_epilogue = epilogue_tiles(x)
    if triton_epilogue:
        from .triton_kernels.symmetric_info_nce import grad_chunk
    for c0, c1 in chunks:
        z = chunk_dots(x_acc, k, c0, c1, acc)
        if triton_epilogue:
            g = grad_chunk(z, c0, row_lse, col_lse, half, positive_cell, eps / M, eps / max(B, 1), gemm)
        else:
            g = _grad_chunk(z, c0, c1, B, M, row_lse, col_lse, half, positive_cell, eps, positive).to(gemm)
        del z
        k_chunk = k[c0:c1].to(gemm)
        if dx is not None:
            dx.add(g, k_chunk)
        if dk is not None:
            if g.dtype == dk.dtype:
                torch.mm(g.t(), x_gemm, out=dk[c0:c1])
            else:
                dk[c0:c1] = mm_accumulate(g.t(), x_gemm, acc)
        del g, k_chunk
    return (None if dx is None else dx.result().to(x.dtype)), dk
