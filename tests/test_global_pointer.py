"""GlobalPointer's span loss with fused logits against bert4keras's GlobalPointer + multilabel CE on the materialised
(B, H, L, L) logits, in float64."""
import json
import math

import pytest
import torch

import marginkern as mk
from tests.helpers import run_python


def naive_global_pointer(q, k, positives, mask=None, scale=None, tril=True, mask_zero=False, ignore_index=-100):
    """bert4keras's GlobalPointer logits (einsum, −inf on padding at either end and below the diagonal, / √d) and
    its multilabel CE in the current form (−inf logits in neither sum, a 0 appended to each side), per (b, h)."""
    B, L, H, d = q.shape
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * (1.0 / math.sqrt(d) if scale is None else scale)
    kept = torch.ones(B, 1, L, L, dtype=torch.bool)
    if mask is not None:
        m = mask.bool()
        kept = kept & m[:, None, :, None] & m[:, None, None, :]
    if tril:
        kept = kept & torch.ones(L, L, dtype=torch.bool).triu()
    s = s.masked_fill(~kept, -float("inf")).reshape(B, H, L * L)
    named = positives != ignore_index
    if mask_zero:
        named &= positives != 0
        s = torch.cat([torch.full_like(s[..., :1], -float("inf")), s[..., 1:]], -1)
    y = torch.zeros(B, H, L * L + 1, dtype=torch.bool).scatter_(-1, torch.where(named, positives, L * L), True)
    y = y[..., :L * L]
    finite = s != -float("inf")
    zero = s.new_zeros(B, H, 1)
    neg = torch.cat([s.masked_fill(~(finite & ~y), -float("inf")), zero], -1)
    pos = torch.cat([(-s).masked_fill(~(finite & y), -float("inf")), zero], -1)
    return torch.logsumexp(neg, -1) + torch.logsumexp(pos, -1)


def inputs(B, L, H, d, P, dtype=torch.float64, seed=0, padded=True, mask_zero=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, d, generator=g, dtype=torch.float64).mul_(1.5).to(dtype)
    k = torch.randn(B, L, H, d, generator=g, dtype=torch.float64).mul_(1.5).to(dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    if padded:
        for b in range(B):
            mask[b, torch.randint(1, L + 1, (1,), generator=g).item():] = False
    # upper-triangle spans (start ≤ end), a random number of them padding
    starts = torch.randint(0, L, (B, H, P), generator=g)
    ends = torch.minimum(starts + torch.randint(0, 4, (B, H, P), generator=g), torch.tensor(L - 1))
    spans = starts * L + ends
    count = torch.randint(0, P + 1, (B, H, 1), generator=g)
    positives = torch.where(torch.arange(P) < count, spans, 0 if mask_zero else -100)
    return q, k, positives, mask


@pytest.mark.parametrize("shape", [(2, 7, 3, 4), (1, 1, 1, 1), (3, 13, 2, 5)])
@pytest.mark.parametrize("tril", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_global_pointer_matches_bert4keras_logits_and_loss(shape, tril, masked, reduction):
    q, k, positives, mask = inputs(*shape, P=4, padded=masked)
    mask = mask if masked else None
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = mk.global_pointer_loss(q1, k1, positives, mask=mask, tril=tril, reduction=reduction)
    rows = naive_global_pointer(q2, k2, positives, mask, tril=tril)
    want = rows if reduction == "none" else rows.mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q1, k1)), torch.autograd.grad(want.sum(), (q2, k2))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_global_pointer_equals_the_sparse_loss_of_its_logits():
    """The fused loss is the sparse ZLPR of the masked logits it never makes (one definition, two code paths)."""
    B, L, H, d = 2, 9, 3, 4
    q, k, positives, mask = inputs(B, L, H, d, P=5, dtype=torch.float32, seed=1, mask_zero=True)
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) / 2.0
    kept = mask[:, None, :, None] & mask[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).triu()
    logits = s.masked_fill(~kept, -float("inf")).reshape(B * H, L * L)
    want = mk.sparse_multilabel_categorical_crossentropy(logits, positives.reshape(B * H, -1), mask_zero=True,
                                                         reduction="none").reshape(B, H)
    got = mk.global_pointer_loss(q, k, positives, mask=mask, mask_zero=True, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_global_pointer_mask_zero_scale_and_integer_mask():
    q, k, positives, mask = inputs(2, 6, 2, 3, P=3, seed=2, mask_zero=True)
    got = mk.global_pointer_loss(q, k, positives, mask=mask.long(), scale=0.7, mask_zero=True, reduction="sum")
    want = naive_global_pointer(q, k, positives, mask, scale=0.7, mask_zero=True).sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tril", [True, False])
def test_global_pointer_repeated_and_left_out_positives(tril):
    """Positives listed twice (one positive), below the diagonal, on padding, and span 0 (a positive without
    mask_zero): as the dense definition says, loss and gradients."""
    q, k, _, mask = inputs(2, 6, 2, 3, P=1, seed=8)
    mask[1, 4:] = False
    positives = torch.tensor([[[7, 7, 0, 13, -100], [12, 6, 6, 6, 35]],      # 13 = (2, 1): below the diagonal
                              [[5, 28, 5, 0, 0], [33, 4, -100, -100, 4]]])    # 28 = (4, 4), 33 = (5, 3): padding
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = mk.global_pointer_loss(q1, k1, positives, mask=mask, tril=tril, reduction="none")
    want = naive_global_pointer(q2, k2, positives, mask, tril=tril)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q1, k1)), torch.autograd.grad(want.sum(), (q2, k2))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_global_pointer_takes_the_heads_as_globalpointer_slices_them():
    """GlobalPointer's dense layer gives (B, L, H·2d), viewed (B, L, H, 2d) and sliced into q and k (non-contiguous
    views of one tensor); int32 positives; under no_grad and inference_mode the loss alone."""
    g = torch.Generator().manual_seed(9)
    dense = torch.randn(2, 9, 3 * 2 * 4, generator=g, dtype=torch.float64, requires_grad=True)
    heads = dense.view(2, 9, 3, 8)
    q, k = heads[..., :4], heads[..., 4:]
    positives = torch.randint(0, 81, (2, 3, 4), generator=g, dtype=torch.int32)
    got = mk.global_pointer_loss(q, k, positives)
    want = naive_global_pointer(q, k, positives.long())
    torch.testing.assert_close(got, want.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, dense)[0], torch.autograd.grad(want.mean(), dense)[0],
                               rtol=1e-11, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mk.global_pointer_loss(q, k, positives), got.detach())
    with torch.inference_mode():
        torch.testing.assert_close(mk.global_pointer_loss(q, k, positives), got.detach())


def test_efficient_global_pointer_by_two_extra_columns():
    """bert4keras's EfficientGlobalPointer: one shared q·k/√d and per-head biases, logits[b, h, m, n] = q_m·k_n/√d +
    bias[b, 2h, n] + bias[b, 2h+1, m]. The README's recipe, two columns more per head: q' = [q, √d, √d·bias[2h+1](m)],
    k' = [k, bias[2h](n), 1] and scale 1/√d give scale·q'·k' = q·k/√d + bias[2h](n) + bias[2h+1](m)."""
    g = torch.Generator().manual_seed(10)
    B, L, H, d = 2, 7, 3, 4
    qw = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    kw = torch.randn(B, L, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(B, 2 * H, L, generator=g, dtype=torch.float64, requires_grad=True) / 2
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    positives = torch.tensor([[[3, 10, -100], [0, 48, 17], [8, 9, 10]],
                              [[1, 2, 3], [-100, -100, -100], [6, 12, 18]]])
    # bert4keras's logits, then its loss on them (the reference's masks applied to materialised logits)
    logits = (torch.einsum("bmd,bnd->bmn", qw, kw) / d ** 0.5)[:, None] + bias[:, ::2, None] + bias[:, 1::2, :, None]
    kept = mask[:, None, :, None] & mask[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).triu()
    s = logits.masked_fill(~kept, -float("inf")).reshape(B * H, L * L)
    want = mk.sparse_multilabel_categorical_crossentropy(s, positives.reshape(B * H, -1), reduction="none")
    # the recipe: (B, L, H, d + 2) heads
    ones = torch.ones(B, L, H, 1, dtype=torch.float64)
    root = d ** 0.5
    q = torch.cat([qw[:, :, None].expand(B, L, H, d), ones * root, bias[:, 1::2].transpose(1, 2)[..., None] * root], -1)
    k = torch.cat([kw[:, :, None].expand(B, L, H, d), bias[:, ::2].transpose(1, 2)[..., None], ones], -1)
    got = mk.global_pointer_loss(q, k, positives, mask=mask, scale=1 / root, reduction="none")
    torch.testing.assert_close(got.reshape(-1), want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (qw, kw, bias)), torch.autograd.grad(want.sum(), (qw, kw, bias))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_global_pointer_padding_only_rows_are_zero_and_get_no_gradient():
    q, k, positives, mask = inputs(2, 5, 2, 3, P=2, seed=3)
    mask[1] = False  # a batch element of padding only: no spans at all
    q.requires_grad_()
    rows = mk.global_pointer_loss(q, k, positives, mask=mask, reduction="none")
    (dq,) = torch.autograd.grad(rows.sum(), q)
    assert (rows[1] == 0).all() and not dq[1].any() and torch.isfinite(rows).all()


@pytest.mark.parametrize("B, L, H, d, P", [(0, 5, 2, 3, 2), (2, 0, 2, 3, 2), (2, 5, 0, 3, 2), (2, 5, 2, 0, 2),
                                           (2, 5, 2, 3, 0), (1, 1, 1, 1, 1)])
def test_global_pointer_empty_sizes(B, L, H, d, P):
    """No batch, no tokens, no heads, zero-width heads, no positives, one span: the definition's values, finite."""
    q = torch.randn(B, L, H, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, L, H, d, dtype=torch.float64, requires_grad=True)
    positives = torch.full((B, H, P), -100)
    if L and P:
        positives[..., 0] = 0
    for reduction in ("mean", "sum", "none"):
        got = mk.global_pointer_loss(q, k, positives, reduction=reduction)
        dq, dk = torch.autograd.grad(got.sum(), (q, k))
        assert dq.shape == q.shape and dk.shape == k.shape and torch.isfinite(dq).all()
    want = naive_global_pointer(q, k, positives, scale=1.0 if d == 0 else None)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block_bytes", [3 * 7 * 7 * 8, 7 * 8, 8, 3 * 7 * 8])
@pytest.mark.parametrize("tril", [True, False])
def test_global_pointer_by_blocks_matches_one_block(monkeypatch, block_bytes, tril):
    """Blocks of rows, of one row, and of one or three query positions (with tril, their keys from the block's first
    query on): the one-block loss and gradients (float64 rounding), mask_zero's span 0 included."""
    import marginkern.global_pointer as gp
    q, k, positives, mask = inputs(2, 7, 3, 4, P=4, seed=4, mask_zero=True)
    results = []
    for bytes_ in (1 << 20, block_bytes):
        monkeypatch.setattr(gp, "GP_BLOCK_BYTES", bytes_)
        q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
        rows = mk.global_pointer_loss(q1, k1, positives, mask=mask, tril=tril, mask_zero=True, reduction="none")
        results.append((rows, *torch.autograd.grad(rows.sum(), (q1, k1))))
    assert len(gp._blocks(6, 7, 8, False)) > 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(results[1][0], naive_global_pointer(q, k, positives, mask, tril=tril, mask_zero=True),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_global_pointer_lower_precision_inputs(dtype):
    """16-bit q and k go into fp32 GEMMs: the loss within fp32 rounding of float64 on the same (rounded) inputs, the
    gradients within the 16-bit outputs' rounding."""
    q, k, positives, mask = inputs(2, 24, 3, 16, P=6, dtype=dtype, seed=5)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    rows = mk.global_pointer_loss(q1, k1, positives, mask=mask, reduction="none")
    grads = torch.autograd.grad(rows.sum(), (q1, k1))
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    want = naive_global_pointer(q2, k2, positives, mask)
    want_grads = torch.autograd.grad(want.sum(), (q2, k2))
    assert rows.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        assert ((got.double() - expected).norm() / expected.norm()) < max(1e-5, torch.finfo(dtype).eps)


def test_global_pointer_ops_opcheck_and_gradcheck():
    q, k, positives, mask = inputs(2, 5, 2, 3, P=3, seed=6)
    for m in (mask, None):
        args = (q.clone().requires_grad_(), k.clone().requires_grad_(), positives, m, 0.5, True, False, -100)
        torch.library.opcheck(torch.ops.marginkern.global_pointer.default, args)
        _, L_neg, L_pos = torch.ops.marginkern.global_pointer(q, k, positives, m, 0.5, True, False, -100)
        torch.library.opcheck(torch.ops.marginkern.global_pointer_backward.default,
                              (torch.rand(4, dtype=torch.float64), q, k, positives, m, L_neg, L_pos, 0.5, True, False,
                               -100))
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mk.global_pointer_loss(a, b, positives, mask=mask, reduction="none"),
                                    (q1, k1))
    # k alone needs a gradient
    (dk,) = torch.autograd.grad(mk.global_pointer_loss(q, k1, positives, mask=mask), k1)
    assert dk.shape == k.shape
    g = torch.autograd.grad(mk.global_pointer_loss(q1, k1, positives), q1, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="global_pointer cannot be differentiated twice"):
        g.sum().backward()


def test_global_pointer_compiles_once_over_shapes_and_marks_bad_rows_nan():
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b, p, m: mk.global_pointer_loss(a, b, p, mask=m), fullgraph=True, dynamic=True,
                             backend=counter)
    for B, L in ((2, 5), (3, 5), (3, 9)):  # (every size distinct at the first call: no duck-sized guards)
        q, k, positives, mask = inputs(B, L, 7, 4, P=3, dtype=torch.float32, seed=B + L)
        q.requires_grad_()
        got, want = compiled(q, k, positives, mask), mk.global_pointer_loss(q, k, positives, mask=mask)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, q)[0], torch.autograd.grad(want, q)[0])
    assert counter.frame_count == 1
    # a compiled call cannot look at the values: a row naming a span outside [0, L²) is NaN (eager calls raise)
    q, k, positives, mask = inputs(1, 4, 2, 3, P=2, dtype=torch.float32, seed=7)
    positives[0, 0, 0] = 16
    rows = torch.compile(lambda a, b, p: mk.global_pointer_loss(a, b, p, reduction="none"), fullgraph=True,
                         backend="aot_eager")(q, k, positives)
    assert rows[0, 0].isnan() and torch.isfinite(rows[0, 1])


def test_global_pointer_options_as_numpy_and_unsigned_positives():
    """ignore_index as a NumPy integer reaches the op as an int (compiled too: dynamo makes it a tensor, which the
    op's schema cannot take; fullgraph cannot read it back, as for every function's ignore_index); uint16 positives
    are indices."""
    import numpy as np
    q, k, positives, mask = inputs(2, 6, 3, 4, P=3, dtype=torch.float32, seed=12)
    want = mk.global_pointer_loss(q, k, positives, mask=mask)
    compiled = torch.compile(lambda a, b: mk.global_pointer_loss(a, b, positives, mask=mask,
                                                                 ignore_index=np.int64(-100)), backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), want)
    padded = torch.where(positives == -100, 65535, positives).to(torch.uint16)
    torch.testing.assert_close(mk.global_pointer_loss(q, k, padded, mask=mask, ignore_index=65535), want)
    empty = torch.randn(2, 0, 3, 4)
    rows = mk.global_pointer_loss(empty, empty, torch.zeros(2, 3, 2, dtype=torch.long), mask_zero=True,
                                  reduction="none")
    assert (rows == 0).all()


def test_global_pointer_errors_name_the_argument():
    q, k, positives, mask = inputs(2, 5, 3, 4, P=2, dtype=torch.float32)
    f = mk.global_pointer_loss
    with pytest.raises(ValueError, match="q must have 4 dimensions|q must be"):
        f(q[0], k[0], positives)
    with pytest.raises(ValueError, match=r"k must have q's shape \(2, 5, 3, 4\)"):
        f(q, k[:, :4], positives)
    with pytest.raises(TypeError, match="k must have q's dtype torch.float32"):
        f(q, k.double(), positives)
    with pytest.raises(TypeError, match="positives must hold integer class indices"):
        f(q, k, positives.float())
    with pytest.raises(ValueError, match=r"positives must have shape \(B=2, H=3, P\)"):
        f(q, k, positives[:, :2])
    with pytest.raises(ValueError, match=r"positives \(spans m·L \+ n\) holds class 25, outside \[0, 25\)"):
        f(q, k, torch.full((2, 3, 1), 25))
    with pytest.raises(ValueError, match=r"positives \(spans m·L \+ n\) holds class 156"):
        f(q, k, torch.full((2, 3, 1), 156, dtype=torch.uint8), ignore_index=-100)  # (-100 wraps to 156 in uint8)
    with pytest.raises(ValueError, match=r"mask must have shape \(B=2, L=5\)"):
        f(q, k, positives, mask=mask[:, :4])
    with pytest.raises(TypeError, match="mask must be a bool or integer tensor"):
        f(q, k, positives, mask=mask.float())
    with pytest.raises(ValueError, match="scale must lie in"):
        f(q, k, positives, scale=0.0)
    with pytest.raises(TypeError, match="tril must be a bool"):
        f(q, k, positives, tril=1)
    with pytest.raises(TypeError, match="mask_zero must be a bool"):
        f(q, k, positives, mask_zero=None)
    with pytest.raises(ValueError, match="reduction"):
        f(q, k, positives, reduction="batchmean")


GLOBAL_POINTER_MEMORY_PROBE = """
import json, torch, marginkern as mk
from tests.test_global_pointer import naive_global_pointer
torch.manual_seed(0)
B, H, d = 2, 8, 32
naive = lambda *a, mask: naive_global_pointer(*a, mask=mask).mean()  # noqa: E731
loss_fn = mk.global_pointer_loss if MODE == "marginkern" else naive
q = torch.randn(B, L, H, d, requires_grad=True)
k = torch.randn(B, L, H, d, requires_grad=True)
mask = torch.ones(B, L, dtype=torch.bool)
positives = torch.randint(0, L * L, (B, H, 20))
loss_fn(q[:, :8], k[:, :8], positives % 64, mask=mask[:, :8]).backward()  # warm-up
before = peak()
loss_fn(q, k, positives, mask=mask).backward()
print(json.dumps(dict(extra=peak() - before, logits_bytes=B * H * L * L * 4, input_bytes=q.numel() * 4)))
"""


def test_global_pointer_memory_is_blocks_not_logits():
    """fwd+bwd at B = 2, H = 8, L = 768 and 1536 (fp32 logits of 38 and 151 MB), each in its own process (freed memory
    that the allocator keeps would hide the next one's): the extra memory is the fp32 gradients of q and k, their
    layout copies and a few 8 MB blocks, so 4× the logits adds only input-sized memory; bert4keras's composition holds
    several logit-sized tensors (the probe's check that it sees them). Measured on a 2-core x86 VM: 29 and 26–37 MB; the
    composition 223 MB at L = 768."""
    def probe(mode, L):
        return json.loads(run_python(f"MODE, L = {mode!r}, {L}\n" + GLOBAL_POINTER_MEMORY_PROBE, peak_memory=True))
    naive, small, large = probe("naive", 768), probe("marginkern", 768), probe("marginkern", 1536)
    assert naive["extra"] > 2 * naive["logits_bytes"], naive
    assert small["extra"] < naive["logits_bytes"] + 16 * small["input_bytes"], small
    assert large["extra"] < small["extra"] + 16 * (large["input_bytes"] - small["input_bytes"]) + (4 << 20), \
        (small, large)
    assert large["extra"] < 0.5 * large["logits_bytes"], large
