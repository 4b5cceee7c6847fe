"""Class-sharded (model-parallel) margin-softmax cross-entropy, as insightface's PartialFC_V2 at sample_rate 1,
and a vocab-parallel LM head's losses: linear cross-entropy (`sharded_linear_cross_entropy`), per-token log-probs
and entropy (`sharded_log_probs_and_entropy`) and distillation (`sharded_linear_kl_divergence`, `sharded_linear_jsd`).

W processes of a torch.distributed group each hold one contiguous slice of the C class centres (insightface's
rule, `shard_range`) and see the same N rows (the embeddings all-gathered by the caller). Each rank streams
over its own slice with the engine, so no rank ever holds an N × C_local logits matrix, and only per-row
statistics cross ranks:

    forward    m_n = max_r lse_n^(r)                               all-reduce MAX, (N,)
               lse_n = m_n + log Σ_r exp(lse_n^(r) − m_n)          ┐
               T_n = Σ_r T_n^(r)      (0 except on y_n's owner)    ├ one all-reduce SUM, (2 or 3, N)
               Σ_j z_nj = Σ_r Σ_{j in r} z_nj   (label smoothing)   ┘
               loss_n = lse_n − (1−ε)·T_n − (ε/C)·Σ_j z_nj          identical on every rank
    backward   dL/dx = Σ_r (dL/dx)^(r)                             all-reduce SUM, (N, D) in fp32/fp64

The target geometry (c_y, ψ, T, ‖w_y‖ and the L-Softmax radial terms) is computed by the rank that holds
y_n only; dL/dw of each slice is local. Communication per step: two all-reduces of O(N) and one of N × D,
never logits or weights. The per-row math is margin_ce.py's, through its `ClassShard` hooks.
"""
import dataclasses
import hashlib
import numbers

import torch
import torch.distributed as dist
from torch import nn

from .checks import (check_bias, check_bool, check_class_shard, check_class_weight,
                     check_class_weight_values, check_classes_per_rank, check_classification_inputs, check_direction,
                     check_extra_outputs, check_finite, check_head_size, check_ignore_index, check_int, check_jsd_beta,
                     check_linear_ce_options, check_margin_options, check_module_embeddings,
                     check_proxy_anchor_options, check_reduction,
                     check_subcenters, check_target_tensor, check_teacher, check_temperature, check_tensor,
                     check_skip_ignored_rows, check_softcap, check_token_scaling, check_topk_arguments, interclass_filtering_options,
                     margin_module_repr)
from .dispatch import select_tiles, select_tiles_except
from .distill import jsd_backward, jsd_forward, kl_backward, kl_forward
from .engine import accumulation_dtype, merge_max_sums, merge_weighted_sums
from .process_groups import SharesProcessGroup
from .adaptive_margins import AdaFaceMargins, ElasticMargins, MagFaceMargins
from .functional import _lm_rows, _may_skip_rows, hard_negative_coefficients, linear_ce_outputs, row_margin_offsets
from .row_skipping import labelled_rows, put_rows, skip_share, take_rows
from .linear_ce import (LinearCEOptions, linear_ce_backward, linear_ce_forward, target_class_weights,
                        token_scaling_weights)
from .log_probs import log_probs_backward, log_probs_forward
from .margin_ce import MarginOptions, local_columns, margin_ce_backward, margin_ce_forward, row_margin_grads
from .proxy_anchor import proxy_anchor_backward, proxy_anchor_forward
from .hard_negatives import CurricularFaceT, MVSoftmaxCoefficients
from .modules import AdditiveMargin, AngularMargin, LambdaAnnealing, ScaleOption
from .reference import reduce_rows
from .sampling import IGNORED, num_sampled_classes, sample_classes, sampled_class_rows
from .topk import streaming_topk


def shard_range(num_classes: int, rank: int, world_size: int):
    """(start, stop): the classes rank `rank` of `world_size` holds, by insightface's rule

        num_local = C // W + (rank < C % W),   start = C // W · rank + min(rank, C % W)

    (the first C % W ranks hold one class more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be ≥ 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def _rank_and_world_size(group):
    """This process's rank in `group` (None: the default group) and the group's size."""
    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (a group of world_size=1 works for a single process)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


class ProcessGroupShard:
    """margin_ce.ClassShard over a torch.distributed group: this rank holds classes [start, start + C_local)."""

    def __init__(self, start: int, num_classes: int, group=None):
        self.start, self.num_classes, self.group = start, num_classes, group

    def _all_reduce(self, t, op):
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def merge_row_stats(self, lse, sum_logits, target_logit):
        """(lse, Σ_j z or None, T) of this slice → of all C classes; a stable log-sum-exp across ranks."""
        row_max = self._all_reduce(lse.clone(), dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # as torch.logsumexp
        parts = [torch.exp(lse - shift), target_logit] + ([] if sum_logits is None else [sum_logits])
        sums = self._all_reduce(torch.stack(parts), dist.ReduceOp.SUM)
        return shift + torch.log(sums[0]), (None if sum_logits is None else sums[2]), sums[1]

    def sum_input_grad(self, grad_x):
        return self._all_reduce(grad_x.contiguous(), dist.ReduceOp.SUM)

    def sum_rows(self, values):
        return self._all_reduce(values.clone(), dist.ReduceOp.SUM)

    def max_rows(self, values):
        return self._all_reduce(values.clone(), dist.ReduceOp.MAX)

    def merge_entropy_stats(self, state, target_logit):
        """log_probs.py's hook: the ranks' entropy statistics (M, S′, T) merged exactly, in rank order (so every
        rank gets the same bits), and the target logit from the rank that holds it (0 elsewhere): one
        all-gather of (4, N)."""
        _, world_size = _rank_and_world_size(self.group)
        local = torch.stack([*state, target_logit]).contiguous()
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=self.group)
        merged = tuple(gathered[0][:3])
        for part in gathered[1:]:
            merged = merge_max_sums(merged, tuple(part[:3]))
        return merged, torch.stack([part[3] for part in gathered]).sum(0)

    def merge_teacher_stats(self, lse, lse_t, mean_q, mean_p):
        """distill.py's hook: the ranks' (lse, lse^T, E_q[z^T − z], E_p[z − z^T]) over all classes, in rank order
        (the same bits on every rank), one all-gather of (4, N). Each rank's mean joins as a weighted sum with
        weight 1 at its own log-sum-exp (engine.merge_weighted_sums): the merged mean divides by the same rounded
        weights it multiplies with."""
        _, world_size = _rank_and_world_size(self.group)
        local = torch.stack([lse, lse_t, mean_q, mean_p]).contiguous()
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=self.group)
        ones = torch.ones_like(lse)
        student, teacher = (gathered[0][0], ones, gathered[0][3]), (gathered[0][1], ones, gathered[0][2])
        for part in gathered[1:]:
            student = merge_weighted_sums(student, (part[0], ones, part[3]))
            teacher = merge_weighted_sums(teacher, (part[1], ones, part[2]))
        return (student[0] + torch.log(student[1]), teacher[0] + torch.log(teacher[1]), teacher[2] / teacher[1],
                student[2] / student[1])


def _all_gather_ints(code, group, world_size):
    """Every rank's int64 vector `code` (same length on every rank), as lists of ints in rank order: the
    small agreement all-gathers of this module, each with its one host sync."""
    codes = [torch.empty_like(code) for _ in range(world_size)]
    dist.all_gather(codes, code, group=group)
    return torch.stack(codes).tolist()


_MAX_GATHER_DIMS = 7
_GATHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
                  torch.int8, torch.uint8, torch.bool)


_NOT_ROWS = -2  # the shape check's code of a rank whose argument was no tensor of rows


def _collective_device(group):
    """Where a small collective's tensor lives for `group`: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_rows(local, group, world_size):
    """Every rank must pass the same shape and dtype: all_gather with unequal sizes hangs or fails deep
    inside the backend (PartialFC asserts a constant batch size). One tiny all-gather of (dims, dtype,
    shape) and one host sync; every rank raises the same error, none is left waiting in a collective.
    Skipped while a CUDA graph is captured (a sync would break the capture)."""
    if local.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    dims = local.dim() if local.dim() <= _MAX_GATHER_DIMS else -1
    dtype = _GATHER_DTYPES.index(local.dtype) if local.dtype in _GATHER_DTYPES else -1
    sizes = list(local.shape) if dims >= 0 else []
    code = torch.tensor([dims, dtype] + sizes + [0] * (_MAX_GATHER_DIMS - len(sizes)), dtype=torch.int64,
                        device=local.device)
    seen = _all_gather_ints(code, group, world_size)
    if any(c[0] == _NOT_ROWS for c in seen):
        raise ValueError(f"gather_embeddings: rank(s) {[r for r, c in enumerate(seen) if c[0] == _NOT_ROWS]} passed no "
                         "tensor of rows (their own error says what); every rank stops here rather than wait for them")
    if any(c[0] < 0 for c in seen):
        raise ValueError(f"gather_embeddings takes at most {_MAX_GATHER_DIMS} dimensions, got "
                         f"{['> 7' if c[0] < 0 else c[0] for c in seen]} on ranks 0..{world_size - 1}")
    if any(c != seen[0] for c in seen):
        shapes = [(tuple(c[2:2 + c[0]]), str(_GATHER_DTYPES[c[1]]) if c[1] >= 0 else "other") for c in seen]
        raise ValueError(f"gather_embeddings: every rank must pass the same shape (the same batch size) and "
                         f"dtype, got {shapes} on ranks 0..{world_size - 1}")


def _all_gather_cat(local, group):
    _, world_size = _rank_and_world_size(group)
    _check_same_rows(local, group, world_size)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    return torch.cat(gathered)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group):
        ctx.rows = local.shape[0]
        ctx.rank, ctx.world_size = _rank_and_world_size(group)
        return _all_gather_cat(local, group)

    @staticmethod
    def backward(ctx, grad):
        r0 = ctx.rank * ctx.rows
        return grad[r0:r0 + ctx.rows] * ctx.world_size, None


def gather_embeddings(local, group=None):
    """All-gather of the rows of `local` (b, D) over `group` → (W·b, D), rank order; every rank passes the same
    b (as PartialFC asserts; checked, unequal shapes raise). Labels: call it on them too (integer tensors get
    no gradient).

    Made for `sharded_margin_cross_entropy`, whose dL/dinput is already summed over ranks: the backward pass
    needs no communication and returns W × this rank's rows of the gradient, so that DDP's averaging of the
    backbone's gradients gives the gradient of the one global loss (insightface's AllGatherFunc does the same
    after a reduce-scatter). Only for a gradient that is identical on every rank.
    """
    if not isinstance(local, torch.Tensor) or local.dim() < 1:
        what = f"shape {tuple(local.shape)}" if isinstance(local, torch.Tensor) else type(local).__name__
        error = ValueError(f"local must be a tensor of rows (b, ...), got {what}")
        _, world_size = _rank_and_world_size(group)
        # join the other ranks' shape check before raising, so that it raises there too instead of waiting
        code = torch.full((2 + _MAX_GATHER_DIMS,), _NOT_ROWS, dtype=torch.int64, device=_collective_device(group))
        _all_gather_ints(code, group, world_size)
        raise error
    if not local.dtype.is_floating_point:
        return _all_gather_cat(local, group)
    return _GatherRows.apply(local, group)


class _GatherRowsSummingGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group):
        ctx.rows, ctx.group = local.shape[0], group
        ctx.rank, _ = _rank_and_world_size(group)
        return _all_gather_cat(local, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":  # half the traffic of an all-reduce; gloo has no reduce-scatter
            mine = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)
        r0 = ctx.rank * ctx.rows
        return grad[r0:r0 + ctx.rows], None


def gather_rows_summing_grads(local, group=None):
    """All-gather of the rows of `local` (b, D) over `group` → (W·b, D), rank order, every rank the same b (checked),
    whose backward sums the gathered rows' gradients over the ranks and returns this rank's rows of the sum (a
    reduce-scatter on NCCL, an all-reduce elsewhere): for a loss whose gradient differs per rank, such as the
    contrastive losses' loss of this rank's queries against every rank's keys (open_clip's gather_with_grad).
    Every rank must run the backward pass."""
    return _GatherRowsSummingGrads.apply(local, group)


_BITS_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _checksum(t):
    """An integer checksum of t's bits (int64 on t's device), row sums weighted by the row's position:
    integer sums do not depend on the order of the reduction, so equal tensors give equal checksums on
    every rank. O(rows) extra memory (the sums accumulate in int64 without an int64 copy of t)."""
    t = t.detach()
    if t.is_floating_point():
        t = t.view(_BITS_OF[t.element_size()])
    rows = t.flatten(1).sum(dim=1, dtype=torch.int64) if t.dim() > 1 else t.to(torch.int64)
    return (rows * torch.arange(1, rows.numel() + 1, device=rows.device, dtype=torch.int64)).sum()


def _rows_checksum(input, *extras):
    """_checksum of the input, with the step's tensors that must be the same on every rank too (per-row margins,
    hard-negative coefficients) when there are some (None: none)."""
    total = _checksum(input)
    for extra in extras:
        if extra is not None:
            total = total * 1_000_003 + _checksum(extra)  # int64 wraps around: still equal for equal bits
    return total


_STEP_FIELDS = ("argument error", "input rows", "input width", "num_classes", "class sampling (train mode)",
                "target checksum", "input checksum", "targets out of range", "smallest target out of range",
                "options checksum", "needs a gradient", "may skip ignored rows")


def _options_checksum(options, device):
    """63 bits of a SHA-256 of a call's options (integers and floats by exact repr, −0.0 as 0.0; anything else by repr):
    equal on ranks that pass equal options, and unequal on ranks that do not, unlike a positional sum of their bits
    (doubling one option and halving another cancelled there). Host-side, and raises nothing before the gather."""
    def exact(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return repr(value)
        return repr(int(value)) if isinstance(value, numbers.Integral) else repr(float(value) + 0.0)

    parts = [exact(v) for v in options]
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return torch.tensor(int.from_bytes(digest[:8], "little") >> 1, dtype=torch.int64, device=device)


def _needs_grad(tensors):
    """Whether a loss of these inputs will carry a gradient (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _ranks_agree(group, input, target, num_classes, ignore_index, sampled, local_error,
                 op="sharded_margin_cross_entropy", options=(), differentiable=(), row_margins=None,
                 hard_negatives=None, skip_ignored_rows=False):
    """Every rank's step must see the same input, targets, num_classes and mode, and the targets must be
    valid class ids. One all-gather of a few int64 per rank and one host sync (the single-process loss
    checks its targets with a sync too); every rank raises the same error, so none is left waiting in a
    collective: an argument error on one rank only, ranks in different train/eval modes (they would run
    different collectives), different num_classes (a class no rank holds: a silently wrong loss), or rows
    that differ across ranks (embeddings not all-gathered: rows of different samples mixed silently), or other
    `options` (margins, scale, temperature, ...: a loss of no one's options, or per-rank losses that differ),
    or a loss that needs a gradient on some ranks only (`differentiable`: the call's tensors that may require
    grad; under torch.no_grad or with frozen tensors on one rank, its backward pass's collectives would wait for
    ranks that never run them). Skipped while a CUDA graph is captured (a sync would break the capture), as the
    local check is. Returns the share (row_skipping.skip_share of `skip_ignored_rows`) the ranks' labelled_rows
    skips ignored rows with, or None where some rank may not skip them (functional._may_skip_rows, a per-process
    answer: a rank under a dispatch mode runs every row, so the others must too)."""
    rank, world_size = _rank_and_world_size(group)
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        if local_error is not None:
            raise local_error
        return None
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if local_error is None:
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        fields = [zero, zero + input.shape[0], zero + input.shape[1], zero + num_classes, zero + int(sampled),
                  _checksum(target), _rows_checksum(input, row_margins, hard_negatives), bad.sum(),
                  torch.where(bad, target, torch.iinfo(torch.int64).max).min() if target.numel() else zero,
                  _options_checksum((ignore_index,) + tuple(options), device), zero + int(_needs_grad(differentiable)),
                  zero + int(_may_skip_rows(input, target, skip_ignored_rows))]
    else:
        fields = [zero + 1] + [zero] * (len(_STEP_FIELDS) - 1)
    seen = _all_gather_ints(torch.stack(fields), group, world_size)
    failed = [r for r, c in enumerate(seen) if c[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"{op}: rank(s) {failed} of {world_size} got invalid arguments "
                         "(their own error says which); every rank stops here rather than wait for them")
    for k, what in enumerate(_STEP_FIELDS[1:5], start=1):
        if len({c[k] for c in seen}) > 1:
            values = [c[k] for c in seen]
            if k == 4:
                raise ValueError(f"every rank must be in the same mode (train or eval) with the same sample_rate: the "
                                 f"ranks differ in {what}, {values} on ranks 0..{world_size - 1} (they would run "
                                 "different collectives)")
            raise ValueError(f"every rank must pass the same {what}, got {values} on ranks 0..{world_size - 1}")
    if len({(c[5], c[6]) for c in seen}) > 1:
        raise ValueError("input and target (and per-row margins, hard-negative coefficients) must be the same on every "
                         "rank (the all-gathered embeddings and labels: marginkern.distributed.gather_embeddings); "
                         "they differ across ranks 0.."
                         f"{world_size - 1}, so rows of different samples would be mixed"
                         + ("" if row_margins is None and hard_negatives is None else
                            " (margins or coefficients that depend on the module's mode, as AdaFace's and "
                            "CurricularFace's statistics do, also differ when ranks are in different train/eval modes)"))
    if len({c[9] for c in seen}) > 1:
        raise ValueError(f"{op}: every rank must pass the same options (ignore_index, and the loss's scale, margins, "
                         f"temperature, reduction, ...); they differ across ranks 0..{world_size - 1}")
    if len({c[10] for c in seen}) > 1:
        needing = [r for r, c in enumerate(seen) if c[10]]
        raise ValueError(f"{op}: the loss needs a gradient on rank(s) {needing} of {world_size} only (requires_grad of "
                         "the input and the shards, or torch.no_grad(), differ across ranks): its backward pass's "
                         "collectives would wait for the other ranks forever; every rank must need one, or none")
    if seen[rank][7]:
        raise ValueError(f"target holds class {seen[rank][8]}, outside [0, {num_classes}) and not "
                         f"ignore_index={ignore_index}")
    return skip_share(skip_ignored_rows) if all(c[11] for c in seen) else None


def _checked_shard(weight_shard, class_start, num_classes, rank, world_size, subcenters=1):
    """(class_start, num_classes) as ints, weight_shard holding this rank's classes by shard_range's rule."""
    class_start, num_classes = check_int("class_start", class_start), check_int("num_classes", num_classes)
    check_class_shard(weight_shard, class_start, num_classes, rank, world_size,
                      shard_range(num_classes, rank, world_size), subcenters)
    return class_start, num_classes


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    """Per-row loss over all C classes; gradients: dL/dinput summed over ranks, dL/dweight_shard local."""

    @staticmethod
    def forward(ctx, input, weight_shard, target, shard: ProcessGroupShard, opts: MarginOptions, row_margins=None,
                hard_negatives=None):
        input, weight_shard = input.contiguous(), weight_shard.contiguous()
        tiles = _tiles(input, opts, hard_negatives)
        with torch.autocast(input.device.type, enabled=False):  # the engine picks its GEMM precision itself
            loss_rows, lse, row_state, col_norm = margin_ce_forward(input, weight_shard, target, opts, tiles, shard,
                                                                    keep_geometry=True, row_margins=row_margins,
                                                                    hard_negatives=hard_negatives)
        ctx.save_for_backward(input, weight_shard, target, lse, row_state, col_norm, row_margins, hard_negatives)
        ctx.shard, ctx.opts = shard, opts
        return loss_rows

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the engine's backward is not differentiable again
            raise RuntimeError("sharded_margin_cross_entropy cannot be differentiated twice (create_graph=True)")
        input, weight_shard, target, lse, row_state, col_norm, row_margins, hard_negatives = ctx.saved_tensors
        need_weight_grad, grad_loss, opts = ctx.needs_input_grad[1], grad_loss.contiguous(), ctx.opts
        # dL/dinput is computed (and all-reduced) even when only the weight needs it: every rank must join
        # the same collectives, whatever its own requires_grad flags say.
        with torch.autocast(input.device.type, enabled=False):
            grad_input, grad_weight = margin_ce_backward(
                grad_loss, input, weight_shard, target, lse, opts, _tiles(input, opts, hard_negatives), need_weight_grad,
                ctx.shard, saved=(row_state, None if col_norm.numel() == 0 else col_norm), row_margins=row_margins,
                hard_negatives=hard_negatives)
        grad_margins = None
        if row_margins is not None and ctx.needs_input_grad[5]:  # on every rank (agreed in the forward), or none
            num_local = weight_shard.shape[0] // opts.subcenters
            grad_margins = ctx.shard.sum_rows(row_margin_grads(row_state, lse, grad_loss, target, opts,
                                                               ctx.shard.num_classes, row_margins, num_local,
                                                               ctx.shard.start))
        return (grad_input if ctx.needs_input_grad[0] else None), grad_weight, None, None, None, grad_margins, None


def _tiles(input, opts: MarginOptions, hard_negatives=None):
    """The tile backend of the sharded loss: the engine's loop over tiles, whose C++ and CUDA ones have no
    sub-centres (the C++ margin step that has them is for a whole, unsharded loss) nor hard negatives."""
    if hard_negatives is not None:
        return select_tiles_except(("cpp", "cuda"), "hard-negative re-weighting", input.device, input.dtype)
    if opts.subcenters == 1:
        return select_tiles(input.device, input.dtype)
    return select_tiles_except(("cpp", "cuda"), "sub-centres for the class-sharded loss", input.device, input.dtype)


def sharded_margin_cross_entropy(input, weight_shard, target, *, class_start, num_classes, group=None, scale=64.0,
                                 m1=1.0, m2=0.5, m3=0.0, normalize=True, margin_grad="exact", label_smoothing=0.0,
                                 ignore_index=-100, reduction="mean", subcenters=1, lambda_=0.0, hard_negatives=None,
                                 hard_negative_threshold=None):
    """marginkern.margin_cross_entropy with the class centres sharded across the ranks of `group`.

    Every rank of `group` (None: the default group) calls this with the SAME `input` (N, D) and `target` (N,)
    (global class ids in [0, num_classes) or ignore_index): the caller all-gathers its embeddings and labels,
    as PartialFC does. `weight_shard` (C_local, D) holds classes [class_start, class_start + C_local), which
    must be `shard_range(num_classes, rank, world_size)`; with `subcenters` K it is (C_local·K, D), the rows
    of those classes in margin_cross_entropy's layout (on the CPU the PyTorch tiles serve it then). Options
    and the result are those of `marginkern.margin_cross_entropy(input, cat(all shards), target, ...)`,
    identical on every rank; per-row (N,) tensor margins m2/m3 (AdaFace, MagFace) too, the same on every rank
    (checked with the input), their gradient summed from the ranks that hold each row's target (one more
    all-reduce of (N, 2)); `hard_negatives` (CurricularFace, MV-Softmax) too, the same on every rank (checked), each
    row's threshold T all-reduced from its target's rank (one more all-reduce of (N,) floats per pass), and
    `hard_negative_threshold` (insightface's inter-class filtering; a fixed threshold needs no all-reduce).

    Gradients: dL/dinput is the full gradient (the sum over the shards), identical on every rank; gather the
    embeddings with `gather_embeddings`, whose backward pass takes this rank's rows without communicating
    (an all-gather whose backward sums over ranks, e.g. torch.distributed.nn.functional.all_gather, gives
    the same result through one more N × D reduction). dL/dweight_shard is this rank's slice of dL/dweight;
    keep `weight_shard` out of DDP. Every rank must run the backward pass with the same gradient of the loss.
    """
    rank, world_size = _rank_and_world_size(group)
    local_error, row_margins = None, None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        check_classification_inputs(input, weight_shard, target, weight_name="weight_shard")
        row_margins, m2, m3 = row_margin_offsets(input, m2, m3)
        hard_negatives = hard_negative_coefficients(input, hard_negatives, check_bool("normalize", normalize),
                                                    hard_negative_threshold)
        check_margin_options(scale, m1, m2, m3, margin_grad, label_smoothing)
        check_reduction(reduction)
        subcenters = check_subcenters(subcenters, check_bool("normalize", normalize))
        class_start, num_classes = _checked_shard(weight_shard, class_start, num_classes, rank, world_size, subcenters)
        opts = _margin_options(scale, m1, m2, m3, normalize, margin_grad, label_smoothing, ignore_index, subcenters,
                               lambda_)
        target = target.long()  # uint8 indices would index as a mask
    except (TypeError, ValueError) as e:
        local_error = e
    # whether the margins need a gradient is agreed too: their backward all-reduce runs on every rank, or on none
    _ranks_agree(group, input, target, num_classes, ignore_index, False, local_error,
                 options=() if local_error else dataclasses.astuple(opts) + (reduction, _needs_grad((row_margins,))),
                 differentiable=(input, weight_shard, row_margins), row_margins=row_margins,
                 hard_negatives=None if local_error else hard_negatives)
    return _sharded_loss(input, weight_shard, target, ProcessGroupShard(class_start, num_classes, group), opts,
                         reduction, row_margins, hard_negatives)


class _ShardedLinearCrossEntropy(torch.autograd.Function):
    """(per-row loss, lse, correct) over all C classes (lse differentiable with `differentiable_lse`, correct empty
    unless `token_accuracy`); gradients: dL/dinput summed over ranks, dL/dweight_shard and dL/dbias_shard local."""

    @staticmethod
    def forward(ctx, input, weight_shard, bias_shard, target, shard: ProcessGroupShard, opts: LinearCEOptions,
                differentiable_lse, token_accuracy, class_weight_shard):
        ctx.set_materialize_grads(False)
        input, weight_shard = input.contiguous(), weight_shard.contiguous()
        tiles = (select_tiles_except(("cuda",), "token accuracy (row maxima)", input.device, input.dtype)
                 if token_accuracy else select_tiles(input.device, input.dtype))
        with torch.autocast(input.device.type, enabled=False):  # the engine picks its GEMM precision itself
            loss_rows, lse, *correct = linear_ce_forward(input, weight_shard, target, bias_shard, opts, tiles, shard,
                                                         class_weight_shard, token_accuracy=token_accuracy)
        correct = correct[0] if token_accuracy else torch.empty(0, dtype=torch.bool, device=input.device)
        ctx.save_for_backward(input, weight_shard, bias_shard, target, lse, class_weight_shard)
        ctx.shard, ctx.opts, ctx.differentiable_lse = shard, opts, differentiable_lse
        ctx.mark_non_differentiable(*((correct,) if differentiable_lse else (lse, correct)))
        # lse is saved above: the caller gets a copy, which an in-place edit may change
        return loss_rows, (lse.clone() if differentiable_lse else lse), correct

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_correct):
        if torch.is_grad_enabled():
            raise RuntimeError("sharded_linear_cross_entropy cannot be differentiated twice (create_graph=True)")
        input, weight_shard, bias_shard, target, lse, class_weight_shard = ctx.saved_tensors
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.contiguous()
        # every rank joins the same collectives, whatever its own requires_grad flags say
        with torch.autocast(input.device.type, enabled=False):
            grad_input, grad_weight, grad_bias = linear_ce_backward(
                grad_loss, input, weight_shard, target, bias_shard, lse, ctx.opts,
                select_tiles(input.device, input.dtype), ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                shard=ctx.shard, class_weight=class_weight_shard,
                grad_lse=grad_lse if ctx.differentiable_lse else None)
        return ((grad_input if ctx.needs_input_grad[0] else None), grad_weight, grad_bias) + (None,) * 6


def sharded_linear_cross_entropy(input, weight_shard, target, bias_shard=None, *, class_start, num_classes, group=None,
                                 ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0,
                                 gamma_ce=0.0, reduction="mean", shift=0, class_weight_shard=None, return_lse=False,
                                 return_token_accuracy=False, token_scaling=False, skip_ignored_rows=None):
    """marginkern.linear_cross_entropy with the LM head's vocabulary sharded across the ranks of `group` (a
    tensor-parallel head: Megatron's vocab-parallel cross-entropy, fused with its GEMM).

    Every rank of `group` (None: the default group) calls this with the SAME `input` (N, D) or (B, T, D) and
    `target` (N,) or (B, T) (global token ids in [0, num_classes) or ignore_index); `weight_shard` (C_local, D)
    and `bias_shard` (C_local,) or None hold the vocabulary rows [class_start, class_start + C_local), which must
    be `shard_range(num_classes, rank, world_size)` (pad the vocabulary so that it divides evenly, or give the
    first C % W ranks one row more). Options, `shift` and the result are those of
    `linear_cross_entropy(input, cat(all shards), target, cat(all bias shards), ...)`, identical on every rank.
    Each rank streams over its own rows: only per-row statistics cross ranks (two all-reduces of O(N) in the
    forward pass, one of O(N) and one of dL/dinput (N × D) in the backward pass); dL/dweight_shard and
    dL/dbias_shard are local. Before them, one all-gather of a few integers and one host sync check that the ranks
    agree (rows, targets, options, whether the loss needs a gradient), so that a mismatch raises on every rank
    instead of hanging or mixing. Every rank must run the backward pass, with the same gradient of the loss.
    Exact mode only (no grad_filter_eps or logits_buffer_mb). return_lse and return_token_accuracy as in
    linear_cross_entropy (the accuracy takes one more all-reduce of N row maxima). `class_weight_shard`
    (C_local,): this rank's slice of linear_cross_entropy's class_weight (each row's c_t comes from the rank holding
    its target: one more all-reduce of N per pass, and one of a scalar for Σ c). token_scaling (DFT) as in
    linear_cross_entropy: each p_t from the rank holding the target (one more all-reduce of N). skip_ignored_rows as
    in linear_cross_entropy (every rank leaves out the same rows: the ranks' targets agree).
    """
    rank, world_size = _rank_and_world_size(group)
    local_error, opts, token_shape = None, None, None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        input, target, token_shape, ignore_index = _lm_rows(input, target, ignore_index, shift)
        check_classification_inputs(input, weight_shard, target, weight_name="weight_shard")
        check_bias(bias_shard, weight_shard, name="bias_shard")
        check_linear_ce_options(label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
        check_reduction(reduction)
        class_start, num_classes = _checked_shard(weight_shard, class_start, num_classes, rank, world_size)
        opts = LinearCEOptions(ignore_index, float(label_smoothing), float(z_loss),
                               None if softcap is None else float(softcap), float(focal_gamma), float(gamma_ce))
        return_lse, return_token_accuracy = check_extra_outputs(None, return_lse=return_lse,
                                                                return_token_accuracy=return_token_accuracy)
        token_scaling = check_token_scaling(token_scaling, None)
        skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows, return_lse)
        check_class_weight(class_weight_shard, weight_shard, label_smoothing, softcap)
        check_class_weight_values(class_weight_shard, accumulation_dtype(weight_shard.dtype))
        target = target.long()  # uint8 indices would index as a mask
    except (TypeError, ValueError) as e:
        local_error = e
    # the flags and the weights' presence too: each adds collectives, which one rank alone would wait on forever
    share = _ranks_agree(group, input, target, num_classes, ignore_index, False, local_error,
                         op="sharded_linear_cross_entropy",
                         options=() if local_error else dataclasses.astuple(opts) + (
                             reduction, bias_shard is not None, return_lse, return_token_accuracy,
                             class_weight_shard is not None, token_scaling, skip_ignored_rows),
                         differentiable=(input, weight_shard, bias_shard),
                         skip_ignored_rows=False if return_lse else skip_ignored_rows)
    shard = ProcessGroupShard(class_start, num_classes, group)
    rows = labelled_rows(target, opts.ignore_index, share)
    run_input, run_target = take_rows(rows, input, target)
    loss_rows, lse, correct = _ShardedLinearCrossEntropy.apply(
        run_input, weight_shard, bias_shard, run_target, shard, opts, return_lse, return_token_accuracy,
        class_weight_shard)
    if token_scaling:
        loss_rows = loss_rows * token_scaling_weights(run_input, weight_shard, run_target, bias_shard, lse, opts,
                                                      shard)
    loss_rows, = put_rows(rows, target.shape[0], loss_rows)
    if return_token_accuracy:
        correct, = put_rows(rows, target.shape[0], correct)
    valid = target != opts.ignore_index
    target_weight = None
    if class_weight_shard is not None and reduction == "mean":  # Σ c_t: each c_t from the rank holding the target
        column = local_columns(torch.where(valid, target, -1), class_start, weight_shard.shape[0])
        target_weight = target_class_weights(class_weight_shard, column, loss_rows.dtype, shard)
    return linear_ce_outputs(loss_rows, lse, correct, valid, reduction, token_shape, target_weight,
                             return_lse=return_lse, return_token_accuracy=return_token_accuracy)


class _ShardedLogProbsEntropy(torch.autograd.Function):
    """(log p_t, H) per row over all C classes; gradients: dL/dinput summed over ranks, dL/dweight_shard local."""

    @staticmethod
    def forward(ctx, input, weight_shard, target, shard: ProcessGroupShard, temperature, ignore_index, softcap):
        input, weight_shard = input.contiguous(), weight_shard.contiguous()
        with torch.autocast(input.device.type, enabled=False):
            log_probs, entropy, lse = log_probs_forward(input, weight_shard, target, temperature, ignore_index,
                                                        _epilogue_tiles(input, "token-entropy epilogue"), shard,
                                                        softcap=softcap)
        ctx.save_for_backward(input, weight_shard, target, lse, log_probs, entropy)
        ctx.shard, ctx.temperature, ctx.ignore_index, ctx.softcap = shard, temperature, ignore_index, softcap
        return log_probs.clone(), entropy.clone()  # saved above: a caller's in-place edit must not reach them

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        if torch.is_grad_enabled():
            raise RuntimeError("sharded_log_probs_and_entropy cannot be differentiated twice (create_graph=True)")
        input, weight_shard, target, lse, log_probs, entropy = ctx.saved_tensors
        zero = torch.zeros_like(lse)
        # every rank joins the same collective, whatever its own requires_grad flags say
        with torch.autocast(input.device.type, enabled=False):
            grad_input, grad_weight, _ = log_probs_backward(
                zero if grad_log_probs is None else grad_log_probs, zero if grad_entropy is None else grad_entropy,
                input, weight_shard, target, lse, log_probs, entropy, ctx.temperature, ctx.ignore_index,
                _epilogue_tiles(input, "token-entropy epilogue"), ctx.needs_input_grad[1], ctx.shard,
                softcap=ctx.softcap)
        return (grad_input if ctx.needs_input_grad[0] else None), grad_weight, None, None, None, None, None


def _epilogue_tiles(input, what):
    """The engine's tiles for the vocab-parallel LM losses (`what`: their epilogue): Triton on CUDA, the PyTorch
    tiles on the CPU (the C++ kernels run the whole, unsharded losses only)."""
    return select_tiles_except(("cpp", "cuda"), f"{what} for a vocab-parallel head", input.device, input.dtype)


def sharded_log_probs_and_entropy(input, weight_shard, target, *, class_start, num_classes, group=None,
                                  temperature=1.0, softcap=None, ignore_index=-100, skip_ignored_rows=None):
    """marginkern.log_probs_and_entropy with the LM head's vocabulary sharded across the ranks of `group` (a
    tensor-parallel head, as RL trainers run with Megatron-style models).

    Every rank of `group` (None: the default group) calls this with the SAME `input` (N, D) and `target` (N,)
    (global token ids in [0, num_classes) or ignore_index); `weight_shard` (C_local, D) holds the vocabulary rows
    [class_start, class_start + C_local), which must be `shard_range(num_classes, rank, world_size)`. Returns
    (log_probs, entropy), each (N,), those of `log_probs_and_entropy(input, cat(all shards), target)` and
    identical on every rank. Each rank streams over its own rows; only the per-row statistics (M, S′, T) and
    target logits cross ranks (one all-gather of 4 × N values, merged exactly in rank order), and dL/dinput is
    all-reduced (N × D) in the backward pass; dL/dweight_shard is local. softcap (Gemma 2/3's final-logit softcap,
    before the temperature) and skip_ignored_rows as in log_probs_and_entropy (every rank leaves out the same rows).
    """
    rank, world_size = _rank_and_world_size(group)
    local_error = None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        check_classification_inputs(input, weight_shard, target, weight_name="weight_shard")
        check_temperature(temperature)
        softcap = check_softcap(softcap)
        ignore_index = check_ignore_index(ignore_index)
        skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)
        class_start, num_classes = _checked_shard(weight_shard, class_start, num_classes, rank, world_size)
        target = target.long()
    except (TypeError, ValueError) as e:
        local_error = e
    share = _ranks_agree(group, input, target, num_classes, ignore_index, False, local_error,
                         op="sharded_log_probs_and_entropy", options=(temperature, softcap, skip_ignored_rows),
                         differentiable=(input, weight_shard), skip_ignored_rows=skip_ignored_rows)
    rows = labelled_rows(target, ignore_index, share)
    x, t = take_rows(rows, input, target)
    outputs = _ShardedLogProbsEntropy.apply(x, weight_shard, t, ProcessGroupShard(class_start, num_classes, group),
                                            float(temperature), ignore_index, softcap)
    return put_rows(rows, target.shape[0], *outputs)


def sharded_linear_topk(input, weight_shard, k, bias_shard=None, *, class_start, num_classes, group=None,
                        normalize=False, softcap=None, logit_scale=1.0, return_lse=False):
    """marginkern.linear_topk with the head's classes sharded across the ranks of `group` (a vocab-parallel teacher
    caching its top-k, or a sharded face head identifying embeddings). No gradient.

    Every rank calls this with the SAME `input` (N, D) or (B, ..., D); `weight_shard` (C_local, D) (and `bias_shard`
    (C_local,)) hold classes [class_start, class_start + C_local), which must be `shard_range(num_classes, rank,
    world_size)`; k at most the smallest shard's classes. Each rank streams over its own classes; their top-k (values,
    global class ids) and log-sum-exps are all-gathered and merged in rank order, so the result, identical on every
    rank, is linear_topk's over all classes (ties in any order).
    """
    rank, world_size = _rank_and_world_size(group)
    local_error, rows = None, None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        k, normalize, softcap, logit_scale, return_lse = check_topk_arguments(
            input, weight_shard, k, bias_shard, normalize, softcap, logit_scale, return_lse, "weight_shard",
            max_k=check_int("num_classes", num_classes) // world_size)
        class_start, num_classes = _checked_shard(weight_shard, class_start, num_classes, rank, world_size)
        rows = input.reshape(-1, input.shape[-1])
    except (TypeError, ValueError) as e:
        local_error = e
    # the rows must be the same on every rank (the agreement check's checksum; no target here: a placeholder), on
    # the input's device even where its checks failed (NCCL gathers CUDA tensors: a CPU one would leave the rest hung)
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    no_target = torch.zeros(0 if rows is None else rows.shape[0], dtype=torch.int64, device=device)
    _ranks_agree(group, rows if rows is not None else input, no_target, num_classes, -100, False, local_error,
                 op="sharded_linear_topk",
                 options=() if local_error else (k, normalize, softcap, logit_scale, return_lse,
                                                 bias_shard is not None))
    values, indices, lse = streaming_topk(rows, weight_shard, k, bias_shard, normalize, softcap, True, logit_scale)
    # (shapes agreed above: plain all-gathers) values and lse (W, N, k + 1), global class ids (W, N, k)
    gathered_values = [values.new_empty((rows.shape[0], k + 1)) for _ in range(world_size)]
    dist.all_gather(gathered_values, torch.cat([values, lse[:, None]], 1), group=group)
    gathered_indices = [torch.empty_like(indices) for _ in range(world_size)]
    dist.all_gather(gathered_indices, indices + class_start, group=group)
    gathered_values, gathered_indices = torch.stack(gathered_values), torch.stack(gathered_indices)
    # (N, W·k): an explicit width, which reshape cannot infer for N = 0
    candidates = gathered_values[..., :k].permute(1, 0, 2).reshape(rows.shape[0], world_size * k)
    values, order = candidates.topk(k, dim=1)
    indices = gathered_indices.permute(1, 0, 2).reshape(rows.shape[0], world_size * k).gather(1, order)
    leading = input.shape[:-1]
    values, indices = values.reshape(*leading, k), indices.reshape(*leading, k)
    if not return_lse:
        return values, indices
    return values, indices, torch.logsumexp(gathered_values[..., k], dim=0).reshape(leading)


class _ShardedProxyAnchor(torch.autograd.Function):
    """The whole Proxy-Anchor loss from this rank's proxies; gradients: dL/dinput summed over ranks, dL/dproxies_shard
    local."""

    @staticmethod
    def forward(ctx, input, proxies_shard, target, shard: ProcessGroupShard, margin, alpha, ignore_index):
        input, proxies_shard = input.contiguous(), proxies_shard.contiguous()
        with torch.autocast(input.device.type, enabled=False):  # the chunks pick their GEMM precision themselves
            loss, negative, row_weight, num_positive = proxy_anchor_forward(input, proxies_shard, target, margin,
                                                                            alpha, ignore_index, shard)
        ctx.save_for_backward(input, proxies_shard, target, negative, row_weight, num_positive)
        ctx.shard, ctx.options = shard, (margin, alpha, ignore_index)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("sharded_proxy_anchor_loss cannot be differentiated twice (create_graph=True)")
        input, proxies_shard, target, negative, row_weight, num_positive = ctx.saved_tensors
        # dL/dinput is computed (and all-reduced) even when only the proxies need it: every rank joins the same
        # collectives, whatever its own requires_grad flags say
        with torch.autocast(input.device.type, enabled=False):
            grad_input, grad_proxies = proxy_anchor_backward(grad_loss, input, proxies_shard, target, negative,
                                                             row_weight, num_positive, *ctx.options, True,
                                                             ctx.needs_input_grad[1], ctx.shard)
        return (grad_input if ctx.needs_input_grad[0] else None), grad_proxies, None, None, None, None, None


def sharded_proxy_anchor_loss(input, proxies_shard, target, *, class_start, num_classes, group=None, margin=0.1,
                              alpha=32.0, ignore_index=-100):
    """marginkern.proxy_anchor_loss with the proxies sharded across the ranks of `group`.

    Every rank calls this with the SAME `input` (N, D) and `target` (N,) (global class ids in [0, num_classes) or
    ignore_index; all-gather them with `gather_embeddings`); `proxies_shard` (C_local, D) holds proxies
    [class_start, class_start + C_local), which must be `shard_range(num_classes, rank, world_size)`. Each rank streams
    over its own proxies: every row is a negative of each proxy there but its own class's, and the positive terms of
    the classes here; the three sums of the loss (positive terms, negative terms, |P⁺|) are all-reduced, so the
    result, identical on every rank, is proxy_anchor_loss's over all proxies. Gradients: dL/dinput the full gradient
    (one all-reduce of N × D in the backward pass), identical on every rank; dL/dproxies_shard this rank's slice (keep
    the shard out of DDP). Every rank must run the backward pass with the same gradient of the loss.
    """
    rank, world_size = _rank_and_world_size(group)
    local_error = None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        check_classification_inputs(input, proxies_shard, target, weight_name="proxies_shard")
        margin, alpha = check_proxy_anchor_options(margin, alpha)
        ignore_index = check_ignore_index(ignore_index)
        class_start, num_classes = _checked_shard(proxies_shard, class_start, num_classes, rank, world_size)
        target = target.long()  # uint8 indices would index as a mask
    except (TypeError, ValueError) as e:
        local_error = e
    _ranks_agree(group, input, target, num_classes, ignore_index, False, local_error, op="sharded_proxy_anchor_loss",
                 options=() if local_error else (margin, alpha), differentiable=(input, proxies_shard))
    return _ShardedProxyAnchor.apply(input, proxies_shard, target, ProcessGroupShard(class_start, num_classes, group),
                                     margin, alpha, ignore_index)


class _ShardedDistillation(torch.autograd.Function):
    """KL (beta None) or JSD_beta per row over all C classes; gradients: dL/dinput summed over ranks, dL/dweight_shard
    local."""

    @staticmethod
    def forward(ctx, input, weight_shard, teacher_input, teacher_weight_shard, target, shard: ProcessGroupShard,
                temperature, ignore_index, reverse, beta):
        input, weight_shard = input.contiguous(), weight_shard.contiguous()
        teacher_input, teacher_weight_shard = teacher_input.contiguous(), teacher_weight_shard.contiguous()
        tiles = _epilogue_tiles(input, "teacher logit plane")
        with torch.autocast(input.device.type, enabled=False):
            if beta is None:
                divergence, lse, lse_t = kl_forward(input, weight_shard, teacher_input, teacher_weight_shard, target,
                                                    temperature, ignore_index, reverse, tiles, shard)
                saved = divergence
            else:
                divergence, lse, lse_t, saved = jsd_forward(input, weight_shard, teacher_input, teacher_weight_shard,
                                                            target, temperature, ignore_index, beta, tiles, shard)
        ctx.save_for_backward(input, weight_shard, teacher_input, teacher_weight_shard, target, lse, lse_t, saved)
        ctx.shard, ctx.temperature, ctx.ignore_index, ctx.reverse, ctx.beta = (shard, temperature, ignore_index,
                                                                               reverse, beta)
        return divergence.clone()  # (KL: saved above) a caller's in-place edit must not reach it

    @staticmethod
    def backward(ctx, grad_divergence):
        if torch.is_grad_enabled():
            raise RuntimeError("a sharded distillation loss cannot be differentiated twice (create_graph=True)")
        input, weight_shard, teacher_input, teacher_weight_shard, target, lse, lse_t, saved = ctx.saved_tensors
        args = (grad_divergence.contiguous(), input, weight_shard, teacher_input, teacher_weight_shard, target, lse,
                lse_t, saved, ctx.temperature, ctx.ignore_index)
        tiles = _epilogue_tiles(input, "teacher logit plane")
        with torch.autocast(input.device.type, enabled=False):  # every rank joins the same collective
            if ctx.beta is None:
                grad_input, grad_weight = kl_backward(*args, ctx.reverse, tiles, ctx.needs_input_grad[1], ctx.shard)
            else:
                grad_input, grad_weight = jsd_backward(*args, ctx.beta, tiles, ctx.needs_input_grad[1], ctx.shard)
        return ((grad_input if ctx.needs_input_grad[0] else None), grad_weight) + (None,) * 8


def _sharded_distillation(input, weight_shard, teacher_input, teacher_weight_shard, target, class_start, num_classes,
                          group, temperature, ignore_index, reduction, skip_ignored_rows, checked_divergence, op):
    """The sharded distillation losses' argument checks, agreement across ranks, skipped rows and reduction;
    `checked_divergence()` checks the loss's own option and returns (reverse, beta) (beta None: KL)."""
    rank, world_size = _rank_and_world_size(group)
    local_error, reverse, beta = None, False, None
    try:  # an argument error of one rank alone is raised on every rank by _ranks_agree (no hang)
        reverse, beta = checked_divergence()
        ignore_index = check_ignore_index(ignore_index)
        skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)
        if target is None:  # every row counts (no host sync to find that out)
            skip_ignored_rows = False
        if target is None and isinstance(input, torch.Tensor):  # every row counts: any value but ignore_index
            target = torch.full(input.shape[:1], int(ignore_index == 0), dtype=torch.int64, device=input.device)
        check_classification_inputs(input, weight_shard, target, weight_name="weight_shard")
        check_teacher(teacher_input, teacher_weight_shard, input, weight_shard)
        temperature = check_temperature(temperature)
        check_reduction(reduction)
        class_start, num_classes = _checked_shard(weight_shard, class_start, num_classes, rank, world_size)
        target = target.long()
    except (TypeError, ValueError) as e:
        local_error = e
    share = _ranks_agree(group, input, target, num_classes, ignore_index, False, local_error, op=op,
                         options=(temperature, reverse, beta, reduction, skip_ignored_rows),
                         differentiable=(input, weight_shard), skip_ignored_rows=skip_ignored_rows)
    rows = labelled_rows(target, ignore_index, share)
    x, teacher_x, t = take_rows(rows, input, teacher_input.detach(), target)
    divergence = _ShardedDistillation.apply(x, weight_shard, teacher_x, teacher_weight_shard.detach(), t,
                                            ProcessGroupShard(class_start, num_classes, group), temperature,
                                            ignore_index, reverse, beta)
    divergence, = put_rows(rows, target.shape[0], divergence)
    return reduce_rows(divergence, target != ignore_index, reduction)


def sharded_linear_kl_divergence(input, weight_shard, teacher_input, teacher_weight_shard, target=None, *, class_start,
                                 num_classes, group=None, temperature=1.0, direction="forward", ignore_index=-100,
                                 reduction="mean", skip_ignored_rows=None):
    """marginkern.linear_kl_divergence with both heads' vocabularies sharded across the ranks of `group` alike (a
    tensor-parallel student and teacher).

    Every rank passes the SAME `input` (N, D), `teacher_input` (N, E) and `target` (N,) (a mask, or None);
    `weight_shard` (C_local, D) and `teacher_weight_shard` (C_local, E) hold the vocabulary rows [class_start,
    class_start + C_local), which must be `shard_range(num_classes, rank, world_size)`. The result is that of the
    single-process function with the concatenated heads, identical on every rank: each rank streams over its own
    rows, one all-gather of 4 × N per-row values merges them, and dL/dinput is all-reduced in the backward pass;
    dL/dweight_shard is local and the teacher gets no gradient. skip_ignored_rows as in linear_kl_divergence.
    """
    return _sharded_distillation(input, weight_shard, teacher_input, teacher_weight_shard, target, class_start,
                                 num_classes, group, temperature, ignore_index, reduction, skip_ignored_rows,
                                 lambda: (check_direction(direction), None), "sharded_linear_kl_divergence")


def sharded_linear_jsd(input, weight_shard, teacher_input, teacher_weight_shard, target=None, *, class_start,
                       num_classes, group=None, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                       skip_ignored_rows=None):
    """marginkern.linear_jsd with both heads' vocabularies sharded across the ranks of `group` alike: arguments and
    result as sharded_linear_kl_divergence (beta = 0 and 1: its forward and reverse KL). Two forward passes per rank
    over its own rows; the ranks' statistics merge by one all-gather and the two divergence sums by one
    all-reduce of 2 × N; dL/dinput is all-reduced in the backward pass."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta in (0, 1):
        return sharded_linear_kl_divergence(input, weight_shard, teacher_input, teacher_weight_shard, target,
                                            class_start=class_start, num_classes=num_classes, group=group,
                                            temperature=temperature, direction="forward" if beta == 0.0 else "reverse",
                                            ignore_index=ignore_index, reduction=reduction,
                                            skip_ignored_rows=skip_ignored_rows)
    return _sharded_distillation(input, weight_shard, teacher_input, teacher_weight_shard, target, class_start,
                                 num_classes, group, temperature, ignore_index, reduction, skip_ignored_rows,
                                 lambda: (False, check_jsd_beta(beta)), "sharded_linear_jsd")


def _margin_options(scale, m1, m2, m3, normalize, margin_grad, label_smoothing, ignore_index, subcenters=1,
                    lambda_=0.0, **_reduction):
    """The public API's options (margin_grad as a string; a module's reduction ignored) as MarginOptions."""
    return MarginOptions.of(scale, m1, m2, m3, normalize, margin_grad == "exact", label_smoothing, ignore_index,
                            subcenters, lambda_)


def _sharded_loss(input, weight_shard, target, shard: ProcessGroupShard, opts: MarginOptions, reduction,
                  row_margins=None, hard_negatives=None):
    loss_rows = _ShardedMarginCrossEntropy.apply(input, weight_shard, target, shard, opts, row_margins, hard_negatives)
    return reduce_rows(loss_rows, target != opts.ignore_index, reduction)


def _sampled_shards(weight_shard, target, class_start, sample_rate, ignore_index, group, subcenters=1):
    """Class sampling across shards (PartialFC_V2): each rank samples its own slice (its target classes plus
    random others, int(sample_rate·C_local) in all) and the sampled slices, in rank order, form the classes
    of this step. Returns (sampled weight (all `subcenters` rows of each sampled class), targets in that
    numbering with sampling.IGNORED (−1) on ignored rows, the shard of it this rank holds, the sampled
    classes of weight_shard)."""
    rank, world_size = _rank_and_world_size(group)
    num_local = weight_shard.shape[0] // subcenters
    stop = class_start + num_local
    valid = target != ignore_index
    here = valid & (target >= class_start) & (target < stop)
    # This step's draw from a generator offset by the shard's start: ranks seeded alike (as training scripts
    # seed them) would otherwise draw the same local positions every step, so that classes k, C_local + k,
    # ... were always sampled together. One number from the global CPU generator keeps runs reproducible.
    seed = int(torch.randint(2**62, ())) + class_start
    generator = torch.Generator(device=target.device).manual_seed(seed)
    index, local = sample_classes(torch.where(here, target - class_start, IGNORED), num_local,
                                  num_sampled_classes(num_local, sample_rate), IGNORED, generator)
    counts = [c for (c,) in _all_gather_ints(torch.tensor([index.numel()], device=target.device), group,
                                             world_size)]
    start, total = sum(counts[:rank]), sum(counts)
    # Rows whose target another rank holds only need a class id outside this rank's sampled range (their
    # owner knows the real one): the one just before it, or just after it for rank 0.
    elsewhere = start - 1 if start > 0 else start + counts[rank]
    step_target = torch.where(here, start + local, torch.full_like(target, elsewhere))
    step_target = torch.where(valid, step_target, IGNORED)
    return (sampled_class_rows(weight_shard, index, subcenters), step_target, ProcessGroupShard(start, total, group),
            index)


class ShardedCombinedMarginLoss(SharesProcessGroup, ScaleOption, LambdaAnnealing):
    """CombinedMarginLoss whose (C, D) class centres are sharded over `group`: this rank owns the rows
    `shard_range(num_classes, rank, world_size)` as `weight`, initialised N(0, 0.01) like PartialFC_V2.

    forward(embeddings, target) takes the all-gathered embeddings and labels (see
    `sharded_margin_cross_entropy`). Its weight differs per rank, so DistributedDataParallel must leave it
    alone (it would broadcast rank 0's shard over the others' and average the gradients, silently when the
    shards have one shape): the module tells DDP so itself (`_ddp_params_and_buffers_to_ignore`), and for
    a model that holds it, call `keep_shards_out_of_ddp(model)` before wrapping the model.

    `sample_rate` < 1 samples class centres in training mode as PartialFC_V2 (marginkern.sampling: per rank
    its target classes plus random others, int(sample_rate·C_local) in all, 0: the targets alone; one
    all-gather of the counts per step); the gradient of `weight` stays dense, zero on the rows a step did
    not sample. `subcenters` K > 1: sub-center ArcFace (CombinedMarginLoss), K rows per class in the shard.
    `lambda_min` (None: off) anneals A-Softmax's λ as CombinedMarginLoss does (every rank counts the same steps), and
    `interclass_filtering_threshold` filters as CombinedMarginLoss's (arcface_torch's CombinedMarginLoss option).
    """

    def __init__(self, embedding_dim, num_classes, m1=1.0, m2=0.5, m3=0.0, *, group=None, scale=64.0,
                 normalize=True, margin_grad="exact", label_smoothing=0.0, ignore_index=-100, reduction="mean",
                 sample_rate=1.0, subcenters=1, lambda_min=None, lambda_base=1000.0, lambda_gamma=0.12,
                 lambda_power=1.0, interclass_filtering_threshold=0.0, device=None, dtype=None):
        super().__init__()
        embedding_dim, num_classes = check_head_size(embedding_dim, num_classes)
        self._init_lambda(lambda_min, lambda_base, lambda_gamma, lambda_power)
        check_margin_options(scale, m1, m2, m3, margin_grad, label_smoothing)
        check_reduction(reduction)
        check_finite("sample_rate", sample_rate, 0.0, 1.0)  # 0: the batch's classes only
        self.sample_rate = float(sample_rate)
        rank, world_size = _rank_and_world_size(group)
        self.embedding_dim, self.num_classes, self.group = embedding_dim, num_classes, group
        check_classes_per_rank(self.num_classes, world_size)
        self.class_start, class_stop = shard_range(self.num_classes, rank, world_size)
        normalize = check_bool("normalize", normalize)
        self.subcenters = check_subcenters(subcenters, normalize)
        self.weight = nn.Parameter(torch.empty((class_stop - self.class_start) * self.subcenters, self.embedding_dim,
                                               device=device, dtype=dtype))
        # checked here, once: the sampled training path uses ignore_index before any loss function sees it
        self.options = dict(scale=scale, m1=m1, m2=m2, m3=m3, normalize=normalize,
                            margin_grad=margin_grad, label_smoothing=label_smoothing,
                            ignore_index=check_ignore_index(ignore_index), reduction=reduction,
                            **interclass_filtering_options(interclass_filtering_threshold, normalize))
        if self.subcenters > 1:
            self.options["subcenters"] = self.subcenters
        self._ddp_params_and_buffers_to_ignore = ["weight"]  # DDP(this module): a rank's own shard
        self.reset_parameters()
        self._watch_lambda_steps()

    def reset_parameters(self):
        if self.weight.is_meta:  # deferred initialisation
            return
        # One seed per shard: ranks seeded alike would otherwise draw identical shards (PartialFC_V2 does).
        seed = int(torch.randint(2**62, ())) + self.class_start
        generator = torch.Generator(device=self.weight.device).manual_seed(seed)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01, generator=generator)

    def forward(self, embeddings, target):
        """Every rank must be in the same mode (train/eval): the two modes run different collectives."""
        return self._margin_loss(embeddings, target)

    def _agree_before_step_collectives(self, embeddings, target):
        """Every rank's arguments and mode are checked alike (one all-gather) before a step's own collectives
        (CurricularFace's t, ElasticFace's margins): a rank with bad arguments, or in the other mode, must not leave
        the others waiting in them; all raise."""
        local_error = None
        try:
            check_tensor("embeddings", embeddings)
            check_module_embeddings(embeddings, self.embedding_dim)
            check_target_tensor(target, embeddings.shape[0])
        except (TypeError, ValueError) as e:
            local_error = e
        _ranks_agree(self.group, embeddings, target, self.num_classes, self.options["ignore_index"], self.training,
                     local_error)

    def _step_options(self, embeddings, target):
        """Per-row margins {"m2": (N,), "m3": (N,)} or a part of it (CombinedMarginLoss._step_options; the same on every
        rank: they are functions of the gathered embeddings); none here."""
        return {}

    def _margin_loss(self, embeddings, target, row_margins=None):
        """The loss with `row_margins` (None: this module's _step_options, taken once the arguments pass their
        checks; an error there is raised on every rank)."""
        weight, o = self.weight, self._lambda_options(self.options)
        sampled = self.training and self.sample_rate < 1.0
        try:
            check_tensor("embeddings", embeddings)
            check_module_embeddings(embeddings, self.embedding_dim)
            check_target_tensor(target, embeddings.shape[0])
            target = target.long()  # uint8 indices would index as a mask
            o = {**o, **(self._step_options(embeddings, target) if row_margins is None else row_margins)}
            margins = hard = None
            if sampled:  # (unsampled, sharded_margin_cross_entropy makes them from o itself)
                margins, o["m2"], o["m3"] = row_margin_offsets(embeddings, o["m2"], o["m3"])
                hard = hard_negative_coefficients(embeddings, o.pop("hard_negatives", None), o["normalize"],
                                                  o.pop("hard_negative_threshold", None))
        except (TypeError, ValueError) as e:  # raised on this rank by the agreement check, which the others join
            _ranks_agree(self.group, embeddings, target, self.num_classes, o["ignore_index"], sampled, e)
        if not sampled:
            if weight.dtype != embeddings.dtype:  # e.g. bf16 embeddings under autocast, fp32 master weights
                weight = weight.to(embeddings.dtype)
            return sharded_margin_cross_entropy(embeddings, weight, target, class_start=self.class_start,
                                                num_classes=self.num_classes, group=self.group, **o)
        # before _sampled_shards' own collective: a rank in eval mode joins this one too, and all raise
        _ranks_agree(self.group, embeddings, target, self.num_classes, o["ignore_index"], True, None,
                     options=tuple(sorted(o.items())) + (self.sample_rate, _needs_grad((margins,))),
                     differentiable=(embeddings, weight, margins), row_margins=margins, hard_negatives=hard)
        weight, target, shard, _ = _sampled_shards(weight, target, self.class_start, self.sample_rate,
                                                   o["ignore_index"], self.group, self.subcenters)
        weight = weight.to(embeddings.dtype)  # the sampled rows only (a no-op when the dtypes agree)
        check_classification_inputs(embeddings, weight, target, weight_name="weight")
        opts = _margin_options(**{**o, "ignore_index": IGNORED})
        return _sharded_loss(embeddings, weight, target, shard, opts, o["reduction"], margins, hard)

    def extra_repr(self):
        extra = f", classes=[{self.class_start}, {self.class_start + self.weight.shape[0] // self.subcenters})"
        extra += f", sample_rate={self.sample_rate}" if self.sample_rate < 1.0 else ""
        return margin_module_repr(self.embedding_dim, self.num_classes, self.options, extra + self._lambda_repr())


def keep_shards_out_of_ddp(model):
    """Tells DistributedDataParallel to leave the class-centre shards of every sharded margin module inside
    `model` alone (call it before `DistributedDataParallel(model)`): DDP would broadcast rank 0's shard over
    the other ranks' at construction and average the shards' gradients, a silently wrong model whenever
    the shards have one shape (C divisible by the world size). Returns the parameter names it listed."""
    names = [f"{prefix}.{name}" if prefix else name
             for prefix, module in model.named_modules() if isinstance(module, ShardedCombinedMarginLoss)
             for name, _ in module.named_parameters(recurse=False)]
    listed = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = listed + [n for n in names if n not in listed]
    return names


class ShardedArcFaceLoss(AngularMargin, ShardedCombinedMarginLoss):
    """ArcFace (cos(θ_y + margin), monotone past θ = π − margin) over class centres sharded across `group`."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, **kwargs):
        margin = self._checked_margin(margin)  # named as the caller knows it (it becomes m2)
        super().__init__(embedding_dim, num_classes, 1.0, margin, 0.0, scale=scale, **kwargs)


class ShardedCosFaceLoss(AdditiveMargin, ShardedCombinedMarginLoss):
    """CosFace (cos θ_y − margin) over class centres sharded across `group`."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.35, **kwargs):
        margin = self._checked_margin(margin)  # it becomes m3
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, margin, scale=scale, **kwargs)


class ShardedAdaFaceLoss(AdaFaceMargins, ShardedCombinedMarginLoss):
    """AdaFace (marginkern.AdaFaceLoss: margins from the norms' running statistics) over class centres sharded across
    `group`. The statistics are taken over the gathered batch, so they stay the same on every rank (the agreement
    check would raise if they did not: a rank's margins are checked with its input)."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.4, h=0.333, t_alpha=0.01, eps=1e-3,
                 **kwargs):
        self._check_adaface(margin, h, t_alpha, eps, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, 0.0, scale=scale, **kwargs)
        self._init_adaface(margin, h, t_alpha, eps)


class ShardedMagFaceLoss(MagFaceMargins, ShardedCombinedMarginLoss):
    """MagFace (marginkern.MagFaceLoss: a margin that grows with ‖x‖, plus its norm regulariser) over class centres
    sharded across `group`; the regulariser is computed, identically, on every rank."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, lower_margin=0.45, upper_margin=0.8, lower_norm=10.0,
                 upper_norm=110.0, lambda_g=35.0, **kwargs):
        self._check_magface(lower_margin, upper_margin, lower_norm, upper_norm, lambda_g, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, 0.0, 0.0, scale=scale, **kwargs)
        self._init_magface(lower_margin, upper_margin, lower_norm, upper_norm, lambda_g)


class _ShardedElasticMargin(ElasticMargins, ShardedCombinedMarginLoss):
    """ElasticFace (marginkern.ElasticArcFaceLoss / ElasticCosFaceLoss: a margin per row drawn from N(margin, std²) in
    training mode) over class centres sharded across `group`. Every rank draws from its own RNG and takes the draws of
    the group's first rank (one broadcast of N floats per training step, after an agreement check of the step's
    arguments and mode), so the ranks compute one loss whatever their seeds; under activation checkpointing the
    recompute draws the same margins (checkpoint restores the RNG state) and broadcasts them again."""

    def __init__(self, embedding_dim, num_classes, scale, margin, std, **kwargs):
        m2, m3 = self._check_elastic(margin, std, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, m2, m3, scale=scale, **kwargs)
        self._init_elastic(margin, std)

    def forward(self, embeddings, target):
        # the draws' broadcast (training mode) runs only after every rank has seen valid, equal arguments in one mode
        self._agree_before_step_collectives(embeddings, target)
        return super().forward(embeddings, target)

    def _shared_draws(self, draws):
        dist.broadcast(draws, group=self.group, group_src=0)
        return draws


class ShardedElasticArcFaceLoss(AngularMargin, _ShardedElasticMargin):
    """ElasticFace-Arc (ArcFace, its angular margin drawn per row from N(margin, std²)) over class centres sharded
    across `group` (see _ShardedElasticMargin)."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, std=0.05, **kwargs):
        super().__init__(embedding_dim, num_classes, scale, margin, std, **kwargs)


class ShardedElasticCosFaceLoss(AdditiveMargin, _ShardedElasticMargin):
    """ElasticFace-Cos (CosFace, its additive margin drawn per row from N(margin, std²)) over class centres sharded
    across `group` (see _ShardedElasticMargin)."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.35, std=0.05, **kwargs):
        super().__init__(embedding_dim, num_classes, scale, margin, std, **kwargs)


class ShardedCurricularFaceLoss(AngularMargin, CurricularFaceT, ShardedCombinedMarginLoss):
    """CurricularFace (marginkern.CurricularFaceLoss: hard negatives re-weighted by c·(t + c)) over class centres
    sharded across `group`. t's batch mean sums the target cosines from the ranks that hold them (one all-reduce of
    two numbers, after an agreement check of the step's arguments: a rank with bad ones must not leave the others
    waiting in it), so t stays the same on every rank."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.5, momentum=0.01, **kwargs):
        self._check_curricular(margin, momentum, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, margin, 0.0, scale=scale, **kwargs)
        self._init_curricular(momentum)

    def forward(self, embeddings, target):
        # t's all-reduce (training mode) runs only after every rank has seen valid, equal arguments in the same mode
        self._agree_before_step_collectives(embeddings, target)
        return super().forward(embeddings, target)

    def _held_targets(self, target, valid):
        num_local = self.weight.shape[0] // self.subcenters
        local = target.long() - self.class_start
        held = valid & (local >= 0) & (local < num_local)
        return torch.where(held, local, 0), held

    def _summed_over_shards(self, sums):
        dist.all_reduce(sums, group=self.group)
        return sums


class ShardedMVSoftmaxLoss(MVSoftmaxCoefficients, ShardedCombinedMarginLoss):
    """MV-Softmax (marginkern.MVSoftmaxLoss: mis-classified negatives re-weighted by w·c + w − 1) over class centres
    sharded across `group`."""

    def __init__(self, embedding_dim, num_classes, scale=32.0, margin=0.35, mv_weight=1.12, margin_type="cos",
                 **kwargs):
        m2, m3 = self._check_mv(margin, mv_weight, margin_type, kwargs)
        super().__init__(embedding_dim, num_classes, 1.0, m2, m3, scale=scale, **kwargs)
        self._init_mv(mv_weight, margin_type)
