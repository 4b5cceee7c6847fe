"""Dot products of paired rows, (Σa², Σb², Σa·b) per row in fp32: the norms and cosines that the margin
losses' target geometry (margin_rows.py) and CoSENT's pair cosines (pairwise_cosine.py) start from."""
import triton
import triton.language as tl


@triton.jit
def row_dots(a_rows, b_rows, a_mask, b_mask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """a_rows, b_rows: (BLOCK_R, 1) pointers to the rows' first elements; rows outside a_mask / b_mask
    read as zeros."""
    aa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        in_row = (offs < D)[None, :]
        a = tl.load(a_rows + offs[None, :], mask=a_mask[:, None] & in_row, other=0.0).to(tl.float32)
        b = tl.load(b_rows + offs[None, :], mask=b_mask[:, None] & in_row, other=0.0).to(tl.float32)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
        ab += tl.sum(a * b, axis=1)
    return aa, bb, ab
