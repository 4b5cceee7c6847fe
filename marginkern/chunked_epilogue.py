"""What the chunked losses beside the streaming engine share (Proxy-Anchor's column sums; SigLIP, InfoNCE and SupCon
over in-batch keys): each chunk of classes (keys) is one GEMM of raw dot products (fp32 out; 16-bit operands as they
are on CUDA), then an element-wise epilogue over it, on the Triton backend one kernel per pass, else PyTorch's
element-wise ops; the backward pass recomputes the chunk and feeds its dL/d(x·w) to the dX and dW GEMMs (4 GEMMs in
all, no N × C tensor)."""
import torch

from .dispatch import select_tiles
from .engine import (SplitKAccumulator, accumulation_dtype, exp_shift, mm_accumulate, paired_row_dots,
                     split_k_slices)


# The in-batch contrastive losses' (SigLIP's, InfoNCE's, SupCon's) chunk of keys: its fp32 dot products and one
# temporary beside them, plus a chunk × D fp32 copy of 16-bit key rows on the CPU (its GEMM cannot take them), within
# this budget, 8× larger on a GPU; as Proxy-Anchor's (marginkern.proxy_anchor), for the same reasons.
CHUNK_BYTES = 16 << 20
GPU_CHUNK_FACTOR = 8
MIN_CHUNK_CLASSES = 256


def key_chunks(N, M, D, acc_bytes, on_gpu=False, weight_rows=0):
    """[(c0, c1)] covering M keys within the contrastive losses' chunk budget."""
    return plan_chunks(N, M, D, acc_bytes, CHUNK_BYTES * (GPU_CHUNK_FACTOR if on_gpu else 1), MIN_CHUNK_CLASSES,
                       weight_rows)


def plan_chunks(N, C, D, acc_bytes, budget, min_classes, weight_rows=0):
    """[(c0, c1)] covering C classes: two N × chunk tensors of `acc_bytes` elements and `weight_rows` chunk × D ones
    per chunk within `budget` bytes, at least `min_classes` classes (a narrower GEMM runs badly)."""
    chunk = max(min_classes, budget // max(1, (2 * N + weight_rows * D) * acc_bytes))
    return [(c0, min(C, c0 + chunk)) for c0 in range(0, C, chunk)]


def epilogue_tiles(x):
    """(the engine's tiles for x, whether the chunk epilogues run in Triton: where the engine would use Triton, CUDA
    or the interpreter when forced). select_tiles enforces MARGINKERN_BACKEND: a forced backend that cannot serve x
    (Triton and fp64) raises."""
    tiles = select_tiles(x.device, x.dtype)
    return tiles, tiles.name == "triton"


def backward_gemm_dtype(x):
    """The dtype the backward GEMMs read dL/d(x·w) in: bf16 for bf16 on CUDA (fp32's range, cuBLAS's bf16 rate);
    fp32 otherwise (fp16's range would flush the small gradients of far classes to zero)."""
    return x.dtype if x.is_cuda and x.dtype == torch.bfloat16 else accumulation_dtype(x.dtype)


def chunk_dots(x, w, c0, c1, acc):
    """The chunk's raw dot products x·w_cᵀ, fp32 (fp64 for fp64)."""
    return mm_accumulate(x, w[c0:c1].t(), acc)


def scaled_dots(x, k, c0, c1, row_scale, col_scale, acc):
    """The chunk's logits r_i·c_j·(x_i·k_j), fp32 (fp64 for fp64): the contrastive losses' fp32 factors applied after
    the GEMM."""
    return chunk_dots(x, k, c0, c1, acc).mul_(row_scale[:, None]).mul_(col_scale[None, c0:c1])


def max_and_sum(z, dim):
    """(max, Σ e^{z − max}) along `dim`; a line of −inf gives (−inf, 0)."""
    top = z.amax(dim)
    shift = exp_shift(top)
    return top, torch.exp(z - shift.unsqueeze(dim)).sum(dim)


def merge_top_total(top, total, chunk_top, chunk_total):
    """The (max, Σ e^{z − max}) of two sets of cells from each one's; an empty set has max −inf and sum 0."""
    new_top = torch.maximum(top, chunk_top)
    shift = exp_shift(new_top)
    return new_top, total * torch.exp(top - shift) + chunk_total * torch.exp(chunk_top - shift)


def own_cells(column, c0, c1):
    """(each row's own column within the chunk [c0, c1), clamped into it (N, 1), whether it lies there (N, 1))."""
    own = (column - c0)[:, None]
    return own.clamp(0, c1 - c0 - 1), (own >= 0) & (own < c1 - c0)


def set_own_cells_(z, column, c0, c1, value):
    """z[n, column_n − c0] = value (a scalar or (N, 1)) for the rows whose own class lies in the chunk [c0, c1),
    without a host sync: the other rows write back their own value."""
    own, inside = own_cells(column, c0, c1)
    return z.scatter_(1, own, torch.where(inside, value, z.gather(1, own)))


def negate_own_cells_(z, column, c0, c1):
    """z[n, column_n − c0] = −z[n, column_n − c0] for the rows whose own class lies in the chunk."""
    own, inside = own_cells(column, c0, c1)
    mine = z.gather(1, own)
    return z.scatter_(1, own, torch.where(inside, -mine, mine))


def _scaled_rows(t, scale, dtype, block_bytes=16 << 20):
    """scale_i·t_i in `dtype` (the GEMMs'), multiplied in the scale's dtype by blocks of rows."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    rows = max(1, block_bytes // max(1, t.shape[1] * scale.element_size()))
    for r0 in range(0, t.shape[0], rows):
        out[r0:r0 + rows] = t[r0:r0 + rows].to(scale.dtype) * scale[r0:r0 + rows, None]
    return out


def scaled_rows_backward(x, x_acc, k, grad_chunk, row_scale, col_scale, need_input_grad, need_key_grad,
                         need_scale_grads):
    """The backward GEMMs of logits r_i·c_j·(x_i·k_j) (SigLIP's, InfoNCE's and SupCon's), with G = grad_chunk(c0, c1) the
    chunk's dL/dz in the GEMMs' dtype: dX' += G·(c∘K_c) and dK'_c = Gᵀ·(r∘X), so that dL/dx = r∘dX', dL/dk = c∘dK',
    dL/dr_i = x_i·dX'_i and dL/dc_j = k_j·dK'_j, all from fp32 GEMM results and without dividing by a scale (which
    may be 0: a learned temperature at 0, a norm past the dtype's range). Returns (dL/dx, dL/dk in their inputs'
    dtypes, dL/drow_scale, dL/dcol_scale), each None when not asked for; x_acc: x as the chunks' GEMMs read it (an
    fp32 copy of 16-bit rows on the CPU). The chunks are key_chunks' with room for a chunk × D copy of the key rows in
    the GEMMs' dtype and for the chunk's fp32 dK'."""
    acc = accumulation_dtype(x.dtype)
    N, D = x.shape
    gemm = backward_gemm_dtype(x)
    chunks = key_chunks(N, k.shape[0], D, acc.itemsize, x.is_cuda,
                        int(k.dtype != gemm) + int(need_key_grad or need_scale_grads))
    need_dx, need_dk = need_input_grad or need_scale_grads, need_key_grad or need_scale_grads
    x_scaled = _scaled_rows(x_acc, row_scale, gemm) if need_dk else None
    dk = torch.empty_like(k) if need_key_grad else None
    col_scale_grad = torch.zeros(k.shape[0], dtype=acc, device=x.device) if need_scale_grads else None
    dx = None
    if need_dx:
        out = torch.zeros((N, D), dtype=acc, device=x.device)
        dx = SplitKAccumulator(out, split_k_slices(out, chunks[0][1] - chunks[0][0]) if chunks else 1)
    for c0, c1 in chunks:
        g = grad_chunk(c0, c1).to(gemm)
        if dx is not None:
            dx.add(g, _scaled_rows(k[c0:c1], col_scale[c0:c1], gemm))
        if need_dk:
            dk_chunk = mm_accumulate(g.t(), x_scaled, acc)  # dK'_c, fp32
            if need_scale_grads:
                col_scale_grad[c0:c1] = paired_row_dots(k[c0:c1], dk_chunk)
            if dk is not None:
                dk[c0:c1] = dk_chunk.mul_(col_scale[c0:c1, None])
            del dk_chunk
        del g  # before the next chunk allocates its own
    grad_x = row_scale_grad = None
    if dx is not None:
        raw = dx.result()  # dX'
        row_scale_grad = paired_row_dots(x, raw) if need_scale_grads else None
        grad_x = raw.mul_(row_scale[:, None]).to(x.dtype) if need_input_grad else None
    return grad_x, dk, row_scale_grad, col_scale_grad
