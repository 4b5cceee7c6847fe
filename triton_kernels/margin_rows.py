"""The margin losses' per-row target math in one launch per pass (marginkern/margin_ce.py has the PyTorch
twin, `target_rows` and `target_grad_rows`, which defines it and which these kernels are tested against).

Per row the forward needs ‖x‖, ‖w_y‖, the target cosine c_y, the margin ψ(c_y) (marginkern/margin.py),
the logits' row scale and the target logit; the backward turns the saved (‖x‖, ‖w_y‖, c_y, ψ) and the lse
into the engine's coefficients. In PyTorch that is ~35 small ops per pass (~20 forward, ~15 backward, each
a launch and a dispatcher call): at face-small shapes (N = 256) the host side of a step, not the GPU,
sets its time. Here each pass is one program per block of rows.

With ROW_MARGINS, row n's margins are m2 + Δm2_n and m3 + Δm3_n, the offsets read from an (N, 2) fp32 tensor
(AdaFace, MagFace, ElasticFace).

Norms, cosines and quotients are IEEE-rounded (sqrt_rn, div_rn: a GPU's default sqrt and division are approximate,
up to 2 ulp), as the C++ kernels and the PyTorch twin; per row, they cost nothing.

acos is not a Triton primitive; `_acos` is Cephes' single-precision arcsine polynomial (≤ 1 ulp-ish, about
2e-7 rad), with acos(|c|) = 2·asin(√((1−|c|)/2)) above 0.5, which keeps θ accurate near c = ±1 where
acos is steep.
"""
import math

import torch
import triton
import triton.language as tl

from .device import FP_FUSION, cdiv, fp32, next_power_of_2, on_device
from .row_dots import row_dots

from ..engine import NORM_EPS as _NORM_EPS
from ..margin import EXACT_SLOPE_MIN_ANGLE as _EXACT_SLOPE_MIN_ANGLE

# globals a @triton.jit function reads must be constexpr (the interpreter would not notice)
NORM_EPS = tl.constexpr(_NORM_EPS)
EXACT_SLOPE_MIN_ANGLE = tl.constexpr(_EXACT_SLOPE_MIN_ANGLE)
PI = tl.constexpr(math.pi)
# min/max that propagate NaN: Triton's default (and the GPU's max.f32, and the interpreter) return the other
# operand, which would turn a NaN embedding into a finite loss
NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _asin_small(x):
    """asin(x) for |x| ≤ 0.5 (Cephes asinf)."""
    z = x * x
    p = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z \
        + 1.6666752422e-1
    return x + x * z * p


@triton.jit
def _acos(c):
    a = tl.abs(c)
    # acos(|c|) for |c| > 0.5; NaN stays NaN (every clamp here propagates it, as torch's do)
    half_angle = 2.0 * _asin_small(tl.sqrt_rn(tl.maximum((1.0 - a) * 0.5, 0.0, propagate_nan=NAN)))
    far = tl.where(c < 0, PI - half_angle, half_angle)
    return tl.where(a <= 0.5, 0.5 * PI - _asin_small(c), far)


@triton.jit
def _parity_sign(k):
    """(−1)^k for a float holding an integer."""
    return 1.0 - 2.0 * (k - 2.0 * tl.floor(0.5 * k))


@triton.jit
def _margin_psi(cosine, m1, m2, m3):
    """ψ(c) = (−1)^k cos φ − 2k − m3, φ = m1·acos(c) + m2, k = ⌊φ/π⌋ (marginkern.margin.margin_psi)."""
    phi = m1 * _acos(cosine) + m2
    k = tl.floor(phi / PI)
    return _parity_sign(k) * tl.cos(phi) - 2.0 * k - m3


@triton.jit
def _margin_slope(cosine, m1, m2, EXACT: tl.constexpr):
    """dψ/dc, exact with θ clamped to [θ_min, π − θ_min], or 1 (marginkern.margin.margin_slope)."""
    if EXACT:
        theta = tl.minimum(tl.maximum(_acos(cosine), EXACT_SLOPE_MIN_ANGLE, propagate_nan=NAN),
                           PI - EXACT_SLOPE_MIN_ANGLE, propagate_nan=NAN)
        phi = m1 * theta + m2
        sign = _parity_sign(tl.floor(phi / PI))
        return tl.maximum(sign * m1 * tl.sin(phi) / tl.sin(theta), 0.0, propagate_nan=NAN)
    else:
        return tl.full(cosine.shape, 1.0, tl.float32)


@triton.jit
def _target_columns(target_ptr, rows, row_mask, ignore_index, class_start, num_local):
    """(valid, owned, column): column = the target's class within w (−1 where ignored or held elsewhere)."""
    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    valid = target != ignore_index
    local = target - class_start
    owned = valid & (local >= 0) & (local < num_local)
    return valid, owned, tl.where(owned, local, -1)


@triton.jit
def _target_geometry(x_rows, w_ptr, w_row, row_mask, owned, D, stride_w, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """(‖x‖, ‖w_row‖, their cosine clamped to [−1, 1]) per row; NaN-propagating clamps (as torch's clamp): a
    NaN or inf embedding must give a NaN row, not ‖x‖ = ε."""
    w_rows = w_ptr + w_row.to(tl.int64)[:, None] * stride_w
    xx, ww, xw = row_dots(x_rows, w_rows, row_mask, row_mask & owned, D, BLOCK_R, BLOCK_D)
    x_norm = tl.maximum(tl.sqrt_rn(xx), NORM_EPS, propagate_nan=NAN)
    w_norm = tl.maximum(tl.sqrt_rn(ww), NORM_EPS, propagate_nan=NAN)
    cosine = tl.minimum(tl.maximum(tl.div_rn(xw, x_norm * w_norm), -1.0, propagate_nan=NAN), 1.0,
                        propagate_nan=NAN)
    return x_norm, w_norm, cosine


@triton.jit
def margin_target_rows_kernel(x_ptr, w_ptr, target_ptr, column_ptr, row_state_ptr, row_scale_ptr,
                              target_logit_ptr, N, D, num_local, class_start, ignore_index, stride_x, stride_w,
                              scale, m1, m2, m3, lam, row_margins_ptr, NORMALIZE: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SUBCENTERS: tl.constexpr = 1,
                              ROW_MARGINS: tl.constexpr = False):
    """With SUBCENTERS = K > 1 the target is the class's sub-centre of largest cosine (the first of equal ones,
    a NaN wins and stays, as torch.max and the engine kernels), its index the row state's fifth column."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    _, owned, column = _target_columns(target_ptr, rows, row_mask, ignore_index, class_start, num_local)
    tl.store(column_ptr + rows, column, mask=row_mask)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    first_row = tl.maximum(column, 0) * SUBCENTERS
    x_norm, w_norm, cosine = _target_geometry(x_rows, w_ptr, first_row, row_mask, owned, D, stride_w, BLOCK_R,
                                              BLOCK_D)
    subcenter = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in tl.static_range(1, SUBCENTERS):
        _, w_norm_k, cosine_k = _target_geometry(x_rows, w_ptr, first_row + k, row_mask, owned, D, stride_w,
                                                 BLOCK_R, BLOCK_D)
        better = (cosine_k > cosine) | ((cosine_k != cosine_k) & (cosine == cosine))
        cosine = tl.where(better, cosine_k, cosine)
        w_norm = tl.where(better, w_norm_k, w_norm)
        subcenter = tl.where(better, k * 1.0, subcenter)
    if ROW_MARGINS:
        m2 = m2 + tl.load(row_margins_ptr + 2 * rows, mask=row_mask, other=0.0)
        m3 = m3 + tl.load(row_margins_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
    psi = tl.div_rn(lam * cosine + _margin_psi(cosine, m1, m2, m3), 1.0 + lam)  # λ = 0: ψ itself, to the last bit
    if NORMALIZE:
        row_scale = tl.div_rn(scale + tl.zeros_like(x_norm), x_norm)
        target_logit = scale * psi
    else:
        row_scale = tl.full((BLOCK_R,), 1.0, tl.float32) * scale
        target_logit = scale * x_norm * w_norm * psi
    state = row_state_ptr + rows.to(tl.int64) * (4 + (SUBCENTERS > 1))
    tl.store(state, x_norm, mask=row_mask)
    tl.store(state + 1, w_norm, mask=row_mask)
    tl.store(state + 2, cosine, mask=row_mask)
    tl.store(state + 3, psi, mask=row_mask)
    if SUBCENTERS > 1:
        tl.store(state + 4, subcenter, mask=row_mask)
    tl.store(row_scale_ptr + rows, row_scale, mask=row_mask)
    tl.store(target_logit_ptr + rows, tl.where(owned, target_logit, 0.0), mask=row_mask)


@triton.jit
def margin_target_grad_rows_kernel(row_state_ptr, lse_ptr, grad_loss_ptr, target_ptr, column_ptr, row_scale_ptr,
                                   target_logit_ptr, coef_p_ptr, coef_u_ptr, target_grad_ptr, radial_ptr, N,
                                   num_local, class_start, ignore_index, scale, m1, m2, lam, smoothing, num_classes,
                                   row_margins_ptr, NORMALIZE: tl.constexpr, EXACT: tl.constexpr,
                                   BLOCK_R: tl.constexpr, ROW_MARGINS: tl.constexpr = False):
    """Per row: row scale, target logit, coef_p = g, coef_u = g·ε/C, target_grad, radial term."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    valid, owned, column = _target_columns(target_ptr, rows, row_mask, ignore_index, class_start, num_local)
    tl.store(column_ptr + rows, column, mask=row_mask)
    state = row_state_ptr + rows.to(tl.int64) * 4
    x_norm = tl.load(state, mask=row_mask, other=1.0)
    w_norm = tl.load(state + 1, mask=row_mask, other=1.0)
    cosine = tl.load(state + 2, mask=row_mask, other=0.0)
    psi = tl.load(state + 3, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where(valid, tl.load(grad_loss_ptr + rows, mask=row_mask, other=0.0), 0.0)
    if NORMALIZE:
        row_scale = tl.div_rn(scale + tl.zeros_like(x_norm), x_norm)
        target_logit = tl.where(owned, scale * psi, 0.0)
    else:
        row_scale = tl.full((BLOCK_R,), 1.0, tl.float32) * scale
        target_logit = tl.where(owned, scale * x_norm * w_norm * psi, 0.0)
    # the target column's terms belong to the slice that holds it (only there is T known)
    grad_target_logit = tl.where(owned, g * (tl.exp(target_logit - lse) - (1.0 - smoothing) - smoothing / num_classes),
                                 0.0)
    if ROW_MARGINS:
        m2 = m2 + tl.load(row_margins_ptr + 2 * rows, mask=row_mask, other=0.0)
    slope = tl.div_rn(lam + _margin_slope(cosine, m1, m2, EXACT), 1.0 + lam)  # of the λ-eased ψ the row state holds
    if NORMALIZE:  # dT/da_y with the norms held fixed; the tangent projections chain through x̂ and ŵ
        target_grad = tl.div_rn(grad_target_logit * scale * slope, x_norm * w_norm)
        radial = tl.zeros((BLOCK_R,), dtype=tl.float32)
    else:  # T = s·‖x‖‖w_y‖·ψ(c): the cross term through the target column, the radial terms by the caller
        target_grad = grad_target_logit * scale * slope
        # masked, not just multiplied by dL/dT = 0: a row without its target here may hold a NaN ψ (a NaN margin)
        radial = tl.where(owned, grad_target_logit * scale * (psi - cosine * slope), 0.0)
    tl.store(row_scale_ptr + rows, row_scale, mask=row_mask)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask)
    tl.store(coef_p_ptr + rows, g, mask=row_mask)
    tl.store(coef_u_ptr + rows, g * (smoothing / num_classes), mask=row_mask)
    tl.store(target_grad_ptr + rows, target_grad, mask=row_mask)
    tl.store(radial_ptr + rows, radial, mask=row_mask)


BLOCK_ROWS = 32
# the target-geometry kernel's launch: 32 rows × 32 features per step at 4 warps compiles for sm_90 without spills
# (ptxas's count) for fp32 and bf16 rows, D a multiple of 16 or not, with sub-centres and per-row margins (≤ 158
# registers, a ≤ 32-byte stack frame for the calls of libdevice's cos/sin and the IEEE division); 256 features
# spilled up to 2.6 KB (fp32 rows), and 64 features at 8 warps 8 B at odd D
BLOCK_FEATURES = 32
TARGET_ROWS_WARPS = 4


def _row_margins_arg(row_margins, like):
    """(pointer argument, ROW_MARGINS) for the kernels: the (N, 2) offsets as contiguous fp32, or a dummy."""
    if row_margins is None:
        return like, False
    return fp32(row_margins).contiguous(), True


def margin_target_rows(x, w, target, scale, m1, m2, m3, normalize, ignore_index, class_start=0, subcenters=1,
                       lambda_=0.0, row_margins=None):
    """(column (N,) int64, row state (N, 4) fp32 = ‖x‖, ‖w_y‖, c_y, ψ, row scale (N,), target logit (N,)) for
    x (N, D) and the classes [class_start, class_start + len(w) / K) in w (C_local·K, D) with K = subcenters
    rows per class; targets elsewhere or ignored get column −1 and target logit 0. With K > 1 w_y is the target
    class's sub-centre of largest cosine and the row state (N, 5) holds its index last. row_margins (N, 2): per-row
    offsets added to m2 and m3."""
    N, D = x.shape
    column = torch.empty(N, dtype=torch.int64, device=x.device)
    row_state = torch.empty(N, 4 + (subcenters > 1), dtype=torch.float32, device=x.device)
    row_scale, target_logit = torch.empty(2, N, dtype=torch.float32, device=x.device)
    if N > 0:
        margins, has_margins = _row_margins_arg(row_margins, row_scale)
        with on_device(x):
            margin_target_rows_kernel[(cdiv(N, BLOCK_ROWS),)](
                x, w, target, column, row_state, row_scale, target_logit, N, D, w.shape[0] // subcenters,
                class_start, ignore_index, x.stride(0), w.stride(0), scale, m1, m2, m3, lambda_, margins,
                NORMALIZE=normalize, BLOCK_R=BLOCK_ROWS, BLOCK_D=min(BLOCK_FEATURES, next_power_of_2(max(D, 16))),
                SUBCENTERS=subcenters, ROW_MARGINS=has_margins, num_warps=TARGET_ROWS_WARPS, **FP_FUSION)
    return column, row_state, row_scale, target_logit


def margin_target_grad_rows(row_state, lse, grad_loss, target, scale, m1, m2, normalize, exact, smoothing,
                            ignore_index, num_classes, num_local, class_start=0, lambda_=0.0, row_margins=None):
    """(column, (6, N) fp32 planes: row scale, target logit, coef_p, coef_u, target_grad, radial term) from the
    forward's row state (margin_target_rows), the lse and the per-row loss gradient."""
    N = row_state.shape[0]
    column = torch.empty(N, dtype=torch.int64, device=row_state.device)
    planes = torch.empty(6, N, dtype=torch.float32, device=row_state.device)
    if N > 0:
        margins, has_margins = _row_margins_arg(row_margins, planes)
        with on_device(row_state):
            margin_target_grad_rows_kernel[(cdiv(N, BLOCK_ROWS),)](
                fp32(row_state).contiguous(), fp32(lse).contiguous(), fp32(grad_loss).contiguous(), target,
                column, *planes, N, num_local, class_start, ignore_index, scale, m1, m2, lambda_, smoothing,
                num_classes, margins, NORMALIZE=normalize, EXACT=exact, BLOCK_R=BLOCK_ROWS, ROW_MARGINS=has_margins,
                **FP_FUSION)
    return column, planes
