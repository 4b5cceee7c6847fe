"""Triton kernels of the streaming engine (marginkern/engine.py states the contract they implement).

    streaming_ce_fwd_kernel          per-row max / Σexp / Σz over one class split (flash-decoding style:
                                     one program per (row block, class split), merged on the host); with
                                     HAS_COST also Σ_{j≠t} exp(z_j − max)·(1 − A_nj), so EMO's expected
                                     cost comes out of the same pass as the log-sum-exp; with
                                     HAS_ENTROPY Σexp without one maximal term (S′) in its place and
                                     T = Σ exp(z_j − max)·(max − z_j), from which the entropy follows
                                     (engine.streaming_row_stats_with_entropy); with HAS_TEACHER the
                                     teacher's log-sum-exp and the two cross sums of distillation
    streaming_ce_grad_logits_kernel  dL/da for one class chunk, written to a bounded N × chunk buffer
                                     that the engine feeds to the dX and dW GEMMs; with HAS_COST it also
                                     computes EMO's cost cosines A = q·k per tile (a second tl.dot loop);
                                     with HAS_ENTROPY the entropy term −coef·p·log p; with HAS_TEACHER
                                     the teacher's terms −coef_q·q + coef_log_q·p·log q (with JSD
                                     coef_log_q·p·log(p/m), m = (1−β)·p + β·q, instead)
    jsd_row_sums_kernel              the generalized JSD's second forward pass: with both log-sum-exps
                                     known, Σ p·log(p/m) and Σ q·log(q/m) per row over one class split
                                     (engine.streaming_jsd_row_sums)

Both recompute logits tile by tile with tl.dot over D in fp32 accumulators; no N × C tensor exists. With
SUBCENTERS = K (sub-center ArcFace, engine.py) a class tile runs K dot tiles over the classes' K rows of w
and keeps the best per class; the dL/da kernel then writes N × chunk·K, one value per class at its winner.

Program order decides what L2 holds. A logit tile reads a BLOCK_N × D block of x and a BLOCK_C × D block
of w over the whole D; at LLM widths (D = 4096) an x block is 512 KB, and 132 SMs each working on another
row block want 66 MB of x at once, more than the H100's 50 MB L2: x then comes from DRAM again for every
class tile (≈ 64 GB per pass at Llama-3-8B shapes). So both kernels run a 1-D grid whose consecutive
programs share blocks: the forward's programs of one row block over its class splits are neighbours
(the host picks enough splits that the row blocks running at once fit in L2), and the backward's tiles
go in groups of GROUP_N row blocks × all class tiles of the chunk (Triton's grouped matmul ordering).
With FROM_DOTS they read the raw dot products from an (N, C) fp32 buffer instead (x_ptr, stride_x): the
3-GEMM path's block epilogue over logits that cuBLAS computed (engine.buffered_loss_and_grads).

The error bounds quoted below hold in IEEE-rounded arithmetic (the interpreter, the C++ twins). Compiled for a GPU,
tl.exp is ex2.approx and an fp32 division div.full (each within 2 ulp), and z − lse after a dot is one FMA of the
unrounded product: a few ulp more on the GPU (read from the sm_90 PTX, not measured).
"""
import triton
import triton.language as tl


@triton.jit
def exp_shift(top):
    """The shift of a log-sum-exp's e^{z − shift}: the max, or 0 where it is infinite, as torch.logsumexp: a line
    of −inf stays −inf (not e^{−inf − (−inf)} = NaN, e.g. a −inf bias masking a padded vocabulary tail), a +inf
    logit gives +inf (not e^{inf − inf} = NaN), as the C++ and CUDA kernels."""
    return tl.where(tl.abs(top) == float("inf"), 0.0, top)


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_a, stride_b, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_K: tl.constexpr):
    """a[rows] · b[cols]ᵀ over K in fp32: the BLOCK_N × BLOCK_C tile of a GEMM with both operands row-major.

    Rows and columns outside their masks read row 0 instead of being masked (their results are discarded by
    every caller), and with EVEN_K (K % BLOCK_D == 0) the loop's loads carry no mask at all: the shape of
    Triton's own matmul loop, which its software pipeliner handles best."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_D)
    # int64 row offsets: N·D and C·D exceed 2³¹ at the sizes this library exists for.
    a_tiles = a_ptr + tl.where(row_mask, rows, 0).to(tl.int64)[:, None] * stride_a + offs[None, :]
    b_tiles = b_ptr + tl.where(col_mask, cols, 0).to(tl.int64)[:, None] * stride_b + offs[None, :]
    for k0 in range(0, K, BLOCK_D):
        if EVEN_K:
            a_tile = tl.load(a_tiles)
            b_tile = tl.load(b_tiles)
        else:
            k_mask = (k0 + offs) < K
            a_tile = tl.load(a_tiles, mask=k_mask[None, :], other=0.0)
            b_tile = tl.load(b_tiles, mask=k_mask[None, :], other=0.0)
        acc = tl.dot(a_tile, tl.trans(b_tile), acc, input_precision=DOT_PRECISION)
        a_tiles += BLOCK_D
        b_tiles += BLOCK_D
    return acc


@triton.jit
def _grouped_tile(pid, num_row_blocks, num_col_tiles, GROUP_N: tl.constexpr):
    """(row block, column tile) of program pid when tiles go in groups of GROUP_N row blocks, the row
    block fastest within a group: the programs running at once touch GROUP_N blocks of x and a few
    column tiles of w, which L2 keeps."""
    per_group = GROUP_N * num_col_tiles
    first_row_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_N)
    in_group = pid % per_group
    return first_row_block + in_group % group_rows, in_group // group_rows


@triton.jit
def _best_subcenter_tile(x_ptr, w_ptr, col_scale_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                         HAS_COL_SCALE: tl.constexpr, SUBCENTERS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """(col_scale·(x·w) of the winning sub-centre, the winner) per cell: class j's sub-centres are rows
    jK … jK+K−1 of w, and the class takes the one with the largest col_scale·(x·w) (the first of equal ones;
    a NaN wins and stays, so that a NaN embedding gives a NaN loss). Only two tiles stay live across the K dot
    tiles (the caller gathers the winner's column scale): the dL/da kernel spilled at K = 3 with a third."""
    best = tl.full((BLOCK_N, BLOCK_C), -float("inf"), dtype=tl.float32)
    winner = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.int32)
    for k in tl.static_range(SUBCENTERS):
        w_rows = cols * SUBCENTERS + k
        candidate = _dot_tile(x_ptr, w_ptr, rows, w_rows, row_mask, col_mask, D, stride_x, stride_w, DOT_PRECISION,
                              BLOCK_N, BLOCK_C, BLOCK_D, EVEN_D)
        if HAS_COL_SCALE:
            candidate = candidate * tl.load(col_scale_ptr + w_rows, mask=col_mask, other=0.0)[None, :]
        better = (candidate > best) | ((candidate != candidate) & (best == best))
        best = tl.where(better, candidate, best)
        winner = tl.where(better, k, winner)
    return best, winner


@triton.jit
def _tanh(u):
    """tanh(u) within 3 ulp, relative (csrc/cpu/row_epilogue.h tanh_simd, tested there): 1 − 2/(e^{2u} + 1) for
    |u| ≥ 0.625 (saturates cleanly to ±1, keeps NaN), the Taylor series to u¹⁷ below, where that form's absolute
    error (~1e-7) would put the softcapped logit cap·tanh off by cap·1e-7. FMAs only on the series' side."""
    u2 = u * u
    series = u * (1.0 + u2 * (-0.33333334 + u2 * (0.13333334 + u2 * (-0.053968254 + u2 * (0.021869488 + u2 * (
        -0.008863236 + u2 * (0.0035921279 + u2 * (-0.0014558344 + u2 * 0.00059002743))))))))
    return tl.where(tl.abs(u) < 0.625, series, 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def _logit_tile(x_ptr, w_ptr, row_scale, col_scale_ptr, bias_ptr, softcap,
                rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, FROM_DOTS: tl.constexpr, EVEN_D: tl.constexpr,
                SUBCENTERS: tl.constexpr = 1):
    """Logits z, dz/da and the winning sub-centre (0 without sub-centres) for a BLOCK_N × BLOCK_C tile (target
    column not yet substituted). With SUBCENTERS = K > 1 a column is a class of K rows of w (engine.py)."""
    winner = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.int32)
    if SUBCENTERS > 1:
        best, winner = _best_subcenter_tile(x_ptr, w_ptr, col_scale_ptr, rows, cols, row_mask, col_mask, D,
                                            stride_x, stride_w, HAS_COL_SCALE, SUBCENTERS, DOT_PRECISION, BLOCK_N,
                                            BLOCK_C, BLOCK_D, EVEN_D)
        z = best * row_scale[:, None]  # best already carries its column scale
        scale = row_scale[:, None] + tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        if HAS_COL_SCALE:  # the winner's (only the dL/da kernel reads dz/da: the forward's compile drops this)
            scale = scale * tl.load(col_scale_ptr + (cols * SUBCENTERS)[None, :] + winner,
                                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        if FROM_DOTS:  # x_ptr is the (N, C) buffer of dot products, row stride stride_x
            tile = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
            acc = tl.load(tile, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        else:
            acc = _dot_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w, DOT_PRECISION,
                            BLOCK_N, BLOCK_C, BLOCK_D, EVEN_D)
        scale = row_scale[:, None] + tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        if HAS_COL_SCALE:
            scale = scale * tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        z = acc * scale
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    chain = scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
        chain = chain * (1.0 - t * t)
    return z, chain, winner


@triton.jit
def _reweight_hard_negatives(z, chain, threshold_ptr, coef_ptr, rows, row_mask):
    """(z, dz/da) with the hard negatives re-weighted (engine.HardNegatives): z ← (α·z + β)·z + γ and dz/da times
    2α·z + β where z > the row's threshold (a NaN threshold or z makes nothing hard). The target column is re-weighted
    too, and replaced after: both kernels substitute its logit and its dL/da."""
    threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=float("inf"))
    alpha = tl.load(coef_ptr)
    beta = tl.load(coef_ptr + 1)
    gamma = tl.load(coef_ptr + 2)
    hard = z > threshold[:, None]
    # this form keeps the dL/da kernel at 128 registers on sm_90 with Triton 3.6 (two 8-warp blocks per SM, as
    # without hard negatives); two tl.where of the full expressions took 194
    az = alpha * z
    slope = tl.where(hard, az + az + beta, 1.0)
    z = tl.where(hard, (az + beta) * z + gamma, z)
    return z, chain * slope


@triton.jit
def _as_int64(n):
    """An int argument as an int64 scalar, also where Triton's launcher made it the constant 1 (it specialises ints
    equal to 1), which has no .to(): added to an int64 zero."""
    return tl.full([], 0, tl.int64) + n


@triton.jit
def merge_splits_kernel(part_ptr, lse_ptr, sum_logits_ptr, expected_cost_ptr, others_ptr, N, num_splits,
                        NEED_SUM_LOGITS: tl.constexpr, HAS_COST: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_ENTROPY: tl.constexpr = False, HAS_TEACHER: tl.constexpr = False):
    """The forward's per-split states (part: planes × splits × N, planes = max, Σexp[, Σz][, Σe·(1 − A)]) merged
    per row in one launch: lse = M + log Σ_s Σexp_s·e^{max_s − M}, Σz summed, the cost weighted like Σexp.
    A row whose splits are all −inf gets lse −inf (shift 0, as torch.logsumexp), NaN stays NaN.

    With HAS_ENTROPY the planes are max, S′, T (engine.streaming_row_stats_with_entropy) and so are the outputs
    (M at lse_ptr, S′ at others_ptr, T at expected_cost_ptr): the first split holding
    M keeps its S′, the others join with (1 + S′_s)·e^{max_s − M}, and T_s moves to M as
    e^{max_s − M}·(T_s + (M − max_s)·(1 + S′_s)); every term ≥ 0.

    With HAS_TEACHER planes 2–5 are the teacher's (max, Σexp, cross sum) and the student's cross sum; the
    outputs are lse, the teacher's lse (at sum_logits_ptr), E_q[z^T − z] (at expected_cost_ptr) and E_p[z − z^T]
    (at others_ptr). Otherwise others_ptr gets the row max."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    n64 = _as_int64(N)  # int64 offsets: splits · N may pass 2³¹
    plane = n64 * num_splits
    top = tl.full((BLOCK,), -float("inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        top = tl.maximum(top, tl.load(part_ptr + s * n64 + rows, mask=mask, other=-float("inf")))
    shift = exp_shift(top)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_logits = tl.zeros((BLOCK,), dtype=tl.float32)
    cost = tl.zeros((BLOCK,), dtype=tl.float32)
    gap = tl.zeros((BLOCK,), dtype=tl.float32)
    taken = tl.zeros((BLOCK,), dtype=tl.int1)
    for s in range(0, num_splits):
        at = s * n64 + rows
        split_max = tl.load(part_ptr + at, mask=mask, other=-float("inf"))
        weight = tl.exp(split_max - shift)
        split_sum = tl.load(part_ptr + plane + at, mask=mask, other=0.0)
        if HAS_ENTROPY:
            # a split with a NaN logit has S′ NaN (its max may be −inf: tl.max skips NaN): it must reach the row
            present = (split_max > -float("inf")) | (split_sum != split_sum)
            keeps = present & (split_max == top) & (taken == 0)
            total += tl.where(keeps, split_sum, tl.where(present, (1.0 + split_sum) * weight, 0.0))
            taken = taken | keeps
            split_gap = tl.load(part_ptr + 2 * plane + at, mask=mask, other=0.0)
            gap += tl.where(present, weight * (split_gap + (shift - split_max) * (1.0 + split_sum)), 0.0)
        else:
            total += split_sum * weight
        if NEED_SUM_LOGITS:
            sum_logits += tl.load(part_ptr + 2 * plane + at, mask=mask, other=0.0)
        if HAS_COST:
            cost += tl.load(part_ptr + (2 + NEED_SUM_LOGITS) * plane + at, mask=mask, other=0.0) * weight
    if HAS_ENTROPY:
        tl.store(lse_ptr + rows, top, mask=mask)
        tl.store(others_ptr + rows, total, mask=mask)
        tl.store(expected_cost_ptr + rows, gap, mask=mask)
    elif HAS_TEACHER:
        teacher_top = tl.full((BLOCK,), -float("inf"), dtype=tl.float32)
        for s in range(0, num_splits):
            teacher_top = tl.maximum(teacher_top, tl.load(part_ptr + 2 * plane + s * n64 + rows, mask=mask,
                                                          other=-float("inf")))
        teacher_shift = exp_shift(teacher_top)
        teacher_total = tl.zeros((BLOCK,), dtype=tl.float32)
        teacher_cross = tl.zeros((BLOCK,), dtype=tl.float32)
        student_cross = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, num_splits):
            at = s * n64 + rows
            weight = tl.exp(tl.load(part_ptr + at, mask=mask, other=-float("inf")) - shift)
            teacher_weight = tl.exp(tl.load(part_ptr + 2 * plane + at, mask=mask, other=-float("inf")) - teacher_shift)
            teacher_total += tl.load(part_ptr + 3 * plane + at, mask=mask, other=0.0) * teacher_weight
            teacher_cross += tl.load(part_ptr + 4 * plane + at, mask=mask, other=0.0) * teacher_weight
            student_cross += tl.load(part_ptr + 5 * plane + at, mask=mask, other=0.0) * weight
        total = tl.where(mask, total, 1.0)
        teacher_total = tl.where(mask, teacher_total, 1.0)
        tl.store(lse_ptr + rows, shift + tl.log(total), mask=mask)
        tl.store(sum_logits_ptr + rows, teacher_shift + tl.log(teacher_total), mask=mask)
        tl.store(expected_cost_ptr + rows, teacher_cross / teacher_total, mask=mask)
        tl.store(others_ptr + rows, student_cross / total, mask=mask)
    else:
        total = tl.where(mask, total, 1.0)  # rows past N: no log(0)
        tl.store(lse_ptr + rows, shift + tl.log(total), mask=mask)
        tl.store(others_ptr + rows, top, mask=mask)  # the row max (token accuracy): N floats, always
        if NEED_SUM_LOGITS:
            tl.store(sum_logits_ptr + rows, sum_logits, mask=mask)
        if HAS_COST:
            tl.store(expected_cost_ptr + rows, cost / total, mask=mask)


@triton.jit
def _cost_cosine_tile(query_rows_ptr, keys_ptr, query_scale_ptr, key_scale_ptr, rows, cols, row_mask, col_mask,
                      E, stride_k, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_E: tl.constexpr):
    """A_nj = (q_n·k_j)·query_scale_n·key_scale_j: cosines of cost embeddings (EMO), with q_n the row
    query_rows_n of keys, gathered here (no (N, E) copy of the query rows exists)."""
    query_rows = tl.load(query_rows_ptr + rows, mask=row_mask, other=0)
    acc = _dot_tile(keys_ptr, keys_ptr, query_rows, cols, row_mask, col_mask, E, stride_k, stride_k, DOT_PRECISION,
                    BLOCK_N, BLOCK_C, BLOCK_D, EVEN_E)
    query_scale = tl.load(query_scale_ptr + rows, mask=row_mask, other=0.0)
    key_scale = tl.load(key_scale_ptr + cols, mask=col_mask, other=0.0)
    return acc * query_scale[:, None] * key_scale[None, :]


@triton.jit
def _row_block_and_split(N, num_splits, BLOCK_N: tl.constexpr):
    """This program's rows, their mask and its class split, in the forward kernels' 1-D grid: the splits of one row
    block are neighbours, so that they share its x block in L2 (module docstring)."""
    pid = tl.program_id(0)
    rows = (pid // num_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N, pid % num_splits


@triton.jit
def streaming_ce_fwd_kernel(
    x_ptr, w_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, target_ptr, target_logit_ptr,
    part_max_ptr, part_sumexp_ptr, part_sumlogit_ptr,
    query_rows_ptr, keys_ptr, query_scale_ptr, key_scale_ptr, part_cost_ptr, part_gap_ptr,
    teacher_x_ptr, teacher_w_ptr, part_teacher_ptr, hard_threshold_ptr, hard_coef_ptr,
    N, C, D, E, stride_x, stride_w, stride_k, stride_tx, stride_tw, classes_per_split, num_splits, softcap,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_SUM_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, FROM_DOTS: tl.constexpr = False,
    EVEN_D: tl.constexpr = False, FLATTEN: tl.constexpr = False, HAS_COST: tl.constexpr = False,
    COST_DOT_PRECISION: tl.constexpr = "tf32", EVEN_E: tl.constexpr = False, SUBCENTERS: tl.constexpr = 1,
    HAS_ENTROPY: tl.constexpr = False, HAS_TEACHER: tl.constexpr = False, HAS_HARD_NEGATIVES: tl.constexpr = False,
):
    """With HAS_HARD_NEGATIVES the non-target logits above the row's threshold are re-weighted first
    (_reweight_hard_negatives). With HAS_TEACHER (distillation; E is then the teacher's width) the teacher's logit tile
    row_scale·(teacher_x·teacher_wᵀ) runs beside the student's, and four more planes at part_teacher_ptr
    (each splits × N apart) keep its max and Σexp and the two cross sums Σ e^{z^T−max^T}·(z^T − z) and
    Σ e^{z−max}·(z − z^T) (engine.streaming_row_stats_with_teacher)."""
    rows, row_mask, split = _row_block_and_split(N, num_splits, BLOCK_N)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_mask, other=0.0)

    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    run_max = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sumlogit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_cost = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_others = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_teacher_max = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    run_teacher_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_teacher_cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_student_cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # FLATTEN: one software-pipelined loop over (class tile, k) instead of a K loop restarted per class
    # tile, whose pipeline drains at every tile (8 K steps per tile at D = 512); a tuning switch
    for c0 in tl.range(c_begin, c_end, BLOCK_C, flatten=FLATTEN):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < c_end
        z, _, _ = _logit_tile(x_ptr, w_ptr, row_scale, col_scale_ptr, bias_ptr, softcap,
                              rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                              HAS_COL_SCALE, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D,
                              FROM_DOTS, EVEN_D, SUBCENTERS)
        if HAS_HARD_NEGATIVES:  # (its dz/da is the dL/da kernel's: the compile drops it here)
            z, _ = _reweight_hard_negatives(z, z, hard_threshold_ptr, hard_coef_ptr, rows, row_mask)
        z = tl.where(cols[None, :] == target[:, None], target_logit[:, None], z)
        z = tl.where(col_mask[None, :], z, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        shift = exp_shift(new_max)  # a tile (or a whole split) can be all −inf
        rescale = tl.exp(run_max - shift)
        weights = tl.exp(z - shift[:, None])
        tile_sumexp = tl.sum(weights, axis=1)
        if HAS_ENTROPY:  # engine.streaming_row_stats_with_entropy: S′ = Σexp without one maximal cell, and
            # T = Σ e^{z−max}·(max − z), both sums of terms ≥ 0 (exact for confident rows, where Σexp − 1 and
            # the entropy are far below fp32's resolution of 1 and of max)
            present = run_max > -float("inf")
            old_total = tl.where(present, run_others + 1.0, 0.0)  # Σexp of the classes so far
            # T moves to the new max as T + (new − old)·Σexp; cells with e^{z−max} = 0 add 0, not 0·inf
            carried = tl.where(present, run_gap + (shift - run_max) * old_total, 0.0)
            gaps = tl.where(weights > 0, weights * (shift[:, None] - z), 0.0)
            run_gap = carried * rescale + tl.sum(gaps, axis=1)
            # a tile that raises the max: the classes so far join with their 1 + S′, and of the tile's cells
            # at the new max (each e^0 = 1 exactly) one is left out, counted apart from the others (below + count
            # − 1 would round them away against the 1); a NaN in the tile stays NaN
            tile_max = tl.max(z, axis=1)
            at_max = tl.where(z == tile_max[:, None], 1.0, 0.0)
            below_max = tl.sum(tl.where(z < tile_max[:, None], weights, 0.0), axis=1)
            tile_others = tl.where(tile_sumexp != tile_sumexp, tile_sumexp, below_max + (tl.sum(at_max, axis=1) - 1.0))
            run_others = tl.where(tile_max > run_max, old_total * rescale + tile_others, run_others + tile_sumexp)
        run_sumexp = run_sumexp * rescale + tile_sumexp
        if HAS_COST:  # Σ_{j≠t} e^{z_j − max}·(1 − A_nj), rescaled as Σexp is: EMO's expected cost after the
            # merge, a sum of non-negative terms (1 − Σ_j p_j·A_j would cancel as p_t → 1), target column left out
            cosines = _cost_cosine_tile(query_rows_ptr, keys_ptr, query_scale_ptr, key_scale_ptr, rows, cols,
                                        row_mask, col_mask, E, stride_k, COST_DOT_PRECISION, BLOCK_N, BLOCK_C,
                                        BLOCK_D, EVEN_E)
            # 1 − A ≥ 0 (a near-duplicate row's cosine can round above 1), NaN kept
            cost = tl.maximum(1.0 - cosines, 0.0, propagate_nan=tl.PropagateNan.ALL)
            costs = tl.where(cols[None, :] == target[:, None], 0.0, weights * cost)
            run_cost = run_cost * rescale + tl.sum(costs, axis=1)
        if HAS_TEACHER:  # the teacher's online log-sum-exp, and both cross sums rescaled with their own weights
            z_teacher = _dot_tile(teacher_x_ptr, teacher_w_ptr, rows, cols, row_mask, col_mask, E, stride_tx, stride_tw,
                                  COST_DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D, EVEN_E) * row_scale[:, None]
            z_teacher = tl.where(col_mask[None, :], z_teacher, -float("inf"))
            teacher_max = tl.maximum(run_teacher_max, tl.max(z_teacher, axis=1))
            teacher_shift = exp_shift(teacher_max)
            teacher_rescale = tl.exp(run_teacher_max - teacher_shift)
            teacher_weights = tl.exp(z_teacher - teacher_shift[:, None])
            gap = z_teacher - z  # ±inf or NaN where a head's logit is −inf: its weight there is 0, and adds 0
            run_teacher_sumexp = run_teacher_sumexp * teacher_rescale + tl.sum(teacher_weights, axis=1)
            run_teacher_cross = run_teacher_cross * teacher_rescale + tl.sum(
                tl.where(teacher_weights > 0, teacher_weights * gap, 0.0), axis=1)
            run_student_cross = run_student_cross * rescale - tl.sum(tl.where(weights > 0, weights * gap, 0.0), axis=1)
            run_teacher_max = teacher_max
        run_max = new_max
        if NEED_SUM_LOGITS:
            run_sumlogit += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sumexp_ptr + out, run_others if HAS_ENTROPY else run_sumexp, mask=row_mask)
    if NEED_SUM_LOGITS:
        tl.store(part_sumlogit_ptr + out, run_sumlogit, mask=row_mask)
    if HAS_COST:
        tl.store(part_cost_ptr + out, run_cost, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(part_gap_ptr + out, run_gap, mask=row_mask)
    if HAS_TEACHER:
        plane = _as_int64(num_splits) * N
        tl.store(part_teacher_ptr + out, run_teacher_max, mask=row_mask)
        tl.store(part_teacher_ptr + plane + out, run_teacher_sumexp, mask=row_mask)
        tl.store(part_teacher_ptr + 2 * plane + out, run_teacher_cross, mask=row_mask)
        tl.store(part_teacher_ptr + 3 * plane + out, run_student_cross, mask=row_mask)


@triton.jit
def _expm1(x):
    """e^x − 1 without cancellation near 0: the Taylor series to x⁷ where |x| < 0.5 (the remainder x⁸/8! reaches ~3
    ulp at |x| = 0.5: harmless for the loss), the plain difference elsewhere (±inf and NaN as that gives them)."""
    small = tl.abs(x) < 0.5
    t = tl.where(small, x, 0.0)
    series = t * (1.0 + t * (1.0 / 2 + t * (1.0 / 6 + t * (1.0 / 24 + t * (1.0 / 120 + t * (1.0 / 720
                                                                                            + t * (1.0 / 5040)))))))
    return tl.where(small, series, tl.exp(x) - 1.0)


@triton.jit
def _log1p(y):
    """log(1 + y) without cancellation near 0: 2·atanh(s), s = y/(2 + y), by its series to s¹¹ where |y| < 0.25
    (|s| < 1/7: the remainder is below fp32's resolution), log(1 + y) elsewhere."""
    small = tl.abs(y) < 0.25
    t = tl.where(small, y, 0.0)
    s = t / (2.0 + t)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11))))))
    return tl.where(small, series, tl.log(1.0 + y))


@triton.jit
def _log_ratio_to_mixture(log_p, log_q, beta, complement):
    """log(p/m), m = (1−β)·p + β·q, complement = 1 − β rounded apart (engine.log_ratio_to_mixture: its three forms of
    d = log q − log p and why)."""
    d = log_q - log_p
    high = d >= 80.0  # False for NaN, which the general form keeps
    low = (d < -1.0) & (beta > 0.5)
    far = high | low
    general = -_log1p(beta * _expm1(tl.where(far, 0.0, d)))
    # the two other forms share one exp and one log: −(d or 0) − log(a + b·e^{∓d})
    exponent = tl.where(high, -d, tl.where(low, d, 0.0))
    by_parts = -(tl.where(high, d, 0.0) + tl.log(tl.where(high, beta, complement)
                                                  + tl.where(high, complement, beta) * tl.exp(exponent)))
    return tl.where(far, by_parts, general)


@triton.jit
def jsd_row_sums_kernel(
    x_ptr, w_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, teacher_x_ptr, teacher_w_ptr, lse_ptr, teacher_lse_ptr,
    part_ptr, N, C, D, E, stride_x, stride_w, stride_tx, stride_tw, classes_per_split, num_splits, softcap, beta,
    one_minus_beta,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TEACHER_DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_E: tl.constexpr,
):
    """Σ_j p_j·log(p_j/m_j) and Σ_j q_j·log(q_j/m_j) of one (row block, class split), into the planes part[0] and
    part[1] (each splits × N); the host adds the splits. p and q from the known log-sum-exps, so these are plain
    sums (no running max): the split layout and program order of streaming_ce_fwd_kernel."""
    rows, row_mask, split = _row_block_and_split(N, num_splits, BLOCK_N)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    teacher_lse = tl.load(teacher_lse_ptr + rows, mask=row_mask, other=0.0)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    run_pm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_qm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in tl.range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < c_end
        z, _, _ = _logit_tile(x_ptr, w_ptr, row_scale, col_scale_ptr, bias_ptr, softcap,
                              rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                              HAS_COL_SCALE, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D,
                              False, EVEN_D)
        z_teacher = _dot_tile(teacher_x_ptr, teacher_w_ptr, rows, cols, row_mask, col_mask, E, stride_tx, stride_tw,
                              TEACHER_DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D, EVEN_E) * row_scale[:, None]
        log_p = z - lse[:, None]  # finite in the masked columns (their loads give 0), which p = q = 0 drops
        log_q = z_teacher - teacher_lse[:, None]
        p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
        q = tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
        # 0·log(0/m) = 0 where a probability is 0 (its ratio may be NaN there); a NaN probability stays NaN
        run_pm += tl.sum(tl.where(p == 0.0, 0.0, p * _log_ratio_to_mixture(log_p, log_q, beta, one_minus_beta)), axis=1)
        run_qm += tl.sum(tl.where(q == 0.0, 0.0, q * _log_ratio_to_mixture(log_q, log_p, one_minus_beta, beta)), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(part_ptr + out, run_pm, mask=row_mask)
    tl.store(part_ptr + _as_int64(num_splits) * N + out, run_qm, mask=row_mask)


@triton.jit
def streaming_ce_grad_logits_kernel(
    x_ptr, w_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, target_ptr,
    lse_ptr, coef_p_ptr, coef_u_ptr, target_grad_ptr, grad_ptr,
    query_rows_ptr, keys_ptr, query_scale_ptr, key_scale_ptr, coef_cost_ptr, target_subcenter_ptr, coef_entropy_ptr,
    teacher_x_ptr, teacher_w_ptr, teacher_lse_ptr, coef_q_ptr, coef_log_q_ptr, hard_threshold_ptr, hard_coef_ptr,
    N, D, E, stride_x, stride_w, stride_g, stride_k, stride_tx, stride_tw, c_begin, c_end, softcap, jsd_beta,
    jsd_one_minus_beta,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, COST_DOT_PRECISION: tl.constexpr, SATURATE_FP16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, FROM_DOTS: tl.constexpr = False,
    EVEN_D: tl.constexpr = False, EVEN_E: tl.constexpr = False, GROUP_N: tl.constexpr = 8,
    SUBCENTERS: tl.constexpr = 1, HAS_ENTROPY: tl.constexpr = False, HAS_TEACHER: tl.constexpr = False,
    JSD: tl.constexpr = False, HAS_HARD_NEGATIVES: tl.constexpr = False,
):
    """With HAS_HARD_NEGATIVES the hard negatives' z and dz/da are re-weighted (_reweight_hard_negatives). With
    HAS_TEACHER (distillation; E the teacher's width) the teacher's tile z^T is recomputed and
    −coef_q·q + coef_log_q·p·log q added, q = exp(z^T − teacher_lse) (engine.py); with JSD as well,
    coef_log_q·p·log(p/m) instead, m = (1 − jsd_beta)·p + jsd_beta·q. With SUBCENTERS = K > 1, grad has (c_end − c_begin)·K columns, the rows of w of the chunk's classes,
    and must come zeroed: a class's dL/da is stored at its winning sub-centre only (the target's at
    target_subcenter). One scattered store instead of K masked ones: those spilled registers at K = 2, 3."""
    pid_n, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(c_end - c_begin, BLOCK_C), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = c_begin + pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < c_end
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    z, chain, winner = _logit_tile(x_ptr, w_ptr, row_scale, col_scale_ptr, bias_ptr, softcap,
                                   rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                                   HAS_COL_SCALE, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D,
                                   FROM_DOTS, EVEN_D, SUBCENTERS)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef_p = tl.load(coef_p_ptr + rows, mask=row_mask, other=0.0)
    coef_u = tl.load(coef_u_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    if HAS_HARD_NEGATIVES:
        z, chain = _reweight_hard_negatives(z, chain, hard_threshold_ptr, hard_coef_ptr, rows, row_mask)
    target_grad = tl.load(target_grad_ptr + rows, mask=row_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    weight_p = coef_p[:, None] + tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    if HAS_COST:
        cosines = _cost_cosine_tile(query_rows_ptr, keys_ptr, query_scale_ptr, key_scale_ptr, rows, cols, row_mask,
                                    col_mask, E, stride_k, COST_DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D, EVEN_E)
        coef_cost = tl.load(coef_cost_ptr + rows, mask=row_mask, other=0.0)
        weight_p = weight_p - coef_cost[:, None] * cosines
    g = weight_p * p
    if HAS_ENTROPY:  # −coef·p·log p, 0 where p = 0 (log p may be −inf there)
        coef_entropy = tl.load(coef_entropy_ptr + rows, mask=row_mask, other=0.0)
        g = g - coef_entropy[:, None] * tl.where(p > 0, p * log_p, 0.0)
    if HAS_TEACHER:
        z_teacher = _dot_tile(teacher_x_ptr, teacher_w_ptr, rows, cols, row_mask, col_mask, E, stride_tx, stride_tw,
                              COST_DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D, EVEN_E) * row_scale[:, None]
        log_q = z_teacher - tl.load(teacher_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
        coef_log_q = tl.load(coef_log_q_ptr + rows, mask=row_mask, other=0.0)
        if JSD:  # 0 where p = 0 (its ratio may be NaN there); a NaN p stays NaN
            g = g + tl.where(p == 0.0, 0.0, coef_log_q[:, None] * p * _log_ratio_to_mixture(log_p, log_q, jsd_beta,
                                                                                             jsd_one_minus_beta))
        else:
            coef_q = tl.load(coef_q_ptr + rows, mask=row_mask, other=0.0)
            # p·log q only where its coefficient is not 0 (forward KL: a −inf teacher logit would give 0·(−inf))
            g = g - coef_q[:, None] * tl.exp(log_q) + tl.where((p > 0) & (coef_log_q[:, None] != 0),
                                                               coef_log_q[:, None] * p * log_q, 0.0)
    g = (g - coef_u[:, None]) * chain
    is_target = cols[None, :] == target[:, None]
    g = tl.where(is_target, target_grad[:, None], g)
    if SATURATE_FP16:  # degenerate rows/columns saturate instead of turning into inf (see engine.py);
        # NaN stays NaN (tl.minimum/tl.maximum return the other operand), so that GradScaler sees it
        g = tl.where(g != g, g, tl.minimum(tl.maximum(g, -65504.0), 65504.0))
    out = grad_ptr + rows.to(tl.int64)[:, None] * stride_g
    store_mask = row_mask[:, None] & col_mask[None, :]
    if SUBCENTERS > 1:
        target_subcenter = tl.load(target_subcenter_ptr + rows, mask=row_mask, other=0)
        winner = tl.where(is_target, target_subcenter[:, None].to(tl.int32), winner)
        tl.store(out + ((cols - c_begin) * SUBCENTERS)[None, :] + winner, g.to(grad_ptr.dtype.element_ty),
                 mask=store_mask)
    else:
        tl.store(out + (cols - c_begin)[None, :], g.to(grad_ptr.dtype.element_ty), mask=store_mask)
