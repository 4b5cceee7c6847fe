"""The streaming engine shared by every classification loss (DESIGN.md §2).

For row n and class j the logit is

    z_nj = softcap(row_scale_n · col_scale_j · (x_n · w_j) + bias_j)     for j ≠ target_n
    z_nj = target_logit_n                                                 for j = target_n

The loss computes `target_logit` per row (margins, ...). With K sub-centres per class (sub-center ArcFace,
`LogitSpec.subcenters`), w has K·C rows, class j's rows jK … jK+K−1, and the class's logit is the largest of
its K: z_nj = row_scale_n·max_k col_scale_{jK+k}·(x_n·w_{jK+k}), the first of exactly equal ones (dz/da is
row_scale_n·col_scale at the winning row, 0 at the others; a NaN wins). The forward pass streams over
classes and keeps per-row statistics only: log-sum-exp and, when asked, Σ_j z_nj. The backward pass re-derives

    dL/dz_nj = coef_p_n · p_nj − coef_u_n            (j ≠ target_n)
    dL/da_ny = target_grad_n                          (the loss supplies the target column, already chained)

with a = x·w the raw dot product, turns it into dL/da per class chunk and feeds it to the two GEMMs
dX = G·W and dW = Gᵀ·X. Only a bounded N × chunk buffer exists at any time, never N × C.

EMO adds a cost term: with A_nj = (q_n·k_j)·query_scale_n·key_scale_j, q_n = k_{query_rows_n} (a second,
small dot product per tile: cosines of cost embeddings), dL/dz_nj = (coef_p_n − coef_cost_n·A_nj)·p_nj − coef_u_n;
and its forward needs the expected cost Σ_{j≠t} p_nj·(1 − A_nj) (`streaming_row_stats_with_cost`).

Token entropy H_n = Σ_j p_nj·(lse_n − z_nj) (RL's per-token entropy, marginkern/log_probs.py) is another
epilogue: its forward keeps the row max, Σexp without one maximal term and Σ_j e^{z_nj − max}·(max − z_nj)
(`streaming_row_stats_with_entropy`: sums of non-negative terms, exact for confident rows), and
dH/dz_nj = −p_nj·(log p_nj + H_n) puts an entropy term into the backward:
dL/dz_nj = (coef_p_n − coef_entropy_n·log p_nj)·p_nj − coef_u_n (p·log p taken as 0 where p = 0).

Hard negatives (CurricularFace, MV-Softmax: `HardNegatives`) re-weight the non-target logits above a per-row
threshold, the row's target logit: z_nj ← α·z_nj² + β·z_nj + γ where z_nj > threshold_n (j ≠ target_n), and dz/da
takes the factor 2α·z_nj + β there. The mask is a step (no gradient through the threshold), as in the official heads.

Distillation adds a teacher's logit plane (`TeacherSpec`: z^T_nj = row_scale_n·(x^T_n·w^T_j), its own hidden
states and head, no gradient): the forward keeps the teacher's log-sum-exp and the two cross expectations
E_q[z^T − z] and E_p[z − z^T] beside the student's (`streaming_row_stats_with_teacher`), and with
q_nj = exp(z^T_nj − lse^T_n) the backward adds −coef_q_n·q_nj + coef_log_q_n·p_nj·log q_nj to dL/dz_nj.
The generalized Jensen-Shannon divergence (TeacherSpec.jsd_beta = β) mixes the two, m = (1−β)·p + β·q: a second
forward pass with both log-sum-exps known sums KL(p‖m) and KL(q‖m) per row (`streaming_jsd_row_sums`), and the
backward's teacher term is coef_log_q_n·p_nj·log(p_nj/m_nj) instead (`log_ratio_to_mixture`).

Tile backends compute the two class-streaming steps: `TorchTiles` (plain PyTorch, the CPU fallback and
the kernels' oracle), `marginkern.triton_kernels.TritonTiles` and `marginkern.cpp_tiles.CppTiles`. They
share this contract exactly, except that the C++ and CUDA tiles have no sub-centres (the C++ margin step,
csrc/cpu/margin_loss.cpp, has them internally). A backend may also run the whole backward chunk loop itself
(`tiles.streaming_grads`, same arguments and results as `streaming_grads` below; CppTiles does).
"""
import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def log1p_exp(v: Tensor) -> Tensor:
    """log(1 + e^v), exact at every v: F.softplus returns v itself above its threshold 20 (2e-9 off: invisible in
    fp32, not in fp64), and log1p(exp(v)) overflows."""
    return torch.logaddexp(v, torch.zeros_like(v))


def log1m_exp(v: Tensor) -> Tensor:
    """log(1 − e^v) for v < 0, exact at every v (Mächler's log1mexp): log1p(−exp(v)) cancels as v → 0⁻ (−inf, and
    a NaN gradient, once e^v rounds to 1: TRL #2564, #3237), log(−expm1(v)) loses nothing there; below −log 2
    log1p(−e^v) is the exact one. Each branch gets only arguments it is finite at: torch.where's backward
    multiplies the unused branch's gradient by 0, and 0·inf is NaN."""
    near_zero = v > -math.log(2.0)
    far = torch.clamp(v, max=-math.log(2.0))
    return torch.where(near_zero, torch.log(-torch.expm1(v)), torch.log1p(-torch.exp(far)))


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class HardNegatives:
    """The hard-negative re-weighting of the module docstring, in logit units: coefs (3,) = (α, β, γ) and threshold
    (N,) (+inf on rows with no target anywhere: nothing is hard there), both in the accumulation dtype; logit_bound
    bounds |z| before the re-weighting (the scale of cosine logits), for the fp16 gradient scale."""
    coefs: Tensor
    threshold: Tensor
    logit_bound: float


def reweight_hard_negatives(z, chain, hard: HardNegatives):
    """(z, dz/da) of a tile of logits (N, c) with the hard negatives re-weighted; the target cells too, which the
    caller replaces (their logit and dL/da are the loss's)."""
    alpha, beta, gamma = hard.coefs.unbind()
    is_hard = z > hard.threshold[:, None]
    return (torch.where(is_hard, (alpha * z + beta) * z + gamma, z),
            torch.where(is_hard, chain * (2.0 * alpha * z + beta), chain))


@dataclass(frozen=True)
class LogitSpec:
    row_scale: Tensor               # (N,) accumulation dtype
    col_scale: Optional[Tensor]     # (C,) ((K·C,) with sub-centres) or None (= 1)
    bias: Optional[Tensor]          # (C,) or None
    softcap: Optional[float]
    target: Tensor                  # (N,) int64; −1 = this row has no target column
    target_logit: Tensor            # (N,) accumulation dtype
    # K sub-centres per class (module docstring): col_scale is then per row of w, (K·C,)
    subcenters: int = 1
    # (N,) int64 with subcenters > 1: the target class's sub-centre whose row of w receives target_grad (the
    # one the loss chose for T, saved by its forward pass: a recomputed argmax could break a near-tie the
    # other way); only the backward pass reads it
    target_subcenter: Optional[Tensor] = None
    # the hard-negative re-weighting (CurricularFace, MV-Softmax); only the margin losses set it (no bias, softcap)
    hard_negatives: Optional[HardNegatives] = None


def no_hard_negatives(spec: LogitSpec, what: str):
    """ValueError when `spec` re-weights hard negatives, which `what` does not do."""
    if spec.hard_negatives is not None:
        raise ValueError(f"{what} has no hard-negative re-weighting (the margin losses' streaming tiles have it)")


def target_weight_rows(spec: LogitSpec) -> Tensor:
    """The row of w that each row's target column reads, clamped to 0 where there is none (target −1)."""
    column = spec.target.clamp_min(0)
    if spec.subcenters == 1:
        return column
    return column * spec.subcenters + spec.target_subcenter


@dataclass(frozen=True)
class CostSpec:
    """The EMO cost term of dL/dz (module docstring); all per-row/per-class scales in the accumulation dtype.
    The query rows are rows of `keys` (EMO's targets), given by index: the GPU kernel gathers them per tile,
    so no (N, E) copy exists (64 MB at Llama-3-8B shapes, a quarter of the memory goal)."""
    query_rows: Tensor     # (N,) int64 in [0, C): q_n = keys[query_rows_n]
    query_scale: Tensor    # (N,)
    keys: Tensor           # (C, E)
    key_scale: Tensor      # (C,)
    coef: Tensor           # (N,) coef_cost
    query: Optional[Tensor] = None  # the (N, E) rows gathered once, for tiles that do not index keys


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher's logit plane of the distillation losses (module docstring); the backward's fields are None
    in the forward pass. Same classes and rows as the student's, its own width E."""
    x: Tensor                             # (N, E)
    w: Tensor                             # (C, E)
    row_scale: Tensor                     # (N,) accumulation dtype (1/temperature)
    lse: Optional[Tensor] = None          # (N,) the teacher's log-sum-exp
    coef_q: Optional[Tensor] = None       # (N,)
    coef_log_q: Optional[Tensor] = None   # (N,) the coefficient of p·log q, or of p·log(p/m) with jsd_beta
    jsd_beta: Optional[float] = None      # β of the generalized JSD's mixture m = (1−β)·p + β·q (coef_q unused)


@dataclass(frozen=True)
class SparseCells:
    """dL/da at k extra cells per row besides the target column (a sparse soft target: top-k distillation).
    `columns` (N, k) int64 in [0, C), −1 for none (a column repeated in a row is listed once); `totals` (N, k): dL/da
    at those cells, the engine's dense p-term included, which the engine's loop writes (rounded once to G's dtype:
    adding −q onto a 16-bit p would cancel where p ≈ q); `additions` (N, k): the sparse part alone (totals minus
    the p-term), for tiles that run the whole loop themselves (their G is fp32)."""
    columns: Tensor
    totals: Tensor
    additions: Tensor


def teacher_logits(teacher: TeacherSpec, c0, c1, acc):
    """z^T of classes [c0, c1), (N, c1 − c0) in `acc`."""
    return (teacher.x.to(acc) @ teacher.w[c0:c1].to(acc).t()) * teacher.row_scale[:, None]


def cost_query(cost: CostSpec) -> Tensor:
    """The (N, E) query rows q_n of a cost term: gathered once by the engine's chunk loop for tiles that do
    not index keys themselves (`indexes_cost_rows`), else here."""
    return cost.query if cost.query is not None else cost.keys[cost.query_rows]


def target_columns(target: Tensor, ignore_index: int):
    """(valid, column): the rows that count, and each row's target class with −1 for ignored rows (the
    LogitSpec convention for "no target column"). Index with column.clamp_min(0) to gather safely."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, -1)


def target_dot(x: Tensor, w: Tensor, column: Tensor) -> Tensor:
    """x_n · w_{column_n} in the accumulation dtype (row 0 of w for ignored rows): the raw target logit."""
    return paired_row_dots(x, w[column.clamp_min(0)], accumulation_dtype(x.dtype))


def row_norms(t: Tensor) -> Tensor:
    """‖t_i‖ in the accumulation dtype. On CUDA the reduction upcasts as it loads; on the CPU ATen would make a
    whole fp32 copy of a 16-bit (C, D) weight first, so it runs there by blocks of rows."""
    acc = accumulation_dtype(t.dtype)
    rows = max(1, (4 << 20) // max(1, t.shape[1] * 4))
    if t.is_cuda or t.dtype == acc or torch.compiler.is_compiling() or t.shape[0] <= rows:
        return torch.linalg.vector_norm(t, dim=1, dtype=acc)
    return torch.cat([torch.linalg.vector_norm(t[r0:r1], dim=1, dtype=acc) for r0, r1 in row_blocks(t.shape[0], rows)])


def inverse_row_norms(t: Tensor) -> Tensor:
    """1/‖t_i‖ in the accumulation dtype, norms clamped at NORM_EPS as F.normalize does: the scales that turn dot
    products into cosines."""
    return torch.reciprocal(row_norms(t).clamp_min(NORM_EPS))


def row_blocks(total, rows: int):
    """(r0, r1) of a loop over `total` rows by blocks of `rows`; one block of all of them while torch.compile traces:
    dynamo would fix a symbolic `total` in the graph to unroll the loop (a recompile for every batch size), and the
    compiled graph's buffers are the compiler's to plan."""
    if torch.compiler.is_compiling():
        yield 0, total
        return
    for r0 in range(0, total, rows):
        yield r0, min(total, r0 + rows)


def _upcast_row_blocks(a: Tensor, dtype, block_bytes: int):
    """a's rows in `dtype`, as (r0, r1, block) by blocks of at most block_bytes: never a whole upcast copy of a
    16-bit a (2 GB in fp32 for a Llama-3-8B head)."""
    rows = max(1, a.shape[0] if a.dtype == dtype else block_bytes // max(1, a.shape[1] * dtype.itemsize))
    for r0, r1 in row_blocks(a.shape[0], rows):
        yield r0, r1, a[r0:r1].to(dtype)


def row_block_matvec(a: Tensor, v: Tensor, block_bytes: int = 16 << 20) -> Tensor:
    """a @ v for a (M, K) of any float dtype and v (K,) in the accumulation dtype: (M,) in v's dtype, a upcast
    by blocks of rows."""
    out = torch.empty(a.shape[0], dtype=v.dtype, device=v.device)
    for r0, r1, block in _upcast_row_blocks(a, v.dtype, block_bytes):
        torch.mv(block, v, out=out[r0:r1])
    return out


def row_block_vecmat(v: Tensor, a: Tensor, block_bytes: int = 16 << 20) -> Tensor:
    """Σ_m v_m·a_m for a (M, K) of any float dtype and v (M,) in the accumulation dtype: (K,) in v's dtype, a
    upcast by blocks of rows."""
    out = torch.zeros(a.shape[1], dtype=v.dtype, device=v.device)
    for r0, r1, block in _upcast_row_blocks(a, v.dtype, block_bytes):
        out.addmv_(block.t(), v[r0:r1])
    return out


def paired_row_dots(a: Tensor, b: Tensor, dtype=None, block_bytes: int = 16 << 20) -> Tensor:
    """Σ_k a_mk·b_mk for a and b (M, K) of any float dtypes: (M,) in `dtype` (default b's), both upcast by blocks of
    rows (never a whole fp32 copy of a 16-bit operand)."""
    dtype = dtype or b.dtype
    out = torch.empty(a.shape[0], dtype=dtype, device=b.device)
    rows = max(1, block_bytes // max(1, a.shape[1] * dtype.itemsize))
    for r0, r1 in row_blocks(a.shape[0], rows):
        torch.sum(a[r0:r1].to(dtype) * b[r0:r1].to(dtype), dim=1, out=out[r0:r1])
    return out


def project_out_rows(grad: Tensor, weight: Tensor, inv_norm: Tensor) -> Tensor:
    """In place: grad_j ← grad_j − weight_j·(weight_j·grad_j)·inv_norm_j² (the tangent projection that
    chains a row-normalised weight); tile backends fuse it into `finish_grad_rows`."""
    wf = weight.to(grad.dtype)
    return grad.sub_(wf * ((wf * grad).sum(1) * inv_norm * inv_norm)[:, None])


def finish_grad_rows(grad: Tensor, scale: Tensor, out: Tensor, weight: Optional[Tensor] = None,
                     inv_norm: Optional[Tensor] = None) -> Tensor:
    """out ← scale·P(grad) in out's dtype, with P the tangent projection by (weight, inv_norm = 1/‖weight_j‖)
    (project_out_rows) or the identity; `grad` (accumulation dtype) may be overwritten. How the engine
    stores a class chunk of dW, and how a loss chains dX through a row-normalised x (weight = x) into x's
    dtype; tile backends may fuse it into one pass (`finish_grad_rows`, row_grad_finisher)."""
    grad.mul_(scale)
    if weight is not None:
        project_out_rows(grad, weight, inv_norm)
    return out.copy_(grad)


def row_grad_finisher(tiles):
    """The tiles' fused finish_grad_rows (one pass) when they have one, else the PyTorch one above."""
    return getattr(tiles, "finish_grad_rows", finish_grad_rows)


# Whether this torch has the 16-bit → fp32 cuBLAS overloads (mm/addmm with out_dtype; addmm with an fp32
# `self` needs torch ≥ 2.10), per (overload, operand dtype): probed on first use, then remembered, so a
# missing one costs one exception.
_OUT_DTYPE_WORKS = {}


def _try_out_dtype(kind, dtype, call):
    """call() if the `kind` overload works for `dtype` operands on this torch, else None (never swallows an
    out-of-memory)."""
    if _OUT_DTYPE_WORKS.get((kind, dtype)) is False:
        return None
    try:
        result = call()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError):
        _OUT_DTYPE_WORKS[(kind, dtype)] = False
        return None
    _OUT_DTYPE_WORKS[(kind, dtype)] = True
    return result


def _is_16bit_cuda_pair(a, b):
    return a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)


def mm_accumulate(a: Tensor, b: Tensor, acc) -> Tensor:
    """a @ b with an fp32 (or fp64) result. fp16/bf16 GEMMs on CUDA keep their inputs and write fp32."""
    if _is_16bit_cuda_pair(a, b):
        result = _try_out_dtype("mm", a.dtype, lambda: torch.mm(a, b, out_dtype=acc))
        if result is not None:
            return result
    return a.to(acc) @ b.to(acc)


def bmm_accumulate(a: Tensor, b: Tensor, acc) -> Tensor:
    """torch.bmm(a, b) with an fp32 (or fp64) result, as mm_accumulate: 16-bit CUDA operands stay 16-bit."""
    if _is_16bit_cuda_pair(a, b):
        result = _try_out_dtype("bmm", a.dtype, lambda: torch.bmm(a, b, out_dtype=acc))
        if result is not None:
            return result
    return torch.bmm(a.to(acc), b.to(acc))


def addmm_accumulate(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """out += alpha·(a @ b) in place (out fp32/fp64). 16-bit CUDA operands write into fp32 without an
    out-sized temporary (a (C, D) fp32 temporary per row block is the memory spike of Liger #1323)."""
    if _is_16bit_cuda_pair(a, b):
        result = _try_out_dtype("addmm", a.dtype,
                                lambda: torch.addmm(out, a, b, alpha=alpha, out_dtype=out.dtype, out=out))
        if result is not None:
            return result
        return out.add_(mm_accumulate(a, b, out.dtype), alpha=alpha)
    return out.addmm_(a.to(out.dtype), b.to(out.dtype), alpha=alpha)


# The split-K partials of one small-output GEMM (split_k_slices) stay within this many bytes.
SPLIT_K_PARTIAL_BYTES = 8 << 20


@functools.lru_cache(maxsize=None)
def device_sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_slices(out: Tensor, reduction: int, sm_count: Optional[int] = None) -> int:
    """Into how many slices to cut the reduction (class) dimension of `out += a @ b` on the GPU
    (SplitKAccumulator).

    dX += G·W_c has a small output (N × D: 256 × 512 is 8 output tiles of 128 × 128) and a long reduction
    (a chunk of classes): unless cuBLAS picks a split-K kernel itself, a handful of SMs do all the work.
    Slices make it a batched GEMM with up to about two output tiles per SM (partials summed after), each
    slice at least 1024 classes long, all partials within SPLIT_K_PARTIAL_BYTES, a power of two. 1 on the
    CPU, whose GEMMs parallelise over the reduction anyway, and for outputs that fill the GPU (LLM shapes).
    `MARGINKERN_SPLIT_K` = a number forces that many slices, 1 turns splitting off (the bench compares);
    `sm_count` given: decide as for a GPU with that many SMs, whatever out's device (the tests)."""
    forced = os.environ.get("MARGINKERN_SPLIT_K")
    if forced:
        return max(1, min(int(forced), reduction))
    if sm_count is None:
        if not out.is_cuda:
            return 1
        sm_count = device_sm_count(out.device)
    output_tiles = -(-out.shape[0] // 128) * -(-out.shape[1] // 128)
    wanted = -(-2 * sm_count // output_tiles)
    fits = SPLIT_K_PARTIAL_BYTES // max(1, out.numel() * out.element_size())
    slices = max(1, min(wanted, reduction // 1024, fits))
    # a power of two divides the chunks (multiples of the tile width): no remainder GEMM per chunk
    return 1 << (slices.bit_length() - 1)


class SplitKAccumulator:
    """out += Σ_chunks a_c @ b_c (out fp32/fp64, the chunk loop's dX or EMO's expectation).

    With `slices` > 1 (split_k_slices) every chunk's reduction is cut into that many slices of one batched
    GEMM over strided views of a and b (no copies) that accumulates into (slices, M, N) partials in place
    (beta = 1); `result()` sums them into out once after the loop. Per chunk that is one GEMM launch, as
    without splitting; the partials stay within SPLIT_K_PARTIAL_BYTES. A chunk shorter than `slices`
    columns, and the remainder columns of one, go to out directly. Falls back to plain accumulation when
    this torch lacks the 16-bit → fp32 batched GEMM."""

    def __init__(self, out: Tensor, slices: int):
        self.out, self.slices, self.partial = out, max(1, slices), None

    def add(self, a: Tensor, b: Tensor):
        K = a.shape[1]
        step = K // self.slices
        cut = step * self.slices
        if self.slices == 1 or step == 0 or not self._add_sliced(a[:, :cut], b[:cut], step):
            addmm_accumulate(self.out, a, b)
        elif cut < K:
            addmm_accumulate(self.out, a[:, cut:], b[cut:])

    def _add_sliced(self, a, b, step) -> bool:
        if self.partial is None:
            self.partial = self.out.new_zeros((self.slices,) + tuple(self.out.shape))
        a_slices = a.unflatten(1, (self.slices, step)).transpose(0, 1)  # (slices, M, step), a's own storage
        b_slices = b.unflatten(0, (self.slices, step))                  # (slices, step, N)
        partial = self.partial
        if _is_16bit_cuda_pair(a, b):
            return _try_out_dtype("baddbmm", a.dtype, lambda: torch.baddbmm(
                partial, a_slices, b_slices, out_dtype=partial.dtype, out=partial)) is not None
        partial.baddbmm_(a_slices.to(partial.dtype), b_slices.to(partial.dtype))
        return True

    def result(self) -> Tensor:
        if self.partial is not None:
            self.out.add_(self.partial.sum(0))
            self.partial = None
        return self.out


def gpu_grad_dtype(x) -> torch.dtype:
    """How the GPU tiles (Triton, CUDA) store dL/da: in x's dtype when that is 16-bit (the backward GEMMs
    read it so), else fp32."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def grad_dtype(tiles, x) -> torch.dtype:
    """The dtype of the dL/da chunks `tiles.grad_logits` returns for x (the accumulation dtype unless the
    tiles say otherwise: the GPU tiles keep 16-bit inputs' dtype)."""
    own = getattr(tiles, "grad_dtype", None)
    return own(x) if own is not None else accumulation_dtype(x.dtype)


def streaming_row_stats(x, w, spec: LogitSpec, need_sum_logits: bool, tiles):
    """(lse, Σ_j z_nj or None), each (N,) in the accumulation dtype."""
    return tiles.row_stats(x, w, spec, need_sum_logits)


def streaming_row_stats_with_max(x, w, spec: LogitSpec, need_sum_logits: bool, tiles):
    """(lse, Σ_j z_nj or None, max_j z_nj), the max over every column, the target's substituted logit included
    (token accuracy: the target is the argmax where its logit equals it). Tiles with `row_stats_with_max` serve it
    (the CUDA tiles do not)."""
    return tiles.row_stats_with_max(x, w, spec, need_sum_logits)


def _nonzero_median(values):
    """The median of the values > 0, NaN when there are none; without boolean indexing, which would sync
    with the GPU on every backward pass."""
    return torch.where(values > 0, values, torch.nan).nanmedian()


def _regular(values, outlier_factor=64.0, median=None):
    """values ≤ outlier_factor × the median of the non-zero values (all True when every value is 0);
    `median`: that median when the caller has it (on CUDA it sorts all the values)."""
    median = _nonzero_median(values) if median is None else median
    return ~(values > outlier_factor * median)  # a NaN median compares False: regular


def gradient_bound(spec: LogitSpec, coef_total, target_grad):
    """The largest |dL/da| of the rows and columns whose geometric scale is regular, for the 16-bit G scale.

    A degenerate row or column (a zero embedding or class centre: a 1e12 norm scale) must not push every
    other entry below fp16's range, so it is left out (its own entries saturate instead, the Triton kernel
    clamps fp16 G to ±65504, which keeps every gradient finite). The loss's per-row coefficients are
    taken at their true maximum: focal loss makes easy rows' coefficients ~1e-8 and hard rows' ~1, and a
    robust maximum of those would saturate exactly the rows that matter.
    """
    if coef_total.numel() == 0:
        return coef_total.new_zeros(())
    # rows that do not count (ignored: coefficient 0) must not move the median that defines "regular"
    row_scale = spec.row_scale.abs()
    regular_rows = _regular(torch.where(coef_total > 0, row_scale, torch.zeros_like(row_scale)))
    col_bound, regular_target = 1.0, regular_rows
    if spec.col_scale is not None:
        col_scale = spec.col_scale.abs()
        col_median = _nonzero_median(col_scale)  # one sort of the (C,) scales for both uses
        col_bound = _robust_max(col_scale, median=col_median)
        regular_target = regular_rows & _regular(col_scale, median=col_median)[target_weight_rows(spec)]
    per_row = torch.maximum(coef_total * row_scale * col_bound,
                            torch.where(regular_target, target_grad.abs(), torch.zeros_like(target_grad)))
    return torch.where(regular_rows, per_row, torch.zeros_like(per_row)).max()


def _robust_max(values, outlier_factor=64.0, median=None):
    """max(values ≥ 0), but at most outlier_factor × the median of the non-zero values (0 if all are 0)."""
    median = _nonzero_median(values) if median is None else median
    return torch.fmin(values.max(), outlier_factor * median)  # fmin ignores a NaN median


def hard_negative_slope_bound(spec: LogitSpec):
    """max(1, |β| + 2|α|·logit_bound) ≥ |2α·z + β|, the hard-negative factor of dz/da, for |z| ≤ logit_bound."""
    alpha, beta, _ = spec.hard_negatives.coefs.abs().unbind()
    return torch.clamp_min(beta + 2.0 * alpha * spec.hard_negatives.logit_bound, 1.0)


def grad_scale_16bit(spec: LogitSpec, coef_total, target_grad):
    """1 / gradient_bound: the factor that brings dL/da's largest regular entry to ~1 before it is stored in
    16 bits (fp16 would flush small probabilities, mean over 8k rows gives coef_p ≈ 1e-4, to 0); 1 when the
    bound is 0, below the smallest normal float (1/bound would be inf) or not finite."""
    bound = gradient_bound(spec, coef_total, target_grad)
    usable = (bound > torch.finfo(bound.dtype).tiny) & torch.isfinite(bound)
    return torch.where(usable, 1.0 / bound, torch.ones_like(bound))


def streaming_grads(
    x, w, spec: LogitSpec, lse, coef_p, coef_u, target_grad, tiles,
    finalize_weight_chunk: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    need_bias_grad: bool = False, cost: Optional[CostSpec] = None, need_weight_grad: bool = True,
    grad_filter_eps: Optional[float] = None, tangent_projection: Optional[Tuple[Tensor, Tensor]] = None,
    entropy_coef: Optional[Tensor] = None, teacher: Optional[TeacherSpec] = None,
    sparse_cells: Optional[SparseCells] = None,
):
    """dL/dX (raw, accumulation dtype), dL/dW (weight dtype, or None when not `need_weight_grad`: a frozen
    head skips the dW GEMM) and dL/dbias (or None).

    `sparse_cells` (SparseCells): k extra cells per row. Written into each chunk's G before its GEMMs (one scatter
    over the cells in the chunk: no sync, no (C, D) buffer); tiles that run the whole loop themselves (C++) get their
    additions through the dW chunk finalizer and a gathered dX term instead.

    `finalize_weight_chunk(r0, r1, dw_chunk)` lets the loss chain a chunk of dW, rows [r0, r1) of w (its
    classes' K sub-centres each; accumulation dtype), through what the engine does not know about before
    it is stored. `tangent_projection` =
    (weight, 1/‖weight_j‖) chains dW through row-normalised classes, ŵ = w/‖w‖ (project_out_rows); unlike a
    finalizer, a tile backend fuses it with the unscaling and the store (`finish_grad_rows`).

    `grad_filter_eps` (None: exact) drops the classes of a chunk whose every |dL/da| is below
    grad_filter_eps × the largest typical entry (for mean cross-entropy: p_nj < eps in every row): the
    two GEMMs of the chunk then run over the surviving classes only (`keep_columns`).

    `entropy_coef` (N,): the entropy term of the module docstring, −entropy_coef_n·p_nj·log p_nj added to every
    dL/dz_nj (j ≠ target); only tiles with a `row_stats_with_entropy` serve it (not the CUDA tiles, nor the C++
    tile ops: the C++ loss behind log_probs_and_entropy has it inside, csrc/cpu/log_probs_loss.cpp).
    `teacher`: the distillation terms of the module docstring (its lse, coef_q and coef_log_q set); the same
    tiles serve it.
    """
    if (entropy_coef is not None or teacher is not None) and (hasattr(tiles, "streaming_grads")
                                                            or spec.subcenters > 1):
        raise ValueError(f"the {tiles.name} tiles have no entropy or teacher term (and sub-centres take neither)")
    if tangent_projection is not None:
        if finalize_weight_chunk is not None:
            raise ValueError("streaming_grads takes finalize_weight_chunk or tangent_projection, not both")
        if hasattr(tiles, "streaming_grads") and grad_filter_eps is None:  # a finalizer for the backend's loop
            proj_w, inv_norm = tangent_projection

            def finalize_weight_chunk(c0, c1, grad_w_raw):
                return project_out_rows(grad_w_raw, proj_w[c0:c1], inv_norm[c0:c1])
    if sparse_cells is not None and (spec.subcenters > 1 or need_bias_grad or grad_filter_eps is not None
                                     or finalize_weight_chunk is not None or tangent_projection is not None):
        raise ValueError("sparse_cells take no sub-centres, bias, gradient filtering, finalizer or projection")
    if hasattr(tiles, "streaming_grads") and grad_filter_eps is None:  # the backend runs the loop below
        if sparse_cells is not None:
            return _sparse_cells_around(tiles, x, w, spec, lse, coef_p, coef_u, target_grad, cost, need_weight_grad,
                                        sparse_cells)
        return tiles.streaming_grads(x, w, spec, lse, coef_p, coef_u, target_grad, finalize_weight_chunk,
                                     need_bias_grad, cost, need_weight_grad)
    acc = accumulation_dtype(x.dtype)
    N, D = x.shape
    K = spec.subcenters  # a chunk of classes [c0, c1) is the rows [c0·K, c1·K) of w, of dW and of G's columns
    if K > 1 and (need_bias_grad or cost is not None or grad_filter_eps is not None):
        raise ValueError("sub-centres take no bias, cost term or gradient filtering")
    C = w.shape[0] // K
    grad_x = torch.zeros(N, D, dtype=acc, device=x.device)
    # contiguous, as the fake kernels say
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_weight_grad else None
    grad_bias = torch.zeros(C, dtype=acc, device=x.device) if need_bias_grad else None
    if N == 0 or C == 0:
        if grad_w is not None:
            grad_w.zero_()
        return grad_x, grad_w, grad_bias
    # fp16 G (the GPU stores G in x's dtype) is scaled so that its largest entry is ~1, then unscaled once
    # after the loop; gradient filtering's ε is relative to that entry too. bf16 has fp32's exponent range
    # and fp32/fp64 need nothing: otherwise no scale, and none of the ~30 small ops and two (C,) median
    # sorts that computing it costs per step.
    scaled = x.dtype == torch.float16 or grad_filter_eps is not None
    grad_scale = unscale = torch.ones((), dtype=acc, device=x.device)
    if scaled:
        coef_total = coef_p.abs() + coef_u.abs()
        if cost is not None:  # |A| ≤ 1: cosines
            coef_total = coef_total + cost.coef.abs()
        if entropy_coef is not None:  # p·|log p| ≤ 1/e < 1
            coef_total = coef_total + entropy_coef.abs()
        if teacher is not None:  # q ≤ 1; p·|log q| is not bounded, but the loss's coefficients keep it moderate
            coef_total = coef_total + teacher.coef_q.abs() + teacher.coef_log_q.abs()
        if sparse_cells is not None:  # dL/da already: in the row's units once divided by its scale
            coef_total = coef_total + sparse_cells.additions.abs().sum(1) / spec.row_scale.abs().clamp_min(1e-30)
        if spec.hard_negatives is not None:  # a hard cell's dz/da has the factor |2α·z + β| ≤ |β| + 2|α|·max|z|
            coef_total = coef_total * hard_negative_slope_bound(spec)
        grad_scale = grad_scale_16bit(spec, coef_total, target_grad).to(acc)
        unscale = 1.0 / grad_scale
        coef_p, coef_u, target_grad = coef_p * grad_scale, coef_u * grad_scale, target_grad * grad_scale
        if cost is not None:
            cost = dataclasses.replace(cost, coef=cost.coef * grad_scale)
        if entropy_coef is not None:
            entropy_coef = entropy_coef * grad_scale
        if teacher is not None:
            teacher = dataclasses.replace(teacher, coef_q=teacher.coef_q * grad_scale,
                                          coef_log_q=teacher.coef_log_q * grad_scale)
        if sparse_cells is not None:
            sparse_cells = dataclasses.replace(sparse_cells, totals=sparse_cells.totals * grad_scale)
    if cost is not None and cost.query is None and not getattr(tiles, "indexes_cost_rows", False):
        cost = dataclasses.replace(cost, query=cost_query(cost))  # once, not per chunk
    finish = row_grad_finisher(tiles)
    # With nothing to apply to a chunk of dW (no unscaling, projection or finalizer), its GEMM writes dW in
    # the weight's dtype straight away when G comes in that dtype (16-bit on the GPU, fp32/fp64 as they
    # are): no fp32 chunk round trip (4 GB at Llama-3-8B shapes), and the whole budget goes to G (half the
    # chunks). fp32 accumulation inside the GEMM, rounded once — as PyTorch's own bf16 matmuls, including
    # cuBLAS's split-K reductions when torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction.
    plain_dw = (grad_w is not None and not scaled and finalize_weight_chunk is None and tangent_projection is None
                and grad_dtype(tiles, x) == w.dtype == x.dtype)
    # A tile backend may fuse the chunk's dW GEMM with the tangent projection (no fp32 chunk either).
    fused_dw = (grad_w is not None and tangent_projection is not None and grad_filter_eps is None
                and getattr(tiles, "fuses_projected_weight_grad", lambda x: False)(x))
    # otherwise the chunk's fp32 dW (D per class) shares the tiles' buffer budget with its N × chunk G
    dw_bytes = D * acc.itemsize if need_weight_grad and not (plain_dw or fused_dw) else 0
    # tiles that build the teacher's N × chunk logits beside G (the PyTorch tiles; the kernels keep them in tiles)
    # count them against the chunk's budget too
    teacher_bytes = N * acc.itemsize if teacher is not None and getattr(tiles, "materializes_teacher_plane", False) else 0
    # G of a chunk is N × (chunk·K), and so is its dW chunk in rows
    chunks = tiles.class_chunks(N * K, C, x, bytes_per_class=dw_bytes * K + teacher_bytes)
    input_grad = SplitKAccumulator(grad_x, split_k_slices(grad_x, (chunks[0][1] - chunks[0][0]) * K))
    # the optional terms, passed only when present: tiles without them (C++, CUDA) keep their signature
    extra_terms = {k: v for k, v in (("entropy_coef", entropy_coef), ("teacher", teacher)) if v is not None}
    for c0, c1 in chunks:
        g = tiles.grad_logits(x, w, spec, lse, coef_p, coef_u, target_grad, c0, c1, cost, **extra_terms)
        if sparse_cells is not None:
            _write_sparse_cells_(g, sparse_cells, c0, c1)
        r0, r1 = c0 * K, c1 * K
        w_chunk, kept = w[r0:r1], None
        if grad_filter_eps is not None:
            g, w_chunk, kept = keep_columns(g, w_chunk, grad_filter_eps)
        input_grad.add(g, w_chunk)  # still scaled: unscaled after the loop
        if grad_bias is not None:
            grad_bias[c0:c1] = scatter_rows(g.sum(0, dtype=acc).mul_(unscale), kept, c1 - c0)
        if plain_dw:
            torch.mm(g.t(), x, out=grad_w[r0:r1])
        elif fused_dw:
            tiles.projected_weight_grad(g, x, w_chunk, tangent_projection[1][r0:r1], unscale, grad_w[r0:r1])
        elif grad_w is not None:
            grad_w_chunk = scatter_rows(mm_accumulate(g.t(), x, acc), kept, r1 - r0)  # still scaled
            if finalize_weight_chunk is not None:
                if scaled:
                    grad_w_chunk.mul_(unscale)
                grad_w[r0:r1] = finalize_weight_chunk(r0, r1, grad_w_chunk)
            else:
                projection = () if tangent_projection is None else (t[r0:r1] for t in tangent_projection)
                finish(grad_w_chunk, unscale, grad_w[r0:r1], *projection)
            del grad_w_chunk
        # before the next chunk allocates its own: the budget holds one G and one dW chunk, not two
        del g, w_chunk, kept
    input_grad.result()
    if scaled:
        grad_x.mul_(unscale)
    return grad_x, grad_w, grad_bias


def _write_sparse_cells_(g, cells: SparseCells, c0, c1):
    """g (N, c1 − c0) at the sparse cells whose column lies in [c0, c1) ← their totals, in place, one scatter without a
    host sync. A row's cells outside the chunk rewrite its first inside cell with that cell's own total (or, in a
    row without one, column 0 with its current value): every write to a column then carries the same value."""
    inside = (cells.columns >= c0) & (cells.columns < c1)
    local = torch.where(inside, cells.columns - c0, 0)
    totals = cells.totals.to(g.dtype)
    first = inside.to(torch.int8).argmax(1, keepdim=True)  # the first inside cell of each row (0 when none)
    any_inside = inside.any(1, keepdim=True)
    redirect_column = torch.where(any_inside, local.gather(1, first), 0)
    redirect_value = torch.where(any_inside, totals.gather(1, first), g[:, :1])
    g.scatter_(1, torch.where(inside, local, redirect_column), torch.where(inside, totals, redirect_value))


def _sparse_cells_around(tiles, x, w, spec, lse, coef_p, coef_u, target_grad, cost, need_weight_grad,
                         cells: SparseCells, block_bytes=16 << 20):
    """streaming_grads with sparse cells on tiles that run the whole loop (C++): the dense part by their loop (fp32
    G), the cells' additions to dW through its chunk finalizer (added to the chunk's raw dW before it is stored: one
    rounding) and to dX as Σ_j additions_nj·w_{columns_nj}; both by blocks of ≤ block_bytes of gathered rows."""
    acc = accumulation_dtype(x.dtype)
    present = cells.columns >= 0
    additions = torch.where(present, cells.additions.to(acc), 0.0)
    columns = cells.columns.clamp_min(0)
    row_bytes = x.shape[1] * acc.itemsize

    def finalize(c0, c1, grad_w_chunk):
        rows, at = (present & (cells.columns >= c0) & (cells.columns < c1)).nonzero(as_tuple=True)
        step = max(1, block_bytes // row_bytes)
        for e0 in range(0, rows.numel(), step):
            r, a = rows[e0:e0 + step], at[e0:e0 + step]
            grad_w_chunk.index_add_(0, columns[r, a] - c0, additions[r, a, None] * x[r].to(acc))
        return grad_w_chunk

    grad_x, grad_w, grad_bias = tiles.streaming_grads(x, w, spec, lse, coef_p, coef_u, target_grad,
                                                      finalize if need_weight_grad else None, False, cost,
                                                      need_weight_grad)
    block = max(1, block_bytes // max(1, columns.shape[1] * row_bytes))
    for r0 in range(0, x.shape[0], block):
        r1 = min(x.shape[0], r0 + block)
        grad_x[r0:r1] += torch.einsum("rk,rkd->rd", additions[r0:r1], w[columns[r0:r1]].to(acc))
    return grad_x, grad_w, grad_bias


_kept_columns_log: Optional[list] = None  # a list while a count_kept_columns() block runs


@contextlib.contextmanager
def count_kept_columns():
    """Within the block, gradient filtering appends (classes, kept classes) per class chunk to the list it
    yields: the work it saved (bench/grad_filter_error.py, examples/word_lm_stdlib.py, the tests)."""
    global _kept_columns_log
    outer, _kept_columns_log = _kept_columns_log, []
    try:
        yield _kept_columns_log
    finally:
        _kept_columns_log = outer


def keep_columns(g: Tensor, w_chunk: Tensor, eps: float):
    """(g[:, kept], w_chunk[kept], kept) with kept the columns where some |g| ≥ eps (gradient filtering).

    One host sync per chunk (the GEMM sizes depend on the count): the price of an opt-in speed switch."""
    low, high = torch.aminmax(g, dim=0)  # max |g| per column in one pass, without an |g| temporary
    # a column leaves only when it is provably small: NaN/inf must reach the gradients (GradScaler's check)
    kept = (~((high < eps) & (low > -eps))).nonzero().squeeze(1)
    if _kept_columns_log is not None:
        _kept_columns_log.append((g.shape[1], kept.numel()))
    if kept.numel() == g.shape[1]:
        return g, w_chunk, None
    return g[:, kept], w_chunk[kept], kept


def scatter_rows(values: Tensor, kept: Optional[Tensor], rows: int) -> Tensor:
    """values (len(kept), ...) placed at rows `kept` of a zero (rows, ...) tensor; values when kept is None."""
    if kept is None:
        return values
    out = values.new_zeros((rows,) + values.shape[1:])
    return out.index_copy_(0, kept, values)


def streaming_row_stats_with_cost(x, w, spec: LogitSpec, cost: CostSpec, tiles):
    """(lse, Σ_{j≠t_n} p_nj·(1 − A_nj)) per row, both in the accumulation dtype: the log-sum-exp and the
    softmax-weighted cost 1 − cosine over the classes other than the row's target column spec.target (EMO's
    expected cost without its target term, which the loss adds exactly; written as 1 − Σ_j p_j·A_j it
    cancels as p_t → 1: 1 − p_t is below fp32's resolution of an lse of ~30; cost.coef is not used).
    Tiles may do it in one pass over the classes (`row_stats_with_cost`: one GEMM-equivalent of logits and
    one of cosines, a sum of non-negative terms, nothing (N, E)); otherwise the lse pass, then
    ȳ' = Σ_{j≠t} p_nj·key_scale_j·k_j and Σ_{j≠t} p_nj streamed (streaming_expectation), and
    Σ_{j≠t} p_nj − q̂_n·ȳ'. Only for specs whose dz/da is 1 (no row/column scale, no softcap), as in EMO."""
    own = getattr(tiles, "row_stats_with_cost", None)
    if own is not None:
        return own(x, w, spec, cost)
    lse, _ = tiles.row_stats(x, w, spec, False)
    expected, other_mass = streaming_expectation(x, w, spec, lse, cost.keys, cost.key_scale, tiles)
    # ≥ 0 as the sum it stands for (cosines of near-duplicate rows can round above 1); NaN stays NaN
    return lse, (other_mass - query_dot(cost, expected)).clamp_min(0.0)


def streaming_row_stats_with_entropy(x, w, spec: LogitSpec, tiles):
    """The entropy statistics (M, S′, T) per row in the accumulation dtype, in one pass over the classes (target
    column spec.target_logit, as everywhere): the row max M, S′ = Σ_j e^{z_j − M} over every class but one
    maximal one, and T = Σ_j e^{z_j − M}·(M − z_j). `entropy_of_max_sums` turns them into lse − M = log1p(S′)
    and the entropy H = Σ_j p_j·(lse − z_j) = log1p(S′) + T/(1 + S′); `merge_max_sums` merges two class sets'
    (chunks, class splits, the ranks of a vocab-parallel head).

    Exact for confident rows, where lse − M and H are far below ulp(M): the "1" of the max is never added and
    subtracted, and every term of S′ and T is ≥ 0, so nothing cancels (the loss then computes
    log p_t = (z_t − M) − log1p(S′), exact where z_t is the max). Tiles that have no `row_stats_with_entropy`
    (the C++ tile ops and the CUDA ones) cannot serve it: the caller picks tiles that can."""
    return tiles.row_stats_with_entropy(x, w, spec)


def streaming_row_stats_with_teacher(x, w, spec: LogitSpec, teacher: TeacherSpec, tiles):
    """(lse, lse^T, E_q[z^T − z], E_p[z − z^T]) per row in the accumulation dtype, in one pass over the classes:
    the student's and the teacher's log-sum-exp and the cross expectations under the teacher's q = softmax(z^T)
    and the student's p = softmax(z) (module docstring). Forward KL(q‖p) = E_q[z^T − z] − lse^T + lse, reverse
    KL(p‖q) = E_p[z − z^T] − lse + lse^T. Tiles without a `row_stats_with_teacher` (the C++ and CUDA ones)
    cannot serve it."""
    return tiles.row_stats_with_teacher(x, w, spec, teacher)


def streaming_jsd_row_sums(x, w, spec: LogitSpec, teacher: TeacherSpec, lse, tiles):
    """(KL(p‖m), KL(q‖m)) per row in the accumulation dtype, m = (1−β)·p + β·q with β = teacher.jsd_beta: one pass
    over the classes with the student's `lse` and the teacher's (teacher.lse) known, plain sums of
    p·log(p/m) and q·log(q/m) (`log_ratio_to_mixture`). Tiles without a `jsd_row_sums` cannot serve it."""
    return tiles.jsd_row_sums(x, w, spec, teacher, lse)


MIXTURE_OVERFLOW = 80.0  # e^80 ≈ 5.5e34: β·expm1(d) stays finite in fp32 below it


def log_ratio_to_mixture(log_p, log_q, beta, complement):
    """log(p/m) with m = (1−β)·p + β·q, d = log q − log p, `complement` = 1 − β computed apart (in double precision,
    then rounded: not 1 − fp32(β)):

        −log1p(β·expm1(d))              in general: no cancellation where q ≈ p (a small divergence's summands), and
                                        none for small β (1 − β + β·e^d stays within β of 1: log1p keeps it)
        −log(1−β + β·e^d)               where d < −1 and β > ½: as e^d → 0, 1 + β·expm1(d) would be 1 − fp32(β),
                                        0 at β = 1 − 1e-9 (an infinite JSD); both terms ≥ 0 and their sum ≤ 0.75
        −d − log(β + (1−β)·e^{−d})      where d ≥ 80 (expm1 would overflow fp32; no cancellation for β ≫ e^{−80})

    Swap the arguments and pass (1 − β, β) for log(q/m). Where p = 0 the caller takes p·log(p/m) as 0."""
    d = log_q - log_p
    high = d >= MIXTURE_OVERFLOW  # False for NaN, which the general form keeps
    low = (d < -1.0) & (beta > 0.5)
    far = high | low
    general = -torch.log1p(beta * torch.expm1(torch.where(far, 0.0, d)))
    # the two other forms share one exp and one log: −(d or 0) − log(a + b·e^{∓d})
    exponent = torch.where(high, -d, torch.where(low, d, 0.0))
    # (with two Python numbers torch.where would make a default-dtype tensor: fp32 in a float64 call)
    a = torch.where(high, torch.full_like(d, beta), complement)
    b = torch.where(high, torch.full_like(d, complement), beta)
    by_parts = -(torch.where(high, d, 0.0) + torch.log(a + b * torch.exp(exponent)))
    return torch.where(far, by_parts, general)


def jsd_chunk_sums(log_p, log_q, beta):
    """Σ_j p_j·log(p_j/m_j) and Σ_j q_j·log(q_j/m_j) over a block of log-probabilities (N, c), 0·(…) = 0."""
    p, q = torch.exp(log_p), torch.exp(log_q)
    complement = 1.0 - beta  # in double precision (log_ratio_to_mixture)
    kl_pm = torch.where(p == 0, 0.0, p * log_ratio_to_mixture(log_p, log_q, beta, complement)).sum(1)  # NaN stays
    kl_qm = torch.where(q == 0, 0.0, q * log_ratio_to_mixture(log_q, log_p, complement, beta)).sum(1)
    return kl_pm, kl_qm


def exp_shift(top):
    """The shift of a log-sum-exp's e^{z − shift}: the max, or 0 where it is infinite, as torch.logsumexp (a line of
    −inf stays −inf, a +inf logit gives +inf, not ±inf − ±inf = NaN); triton_kernels/streaming_ce.py has the
    kernels' twin."""
    return torch.where(top.isinf(), 0.0, top)


def weighted_sums(logits, values):
    """(M, Σ_j e^{z_j − M}, Σ_j e^{z_j − M}·v_j) of a block of logits (N, c) and values (N, c): a softmax-weighted
    mean as two sums with the same weights, X/S, so that it does not carry the rounding of a log-sum-exp
    (exp(z − lse) sums to 1 ± ulp(lse)·|z|, which times a mean of the logits' size is 1e-3 at |z| ≈ 300); a row of
    −inf logits gives (−inf, 0, 0)."""
    top = logits.max(1).values
    weight = torch.exp(logits - exp_shift(top)[:, None])
    return top, weight.sum(1), torch.where(weight > 0, weight * values, 0.0).sum(1)


def merge_weighted_sums(a, b):
    """weighted_sums of the union of two class sets from each one's: both sums move to the larger max."""
    (max_a, sum_a, values_a), (max_b, sum_b, values_b) = a, b
    top = torch.maximum(max_a, max_b)
    shift = exp_shift(top)
    scale_a, scale_b = torch.exp(max_a - shift), torch.exp(max_b - shift)
    return (top, sum_a * scale_a + sum_b * scale_b,
            torch.where(scale_a > 0, values_a * scale_a, 0.0) + torch.where(scale_b > 0, values_b * scale_b, 0.0))


EMPTY_ROW_STATE = (-float("inf"), 0.0, 0.0)  # (M, S′, T) of no classes; weighted_sums' too


def _empty_row_state(x):
    """EMPTY_ROW_STATE per row of x, in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    return tuple(torch.full((x.shape[0],), v, dtype=acc, device=x.device) for v in EMPTY_ROW_STATE)


def chunk_max_sums(z):
    """(M, S′, T) of streaming_row_stats_with_entropy for a block of logits z (N, c): the maximal cell left out
    of S′ is the first one; a row of −inf gives (−inf, 0, 0)."""
    top, where_top = z.max(1)
    shift = exp_shift(top)
    weight = torch.exp(z - shift[:, None])
    gap = torch.where(weight > 0, weight * (shift[:, None] - z), 0.0)  # e^{z−M}·(M − z), 0 where e^{z−M} = 0
    others = weight.scatter(1, where_top[:, None], 0.0)
    others = torch.where((top == -float("inf"))[:, None], weight, others)  # no maximal cell to leave out
    return top, others.sum(1), gap.sum(1)


def merge_max_sums(a, b):
    """The (M, S′, T) of the union of two class sets (streaming_row_stats_with_entropy), from each one's: the
    side holding the larger max keeps its S′ and adds the other's 1 + S′ rescaled; T moves to the new max as
    e^{m − M}·(T + (M − m)·(1 + S′)). Every term stays ≥ 0; an empty side (max −inf) adds nothing."""
    (max_a, sums_a, gaps_a), (max_b, sums_b, gaps_b) = a, b
    top = torch.maximum(max_a, max_b)
    shift = exp_shift(top)

    def moved(row_max, sums, gaps):
        """(1 + S′)·e^{m − M} and T moved to M, 0 for an empty side (a NaN S′ is not empty: it must reach the row)."""
        present = (row_max > -float("inf")) | torch.isnan(sums)
        rescale = torch.exp(row_max - shift)
        return (torch.where(present, (1.0 + sums) * rescale, 0.0),
                torch.where(present, rescale * (gaps + (shift - row_max) * (1.0 + sums)), 0.0))

    total_a, gaps_a = moved(max_a, sums_a, gaps_a)
    total_b, gaps_b = moved(max_b, sums_b, gaps_b)
    a_on_top = max_a >= max_b
    sums = torch.where(a_on_top, sums_a + total_b, sums_b + total_a)
    sums = torch.where(top == -float("inf"), 0.0, sums)
    return top, sums, gaps_a + gaps_b


def entropy_of_max_sums(state):
    """(M, log_sum, H) from a row's (M, S′, T) (streaming_row_stats_with_entropy)."""
    top, sums, gaps = state
    log_sum = torch.log1p(sums)
    return top, log_sum, log_sum + gaps / (1.0 + sums)


def query_dot(cost: CostSpec, values: Tensor, block_bytes: int = 16 << 20) -> Tensor:
    """query_scale_n·(q_n·values_n) per row, gathering the query rows by blocks of rows (at most block_bytes
    of gathered and upcast rows at a time, never the whole (N, E))."""
    N, E = values.shape
    out = torch.empty(N, dtype=values.dtype, device=values.device)
    block = max(1, block_bytes // max(1, E * (cost.keys.element_size() + values.element_size())))
    for r0 in range(0, N, block):
        rows = cost.query_rows[r0:r0 + block]
        out[r0:r0 + block] = torch.linalg.vecdot(values[r0:r0 + block], cost.keys[rows].to(values.dtype))
    return out * cost.query_scale


def streaming_expectation(x, w, spec: LogitSpec, lse, values, value_scale, tiles):
    """(Σ_{j≠t_n} p_nj·value_scale_j·values_j, (N, E), and Σ_{j≠t_n} p_nj, (N,)) in the accumulation dtype:
    attention with Q = x, K = w, V = values, streamed over class chunks (p is rebuilt per chunk by
    `grad_logits` with coef_p = 1), the row's target column spec.target left out (p_nt = 0:
    streaming_row_stats_with_cost says why).

    Only for specs whose dz/da is 1 (no row/column scale, no softcap), as in EMO.
    """
    acc = accumulation_dtype(x.dtype)
    N, C = x.shape[0], w.shape[0]
    out = torch.zeros(N, values.shape[1], dtype=acc, device=x.device)
    mass = torch.zeros(N, dtype=acc, device=x.device)
    if N == 0 or C == 0:
        return out, mass
    # fp16 p (the GPU tiles keep 16-bit inputs' dtype) would flush the tail probabilities below 6e-8 and keep few
    # digits below 6e-5: their sum is the whole cost of a confident row (53% off in a simulation). p·2^14 (≤ 16384)
    # keeps full precision down to p ≈ 4e-9 and represents p down to 4e-12; the sums are divided back exactly.
    p_scale = 2.0 ** 14 if grad_dtype(tiles, x) == torch.float16 else 1.0
    ones, zeros = torch.full_like(lse, p_scale), torch.zeros_like(lse)
    # the chunk's scaled values (chunk × E, in p's dtype ≤ 4 bytes) share the budget with its N × chunk p
    chunks = tiles.class_chunks(N, C, x, bytes_per_class=4 * values.shape[1])
    expectation = SplitKAccumulator(out, split_k_slices(out, chunks[0][1] - chunks[0][0]))
    for c0, c1 in chunks:
        p = tiles.grad_logits(x, w, spec, lse, ones, zeros, zeros, c0, c1)  # p_nt = 0: target left out
        # scale the (chunk, E) values rather than the (N, chunk) probabilities: the smaller temporary
        scaled_values = (values[c0:c1] * value_scale[c0:c1, None]).to(p.dtype)
        expectation.add(p, scaled_values)  # in place: no (N, E) temporary per chunk
        mass += p.sum(1, dtype=acc)
        del p, scaled_values  # before the next chunk allocates its own
    return expectation.result().div_(p_scale), mass.div_(p_scale)


def block_gemm_dtype(x):
    """The dtype of G in the 3-GEMM path's dX/dW GEMMs: 16-bit on the GPU (tensor cores, fp32 results);
    the CPU upcasts anyway, so G stays in the accumulation dtype there."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    return accumulation_dtype(x.dtype)


def rows_of(spec: LogitSpec, r0: int, r1: int) -> LogitSpec:
    """The spec of rows [r0, r1)."""
    sub = spec.target_subcenter
    return dataclasses.replace(spec, row_scale=spec.row_scale[r0:r1], target=spec.target[r0:r1],
                               target_logit=spec.target_logit[r0:r1],
                               target_subcenter=sub if sub is None else sub[r0:r1])


def buffered_grads_in_input_dtype(x, w) -> bool:
    """Whether the 3-GEMM path stores dX and dW in the inputs' dtype as it makes them (bf16 on CUDA): dX per
    row block, complete after its GEMM (rounded once), and dW accumulated across the blocks by the GEMM
    itself (beta = 1: fp32 inside, unless torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    lets cuBLAS reduce split-K partials in bf16; rounded to bf16 once per block, as Liger-Kernel does).
    Otherwise they are accumulated in fp32: a (C, D) fp32 dW is 2.1 GB at Llama-3-8B shapes, eight times a
    256 MB buffer. The price is dW's rounding error, which grows with the number of row blocks (relative,
    Frobenius, at N = 512, C = 200, D = 32 on a CPU: 0.18% in one block, 0.65% in 128;
    tests/test_linear_ce_knobs.py measures and bounds it): larger buffers, fewer blocks.
    fp16 keeps fp32 gradients (unit-scale fp16 gradients underflow; GradScaler's scale overflows)."""
    return x.is_cuda and x.dtype == w.dtype == torch.bfloat16


def buffered_loss_and_grads(x, w, spec: LogitSpec, row_terms, buffer_bytes: int, need_sum_logits: bool,
                            need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool, tiles=None):
    """The 3-GEMM path (DESIGN.md §2): gradients computed in the forward pass from a bounded logits buffer.

    Rows go in blocks whose N_r × C logits fit `buffer_bytes` (about three N_r × C temporaries in the
    accumulation dtype are live: the logits, which become dL/da in place, logsumexp's and the softcap slope
    or the 16-bit copy of dL/da; a tile backend says its own count, `block_bytes_per_logit`). Per block: the
    logits GEMM, the row statistics, the loss, dL/da and the GEMMs dX_r = G·W and dW += Gᵀ·X_r; nothing is
    recomputed, but dW is read and written once per block (in fp32, or in bf16 on CUDA:
    buffered_grads_in_input_dtype).

    `row_terms(r0, r1, lse, sum_logits)` → (loss, coef_p, coef_u, target_grad) of rows [r0, r1) for a
    gradient of 1 on the (already reduced) loss, as streaming_grads takes them. Returns the per-row loss
    and lse, and dX (raw), dW (both in the accumulation dtype, or the inputs' when
    buffered_grads_in_input_dtype), dbias in the accumulation dtype, or None for each gradient not needed.
    A tile backend may fuse the block's epilogue (`block_row_stats`, `block_grads_`, contract in TorchTiles).
    """
    if spec.subcenters != 1:  # the row blocks' logits are the dot products themselves: one row of w per class
        raise ValueError("the 3-GEMM path has no sub-centres (LogitSpec.subcenters must be 1)")
    acc = accumulation_dtype(x.dtype)
    N, D = x.shape
    C = w.shape[0]
    elt = 8 if acc == torch.float64 else 4
    bytes_per_logit = getattr(tiles, "block_bytes_per_logit", lambda x: 3 * elt)(x)
    block = max(1, buffer_bytes // max(1, bytes_per_logit * C))
    in_dtype = buffered_grads_in_input_dtype(x, w)
    loss = torch.zeros(N, dtype=acc, device=x.device)
    lse = torch.zeros(N, dtype=acc, device=x.device)
    grad_x = torch.zeros(N, D, dtype=x.dtype if in_dtype else acc, device=x.device) if need_input_grad else None
    grad_w = torch.zeros(C, D, dtype=w.dtype if in_dtype else acc, device=x.device) if need_weight_grad else None
    grad_bias = torch.zeros(C, dtype=acc, device=x.device) if need_bias_grad else None
    gemm_dtype = block_gemm_dtype(x)
    # one upcast copy of a 16-bit weight for all blocks (the CPU GEMMs would make two per block)
    w_gemm = w.to(acc) if gemm_dtype == acc else w
    # The epilogue over a block of dot products: a backend's fused one (CppTiles) or PyTorch's passes.
    block_row_stats = getattr(tiles, "block_row_stats", TorchTiles.block_row_stats)
    block_grads_ = getattr(tiles, "block_grads_", TorchTiles.block_grads_)
    for r0 in range(0, N if C > 0 else 0, block):
        r1 = min(N, r0 + block)
        xr = x[r0:r1]
        block_spec = rows_of(spec, r0, r1)
        z = mm_accumulate(xr, w_gemm.t(), acc)  # GEMM 1 of 3
        block_lse, sum_logits = block_row_stats(z, block_spec, need_sum_logits)
        block_loss, coef_p, coef_u, target_grad = row_terms(r0, r1, block_lse, sum_logits)
        loss[r0:r1], lse[r0:r1] = block_loss, block_lse
        if grad_x is None and grad_w is None and grad_bias is None:
            del z  # before the next block's GEMM allocates its own
            continue
        unscale = 1.0
        if gemm_dtype == torch.float16:  # as streaming_grads (degenerate entries saturate); one sync per block
            scale = float(grad_scale_16bit(block_spec, coef_p.abs() + coef_u.abs(), target_grad))
            coef_p, coef_u, target_grad = coef_p * scale, coef_u * scale, target_grad * scale
            unscale = 1.0 / scale
        # dL/da: in place of z (fused C++, PyTorch passes), or written by the kernel in gemm_dtype (Triton)
        g = block_grads_(z, block_spec, block_lse, coef_p, coef_u, target_grad, gemm_dtype)
        if gemm_dtype == torch.float16 and g.dtype != torch.float16:
            g.clamp_(-65504.0, 65504.0)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=acc).mul_(unscale)
        g_gemm = g.to(gemm_dtype)
        if grad_x is not None:  # GEMM 2 of 3
            if in_dtype:
                torch.mm(g_gemm, w_gemm, out=grad_x[r0:r1])
                if unscale != 1.0:
                    grad_x[r0:r1].mul_(unscale)
            else:
                grad_x[r0:r1] = mm_accumulate(g_gemm, w_gemm, acc).mul_(unscale)
        if grad_w is not None:  # GEMM 3 of 3
            if in_dtype:
                grad_w.addmm_(g_gemm.t(), xr, alpha=unscale)
            else:
                addmm_accumulate(grad_w, g_gemm.t(), xr, alpha=unscale)
        del z, g, g_gemm  # before the next block's GEMM allocates its own
    return loss, lse, grad_x, grad_w, grad_bias


def _target_cells(spec: LogitSpec, z):
    """(row indices, has a target, target column clamped to 0) for indexing a block's target cells."""
    return torch.arange(z.shape[0], device=z.device), spec.target >= 0, spec.target.clamp_min(0)


class TorchTiles:
    """The engine's class-streaming steps in plain PyTorch (ATen GEMM per class chunk).

    The CPU fallback when the C++ kernels (cpp_tiles) are not built, and the tile-level oracle of the
    Triton and C++ kernels.
    """

    name = "reference"
    materializes_teacher_plane = True  # grad_logits builds the teacher's N × chunk logits (engine.streaming_grads)

    # Size of ONE N × chunk tensor; a chunk's epilogue keeps about five of them alive (z, dz/da, the
    # target mask, p, G), so 16 MB here is ≈ 80 MB at peak (with sub-centres a few N × chunk·K ones more).
    def __init__(self, buffer_bytes: int = 16 << 20):
        self.buffer_bytes = buffer_bytes

    def class_chunks(self, N, C, x, bytes_per_class=0):
        """[(c0, c1)] covering C classes; `bytes_per_class`: what the caller keeps per class of a chunk
        besides the N × chunk tensors (the engine's fp32 dW chunk), counted against the same budget. N counts
        a chunk's columns per class (N·K with K sub-centres, x having N rows): the floor of 256 is in GEMM
        columns, so 256/K classes."""
        acc_bytes = 8 if x.dtype == torch.float64 else 4
        columns_per_class = max(1, N // max(1, x.shape[0]))
        floor = max(1, 256 // columns_per_class)
        chunk = max(floor, self.buffer_bytes // max(1, N * acc_bytes + bytes_per_class))
        return [(c0, min(C, c0 + chunk)) for c0 in range(0, C, chunk)]

    @staticmethod
    def logits(x, w, spec: LogitSpec, c0, c1):
        """(z, dz/da, is the target column) for classes [c0, c1) as (N, c1−c0) tensors, z and dz/da in the
        accumulation dtype; with sub-centres also the winning sub-centre of each cell (else None)."""
        acc = accumulation_dtype(x.dtype)
        K = spec.subcenters
        z = x.to(acc) @ w[c0 * K:c1 * K].to(acc).t()
        winner = None
        if K > 1:  # the class's logit is its largest scaled sub-centre's, compared as the kernels compare them
            col_scale = (spec.col_scale[c0 * K:c1 * K] if spec.col_scale is not None
                         else z.new_ones((c1 - c0) * K)).unflatten(0, (c1 - c0, K))
            z, winner = (z.unflatten(1, (c1 - c0, K)) * col_scale).max(2)
            scale = spec.row_scale[:, None] * col_scale.expand(z.shape[0], -1, -1).gather(2, winner[..., None])[..., 0]
            z = z * spec.row_scale[:, None]
        else:
            scale = spec.row_scale[:, None]
            if spec.col_scale is not None:
                scale = scale * spec.col_scale[None, c0:c1]
            z = z * scale
        if spec.bias is not None:
            z = z + spec.bias[c0:c1].to(acc)
        chain = scale.expand_as(z)
        if spec.softcap is not None:
            t = torch.tanh(z / spec.softcap)
            z = spec.softcap * t
            chain = chain * (1.0 - t * t)
        is_target = spec.target[:, None] == torch.arange(c0, c1, device=x.device)[None, :]
        if spec.hard_negatives is not None:
            z, chain = reweight_hard_negatives(z, chain, spec.hard_negatives)
        z = torch.where(is_target, spec.target_logit[:, None], z)
        return z, chain, is_target, winner

    # The 3-GEMM path's epilogue over a block of raw dot products z = x·wᵀ (N_r, C), contiguous, in the
    # accumulation dtype (engine.buffered_loss_and_grads). block_row_stats may rewrite z into whatever
    # block_grads_ of the same backend reads (here: the logits); block_grads_ then returns dL/da (here: z,
    # in place).
    @staticmethod
    def block_row_stats(z, spec: LogitSpec, need_sum_logits):
        """(lse, Σ_j z_nj or None) of the block's rows; z becomes the logits."""
        no_hard_negatives(spec, "the 3-GEMM path")
        z.mul_(spec.row_scale[:, None])
        if spec.col_scale is not None:
            z.mul_(spec.col_scale[None, :])
        if spec.bias is not None:
            z.add_(spec.bias.to(z.dtype)[None, :])
        if spec.softcap is not None:
            z.div_(spec.softcap).tanh_().mul_(spec.softcap)
        rows, has_target, column = _target_cells(spec, z)
        z[rows, column] = torch.where(has_target, spec.target_logit, z[rows, column])
        return torch.logsumexp(z, dim=1), (z.sum(1) if need_sum_logits else None)

    @staticmethod
    def block_grads_(z, spec: LogitSpec, lse, coef_p, coef_u, target_grad, out_dtype=None):
        """z (the logits block_row_stats left) ← dL/da = (coef_p·p − coef_u)·dz/da, target column target_grad;
        returns z. A backend may return a new tensor in `out_dtype` (the GEMMs' dtype) instead."""
        slope = z.div(spec.softcap).square_().neg_().add_(1.0) if spec.softcap is not None else None
        row_scale = spec.row_scale[:, None]  # folded into the per-row coefficients: one pass fewer
        g = z.sub_(lse[:, None]).exp_().mul_(coef_p[:, None] * row_scale).sub_(coef_u[:, None] * row_scale)
        if slope is not None:
            g.mul_(slope)
        if spec.col_scale is not None:
            g.mul_(spec.col_scale[None, :])
        rows, has_target, column = _target_cells(spec, g)
        g[rows, column] = torch.where(has_target, target_grad, g[rows, column])
        return g

    def row_stats(self, x, w, spec: LogitSpec, need_sum_logits):
        return self._row_stats(x, w, spec, need_sum_logits, False)[:2]

    def row_stats_with_max(self, x, w, spec: LogitSpec, need_sum_logits):
        """engine.streaming_row_stats_with_max."""
        return self._row_stats(x, w, spec, need_sum_logits, True)

    def _row_stats(self, x, w, spec: LogitSpec, need_sum_logits, need_max):
        acc = accumulation_dtype(x.dtype)
        N, K = x.shape[0], spec.subcenters
        lse = torch.full((N,), -float("inf"), dtype=acc, device=x.device)
        total = torch.zeros(N, dtype=acc, device=x.device) if need_sum_logits else None
        top = torch.full((N,), -float("inf"), dtype=acc, device=x.device) if need_max else None
        for c0, c1 in self.class_chunks(N * K, w.shape[0] // K, x):  # a chunk's dot products: N × chunk·K
            z = self.logits(x, w, spec, c0, c1)[0]
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            if total is not None:
                total += z.sum(1)
            if top is not None:
                top = torch.maximum(top, z.amax(1))
        return lse, total, top

    def row_stats_with_entropy(self, x, w, spec: LogitSpec):
        """engine.streaming_row_stats_with_entropy: per chunk its (M, S′, T), merged into the running ones."""
        state = _empty_row_state(x)
        for c0, c1 in self.class_chunks(x.shape[0], w.shape[0], x):
            state = merge_max_sums(state, chunk_max_sums(self.logits(x, w, spec, c0, c1)[0]))
        return state

    def row_stats_with_teacher(self, x, w, spec: LogitSpec, teacher: TeacherSpec):
        """engine.streaming_row_stats_with_teacher: per chunk the student's and the teacher's weighted sums of
        z^T − z (engine.weighted_sums), merged into the running ones."""
        student = teacher_sums = _empty_row_state(x)
        for c0, c1 in self.class_chunks(2 * x.shape[0], w.shape[0], x):  # two N × chunk planes
            z = self.logits(x, w, spec, c0, c1)[0]
            z_t = teacher_logits(teacher, c0, c1, z.dtype)
            teacher_sums = merge_weighted_sums(teacher_sums, weighted_sums(z_t, z_t - z))
            student = merge_weighted_sums(student, weighted_sums(z, z - z_t))
        (top, total, cross), (top_t, total_t, cross_t) = student, teacher_sums
        return top + torch.log(total), top_t + torch.log(total_t), cross_t / total_t, cross / total

    def jsd_row_sums(self, x, w, spec: LogitSpec, teacher: TeacherSpec, lse):
        """engine.streaming_jsd_row_sums: per chunk both planes' log-probabilities and their sums."""
        kl_pm = kl_qm = torch.zeros_like(lse)
        for c0, c1 in self.class_chunks(2 * x.shape[0], w.shape[0], x):  # two N × chunk planes
            log_p = self.logits(x, w, spec, c0, c1)[0] - lse[:, None]
            log_q = teacher_logits(teacher, c0, c1, log_p.dtype) - teacher.lse[:, None]
            chunk_pm, chunk_qm = jsd_chunk_sums(log_p, log_q, teacher.jsd_beta)
            kl_pm, kl_qm = kl_pm + chunk_pm, kl_qm + chunk_qm
        return kl_pm, kl_qm

    def grad_logits(self, x, w, spec: LogitSpec, lse, coef_p, coef_u, target_grad, c0, c1, cost=None,
                    entropy_coef=None, teacher=None):
        """dL/da of the classes [c0, c1): (N, c1 − c0), or (N, (c1 − c0)·K) over their rows of w with K
        sub-centres (each class's gradient at its winning sub-centre, the target's at spec.target_subcenter)."""
        z, chain, is_target, winner = self.logits(x, w, spec, c0, c1)
        log_p = z - lse[:, None]
        p = torch.exp(log_p)
        weight_p = coef_p[:, None]
        if cost is not None:
            acc = z.dtype
            cosines = (cost_query(cost).to(acc) @ cost.keys[c0:c1].to(acc).t()) * cost.query_scale[:, None]
            weight_p = weight_p - cost.coef[:, None] * cosines * cost.key_scale[None, c0:c1]
        g = weight_p * p
        if entropy_coef is not None:
            g = g - entropy_coef[:, None] * torch.where(p > 0, p * log_p, 0.0)
        if teacher is not None and teacher.jsd_beta is not None:
            log_q = teacher_logits(teacher, c0, c1, z.dtype) - teacher.lse[:, None]
            ratio = log_ratio_to_mixture(log_p, log_q, teacher.jsd_beta, 1.0 - teacher.jsd_beta)
            g = g + torch.where(p == 0, 0.0, teacher.coef_log_q[:, None] * p * ratio)
        elif teacher is not None:
            log_q = teacher_logits(teacher, c0, c1, z.dtype) - teacher.lse[:, None]
            # p·log q only where its coefficient is not 0 (forward KL: a −inf teacher logit would give 0·(−inf))
            coef_log_q = teacher.coef_log_q[:, None]
            g = (g - teacher.coef_q[:, None] * torch.exp(log_q)
                 + torch.where((p > 0) & (coef_log_q != 0), coef_log_q * p * log_q, 0.0))
        g = (g - coef_u[:, None]) * chain
        if winner is None:
            return torch.where(is_target, target_grad[:, None], g)
        K = spec.subcenters
        g = torch.zeros(*g.shape, K, dtype=g.dtype, device=g.device).scatter_(
            2, winner[..., None], torch.where(is_target, 0.0, g)[..., None]).flatten(1)
        target_row = torch.where(spec.target >= 0, target_weight_rows(spec), -1)
        is_target_row = target_row[:, None] == torch.arange(c0 * K, c1 * K, device=x.device)[None, :]
        return torch.where(is_target_row, target_grad[:, None], g)
