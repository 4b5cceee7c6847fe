"""Finishing rows of a gradient in one pass: out_j = s·(g_j − w_j·(w_j·g_j)·inv_norm_j²) (the tangent
projection that chains a row-normalised matrix; without PROJECT just out_j = s·g_j), written in out's dtype.

Used for each class chunk of dW (w = the class centres) and for dX of the normalised margin losses
(w = x). The engine's backward GEMM leaves a chunk of dW in fp32 (multiplied by the fp16 gradient scale).
In PyTorch, unscaling (`mul_`), projecting (a product, a row sum, a scaled subtraction) and casting into
the 16-bit dW each read and write the fp32 chunk: ≈ 24 bytes of traffic per element (≈ 12 GB at ArcFace
1M). This kernel reads g and w and writes out once per element (≈ 8–10 bytes; the second read of a row
comes from L2). s is a device scalar, so unscaling needs no host sync.

`projected_weight_grad` goes one step further for embedding widths up to 512 (face recognition): the dW
GEMM of a chunk (Σ_n G_nj x_n) and the projection in one kernel, a program holding whole rows of D in its
accumulator, so no fp32 dW chunk exists at all: its 4 bytes per element are neither written nor read back,
and the backward's chunk budget holds G alone (twice the classes per chunk, half the chunk loop's launches).
"""
import torch
import triton
import triton.language as tl

from .device import FP_FUSION, cdiv, fp32, next_power_of_2, on_device
from .streaming_ce import _as_int64


@triton.jit
def finish_grad_rows_kernel(g_ptr, w_ptr, inv_norm_ptr, scale_ptr, out_ptr, R, D, stride_g, stride_w,
                              stride_out, PROJECT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_g
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    scale = tl.load(scale_ptr)
    radial = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if PROJECT:
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (offs < D)[None, :]
            g = tl.load(g_rows + offs[None, :], mask=mask, other=0.0)
            w = tl.load(w_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(g * w, axis=1)
        inv_norm = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)
        radial = dot * inv_norm * inv_norm
    for d0 in range(0, D, BLOCK_D):  # a projected row was just read: this pass is served from L2
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs < D)[None, :]
        g = tl.load(g_rows + offs[None, :], mask=mask, other=0.0)
        if PROJECT:
            w = tl.load(w_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            g = g - radial[:, None] * w
        tl.store(out_rows + offs[None, :], (g * scale).to(out_ptr.dtype.element_ty), mask=mask)


def finish_grad_rows(grad, scale, out, weight=None, inv_norm=None):
    """out ← scale·P(grad) in out's dtype, P the tangent projection by (weight, inv_norm = 1/‖weight_j‖) or
    the identity.
    grad (R, D) fp32; scale a 0-dim tensor; out (R, D), may be grad itself or a row slice of a larger tensor;
    weight (R, D) any float dtype; inv_norm (R,)."""
    R, D = grad.shape
    if R == 0:
        return out
    project = weight is not None
    assert grad.dtype == torch.float32 and grad.stride(1) == 1 and out.stride(1) == 1 and out.shape == grad.shape
    if project:
        assert weight.stride(1) == 1 and weight.shape == grad.shape
    block_d = min(256, next_power_of_2(max(D, 16)))
    with on_device(grad):
        finish_grad_rows_kernel[(cdiv(R, 8),)](
            grad, weight if project else grad, fp32(inv_norm).contiguous() if project else grad,
            fp32(scale), out, R, D, grad.stride(0), weight.stride(0) if project else 0, out.stride(0),
            PROJECT=project, BLOCK_R=8, BLOCK_D=block_d, **FP_FUSION)
    return out


# Register-limited: a program holds BLOCK_R × BLOCK_D fp32 accumulators plus a w tile of the same shape
# (bench/sm90_compile.py: 64 × 512 needs 16 warps, 128 registers each, and spills ~100 bytes).
PROJECTED_DW_MAX_D = 512


@triton.jit
def projected_weight_grad_kernel(g_ptr, x_ptr, w_ptr, inv_norm_ptr, scale_ptr, out_ptr, N, R, D, stride_g,
                                 stride_x, stride_w, stride_out, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr):
    """out_j = s·P_j(Σ_n g[n, j]·x_n) for the R classes of a chunk (g: N × R, row stride stride_g): the
    chunk's dW GEMM with the tangent projection of finish_grad_rows_kernel as its epilogue."""
    classes = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    class_mask = classes < R
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    # g tiles (BLOCK_K × BLOCK_R, classes contiguous; clamped classes read class 0, discarded), transposed
    # for the dot, and x tiles (BLOCK_K × BLOCK_D)
    g_tiles = g_ptr + k.to(tl.int64)[:, None] * stride_g + tl.where(class_mask, classes, 0)[None, :]
    x_tiles = x_ptr + k.to(tl.int64)[:, None] * stride_x + d[None, :]
    for n0 in range(0, N, BLOCK_K):
        if EVEN_N:
            g_tile = tl.load(g_tiles)
            x_tile = tl.load(x_tiles, mask=d_mask[None, :], other=0.0)
        else:
            n_mask = (n0 + k) < N
            g_tile = tl.load(g_tiles, mask=n_mask[:, None], other=0.0)
            x_tile = tl.load(x_tiles, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g_tile), x_tile, acc, input_precision=DOT_PRECISION)
        g_tiles += BLOCK_K * _as_int64(stride_g)  # int64: 32 · stride passes 2³¹ at a stride of 2²⁶
        x_tiles += BLOCK_K * _as_int64(stride_x)
    rows_mask = class_mask[:, None] & d_mask[None, :]
    w = tl.load(w_ptr + classes.to(tl.int64)[:, None] * stride_w + d[None, :], mask=rows_mask,
                other=0.0).to(tl.float32)
    inv_norm = tl.load(inv_norm_ptr + classes, mask=class_mask, other=0.0)
    radial = tl.sum(acc * w, axis=1) * inv_norm * inv_norm
    out = (acc - radial[:, None] * w) * tl.load(scale_ptr)
    tl.store(out_ptr + classes.to(tl.int64)[:, None] * stride_out + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows_mask)


def projected_weight_grad_blocks(D, on_gpu):
    """Block sizes and launch options of projected_weight_grad_kernel for width D (≤ PROJECTED_DW_MAX_D)."""
    block_d = next_power_of_2(max(D, 16))
    if not on_gpu:  # the interpreter: small tiles, so that small test shapes cross every tile boundary
        return dict(BLOCK_R=16, BLOCK_K=16, BLOCK_D=block_d), {}
    return dict(BLOCK_R=64, BLOCK_K=32, BLOCK_D=block_d), dict(num_warps=16 if block_d > 256 else 8, num_stages=3)


def projected_weight_grad(g, x, weight, inv_norm, scale, out):
    """out ← scale·P(gᵀ·x) in out's dtype, P the tangent projection by (weight, inv_norm = 1/‖weight_j‖):
    g (N, R) in x's dtype (row stride free, unit column stride), x (N, D) contiguous, weight and out (R, D)
    with unit column stride, D ≤ PROJECTED_DW_MAX_D, scale a 0-dim tensor."""
    N, R = g.shape
    D = x.shape[1]
    if R == 0:
        return out
    assert D <= PROJECTED_DW_MAX_D and g.stride(1) == 1 and x.stride(1) == 1 and weight.stride(1) == 1
    assert out.stride(1) == 1 and out.shape == (R, D) and weight.shape == (R, D) and g.dtype == x.dtype
    blocks, launch = projected_weight_grad_blocks(D, g.is_cuda)
    with on_device(g):
        projected_weight_grad_kernel[(cdiv(R, blocks["BLOCK_R"]),)](
            g, x, weight, fp32(inv_norm).contiguous(), fp32(scale), out, N, R, D, g.stride(0),
            x.stride(0), weight.stride(0), out.stride(0), EVEN_N=N % blocks["BLOCK_K"] == 0,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **blocks, **launch, **FP_FUSION)
    return out
