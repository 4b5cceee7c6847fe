"""GlobalPointer's span loss with its logits fused in (Su's GlobalPointer, GPLinker): for each (batch, head) row the
ZLPR (multilabel categorical CE) over its L × L span logits s_mn = scale·q_m·k_n, by blocks of rows × query positions
(with tril, a block of queries [m0, m1) takes only keys n ≥ m0), never the (B, H, L, L) logits, their masks or their
gradient.

Spans are cells (m, n) of the flattened index m·L + n (bert4keras's and GPLinker's labels). A cell is left out of the
loss (neither a negative nor a positive, as GlobalPointer's −inf logits) where m or n is padding (mask), below the
diagonal (n < m, tril=True: bert4keras's `tril_mask`), or cell 0 with mask_zero. Each row's loss is
L = log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s).

The positives are a few cells per row: their logits are P dot products per row, gathered, and their side of the loss
and its gradient (−g·e^{−s − L_pos}, added into dq and dk by index) cost O(P·d). The negatives are every other kept
cell: each block's logits get −inf at the left-out cells and at the positives (broadcast masks in place, the
positives scattered: no logits-sized mask), then one log-sum-exp; the backward pass recomputes the block as
s − L_neg in its GEMM, exponentiates it in place into G = e^{s − L_neg} and gives dq = scale·g·G·k and
dk = g·Gᵀ·(scale·q) (4 batched GEMMs per fwd+bwd in all). Where the engine runs Triton (CUDA), the GEMMs give raw
dot products (16-bit operands as they are, fp32 out) and one epilogue kernel per block and pass reads the block once
instead, writing G in the backward GEMMs' dtype (triton_kernels/global_pointer.py)."""
import torch

from .chunked_epilogue import backward_gemm_dtype, epilogue_tiles
from .engine import accumulation_dtype, bmm_accumulate, log1p_exp
from .pairwise import named_positives

# One block's fp32 logits (rows × query positions × L) within this many bytes (a few such temporaries exist at once),
# 8× more on a GPU.
GP_BLOCK_BYTES = 8 << 20
GP_GPU_BLOCK_FACTOR = 8


def _rows(t):
    """(B, L, H, d) → (B·H, L, d): one row per (batch, head)."""
    B, L, H, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(B * H, L, d)


def _blocks(R, L, acc_bytes, on_gpu):
    """(r0, r1, m0, m1) covering R rows × L query positions, each block's logits within the budget."""
    budget = GP_BLOCK_BYTES * (GP_GPU_BLOCK_FACTOR if on_gpu else 1)
    row_bytes = max(1, L * L * acc_bytes)
    if row_bytes <= budget:
        rows = budget // row_bytes
        return [(r0, min(R, r0 + rows), 0, L) for r0 in range(0, R, rows)]
    queries = max(1, budget // max(1, L * acc_bytes))
    return [(r, r + 1, m0, min(L, m0 + queries)) for r in range(R) for m0 in range(0, L, queries)]


class _Spans:
    """What every block needs: q and k as rows, the padding mask per row, the positives (sorted per row) with their
    query and key positions, which of them count (named, inside [0, L²), on a kept cell, not a repeat), and the rows
    that name a cell outside [0, L²) (their loss is NaN, their gradient 0)."""

    def __init__(self, q, k, positives, mask, scale, tril, mask_zero, ignore_index):
        B, L, H, _ = q.shape
        self.L, self.scale, self.tril, self.mask_zero = L, scale, tril, mask_zero
        self.acc = accumulation_dtype(q.dtype)
        self.q, self.k = _rows(q), _rows(k)
        self.mask = None if mask is None else (mask != 0).repeat_interleave(H, 0)  # (B·H, L)
        # with tril, a block of query positions [m0, m1) needs no key before m0 (all below the diagonal): its logits
        # are (rows, m1 − m0, L − n0) from key n0 = m0 on
        self.blocks = [(r0, r1, m0, m1, m0 if tril else 0) for r0, r1, m0, m1 in _blocks(B * H, L, self.acc.itemsize,
                                                                                          q.is_cuda)]
        p, _ = positives.reshape(B * H, positives.shape[-1]).long().sort(-1)
        named = named_positives(p, mask_zero, ignore_index)
        inside = (p >= 0) & (p < L * L)
        self.bad = (named & ~inside).any(-1)
        if L == 0:  # no spans to gather from: no positive counts
            p, named, inside = p[:, :0], named[:, :0], inside[:, :0]
        cell = torch.where(inside, p, 0)
        self.m, self.n = cell // max(L, 1), cell % max(L, 1)
        counts = named & inside
        counts[:, 1:] &= p[:, 1:] != p[:, :-1]  # a span listed twice is one positive
        if self.mask is not None:
            counts &= self.mask.gather(1, self.m) & self.mask.gather(1, self.n)
        if tril:
            counts &= self.n >= self.m
        self.counts = counts
        self._below = {}

    def positive_logits(self):
        """(the positives' query rows, key rows (both (R, P, d), accumulation dtype), their logits (R, P))."""
        d = self.q.shape[-1]
        qp = self.q.gather(1, self.m[..., None].expand(-1, -1, d)).to(self.acc)
        kp = self.k.gather(1, self.n[..., None].expand(-1, -1, d)).to(self.acc)
        return qp, kp, torch.linalg.vecdot(qp, kp).mul_(self.scale)

    def dots(self, r0, r1, m0, m1, n0):
        """The block's raw dot products q_m·k_n (rows, m1 − m0, L − n0) in the accumulation dtype (16-bit CUDA
        operands as they are)."""
        return bmm_accumulate(self.q[r0:r1, m0:m1], self.k[r0:r1, n0:].transpose(1, 2), self.acc)

    def below_diagonal(self, m0, m1, n0, device):
        """The (m1 − m0, L − n0) mask of cells n < m: kept for blocks of whole rows (the same for each), made per
        block of query positions (kept, those would add up to an L × L mask)."""
        if (m0, m1) in self._below:
            return self._below[m0, m1]
        below = torch.arange(n0, self.L, device=device) < torch.arange(m0, m1, device=device)[:, None]
        if m0 == 0 and m1 == self.L:
            self._below[m0, m1] = below
        return below

    def negatives_only(self, s, r0, r1, m0, m1, n0):
        """s (rows, m1 − m0, L − n0) with −inf at every cell that is not a negative, in place: the left-out cells by
        masks broadcast over the block (the Triton epilogues apply them as they read it), then the positives."""
        inf = float("inf")
        if self.mask is not None:
            s.masked_fill_(~self.mask[r0:r1, m0:m1, None], -inf)
            s.masked_fill_(~self.mask[r0:r1, None, n0:], -inf)
        if self.tril:
            s.masked_fill_(self.below_diagonal(m0, m1, n0, s.device), -inf)
        if self.mask_zero and m0 == 0 and m1 > 0 and n0 == 0:
            s[:, 0, 0] = -inf
        return self.positives_out_(s, r0, r1, m0, m1, n0)

    def positives_out_(self, s, r0, r1, m0, m1, n0):
        """s with −inf at the block's positives, in place (scatter_reduce's amin: +inf leaves a cell as it is, where
        a row's positive lies outside this block)."""
        inf = float("inf")
        m, n, counts = self.m[r0:r1], self.n[r0:r1], self.counts[r0:r1]
        here = counts & (m >= m0) & (m < m1) & (n >= n0)
        index = torch.where(here, (m - m0) * (self.L - n0) + (n - n0), 0)
        value = torch.where(here, -inf, inf).to(s.dtype)
        s.view(s.shape[0], -1).scatter_reduce_(1, index, value, "amin")
        return s


def global_pointer_rows(q, k, positives, mask, scale, tril, mask_zero, ignore_index):
    """(loss, L_neg, L_pos), each (B·H,) in the accumulation dtype (module docstring)."""
    spans = _Spans(q, k, positives, mask, scale, tril, mask_zero, ignore_index)
    _, triton_epilogue = epilogue_tiles(q)
    if triton_epilogue:
        from .triton_kernels.global_pointer import block_log_sum_exp
    lse_neg = torch.full((spans.q.shape[0],), -float("inf"), dtype=spans.acc, device=q.device)
    for r0, r1, m0, m1, n0 in spans.blocks:
        if triton_epilogue:  # raw dot products (the kernel scales them as it reads them)
            s = spans.positives_out_(spans.dots(r0, r1, m0, m1, n0), r0, r1, m0, m1, n0)
            block = block_log_sum_exp(s, spans.mask, r0, m0, n0, scale, tril, mask_zero)
        else:
            s = torch.bmm(spans.q[r0:r1, m0:m1].to(spans.acc) * scale,
                          spans.k[r0:r1, n0:].to(spans.acc).transpose(1, 2))
            block = torch.logsumexp(spans.negatives_only(s, r0, r1, m0, m1, n0).view(s.shape[0], -1), -1)
        lse_neg[r0:r1] = torch.logaddexp(lse_neg[r0:r1], block)
    _, _, s_pos = spans.positive_logits()
    lse_pos = torch.logsumexp(torch.neg(s_pos).masked_fill_(~spans.counts, -float("inf")), -1)
    # log(1 + Σ e^v) as log1p_exp(LSE v): a small loss keeps its digits; a side without members adds exactly 0
    L_neg, L_pos = log1p_exp(lse_neg), log1p_exp(lse_pos)
    return (L_neg + L_pos).masked_fill_(spans.bad, float("nan")), L_neg, L_pos


def global_pointer_rows_backward(grad_rows, q, k, positives, mask, L_neg, L_pos, scale, tril, mask_zero,
                                 ignore_index):
    """(dL/dq, dL/dk) for the upstream gradient grad_rows (B·H,) of global_pointer_rows' losses, in q's dtype and
    layout (B, L, H, d)."""
    spans = _Spans(q, k, positives, mask, scale, tril, mask_zero, ignore_index)
    _, triton_epilogue = epilogue_tiles(q)
    if triton_epilogue:
        from .triton_kernels.global_pointer import block_gradient
        gemm = backward_gemm_dtype(q)
    g = grad_rows.to(spans.acc).masked_fill(spans.bad, 0.0)
    dq = torch.zeros(spans.q.shape, dtype=spans.acc, device=q.device)
    dk = torch.zeros(spans.k.shape, dtype=spans.acc, device=q.device)
    for r0, r1, m0, m1, n0 in spans.blocks:
        gb = g[r0:r1, None, None] * scale
        if triton_epilogue:
            s = spans.positives_out_(spans.dots(r0, r1, m0, m1, n0), r0, r1, m0, m1, n0)
            G = block_gradient(s, spans.mask, r0, m0, n0, scale, L_neg, tril, mask_zero, gemm)
            dq[r0:r1, m0:m1] += bmm_accumulate(G, spans.k[r0:r1, n0:], spans.acc).mul_(gb)
            dk[r0:r1, n0:] += bmm_accumulate(G.transpose(1, 2), spans.q[r0:r1, m0:m1], spans.acc).mul_(gb)
            continue
        qs = spans.q[r0:r1, m0:m1].to(spans.acc) * scale
        kb = spans.k[r0:r1, n0:].to(spans.acc)
        # G = e^{s − L_neg} on the negatives: the subtraction in the GEMM, the rest in place
        G = torch.baddbmm(torch.neg(L_neg[r0:r1, None, None]), qs, kb.transpose(1, 2))
        G = spans.negatives_only(G, r0, r1, m0, m1, n0).exp_()
        dq[r0:r1, m0:m1] += torch.bmm(G, kb).mul_(gb)
        dk[r0:r1, n0:] += torch.bmm(G.transpose(1, 2), qs).mul_(g[r0:r1, None, None])
    # the positives: dL/ds = −g·e^{−s − L_pos} at each counted span, into its query and key rows
    qp, kp, s_pos = spans.positive_logits()
    coef = torch.neg(s_pos).sub_(L_pos[:, None]).exp_().mul_(-g[:, None] * scale).masked_fill_(~spans.counts, 0.0)
    d = q.shape[-1]
    dq.scatter_add_(1, spans.m[..., None].expand(-1, -1, d), coef[..., None] * kp)
    dk.scatter_add_(1, spans.n[..., None].expand(-1, -1, d), coef[..., None] * qp)
    B, L, H, _ = q.shape

    def layout(t):
        return t.reshape(B, H, L, d).permute(0, 2, 1, 3).to(q.dtype).contiguous()
    return layout(dq), layout(dk)
