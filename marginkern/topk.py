"""The k largest logits of each row over C classes, streamed over class chunks: the N × C logits never exist.

Two uses: a distillation pipeline caching its teacher as top-k token ids and logits per position (what
`linear_topk_kl_divergence` takes), the log-sum-exp beside them turning the logits into log-probabilities; and face
identification by class centres (normalize=True: the k nearest centres by cosine). Inference only: no gradient.

Each chunk is one GEMM with an fp32 (fp64 for fp64 inputs) result (16-bit inputs on CUDA keep their dtype, as the
engine's GEMMs), then torch.topk of the chunk and of the running top-k beside it; the log-sum-exp is merged as the
engine's row statistics are. Plain PyTorch on every device: the GEMM is the cost, and a chunk of fp32 logits written
and read once beside it is small (64 MB of them at most, and as much of upcast weight rows on the CPU).
"""
import torch
from torch import Tensor

from .engine import accumulation_dtype, exp_shift, inverse_row_norms, mm_accumulate

# The fp32 logits of one chunk (rows × classes), and the fp32 copy of its weight rows where the GEMM needs one; at
# least MIN_CHUNK_CLASSES classes (a GEMM too narrow runs badly), so very long inputs go by blocks of rows.
CHUNK_BYTES = 64 << 20
MIN_CHUNK_CLASSES = 256


def chunk_shape(N, D, acc_bytes, upcast_weight):
    """(rows per block, classes per chunk, a power of two) within CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // (MIN_CHUNK_CLASSES * acc_bytes))
    n = max(1, min(N, rows))
    classes = MIN_CHUNK_CLASSES
    while classes * 2 * n * acc_bytes <= CHUNK_BYTES and (not upcast_weight or classes * 2 * D * acc_bytes
                                                          <= CHUNK_BYTES):
        classes *= 2
    return rows, classes


@torch.no_grad()
def streaming_topk(x: Tensor, w: Tensor, k: int, bias=None, normalize=False, softcap=None, need_lse=False,
                   logit_scale=1.0):
    """(values (N, k) descending, indices (N, k) int64, lse (N,) or None) of z = softcap(x̂·ŵᵀ, or logit_scale·(x·wᵀ +
    bias)), in the accumulation dtype; arguments checked by the caller (k ≤ C)."""
    acc = accumulation_dtype(x.dtype)
    N = x.shape[0]
    col_scale = inverse_row_norms(w) if normalize else None
    keeps_dtype = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)  # cuBLAS writes fp32 from 16-bit inputs
    rows, classes = chunk_shape(N, x.shape[1], torch.finfo(acc).bits // 8, not keeps_dtype and w.dtype != acc)
    parts = [_block_topk(x[r0:r0 + rows], w, k, bias, col_scale, softcap, need_lse, classes, keeps_dtype, acc,
                         logit_scale) for r0 in range(0, N, rows)]
    if not parts:  # no rows
        return (x.new_empty((0, k), dtype=acc), torch.empty((0, k), dtype=torch.long, device=x.device),
                x.new_empty((0,), dtype=acc) if need_lse else None)
    values, indices, lse = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
    return values, indices, lse


def _block_topk(x, w, k, bias, col_scale, softcap, need_lse, classes, keeps_dtype, acc, logit_scale):
    """streaming_topk of a block of rows, over chunks of `classes` classes."""
    N, C = x.shape[0], w.shape[0]
    row_scale = None if col_scale is None else inverse_row_norms(x)[:, None]
    if not keeps_dtype:
        x = x.to(acc)  # once, not per chunk (mm_accumulate upcasts what cuBLAS cannot take as it is)
    values = x.new_empty((N, 0), dtype=acc)
    indices = torch.empty((N, 0), dtype=torch.long, device=x.device)
    lse = torch.full((N,), -float("inf"), dtype=acc, device=x.device) if need_lse else None
    for c0 in range(0, C, classes):
        c1 = min(C, c0 + classes)
        z = mm_accumulate(x, w[c0:c1].t(), acc)
        if col_scale is not None:
            z.mul_(row_scale).mul_(col_scale[None, c0:c1])
        if bias is not None:
            z.add_(bias[None, c0:c1].to(acc))
        if logit_scale != 1.0:  # in fp32, after the GEMM (a 16-bit input scaled first would be rounded)
            z.mul_(logit_scale)
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        top, where = z.topk(min(k, c1 - c0), dim=1)
        values, order = torch.cat([values, top], 1).topk(min(k, values.shape[1] + top.shape[1]), dim=1)
        indices = torch.cat([indices, where + c0], 1).gather(1, order)
        if lse is not None:  # in place, once the top-k are out: torch.logsumexp's e^{z − max} was a second chunk
            shift = exp_shift(z.amax(1, keepdim=True))
            lse = torch.logaddexp(lse, z.sub_(shift).exp_().sum(1).log_().add_(shift[:, 0]))
        del z  # before the next chunk's GEMM allocates its own: one chunk of logits at a time, not two
    return values, indices, lse
