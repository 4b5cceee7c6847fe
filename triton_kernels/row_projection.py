"""Finishing rows of a gradient in one pass: out_j = s·(g_j − w_j·(w_j·g_j)·inv_norm_j²) (the tangent
projection that chains a row-normalised matrix; without PROJECT just out_j = s·g_j), written in out's dtype.

Used for each class chunk of dW (w = the class centres) and for dX of the normalised margin losses
(w = x). The engine's backward GEMM leaves a chunk of dW in fp32 (multiplied by the fp16 gradient scale).
In PyTorch, unscaling (`mul_`), projecting (a product, a row sum, a scaled subtraction) and casting into
the 16-bit dW each read and write the fp32 chunk: ≈ 24 bytes of traffic per element (≈ 12 GB at ArcFace
1M). This kernel reads g and w and writes out once per element (≈ 8–10 bytes; the second read of a row
comes from L2). s is a device scalar, so unscaling needs no host sync.
"""
import torch
import triton
import triton.language as tl

from .device import on_device


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
    """out ← scale·P(grad) in out's dtype, P the tangent projection by (weight, inv_norm = 1/‖weight_j‖) or the identity.
    grad (R, D) fp32; scale a 0-dim tensor; out (R, D), may be grad itself or a row slice of a larger tensor;
    weight (R, D) any float dtype; inv_norm (R,)."""
    R, D = grad.shape
    if R == 0:
        return out
    project = weight is not None
    assert grad.dtype == torch.float32 and grad.stride(1) == 1 and out.stride(1) == 1 and out.shape == grad.shape
    if project:
        assert weight.stride(1) == 1 and weight.shape == grad.shape
    block_d = min(256, triton.next_power_of_2(max(D, 16)))
    with on_device(grad):
        finish_grad_rows_kernel[(triton.cdiv(R, 8),)](
            grad, weight if project else grad, inv_norm.float().contiguous() if project else grad,
            scale.float().reshape(1), out, R, D, grad.stride(0), weight.stride(0) if project else 0, out.stride(0),
            PROJECT=project, BLOCK_R=8, BLOCK_D=block_d)
    return out
