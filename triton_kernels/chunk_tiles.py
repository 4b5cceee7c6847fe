"""What the chunk epilogues of the in-batch contrastive losses share (marginkern/chunked_epilogue.py is their host
side): a tile of logits z = r_i·c_j·d_ij from the chunk's raw fp32 dot products d and the fp32 row and key factors, a
streamed (max, Σ e^{z − max}) along one axis of a tile, and the host's merge of such per-block partials."""
import torch
import triton
import triton.language as tl


@triton.jit
def scaled_logit_tile(d_ptr, stride_d, row_scale_ptr, col_scale_ptr, rows, cols, row_mask, col_mask):
    """z = r·c·d of a tile (0 outside the masks)."""
    mask = row_mask[:, None] & col_mask[None, :]
    d = tl.load(d_ptr + rows.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
    r = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    c = tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)
    return r[:, None] * c[None, :] * d


@triton.jit
def max_and_exp_sum(values, AXIS: tl.constexpr):
    """(max, Σ e^{v − max}) along AXIS; a line of −inf gives (−inf, 0)."""
    top = tl.max(values, axis=AXIS)
    shift = tl.where(top == -float("inf"), 0.0, top)
    return top, tl.sum(tl.exp(values - tl.expand_dims(shift, AXIS)), axis=AXIS)


def merged_partials(top, total, dim):
    """(max, Σ e^{z − max}) over `dim` of per-block partials (max −inf, sum 0: an empty block)."""
    merged = top.amax(dim)
    shift = torch.where(merged == -float("inf"), 0.0, merged)
    return merged, (total * torch.exp(top - shift.unsqueeze(dim))).sum(dim)
