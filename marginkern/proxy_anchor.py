"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, CVPR 2020) over very many proxies, streamed over class chunks.

With s_nj the cosine of embedding n and proxy j, P⁺ the proxies with a (non-ignored) positive in the batch:

    L = 1/|P⁺| Σ_{j∈P⁺} log(1 + Σ_{n: y_n = j} e^{−α(s_nj − δ)}) + 1/C Σ_j log(1 + Σ_{n: y_n ≠ j} e^{α(s_nj + δ)})

(the official code's and pytorch-metric-learning's ProxyAnchorLoss). Every proxy's negative term is a log-sum-exp
down its column, over all N rows: a chunk of classes × all rows holds whole columns, so the forward pass needs one
GEMM per chunk and keeps one number per proxy (its term L_j); the backward pass recomputes the chunk's cosines and
feeds dL/ds_nj = α/C·e^{a_nj − L_j} into the dX and dW GEMMs (4 GEMMs in all, no N × C tensor). The positive terms
need only each row's own cosine s_n,y_n: per-class log-sum-exps of N values in (C,) buffers, no sort, no host sync.

Each chunk is one GEMM of raw dot products (fp32 out; 16-bit operands as they are on CUDA), then an epilogue over
it: on the Triton backend one kernel per pass (triton_kernels/proxy_anchor.py: the chunk read once), else PyTorch's
element-wise ops (a dozen passes over the chunk). The column reduction is not an epilogue of the row-softmax engine,
whose kernels keep per-row statistics.
"""
import torch

from .chunked_epilogue import (backward_gemm_dtype, chunk_dots, epilogue_tiles, plan_chunks,
                               set_own_cells_)
from .engine import (SplitKAccumulator, accumulation_dtype, inverse_row_norms, log1p_exp, mm_accumulate,
                     row_grad_finisher, split_k_slices, target_dot)

# A chunk's fp32 dot products (rows × classes) and the one temporary beside them (the column log-sum-exp's, then the
# backward's dL/da in the GEMMs' dtype), plus its chunk × D tensors: an fp32 copy of 16-bit weight rows for a GEMM that
# cannot take them (the CPU's), and in the backward pass, unless the tiles fuse dW's GEMM with its projection, the
# chunk's fp32 dW rows and what finishing them takes (PyTorch's projection: two more chunk × D products and that
# copy), within this budget; at least MIN_CHUNK_CLASSES classes (a narrower GEMM runs badly). On a GPU 8× larger: a
# few launches per chunk; at N = 1024 rows and D = 512, 16384 proxies a chunk (62 chunks for a million). 16 MB on the
# CPU: a chunk's dozen element-wise passes then run closer to the caches (2-core Xeon, (512, 128, 200000) fp32:
# 1025 ms per fwd+bwd at 16 MB, 1049 at 8 MB, 1180–1228 at 32 MB).
CHUNK_BYTES = 16 << 20
GPU_CHUNK_FACTOR = 8
MIN_CHUNK_CLASSES = 256


def proxy_chunks(N, C, D, acc_bytes, on_gpu=False, weight_rows=0):
    """[(c0, c1)] covering C proxies: two N × chunk tensors and `weight_rows` chunk × D ones per chunk in the budget."""
    return plan_chunks(N, C, D, acc_bytes, CHUNK_BYTES * (GPU_CHUNK_FACTOR if on_gpu else 1), MIN_CHUNK_CLASSES,
                       weight_rows)


# A row's column: its class's index among this rank's proxies, or IGNORED (target == ignore_index: neither a positive
# nor a negative) or FOREIGN (its class is another rank's: a negative of every proxy here). Without a shard, no row is
# foreign. The Triton epilogues read the same encoding.
IGNORED, FOREIGN = -1, -2


def _row_columns(target, ignore_index, num_local, shard):
    """(valid (N,) bool: not ignored, own (N,) bool: its class is here, column (N,) int64)."""
    target = target.long()  # int8/int16/uint8 targets: int64 indices (a uint8 index would act as a mask)
    valid = target != ignore_index
    local = target - (0 if shard is None else shard.start)
    own = valid & (local >= 0) & (local < num_local)
    return valid, own, torch.where(own, local, torch.where(valid, FOREIGN, IGNORED))


def _negative_exponents(x, w, c0, c1, inv_x, inv_w, ignored, column, margin, alpha, acc):
    """a_nj = α(s_nj + δ) of the chunk's classes, −inf at each row's own class and on `ignored` rows ((N, 1) bool:
    filled, so that a NaN in an ignored row stays out, as on the Triton epilogue)."""
    z = chunk_dots(x, w, c0, c1, acc)
    z.mul_(inv_x[:, None]).mul_(inv_w[None, c0:c1])  # cosines, scaled in fp32 after the GEMM
    z.add_(margin).mul_(alpha).masked_fill_(ignored, -float("inf"))
    return set_own_cells_(z, column, c0, c1, -float("inf"))


def _positive_terms(x, w, column, valid, inv_x, inv_w, margin, alpha, C, acc):
    """(Σ_{j∈P⁺} log(1 + Σ_{y_n=j} e^{b_n}), per-row e^{b_n − Lp_{y_n}} (0 where not `valid`), |P⁺|) over the C
    proxies here, `valid` the rows whose class is one of them, with b_n = −α(s_n,y_n − δ): log-sum-exps per class
    through (C,) buffers (scatter amax, then a sum of exps)."""
    safe = column.clamp_min(0)
    b = torch.where(valid, -alpha * (target_dot(x, w, column) * inv_x * inv_w[safe] - margin), -float("inf"))
    peak = torch.full((C,), -float("inf"), dtype=acc, device=x.device).scatter_reduce(0, safe, b, "amax")
    peak_of_row = peak[safe]
    # a class without rows keeps peak −inf (its sum 0): its term is log(1 + e^−inf) = 0
    shifted = torch.where(valid, torch.exp(b - torch.where(valid, peak_of_row, 0.0)), 0.0)
    sums = torch.zeros(C, dtype=acc, device=x.device).index_add_(0, safe, shifted)
    class_terms = log1p_exp(peak + torch.log(sums))
    row_weight = torch.where(valid, torch.exp(b - class_terms[safe]), 0.0)
    num_positive = (sums > 0).sum().to(acc)
    return class_terms.sum(), row_weight, num_positive


def proxy_anchor_forward(x, w, target, margin, alpha, ignore_index, shard=None):
    """(loss (), L_j of every proxy's negative term (C,), per-row positive weights (N,), |P⁺| ()) in the
    accumulation dtype; arguments checked by the caller. `shard` (distributed.ProcessGroupShard): w holds the proxies
    [shard.start, shard.start + C) of shard.num_classes, every rank the same rows; the loss and |P⁺| are then the
    whole loss's (one all-reduce of three numbers), L_j and the row weights this rank's."""
    acc = accumulation_dtype(x.dtype)
    (N, D), C = x.shape, w.shape[0]
    valid, own, column = _row_columns(target, ignore_index, C, shard)
    inv_x, inv_w = inverse_row_norms(x), inverse_row_norms(w)
    _, triton_epilogue = epilogue_tiles(x)
    if x.device.type == "cpu" and x.dtype != acc:
        x = x.to(acc)  # once, not per chunk
    ignored = ~valid[:, None]
    negative = torch.empty(C, dtype=acc, device=x.device)
    if triton_epilogue:
        from .triton_kernels.proxy_anchor import negative_terms
    upcast_rows = int(not w.is_cuda and w.dtype != acc)  # mm_accumulate's fp32 copy of a chunk of 16-bit rows
    for c0, c1 in proxy_chunks(N, C, D, acc.itemsize, x.is_cuda, upcast_rows):
        if triton_epilogue:
            negative[c0:c1] = negative_terms(chunk_dots(x, w, c0, c1, acc), inv_x, inv_w[c0:c1], column, c0, alpha,
                                             margin)
            continue
        a = _negative_exponents(x, w, c0, c1, inv_x, inv_w, ignored, column, margin, alpha, acc)
        # a column without a negative row (N = 0, or all rows of that class or ignored) is log(1 + 0) = 0
        negative[c0:c1] = log1p_exp(torch.logsumexp(a, dim=0))
        del a  # before the next chunk's GEMM allocates its own
    positive_sum, row_weight, num_positive = _positive_terms(x, w, column, own, inv_x, inv_w, margin, alpha, C, acc)
    negative_sum, num_classes = negative.sum(), C
    if shard is not None:
        positive_sum, negative_sum, num_positive = shard.sum_rows(torch.stack([positive_sum, negative_sum,
                                                                               num_positive])).unbind()
        num_classes = shard.num_classes
    loss = positive_sum / num_positive.clamp_min(1) + negative_sum / num_classes
    return loss, negative, row_weight, num_positive


def proxy_anchor_backward(grad_loss, x, w, target, negative, row_weight, num_positive, margin, alpha, ignore_index,
                          need_input_grad=True, need_weight_grad=True, shard=None):
    """(dL/dx in x's dtype or None, dL/dw in w's dtype or None) from the forward pass's by-products: per chunk the
    dot products again, G = dL/d(x·w) with the chunk's own-class cells set to the positive terms' gradient, dX += G·W_c
    and dW_c = Gᵀ·X, both chained through the row normalisations. The engine's pieces do the GEMMs as for the other
    losses: dX split over the chunk's classes where its N × D output cannot fill a GPU (SplitKAccumulator), dW's GEMM
    and tangent projection in one Triton kernel where the tiles have it, else an fp32 chunk and the tiles' finisher.
    With a `shard` (the forward's), dL/dx is the sum over the ranks (one all-reduce of N × D), the same on each."""
    acc = accumulation_dtype(x.dtype)
    (N, D), C = x.shape, w.shape[0]
    valid, _, column = _row_columns(target, ignore_index, C, shard)
    inv_x, inv_w = inverse_row_norms(x), inverse_row_norms(w)
    tiles, triton_epilogue = epilogue_tiles(x)
    finish = row_grad_finisher(tiles)
    gemm = backward_gemm_dtype(x)
    x_acc = x.to(acc) if x.device.type == "cpu" else x
    x_gemm = x_acc.to(gemm)
    ignored = ~valid[:, None]
    grad_loss = grad_loss.to(acc)
    negative_coef = grad_loss * (alpha / (C if shard is None else shard.num_classes))
    # dL/ds of each row's own class, times 1/(‖x_n‖‖w_y‖): the cell the chunk holding y_n gets in G
    own_cell = (-alpha * grad_loss / num_positive.clamp_min(1)) * row_weight * inv_x * inv_w[column.clamp_min(0)]
    one = torch.ones((), dtype=acc, device=x.device)
    dw = torch.empty_like(w) if need_weight_grad else None
    fused_dw = dw is not None and getattr(tiles, "fuses_projected_weight_grad", lambda x: False)(x_gemm)
    # an unfused dW chunk: itself, two products of the projection and a copy of 16-bit rows; else the copy at most (the
    # GEMMs' operand dtype, and on the CPU also the recomputing GEMM's)
    weight_rows = 4 if dw is not None and not fused_dw else int(w.dtype != gemm)
    chunks = proxy_chunks(N, C, D, acc.itemsize, x.is_cuda, weight_rows)
    dx = None
    if need_input_grad:
        out = torch.zeros((N, D), dtype=acc, device=x.device)
        dx = SplitKAccumulator(out, split_k_slices(out, chunks[0][1] - chunks[0][0]))
    if triton_epilogue:
        from .triton_kernels.proxy_anchor import grad_chunk
    for c0, c1 in chunks:
        if triton_epilogue:
            g = grad_chunk(chunk_dots(x_acc, w, c0, c1, acc), inv_x, inv_w[c0:c1], column, negative[c0:c1], own_cell,
                           negative_coef, c0, alpha, margin, gemm)
        else:
            a = _negative_exponents(x_acc, w, c0, c1, inv_x, inv_w, ignored, column, margin, alpha, acc)
            g = a.sub_(negative[None, c0:c1]).exp_().mul_(inv_x[:, None]).mul_(inv_w[None, c0:c1] * negative_coef)
            g = set_own_cells_(g, column, c0, c1, own_cell[:, None]).to(gemm)
            del a
        w_chunk = w[c0:c1].to(gemm)  # the rows themselves when they are in the GEMMs' dtype
        if dx is not None:
            dx.add(g, w_chunk)
        if fused_dw:
            tiles.projected_weight_grad(g, x_gemm, w[c0:c1], inv_w[c0:c1], one, dw[c0:c1])
        elif dw is not None:
            finish(mm_accumulate(g.t(), x_gemm, acc), one, dw[c0:c1], w[c0:c1], inv_w[c0:c1])
        del g, w_chunk  # before the next chunk allocates its own
    grad_x = None
    if dx is not None:
        raw = dx.result() if shard is None else shard.sum_input_grad(dx.result())
        grad_x = finish(raw, one, torch.empty_like(x), x, inv_x)
    return grad_x, dw
