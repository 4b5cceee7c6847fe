"""In-place tangent projection of weight-gradient rows: g_j ← g_j − w_j·(w_j·g_j)·inv_norm_sq_j.

The normalised margin losses chain dW through ŵ = w/‖w‖ once per class chunk. In PyTorch that is
an fp32 copy of the W chunk, a product, a row sum, a scaled copy and a subtraction (≈ 30 bytes of
traffic per element); this kernel reads g (fp32) and w once per pass and writes g back.
"""
import torch
import triton
import triton.language as tl

from .device import on_device


@triton.jit
def project_out_rows_kernel(g_ptr, w_ptr, inv_norm_sq_ptr, R, D, stride_g, stride_w,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_g
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs < D)[None, :]
        g = tl.load(g_rows + offs[None, :], mask=mask, other=0.0)
        w = tl.load(w_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * w, axis=1)
    radial = dot * tl.load(inv_norm_sq_ptr + rows, mask=row_mask, other=0.0)
    for d0 in range(0, D, BLOCK_D):  # the rows were just read: this pass is served from L2
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs < D)[None, :]
        g = tl.load(g_rows + offs[None, :], mask=mask, other=0.0)
        w = tl.load(w_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(g_rows + offs[None, :], g - radial[:, None] * w, mask=mask)


def project_out_rows(grad, weight, inv_norm_sq):
    """grad (R, D) fp32, modified in place and returned; weight (R, D) any float dtype; inv_norm_sq (R,)."""
    R, D = grad.shape
    if R == 0:
        return grad
    assert grad.dtype == torch.float32 and grad.stride(1) == 1 and weight.stride(1) == 1
    block_d = min(256, triton.next_power_of_2(max(D, 16)))
    with on_device(grad):
        project_out_rows_kernel[(triton.cdiv(R, 8),)](
            grad, weight, inv_norm_sq.float().contiguous(), R, D, grad.stride(0), weight.stride(0),
            BLOCK_R=8, BLOCK_D=block_d)
    return grad
