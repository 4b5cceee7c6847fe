"""Host side of the Triton engine: launch configuration and the tile-backend contract of
marginkern/engine.py (`row_stats`, `grad_logits`, `class_chunks`)."""
import functools
import os
from typing import Optional

import torch

from ..engine import block_gemm_dtype, device_sm_count, gpu_grad_dtype, no_hard_negatives
from ..margin_ce import TargetGradRows, TargetRows
from .device import FP_FUSION, cdiv, fp32, on_device
from .margin_rows import margin_target_grad_rows as _margin_target_grad_rows
from .margin_rows import margin_target_rows as _margin_target_rows
from .row_projection import PROJECTED_DW_MAX_D
from .row_projection import finish_grad_rows as _finish_grad_rows
from .row_projection import projected_weight_grad as _projected_weight_grad
from .streaming_ce import (jsd_row_sums_kernel, merge_splits_kernel, streaming_ce_fwd_kernel,
                           streaming_ce_grad_logits_kernel)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_CLASS_TILES_PER_LAUNCH = 65535  # bounds one launch of the dL/da kernel (its grid: row blocks × these)

# Untuned starting point. GROUP_N: row blocks per group of the backward kernel's grouped program order;
# FLATTEN: the forward kernel's class and K loops pipelined as one (streaming_ce_fwd_kernel).
GPU_CONFIG = dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, GROUP_N=8, FLATTEN=False, num_warps=8, num_stages=3)
# Interpreter blocks: small, so that tests on small odd shapes cross every tile and group boundary.
INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_C=32, BLOCK_D=16, GROUP_N=2, FLATTEN=False)


def parse_config(text):
    """'BLOCK_N=128,GROUP_N=16,FLATTEN=1,num_warps=8' → GPU_CONFIG with those keys changed
    (MARGINKERN_TRITON_CONFIG, bench/sweep_triton_configs.py)."""
    config = dict(GPU_CONFIG)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in GPU_CONFIG:
            raise ValueError(f"MARGINKERN_TRITON_CONFIG: unknown key {key!r}; expected keys of {sorted(GPU_CONFIG)}")
        config[key] = int(value)
    config["FLATTEN"] = bool(config["FLATTEN"])
    return config


def _config(x):
    """Block sizes and launch options. The interpreter gets small blocks so that tests on small, odd shapes
    still cross every tile boundary; on the GPU, MARGINKERN_TRITON_CONFIG overrides GPU_CONFIG (tuning)."""
    if INTERPRETED or not x.is_cuda:
        return dict(INTERPRETER_BLOCKS), {}
    config = parse_config(os.environ.get("MARGINKERN_TRITON_CONFIG", ""))
    return ({k: config[k] for k in ("BLOCK_N", "BLOCK_C", "BLOCK_D", "GROUP_N", "FLATTEN")},
            {k: config[k] for k in ("num_warps", "num_stages")})


def subcenter_blocks(blocks, num_warps, subcenters):
    """The engine kernels' tile with K > 1 sub-centres. Their running best and winner tiles live beside the
    dot accumulator: at GPU_CONFIG's 64 × 128 that took 210–255 registers on sm_90 (one 8-warp program per
    SM instead of two) and spilled at 128 × 128 (bench/NOTES.md, ninth session). BLOCK_C halves until a tile
    holds at most 16 elements per thread: 126–157 registers at 64 × 64 and 128 × 32 with 8 warps, K = 2–4."""
    block_c = blocks["BLOCK_C"]
    while subcenters > 1 and block_c > 16 and blocks["BLOCK_N"] * block_c > 16 * 32 * num_warps:
        block_c //= 2
    return dict(blocks, BLOCK_C=block_c)


def _subcenter_config(x, spec):
    """_config, with the tile subcenter_blocks gives for spec's sub-centres."""
    blocks, launch = _config(x)
    return subcenter_blocks(blocks, launch.get("num_warps", 4), spec.subcenters), launch


def _sm_count(device):
    """SMs of x's GPU (engine.device_sm_count; the interpreter pretends an H100 SXM's 132)."""
    return device_sm_count(device) if device.type == "cuda" else 132


@functools.lru_cache(maxsize=None)
def _l2_bytes(device):
    """L2 cache of x's GPU (50 MB on an H100; the interpreter pretends the same)."""
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return getattr(props, "L2_cache_size", 0) or (50 << 20)


def class_splits(N, C, D, element_size, blocks, sm_count, l2_bytes):
    """(splits, classes per split) of the forward kernel. Enough splits that few row blocks still fill the
    GPU (two programs per SM, flash-decoding), and that the row blocks running at once (≈ 2 programs per
    SM, each split of a row block a neighbour of the others) keep their x blocks within half of L2."""
    row_blocks = cdiv(N, blocks["BLOCK_N"])
    class_blocks = cdiv(C, blocks["BLOCK_C"])
    for_occupancy = cdiv(2 * sm_count, max(1, row_blocks))
    x_blocks_at_once = 2 * sm_count * blocks["BLOCK_N"] * D * element_size
    for_l2 = cdiv(x_blocks_at_once, l2_bytes // 2)
    wanted = max(1, min(class_blocks, max(for_occupancy, for_l2)))
    per_split = cdiv(class_blocks, wanted) * blocks["BLOCK_C"]
    return cdiv(C, per_split), per_split


def _cost_pointer_args(cost, spec, w, placeholder):
    """((query rows, keys, query scale, key scale), E, keys' row stride) of the EMO cost term for the
    kernels; without one, unread placeholders (HAS_COST=False) and E = 0."""
    if cost is None:
        return (spec.target, w, placeholder, placeholder), 0, 0
    keys = cost.keys.contiguous()
    args = (cost.query_rows.contiguous(), keys, fp32(cost.query_scale), fp32(cost.key_scale))
    return args, keys.shape[1], keys.stride(0)


def _teacher_pointer_args(teacher, x, E):
    """((teacher x, teacher w), E, their row strides) of the distillation's teacher plane for the kernels; without
    one, x twice (unread: HAS_TEACHER=False) and the E and strides the caller had."""
    if teacher is None:
        return (x, x), E, 0, 0
    tx, tw = teacher.x.contiguous(), teacher.w.contiguous()
    return (tx, tw), tx.shape[1], tx.stride(0), tw.stride(0)


def _without(blocks, key):
    """The block options minus the one a kernel does not take (GROUP_N: backward only; FLATTEN: forward only)."""
    return {k: v for k, v in blocks.items() if k != key}


def _dot_precision(x):
    # tf32 would cost fp32 users three decimal digits; 16-bit inputs ignore this setting.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _flags(spec):
    return dict(HAS_COL_SCALE=spec.col_scale is not None, HAS_BIAS=spec.bias is not None,
                HAS_SOFTCAP=spec.softcap is not None)


def _hard_negative_args(spec, placeholder):
    """(threshold, coefs) pointers of the hard-negative re-weighting and its flag; unread placeholders without it."""
    hard = spec.hard_negatives
    if hard is None:
        return (placeholder, placeholder), dict(HAS_HARD_NEGATIVES=False)
    return (fp32(hard.threshold), fp32(hard.coefs)), dict(HAS_HARD_NEGATIVES=True)


def _pointer_args(x, spec):
    # Unused optional pointers still need a tensor argument; the constexpr flags keep them unread.
    col_scale = spec.col_scale if spec.col_scale is not None else spec.row_scale
    bias = spec.bias.contiguous() if spec.bias is not None else spec.row_scale  # read with stride 1
    softcap = float(spec.softcap) if spec.softcap is not None else 1.0
    return col_scale, bias, softcap


class TritonTiles:
    name = "triton"

    def __init__(self, buffer_bytes: Optional[int] = None):
        self.buffer_bytes = buffer_bytes

    @staticmethod
    def default_buffer_bytes(N, D):
        """The backward's chunk budget (G and the chunk's fp32 dW): 40 MB plus half of the (N, D) fp32 dX
        accumulator the engine holds anyway. Small for face shapes, whose goal is ≤ 64 MB of extra memory
        at a million classes (≈ 12 MB of it are (C,) fp32 vectors: norms, their inverses); larger for LLM
        shapes (≈ 104 MB at N=8192, D=4096, 232 MB in all with the accumulator, goal ≤ 256 MB), where
        every chunk's dX GEMM reads and writes the accumulator, so fewer chunks cost less traffic."""
        return (40 << 20) + N * D * 2

    def class_chunks(self, N, C, x, bytes_per_class=0):
        """engine.TorchTiles.class_chunks: the chunk's G (N × chunk, x's dtype when 16-bit) and the caller's
        `bytes_per_class` fill `buffer_bytes` (default: default_buffer_bytes)."""
        blocks, _ = _config(x)
        elt = x.element_size() if x.dtype in (torch.float16, torch.bfloat16) else 4
        # from x's own rows: N counts a chunk's columns per class (K·N with sub-centres)
        budget = self.buffer_bytes if self.buffer_bytes is not None else self.default_buffer_bytes(*x.shape)
        chunk = max(blocks["BLOCK_C"], budget // max(1, N * elt + bytes_per_class))
        chunk = min(chunk, MAX_CLASS_TILES_PER_LAUNCH * blocks["BLOCK_C"])  # bounded launches
        chunk = chunk // blocks["BLOCK_C"] * blocks["BLOCK_C"]
        return [(c0, min(C, c0 + chunk)) for c0 in range(0, C, chunk)]

    def row_stats(self, x, w, spec, need_sum_logits):
        return self.row_stats_with_max(x, w, spec, need_sum_logits)[:2]

    def row_stats_with_max(self, x, w, spec, need_sum_logits):
        """engine.streaming_row_stats_with_max: the merge kernel writes the row max beside the lse anyway."""
        x, w = x.contiguous(), w.contiguous()
        num_classes = w.shape[0] // spec.subcenters
        return self._row_stats(x, w, spec, need_sum_logits, x.shape[0], num_classes, x.shape[1], x.stride(0),
                               w.stride(0), from_dots=False, row_max=True)

    def row_stats_with_cost(self, x, w, spec, cost):
        """(lse, Σ_{j≠t} p_nj·(1 − A_nj)) in one pass (engine.streaming_row_stats_with_cost): the costs of each
        tile weighted by its softmax terms inside the forward kernel."""
        x, w = x.contiguous(), w.contiguous()
        lse, _, expected_cost = self._row_stats(x, w, spec, False, x.shape[0], w.shape[0], x.shape[1], x.stride(0),
                                                w.stride(0), from_dots=False, cost=cost)
        return lse, expected_cost

    def row_stats_with_entropy(self, x, w, spec):
        """(M, S′, T) in one pass (engine.streaming_row_stats_with_entropy): the forward kernel keeps them per
        class split, merged by merge_splits_kernel."""
        x, w = x.contiguous(), w.contiguous()
        return self._row_stats(x, w, spec, False, x.shape[0], w.shape[0], x.shape[1], x.stride(0), w.stride(0),
                               from_dots=False, entropy=True)

    def row_stats_with_teacher(self, x, w, spec, teacher):
        """(lse, lse^T, E_q[z^T − z], E_p[z − z^T]) in one pass (engine.streaming_row_stats_with_teacher): the
        teacher's logit tile beside the student's in the forward kernel, merged by merge_splits_kernel."""
        x, w = x.contiguous(), w.contiguous()
        return self._row_stats(x, w, spec, False, x.shape[0], w.shape[0], x.shape[1], x.stride(0), w.stride(0),
                               from_dots=False, teacher=teacher)

    def jsd_row_sums(self, x, w, spec, teacher, lse):
        """(KL(p‖m), KL(q‖m)) per row (engine.streaming_jsd_row_sums): jsd_row_sums_kernel over the forward
        kernel's class splits, the splits added here."""
        x, w = x.contiguous(), w.contiguous()
        N, C, D = x.shape[0], w.shape[0], x.shape[1]
        blocks, launch = _config(x)
        splits, per_split = class_splits(N, C, D, x.element_size(), blocks, _sm_count(x.device), _l2_bytes(x.device))
        part = torch.zeros(2, splits, N, dtype=torch.float32, device=x.device)
        col_scale, bias, softcap = _pointer_args(x, spec)
        (tx, tw), E, stride_tx, stride_tw = _teacher_pointer_args(teacher, x, 0)
        if N > 0:
            with on_device(x):
                jsd_row_sums_kernel[(cdiv(N, blocks["BLOCK_N"]) * splits,)](
                    x, w, fp32(spec.row_scale), fp32(col_scale), bias, tx, tw, fp32(lse), fp32(teacher.lse), part,
                    N, C, D, E, x.stride(0), w.stride(0), stride_tx, stride_tw, per_split, splits, softcap,
                    float(teacher.jsd_beta), 1.0 - float(teacher.jsd_beta), DOT_PRECISION=_dot_precision(x),
                    TEACHER_DOT_PRECISION=_dot_precision(tx),
                    EVEN_D=D % blocks["BLOCK_D"] == 0, EVEN_E=E % blocks["BLOCK_D"] == 0, **_flags(spec),
                    **_without(_without(blocks, "GROUP_N"), "FLATTEN"), **launch, **FP_FUSION)
        kl_pm, kl_qm = part.sum(1)
        return kl_pm, kl_qm

    @staticmethod
    def block_bytes_per_logit(x):
        """Live bytes per logit of a 3-GEMM row block: the fp32 dot products (read in place by the two
        epilogue kernels) and dL/da, written in the GEMMs' dtype (engine.block_gemm_dtype)."""
        return 4 + block_gemm_dtype(x).itemsize

    def block_row_stats(self, z, spec, need_sum_logits):
        """engine.TorchTiles.block_row_stats in the forward kernel reading the dot products (FROM_DOTS);
        z is left unchanged."""
        no_hard_negatives(spec, "the 3-GEMM path")
        z = z.contiguous()
        lse, sum_logits, _ = self._row_stats(z, z, spec, need_sum_logits, z.shape[0], z.shape[1], 0, z.stride(0), 0,
                                             from_dots=True)
        return lse, sum_logits

    def _row_stats(self, x, w, spec, need_sum_logits, N, C, D, stride_x, stride_w, from_dots, cost=None,
                   entropy=False, teacher=None, row_max=False):
        """(lse, Σ_j z_nj or None, Σ_{j≠t} p_nj·(1 − A_nj) or None): the forward kernel over class splits, merged
        here; with `row_max` (lse, Σ_j z_nj or None, max_j z_nj) instead; with `entropy` (M, S′, T) of
        engine.streaming_row_stats_with_entropy, with `teacher` the four statistics of
        engine.streaming_row_stats_with_teacher (each without Σz, a cost term or the other)."""
        if (entropy or teacher is not None) and (need_sum_logits or cost is not None or (entropy and teacher)):
            raise ValueError("the entropy and teacher statistics come alone: without Σz, a cost term or each other")
        blocks, launch = _subcenter_config(x, spec)
        row_blocks = cdiv(N, blocks["BLOCK_N"])
        splits, per_split = class_splits(N, C, D, x.element_size(), blocks, _sm_count(x.device), _l2_bytes(x.device))
        # max, Σexp [, Σz] [, Σ e·A] [, Σ e·(max − z)] [, the teacher's four]
        planes = 2 + need_sum_logits + (cost is not None) + entropy + 4 * (teacher is not None)
        part = torch.empty(planes, splits, N, dtype=torch.float32, device=x.device)
        col_scale, bias, softcap = _pointer_args(x, spec)
        cost_args, E, stride_k = _cost_pointer_args(cost, spec, w, part[0])
        teacher_args, E, stride_tx, stride_tw = _teacher_pointer_args(teacher, x, E)
        hard_args, hard_flag = _hard_negative_args(spec, part[-1])
        if N > 0:
            with on_device(x):
                streaming_ce_fwd_kernel[(row_blocks * splits,)](
                    x, w, fp32(spec.row_scale), fp32(col_scale), bias, spec.target, fp32(spec.target_logit),
                    part[0], part[1], part[2 if need_sum_logits else 1], *cost_args, part[-1], part[-1],
                    *teacher_args, part[2] if teacher is not None else part[-1], *hard_args,
                    N, C, D, E, stride_x, stride_w, stride_k, stride_tx, stride_tw, per_split, splits, softcap,
                    NEED_SUM_LOGITS=need_sum_logits, DOT_PRECISION=_dot_precision(x), FROM_DOTS=from_dots,
                    EVEN_D=D % blocks["BLOCK_D"] == 0, HAS_COST=cost is not None,
                    COST_DOT_PRECISION=_dot_precision(cost_args[1] if teacher is None else teacher_args[0]),
                    EVEN_E=E % blocks["BLOCK_D"] == 0, SUBCENTERS=spec.subcenters, HAS_ENTROPY=entropy,
                    HAS_TEACHER=teacher is not None, **hard_flag, **_flags(spec), **_without(blocks, "GROUP_N"),
                    **launch, **FP_FUSION)
        lse, second, third, fourth = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(4))
        if N > 0:
            with on_device(x):  # one launch instead of ~10 small ops
                merge_splits_kernel[(cdiv(N, 1024),)](part, lse, second, third, fourth, N, splits,
                                                      NEED_SUM_LOGITS=need_sum_logits, HAS_COST=cost is not None,
                                                      BLOCK=1024, HAS_ENTROPY=entropy, HAS_TEACHER=teacher is not None,
                                                      **FP_FUSION)
        if entropy:  # (M, S′, T)
            return lse, fourth, third
        if teacher is not None:  # (lse, lse^T, E_q[z^T − z], E_p[z − z^T])
            return lse, second, third, fourth
        if row_max:
            return lse, (second if need_sum_logits else None), fourth
        return lse, (second if need_sum_logits else None), (third if cost is not None else None)

    def finish_grad_rows(self, grad, scale, out, weight=None, inv_norm=None):
        """engine.finish_grad_rows in one pass: unscale, project (when weight is given) and store in out's dtype."""
        return _finish_grad_rows(grad, scale, out, None if weight is None else weight.contiguous(), inv_norm)

    @staticmethod
    def margin_target_rows(x, w, target, opts, class_start=None, row_margins=None):
        """margin_ce.target_rows in one launch (margin_rows.py)."""
        rows = _margin_target_rows(x, w, target.contiguous(), opts.scale, opts.m1, opts.m2, opts.m3, opts.normalize,
                                   opts.ignore_index, class_start or 0, opts.subcenters, opts.lambda_, row_margins)
        return TargetRows(*rows)

    @staticmethod
    def margin_target_grad_rows(row_state, lse, grad_loss, target, opts, num_classes, num_local, class_start=None,
                                row_margins=None):
        """margin_ce.target_grad_rows in one launch (margin_rows.py)."""
        column, planes = _margin_target_grad_rows(
            row_state, lse, grad_loss, target.contiguous(), opts.scale, opts.m1, opts.m2, opts.normalize,
            opts.exact_margin_grad, opts.label_smoothing, opts.ignore_index, num_classes, num_local, class_start or 0,
            opts.lambda_, row_margins)
        return TargetGradRows(column, *planes.unbind(0))

    indexes_cost_rows = True  # the dL/da kernel gathers the cost term's query rows itself

    grad_dtype = staticmethod(gpu_grad_dtype)

    @staticmethod
    def fuses_projected_weight_grad(x):
        """Whether projected_weight_grad serves x's width (≤ 512; MARGINKERN_FUSED_DW=0 turns it off)."""
        return x.shape[1] <= PROJECTED_DW_MAX_D and os.environ.get("MARGINKERN_FUSED_DW", "1") != "0"

    def projected_weight_grad(self, g, x, weight, inv_norm, scale, out):
        """out ← scale·P(gᵀ·x): a chunk's dW GEMM with the tangent projection fused, no fp32 chunk."""
        return _projected_weight_grad(g, x.contiguous(), weight, inv_norm, scale, out)

    def grad_logits(self, x, w, spec, lse, coef_p, coef_u, target_grad, c0, c1, cost=None, entropy_coef=None,
                    teacher=None):
        x, w = x.contiguous(), w.contiguous()
        return self._grad_logits(x, w, spec, lse, coef_p, coef_u, target_grad, c0, c1, cost, x.shape[1],
                                 x.stride(0), w.stride(0), self.grad_dtype(x), from_dots=False,
                                 entropy_coef=entropy_coef, teacher=teacher)

    def block_grads_(self, z, spec, lse, coef_p, coef_u, target_grad, out_dtype=torch.float32):
        """engine.TorchTiles.block_grads_ in the dL/da kernel reading the dot products (FROM_DOTS): writes
        dL/da straight into a new `out_dtype` buffer (16-bit for the GEMMs; fp16 saturates at ±65504)."""
        z = z.contiguous()
        N, C = z.shape
        grad = torch.empty(N, C, dtype=out_dtype, device=z.device)
        span = MAX_CLASS_TILES_PER_LAUNCH * _config(z)[0]["BLOCK_C"]  # one launch per span
        for c0 in range(0, C, span):
            c1 = min(C, c0 + span)
            self._grad_logits(z, z, spec, lse, coef_p, coef_u, target_grad, c0, c1, None, 0, z.stride(0), 0,
                              out_dtype, from_dots=True, grad=grad[:, c0:c1])
        return grad

    def _grad_logits(self, x, w, spec, lse, coef_p, coef_u, target_grad, c0, c1, cost, D, stride_x, stride_w,
                     grad_dtype, from_dots, grad=None, entropy_coef=None, teacher=None):
        """dL/da of the classes [c0, c1) into `grad` (N, c1 − c0), which may be a column slice of a wider buffer;
        (N, (c1 − c0)·K), the classes' rows of w, with K sub-centres per class."""
        N = x.shape[0]
        blocks, launch = _subcenter_config(x, spec)
        if grad is None:  # the kernel writes each class's winning sub-centre only: the others stay 0
            grad = (torch.empty if spec.subcenters == 1 else torch.zeros)(N, (c1 - c0) * spec.subcenters,
                                                                          dtype=grad_dtype, device=x.device)
        col_scale, bias, softcap = _pointer_args(x, spec)
        grid = (cdiv(N, blocks["BLOCK_N"]) * cdiv(c1 - c0, blocks["BLOCK_C"]),)
        cost_args, E, stride_k = _cost_pointer_args(cost, spec, w, lse)
        coef_cost = fp32(cost.coef) if cost is not None else lse
        teacher_args, E, stride_tx, stride_tw = _teacher_pointer_args(teacher, x, E)
        teacher_rows = (lse, lse, lse) if teacher is None else (fp32(teacher.lse), fp32(teacher.coef_q),
                                                                fp32(teacher.coef_log_q))
        hard_args, hard_flag = _hard_negative_args(spec, lse)
        if N > 0:
            with on_device(x):
                streaming_ce_grad_logits_kernel[grid](
                    x, w, fp32(spec.row_scale), fp32(col_scale), bias, spec.target,
                    fp32(lse), fp32(coef_p), fp32(coef_u), fp32(target_grad), grad, *cost_args, coef_cost,
                    spec.target if spec.target_subcenter is None else spec.target_subcenter.contiguous(),
                    lse if entropy_coef is None else fp32(entropy_coef), *teacher_args, *teacher_rows, *hard_args,
                    N, D, E, stride_x, stride_w, grad.stride(0), stride_k, stride_tx, stride_tw, c0, c1, softcap,
                    *((1.0, 0.0) if teacher is None or teacher.jsd_beta is None
                      else (float(teacher.jsd_beta), 1.0 - float(teacher.jsd_beta))),
                    HAS_COST=cost is not None, DOT_PRECISION=_dot_precision(x), FROM_DOTS=from_dots,
                    SATURATE_FP16=grad_dtype == torch.float16, EVEN_D=D % blocks["BLOCK_D"] == 0,
                    EVEN_E=E % blocks["BLOCK_D"] == 0,
                    COST_DOT_PRECISION=_dot_precision(cost_args[1] if teacher is None else teacher_args[0]),
                    SUBCENTERS=spec.subcenters, HAS_ENTROPY=entropy_coef is not None, HAS_TEACHER=teacher is not None,
                    JSD=teacher is not None and teacher.jsd_beta is not None, **hard_flag,
                    **_flags(spec), **_without(blocks, "FLATTEN"), **launch, **FP_FUSION)
        return grad
