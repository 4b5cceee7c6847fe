"""CoSENT's loss and its gradient: L = log(1 + Σ_{y_a < y_b} exp(s_a − s_b)), s = scale·score.

In label order (stable), with P_b = LSE of s over the pairs of strictly smaller label (the inclusive prefix
LSE just before b's label group) and T_b = P_b − s_b (−inf when none):

    L = log(1 + Σ_b e^{T_b}),     dL/ds_a = −e^{T_a − L} + e^{s_a + R_a − L}

with R_a the LSE of −s over the pairs of strictly larger label (from the other end). After the label sort,
four launches, each over all blocks of BLOCK sorted pairs in parallel (a three-phase scan, the block
totals scanned again by every program, so nothing waits on another program):
  1. block totals: per block the LSE of s and of −s, its last label-group start and first group end
     (and s gathered into label order once);
  2. block scans: inclusive prefix LSE of s, suffix LSE of −s and each pair's group bounds, the other
     blocks' totals as the carries (every program reduces all G totals, 1024 at a time);
  3. the terms T (a gather of the prefix at the group start, anywhere in the array) and their block LSEs;
  4. L from those block LSEs, and the gradients, stored at each pair's original index.
An earlier version ran the four sweeps in ONE program (one SM: at 65536 pairs, 64 dependent block steps
of a few µs each, predicted 0.2–0.3 ms, against a goal of ≈ 0.3 ms for the whole fused CoSENT step). The
gradient comes out with the loss: the backward pass only scales it. marginkern/pairwise.py holds the same
math in PyTorch (CPU) and the tests' O(B²) oracle.
"""
import torch
import triton
import triton.language as tl

from .device import FP_FUSION, cdiv, on_device
from .streaming_ce import _log1p, exp_shift


@triton.jit
def _logaddexp(a, b):
    top = tl.maximum(a, b)
    shift = exp_shift(top)
    return shift + tl.log(tl.exp(a - shift) + tl.exp(b - shift))


@triton.jit
def _logsumexp(v):
    top = tl.max(v, 0)
    shift = exp_shift(top)
    return shift + tl.log(tl.sum(tl.exp(v - shift), 0))


@triton.jit
def _softplus(x):
    """log(1 + e^x) without rounding 1 + e^x: x + log1p(e^−x) above 0, log1p(e^x) below (−inf → 0, +inf → +inf)."""
    return tl.where(x > 0, x + _log1p(tl.exp(-x)), _log1p(tl.exp(x)))


@triton.jit
def _block_totals_before_after(totals_ptr, block, G, CHUNK: tl.constexpr):
    """(LSE of totals[g] over blocks g < block, over blocks g > block), read CHUNK totals at a time."""
    before = tl.full([], -float("inf"), tl.float32)
    after = tl.full([], -float("inf"), tl.float32)
    for g0 in range(0, G, CHUNK):
        g = g0 + tl.arange(0, CHUNK)
        v = tl.load(totals_ptr + g, mask=g < G, other=-float("inf"))
        before = _logaddexp(before, _logsumexp(tl.where(g < block, v, -float("inf"))))
        after = _logaddexp(after, _logsumexp(tl.where(g > block, v, -float("inf"))))
    return before, after


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _group_edges(labels_ptr, i, mask, B):
    """(starts, ends): whether sorted pair i opens resp. closes its label group."""
    label = tl.load(labels_ptr + i, mask=mask)
    previous = tl.load(labels_ptr + i - 1, mask=mask & (i > 0))
    following = tl.load(labels_ptr + i + 1, mask=mask & (i + 1 < B))
    return mask & ((i == 0) | (label != previous)), mask & ((i == B - 1) | (label != following))


@triton.jit
def cosent_block_totals_kernel(score_ptr, order_ptr, labels_ptr, s_ptr, lse_totals_ptr, edge_totals_ptr, B, G,
                               scale, BLOCK: tl.constexpr):
    """Per block: s in label order (stored), LSE(s), LSE(−s), the last group start and the first group end
    in the block (−1 resp. B when it has none)."""
    block = tl.program_id(0)
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    original = tl.load(order_ptr + i, mask=mask, other=0)
    s = tl.load(score_ptr + original, mask=mask, other=0.0).to(tl.float32) * scale
    tl.store(s_ptr + i, s, mask=mask)
    starts, ends = _group_edges(labels_ptr, i, mask, B)
    tl.store(lse_totals_ptr + block, _logsumexp(tl.where(mask, s, -float("inf"))))
    tl.store(lse_totals_ptr + G + block, _logsumexp(tl.where(mask, -s, -float("inf"))))
    tl.store(edge_totals_ptr + block, tl.max(tl.where(starts, i, -1), 0))
    tl.store(edge_totals_ptr + G + block, tl.min(tl.where(ends, i, B), 0))


@triton.jit
def cosent_block_scans_kernel(s_ptr, labels_ptr, lse_totals_ptr, edge_totals_ptr, prefix_ptr, suffix_ptr, first_ptr,
                              last_ptr, B, G, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Per sorted pair: the inclusive prefix LSE of s, the inclusive suffix LSE of −s, and the first and
    last index of its label group; the carries come from the blocks before resp. after this one."""
    block = tl.program_id(0)
    carry_prefix, _ = _block_totals_before_after(lse_totals_ptr, block, G, CHUNK)
    _, carry_suffix = _block_totals_before_after(lse_totals_ptr + G, block, G, CHUNK)
    carry_first = tl.full([], 0, tl.int32)  # pair 0 opens a group
    carry_last = tl.full([], 0, tl.int32) + B - 1  # pair B−1 closes one
    for g0 in range(0, G, CHUNK):
        g = g0 + tl.arange(0, CHUNK)
        carry_first = tl.maximum(carry_first, tl.max(tl.load(edge_totals_ptr + g, mask=g < block, other=0), 0))
        carry_last = tl.minimum(carry_last, tl.min(tl.load(edge_totals_ptr + G + g, mask=(g > block) & (g < G),
                                                           other=B - 1), 0))
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    s = tl.load(s_ptr + i, mask=mask, other=0.0)
    starts, ends = _group_edges(labels_ptr, i, mask, B)
    prefix = _logaddexp(tl.associative_scan(tl.where(mask, s, -float("inf")), 0, _logaddexp), carry_prefix)
    suffix = _logaddexp(tl.associative_scan(tl.where(mask, -s, -float("inf")), 0, _logaddexp, reverse=True),
                        carry_suffix)
    first = tl.maximum(tl.associative_scan(tl.where(starts, i, 0), 0, _maximum), carry_first)
    last = tl.minimum(tl.associative_scan(tl.where(ends, i, B), 0, _minimum, reverse=True), carry_last)
    tl.store(prefix_ptr + i, prefix, mask=mask)
    tl.store(suffix_ptr + i, suffix, mask=mask)
    tl.store(first_ptr + i, first, mask=mask)
    tl.store(last_ptr + i, last, mask=mask)


@triton.jit
def cosent_terms_kernel(s_ptr, prefix_ptr, first_ptr, terms_ptr, term_totals_ptr, B, BLOCK: tl.constexpr):
    """T = P − s per sorted pair (−inf without a pair of smaller label) and the block's LSE of T."""
    block = tl.program_id(0)
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    s = tl.load(s_ptr + i, mask=mask, other=0.0)
    first = tl.load(first_ptr + i, mask=mask, other=0)
    smaller = mask & (first > 0)
    terms = tl.where(smaller, tl.load(prefix_ptr + first - 1, mask=smaller, other=0.0) - s, -float("inf"))
    tl.store(terms_ptr + i, terms, mask=mask)
    tl.store(term_totals_ptr + block, _logsumexp(terms))


@triton.jit
def cosent_grad_kernel(s_ptr, order_ptr, terms_ptr, suffix_ptr, last_ptr, term_totals_ptr, loss_ptr, grad_ptr, B, G,
                       scale, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """L = log(1 + Σ e^T) from the block totals (every program), and dL/dscore = scale·(e^{s + R − L} −
    e^{T − L}) stored at each pair's original index."""
    block = tl.program_id(0)
    before, after = _block_totals_before_after(term_totals_ptr, block, G, CHUNK)
    own = tl.load(term_totals_ptr + block)
    loss = _softplus(_logaddexp(_logaddexp(before, own), after))  # log(1 + Σ e^T): a small loss keeps its digits
    if block == 0:
        tl.store(loss_ptr, loss)
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    s = tl.load(s_ptr + i, mask=mask, other=0.0)
    terms = tl.load(terms_ptr + i, mask=mask, other=-float("inf"))
    last = tl.load(last_ptr + i, mask=mask, other=0)
    larger = mask & (last + 1 < B)
    after = tl.load(suffix_ptr + last + 1, mask=larger, other=-float("inf"))
    # a pair without a larger label has no "smaller" term at all: 0, not e^{+inf − inf} for an infinite score
    grad = tl.where(larger, tl.exp(s + after - loss), 0.0) - tl.exp(terms - loss)
    original = tl.load(order_ptr + i, mask=mask, other=0)
    tl.store(grad_ptr + original, grad * scale, mask=mask)


def cosent_loss_and_grad(scores, labels, scale):
    """(loss, dL/dscores) in fp32 for 1-D scores and labels on one device (the op's Triton path)."""
    B = scores.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=scores.device)  # log(1 + 0) without pairs
    grad = torch.empty(B, dtype=torch.float32, device=scores.device)
    if B == 0:
        return loss, grad
    labels_sorted, order = torch.sort(labels, stable=True)
    # 1024 pairs a block (2048 beyond 2M pairs); programs 2 and 4 read all G block totals each, 1024 at a
    # time (O(G²) reads in all: ≈ 4·10⁶ at 2M pairs, ≈ 6·10⁷ at 16M)
    block = (1024 if B <= (1 << 21) else 2048) if scores.is_cuda else 64
    G = cdiv(B, block)
    chunk = 1024 if scores.is_cuda else 4  # the interpreter: several chunks of block totals
    floats = torch.empty(4, B, dtype=torch.float32, device=scores.device)  # s, prefix, suffix, terms
    edges = torch.empty(2, B, dtype=torch.int32, device=scores.device)     # first, last
    lse_totals = torch.empty(3, G, dtype=torch.float32, device=scores.device)  # LSE s, LSE −s, LSE T
    edge_totals = torch.empty(2, G, dtype=torch.int32, device=scores.device)
    s, prefix, suffix, terms = floats
    launch = dict(num_warps=block // 256) if scores.is_cuda else {}
    with on_device(scores):
        cosent_block_totals_kernel[(G,)](scores.contiguous(), order, labels_sorted, s, lse_totals, edge_totals, B, G,
                                         float(scale), BLOCK=block, **launch, **FP_FUSION)
        cosent_block_scans_kernel[(G,)](s, labels_sorted, lse_totals, edge_totals, prefix, suffix, edges[0], edges[1],
                                        B, G, BLOCK=block, CHUNK=chunk, **launch, **FP_FUSION)
        cosent_terms_kernel[(G,)](s, prefix, edges[0], terms, lse_totals[2], B, BLOCK=block, **launch, **FP_FUSION)
        cosent_grad_kernel[(G,)](s, order, terms, suffix, edges[1], lse_totals[2], loss, grad, B, G, float(scale),
                                 BLOCK=block, CHUNK=chunk, **launch, **FP_FUSION)
    return loss, grad
