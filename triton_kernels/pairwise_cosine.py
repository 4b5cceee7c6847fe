"""Row-wise cosine of two embedding batches, cos_i = a_i·b_i / (‖a_i‖‖b_i‖), forward and backward in one
read of each batch (CoSENT's fused-cosine path). fp32 accumulation; the cosines and inverse norms in fp32, the
gradients in the input dtype."""
import torch
import triton
import triton.language as tl

from ..engine import NORM_EPS
from .device import FP_FUSION, cdiv, fp32, next_power_of_2, on_device
from .row_dots import row_dots


@triton.jit
def pairwise_cosine_fwd_kernel(a_ptr, b_ptr, cos_ptr, inv_a_ptr, inv_b_ptr, B, D, stride_a, stride_b, eps,
                               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_b
    aa, bb, dot = row_dots(a_rows, b_rows, row_mask, row_mask, D, BLOCK_R, BLOCK_D)
    # IEEE-rounded (a GPU's default sqrt and division are approximate); a NaN row keeps NaN, as in torch
    one = tl.full((BLOCK_R,), 1.0, tl.float32)
    inv_a = tl.div_rn(one, tl.maximum(tl.sqrt_rn(aa), eps, propagate_nan=tl.PropagateNan.ALL))
    inv_b = tl.div_rn(one, tl.maximum(tl.sqrt_rn(bb), eps, propagate_nan=tl.PropagateNan.ALL))
    tl.store(cos_ptr + rows, dot * inv_a * inv_b, mask=row_mask)
    tl.store(inv_a_ptr + rows, inv_a, mask=row_mask)
    tl.store(inv_b_ptr + rows, inv_b, mask=row_mask)


@triton.jit
def pairwise_cosine_bwd_kernel(grad_ptr, a_ptr, b_ptr, cos_ptr, inv_a_ptr, inv_b_ptr, da_ptr, db_ptr, B, D,
                               stride_a, stride_b, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # d cos / d a = (b̂ − cos·â)/‖a‖,  d cos / d b = (â − cos·b̂)/‖b‖
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    cos = tl.load(cos_ptr + rows, mask=row_mask, other=0.0)
    inv_a = tl.load(inv_a_ptr + rows, mask=row_mask, other=0.0)
    inv_b = tl.load(inv_b_ptr + rows, mask=row_mask, other=0.0)
    a_off = rows.to(tl.int64)[:, None] * stride_a
    b_off = rows.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs < D)[None, :]
        a = tl.load(a_ptr + a_off + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_off + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        a_hat = a * inv_a[:, None]
        b_hat = b * inv_b[:, None]
        da = (g * inv_a)[:, None] * (b_hat - cos[:, None] * a_hat)
        db = (g * inv_b)[:, None] * (a_hat - cos[:, None] * b_hat)
        tl.store(da_ptr + a_off + offs[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + b_off + offs[None, :], db.to(db_ptr.dtype.element_ty), mask=mask)


def _blocks(D):
    return dict(BLOCK_R=16, BLOCK_D=min(128, next_power_of_2(max(D, 16))))


def pairwise_cosine_forward(a, b):
    a, b = a.contiguous(), b.contiguous()
    B, D = a.shape
    # three separate tensors: outputs of a custom op must not alias each other
    cos, inv_a, inv_b = (torch.empty(B, dtype=torch.float32, device=a.device) for _ in range(3))
    if B:
        blocks = _blocks(D)
        with on_device(a):
            pairwise_cosine_fwd_kernel[(cdiv(B, blocks["BLOCK_R"]),)](
                a, b, cos, inv_a, inv_b, B, D, a.stride(0), b.stride(0), NORM_EPS, **blocks, **FP_FUSION)
    return cos, inv_a, inv_b


def pairwise_cosine_backward(grad, a, b, cos, inv_a, inv_b):
    a, b = a.contiguous(), b.contiguous()
    B, D = a.shape
    da, db = torch.empty_like(a), torch.empty_like(b)
    if B:
        blocks = _blocks(D)
        with on_device(a):
            pairwise_cosine_bwd_kernel[(cdiv(B, blocks["BLOCK_R"]),)](
                fp32(grad).contiguous(), a, b, cos, inv_a, inv_b, da, db, B, D, a.stride(0), b.stride(0),
                **blocks, **FP_FUSION)
    return da, db
