"""What the losses that are not a row softmax share (Proxy-Anchor, SigLIP): each chunk of classes is one GEMM of raw
dot products (fp32 out; 16-bit operands as they are on CUDA), then an element-wise epilogue over it, on the Triton
backend one kernel per pass, else PyTorch's element-wise ops; the backward pass recomputes the chunk and feeds its
dL/d(x·w) to the dX and dW GEMMs (4 GEMMs in all, no N × C tensor)."""
import torch

from .dispatch import select_tiles
from .engine import accumulation_dtype, mm_accumulate


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
