"""CoSENT, multilabel categorical CE and Circle loss against their O(B²) / dense definitions."""
import json

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from tests.helpers import run_python


def naive_cosent(scores, labels, scale=20.0):
    """sentence-transformers' CoSENTLoss: the B × B matrix of s_low − s_high, masked, a 0 prepended."""
    s = scores.double() * scale
    diff = s[:, None] - s[None, :]
    mask = labels[:, None] < labels[None, :]
    diff = torch.where(mask, diff, torch.full_like(diff, -float("inf")))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), 0)


@pytest.mark.parametrize("B,num_labels", [(1, 1), (2, 2), (7, 1), (50, 5), (300, 300), (513, 3)])
@pytest.mark.parametrize("float_labels", [False, True])
def test_cosent_matches_quadratic_definition(B, num_labels, float_labels):
    s = torch.rand(B, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, num_labels, (B,))
    if float_labels:
        y = y.double() / 4
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, want = mk.cosent_loss(s1, y), naive_cosent(s2, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s1)[0], torch.autograd.grad(want, s2)[0],
                               rtol=1e-10, atol=1e-12)


def test_cosent_op_opcheck_and_double_backward_raises():
    s = (torch.rand(40, dtype=torch.float64) * 2 - 1).requires_grad_()
    y = torch.randint(0, 5, (40,))
    torch.library.opcheck(torch.ops.marginkern.cosent.default, (s, y, 20.0))
    loss = mk.cosent_loss(s, y)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError):  # dL/ds comes out of the forward pass: no second derivative
        torch.autograd.grad(g.sum(), s)


def test_cosent_all_labels_equal_is_zero():
    s = torch.randn(20, requires_grad=True)
    loss = mk.cosent_loss(s, torch.full((20,), 3))
    assert float(loss.detach()) == 0.0
    (g,) = torch.autograd.grad(loss, s)
    assert not g.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosent_half_precision_scores(dtype):
    s = (torch.rand(400) * 2 - 1).to(dtype)
    y = torch.randint(0, 6, (400,))
    loss = mk.cosent_loss(s, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), naive_cosent(s.double(), y), rtol=1e-6, atol=1e-5)


def test_cosent_200k_pairs_on_cpu():
    s = (torch.rand(200_000) * 2 - 1).requires_grad_()
    y = torch.randint(0, 6, (200_000,)).float()
    loss = mk.cosent_loss(s, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # a subsample checks the values against the quadratic form
    idx = torch.randperm(200_000)[:2000]
    sub = mk.cosent_loss(s.detach()[idx], y[idx])
    torch.testing.assert_close(sub.double(), naive_cosent(s.detach()[idx], y[idx]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cosent_from_embeddings_matches_sentence_transformers(dtype):
    a, b = torch.randn(64, 33).to(dtype), torch.randn(64, 33).to(dtype)
    y = torch.rand(64)
    got_a, got_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref_a, ref_b = a.double().requires_grad_(), b.double().requires_grad_()
    got = mk.cosent_embedding_loss(got_a, got_b, y)
    want = naive_cosent(F.cosine_similarity(ref_a, ref_b), y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    got.backward()
    want.backward()
    torch.testing.assert_close(got_a.grad.double(), ref_a.grad, **tol)
    torch.testing.assert_close(got_b.grad.double(), ref_b.grad, **tol)


def test_pairwise_cosine_opcheck_and_compile():
    a, b = torch.randn(9, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.marginkern.pairwise_cosine.default, (a, b))
    cos, ia, ib = torch.ops.marginkern.pairwise_cosine(a, b)
    torch.library.opcheck(torch.ops.marginkern.pairwise_cosine_backward.default,
                          (torch.rand(9), a.detach(), b.detach(), cos.detach(), ia.detach(), ib.detach()))
    y = torch.randint(0, 3, (9,))
    step = lambda p, q: mk.cosent_embedding_loss(p, q, y)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(a, b), step(a, b))


def test_cosent_module():
    loss = mk.CoSENTLoss(scale=10.0)
    a, b, y = torch.randn(8, 4), torch.randn(8, 4), torch.rand(8)
    torch.testing.assert_close(loss(a, b, y), mk.cosent_embedding_loss(a, b, y, scale=10.0))
    torch.testing.assert_close(loss(F.cosine_similarity(a, b), y), mk.cosent_loss(F.cosine_similarity(a, b), y,
                                                                                 scale=10.0))
    with pytest.raises(TypeError, match="CoSENTLoss takes"):
        loss(a)


# ---- multilabel categorical cross-entropy (ZLPR) -----------------------------------------------------

def naive_zlpr(s, y):
    """bert4keras's original form: s' = (1−2y)s; −1e12 masks; a 0 appended to each side."""
    s, y = s.double(), y.double()
    s = (1 - 2 * y) * s
    neg = s - y * 1e12
    pos = s - (1 - y) * 1e12
    zeros = torch.zeros_like(s[..., :1])
    return torch.logsumexp(torch.cat([neg, zeros], -1), -1) + torch.logsumexp(torch.cat([pos, zeros], -1), -1)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 10), (1, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zlpr_matches_dense_definition(shape, reduction):
    s = torch.randn(*shape, dtype=torch.float64) * 3
    y = torch.rand(*shape) < 0.3
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = mk.multilabel_categorical_crossentropy(s1, y, reduction=reduction)
    rows = naive_zlpr(s2, y)
    want = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), s1)[0], torch.autograd.grad(want.sum(), s2)[0])


def test_zlpr_masked_logits_are_left_out():
    s = torch.randn(4, 6, requires_grad=True)
    y = torch.zeros(4, 6)
    y[:, 0] = 1
    masked = s.detach().clone()
    masked[:, 3:] = -float("inf")
    masked.requires_grad_()
    loss = mk.multilabel_categorical_crossentropy(masked, y, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(masked.grad).all() and not masked.grad[:, 3:].any()
    torch.testing.assert_close(loss.double(), naive_zlpr(s.detach()[:, :3], y[:, :3]).sum(), rtol=1e-6, atol=1e-6)


def test_zlpr_masked_positive_is_left_out_too():
    # a label on a masked span (a padded position marked positive): left out of the positive sum as well, where
    # e^{−s} = e^{+inf} would make the loss inf (mutation testing found no test with a masked positive)
    s = torch.randn(3, 6, dtype=torch.float64)
    y = torch.zeros(3, 6)
    y[:, 0] = 1
    y[0, 4] = 1
    y[1, 5] = 1
    masked = s.clone()
    masked[:, 3:] = -float("inf")
    masked.requires_grad_()
    loss = mk.multilabel_categorical_crossentropy(masked, y, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(masked.grad).all() and not masked.grad[:, 3:].any()
    torch.testing.assert_close(loss, naive_zlpr(s[:, :3], y[:, :3]), rtol=1e-12, atol=1e-12)


def test_zlpr_op_opcheck_and_fp32_logits_are_not_written():
    s = torch.randn(4, 3, 9, dtype=torch.float64) * 3
    y = torch.rand(4, 3, 9) < 0.3
    s[0, 0, 2] = -float("inf")
    torch.library.opcheck(torch.ops.marginkern.multilabel_ce.default, (s.requires_grad_(), y))
    rows, L_neg, L_pos = torch.ops.marginkern.multilabel_ce(s.detach(), y)
    torch.library.opcheck(torch.ops.marginkern.multilabel_ce_backward.default,
                          (torch.rand(12, dtype=torch.float64), s.detach(), y, L_neg, L_pos))
    x = torch.randn(6, 40, requires_grad=True)
    before = x.detach().clone()
    mk.multilabel_categorical_crossentropy(x, torch.rand(6, 40) < 0.2).backward()
    assert torch.equal(x.detach(), before)
    g = torch.autograd.grad(mk.multilabel_categorical_crossentropy(x, torch.rand(6, 40) < 0.2), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="multilabel_ce cannot be differentiated twice"):
        g.sum().backward()


def check_zlpr_row_blocks_match_one_block(monkeypatch, s, loss_fn):
    """loss_fn(logits) (per row) over rows split into blocks of one row (ZLPR_BLOCK_BYTES) gives the one-block loss and
    gradient bit for bit."""
    import marginkern.pairwise
    results = []
    for block_bytes in (1 << 20, s.shape[-1] * 4):
        monkeypatch.setattr(marginkern.pairwise, "ZLPR_BLOCK_BYTES", block_bytes)
        x = s.clone().requires_grad_()
        loss = loss_fn(x)
        results.append((loss, torch.autograd.grad(loss.sum(), x)[0]))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_zlpr_by_row_blocks_matches_one_block(monkeypatch):
    y = torch.rand(7, 5, 33) < 0.2
    check_zlpr_row_blocks_match_one_block(
        monkeypatch, torch.randn(7, 5, 33) * 4, lambda x: mk.multilabel_categorical_crossentropy(x, y, reduction="none"))


ZLPR_MEMORY_PROBE = """
import json, torch, marginkern as mk
torch.manual_seed(0)
N, C = 512, 50_000
s = torch.randn(N, C, requires_grad=True)
y = torch.rand(N, C) < 0.01
mk.multilabel_categorical_crossentropy(s[:4], y[:4]).backward()  # warm-up
before = peak()
mk.multilabel_categorical_crossentropy(s, y).backward()
print(json.dumps(dict(extra=peak() - before, logits_bytes=N * C * 4)))
"""


def test_zlpr_memory_is_the_gradient_and_a_few_row_blocks():
    """fwd+bwd over (512, 50000) fp32 logits: the gradient (1× the logits) and a few 8 MB row blocks (measured 2.0×
    with the allocator's slack), not the composition's masks, where-copies and saved tensors (6.7× measured)."""
    result = json.loads(run_python(ZLPR_MEMORY_PROBE, peak_memory=True))
    assert result["extra"] < 2.5 * result["logits_bytes"], result


def test_zlpr_without_labels_is_zero():
    """C = 0: log(1 + 0) + log(1 + 0) per row (reshape(-1, 0) cannot infer the rows)."""
    for shape in ((4, 0), (0,), (2, 3, 0)):
        s = torch.randn(*shape, requires_grad=True)
        rows = mk.multilabel_categorical_crossentropy(s, torch.zeros(*shape), reduction="none")
        assert rows.shape == shape[:-1] and (rows == 0).all()
        assert torch.autograd.grad(mk.multilabel_categorical_crossentropy(s, torch.zeros(*shape)), s)[0].shape == shape


def test_zlpr_rejects_soft_labels_and_shape_mismatch():
    with pytest.raises(ValueError, match="targets"):
        mk.multilabel_categorical_crossentropy(torch.randn(3, 4), torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="targets"):
        mk.multilabel_categorical_crossentropy(torch.randn(3, 4), torch.ones(3, 5))


# ---- Circle loss --------------------------------------------------------------------------------------

def naive_circle(x, labels, m=0.25, gamma=256.0):
    """PML's CircleLoss on the B × B cosine matrix, per anchor, mean over anchors with pairs."""
    x = F.normalize(x.double(), dim=1)
    sim = x @ x.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    ap, an = torch.relu(1 + m - sim.detach()), torch.relu(sim.detach() + m)
    lp = torch.where(pos, -gamma * ap * (sim - (1 - m)), torch.full_like(sim, -float("inf")))
    ln = torch.where(neg, gamma * an * (sim - m), torch.full_like(sim, -float("inf")))
    keep = pos.any(1) & neg.any(1)
    v = torch.logsumexp(lp[keep], 1) + torch.logsumexp(ln[keep], 1)
    per_anchor = torch.logaddexp(v, torch.zeros_like(v))  # log(1 + e^v), exactly (F.softplus is linear above 20)
    return per_anchor.mean() if keep.any() else sim.sum() * 0


@pytest.mark.parametrize("B,classes,block", [(40, 5, 7), (40, 5, 1000), (9, 9, 4), (12, 1, 5)])
def test_circle_matches_quadratic_definition(B, classes, block):
    x = torch.randn(B, 16, dtype=torch.float64)
    y = torch.randint(0, classes, (B,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = mk.circle_loss(x1, y, anchor_block=block)
    want = naive_circle(x2, y)
    torch.testing.assert_close(got, want)
    g1, g2 = torch.autograd.grad(got, x1)[0], torch.autograd.grad(want, x2)[0]
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype,grad_rtol", [(torch.float32, 2e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_circle_low_precision_at_gamma_256(dtype, grad_rtol):
    """γ = 256 (the paper's) scales the cosines' margins to exponents of ±256: in fp16/bf16 embeddings the loss still
    equals the float64 definition of the same (rounded) inputs to fp32 accuracy, the gradient to about one of the
    dtype's ulps (it is rounded to `dtype`: eps 9.8e-4 fp16, 7.8e-3 bf16; measured 2.1e-4 and 1.7e-3, the rounding of
    the float64 gradient itself), finite, anchors without a positive included."""
    torch.manual_seed(0)
    x = torch.randn(48, 32).to(dtype)
    y = torch.randint(0, 6, (48,))
    y[0] = 99  # an anchor without a positive
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got, want = mk.circle_loss(x1, y, gamma=256.0), naive_circle(x64, y, gamma=256.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    g, g64 = torch.autograd.grad(got, x1)[0], torch.autograd.grad(want, x64)[0]
    assert g.dtype == dtype and torch.isfinite(g).all()
    assert (g.double() - g64).norm() / g64.norm() < grad_rtol


def test_circle_op_opcheck_gradcheck_and_double_backward_raises():
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (11,))
    torch.library.opcheck(torch.ops.marginkern.circle.default, (x, y, 0.25, 8.0, 4))
    rows, _ = torch.ops.marginkern.circle(x, y, 0.25, 8.0, 4)
    torch.library.opcheck(torch.ops.marginkern.circle_backward.default, (torch.rand(11, dtype=torch.float64), x.detach(),
                                                                        y, 0.25, 8.0, 4))
    # (no gradcheck: the weights α are detached, PML's gradient, not the loss's derivative; naive_circle checks it)
    g = torch.autograd.grad(mk.circle_loss(x, y, gamma=8.0), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="circle cannot be differentiated twice"):
        g.sum().backward()


def test_circle_default_block_is_within_its_budget():
    """The default anchor block holds CIRCLE_BLOCK_BYTES of similarities in the accumulation dtype (a fixed 1024 rows
    were 4 GB per temporary at B = 10⁶), at least MIN_CIRCLE_BLOCK rows, at most the batch."""
    from marginkern.pairwise import CIRCLE_BLOCK_BYTES, MIN_CIRCLE_BLOCK, circle_anchor_block
    assert circle_anchor_block(torch.empty(20_000, 4)) == CIRCLE_BLOCK_BYTES // (20_000 * 4) > MIN_CIRCLE_BLOCK
    assert circle_anchor_block(torch.empty(20_000, 4, dtype=torch.bfloat16)) == CIRCLE_BLOCK_BYTES // (20_000 * 4)
    assert circle_anchor_block(torch.empty(20_000, 4, dtype=torch.float64)) == CIRCLE_BLOCK_BYTES // (20_000 * 8)
    assert circle_anchor_block(torch.empty(10**7, 4)) == MIN_CIRCLE_BLOCK
    assert circle_anchor_block(torch.empty(50, 4)) == 50
    assert circle_anchor_block(torch.empty(0, 4)) == 1


def test_circle_compiles_once_over_batch_sizes_and_exports():
    """One op call, not a Python loop over the batch: a dynamic compiled graph serves every batch size (the loop fixed
    B in the graph: a recompile per size, and fullgraph=True failed at the recompile limit), and torch.export with a
    dynamic batch dimension runs at another size."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b: mk.circle_loss(a, b, gamma=32.0), fullgraph=True, dynamic=True,
                             backend=counter)
    for B in (7, 13, 29, 61):
        x, y = torch.randn(B, 8, requires_grad=True), torch.randint(0, 4, (B,))
        got, want = compiled(x, y), mk.circle_loss(x, y, gamma=32.0)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    assert counter.frame_count == 1

    class Circle(torch.nn.Module):
        def forward(self, a, b):
            return mk.circle_loss(a, b, gamma=32.0, anchor_block=8)
    # column-major embeddings: the backward's gradient is contiguous, as its fake says (Inductor asserts the strides)
    x, y = torch.randn(5, 10).t().requires_grad_(), torch.arange(10) % 3
    inductor = torch.compile(lambda a, b: mk.circle_loss(a, b, gamma=32.0), fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(inductor(x, y), x)[0],
                               torch.autograd.grad(mk.circle_loss(x, y, gamma=32.0), x)[0])

    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(Circle(), (torch.randn(13, 8), torch.randint(0, 4, (13,))),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    x, y = torch.randn(29, 8), torch.randint(0, 4, (29,))
    torch.testing.assert_close(program.module()(x, y), mk.circle_loss(x, y, gamma=32.0))


CIRCLE_MEMORY_PROBE = """
import json, torch, marginkern as mk
import marginkern.pairwise
marginkern.pairwise.CIRCLE_BLOCK_BYTES = 1 << 20  # the default's 8 MB blocks, scaled down with the batch
torch.manual_seed(0)
B, D = 6144, 32
x = torch.randn(B, D, requires_grad=True)
y = torch.randint(0, B // 4, (B,))
mk.circle_loss(x[:300], y[:300]).backward()  # warm-up: thread pools, allocator
before = peak()
mk.circle_loss(x, y).backward()
print(json.dumps(dict(extra=peak() - before, pairs_bytes=B * B * 4)))
"""


def test_circle_memory_stays_far_below_the_pair_matrix():
    """A fwd+bwd holds a few blocks of anchors, not the B × B similarities (151 MB in fp32 at B = 6144, with 1 MB
    blocks of them; the fixed 1024-anchor blocks of before held ~12 temporaries of 25 MB at once here, and 487 MB at
    B = 10240 with the 8 MB default)."""
    result = json.loads(run_python(CIRCLE_MEMORY_PROBE, peak_memory=True))
    assert result["extra"] < result["pairs_bytes"] / 8, result


@pytest.mark.parametrize("call,match", [
    (lambda: mk.cosent_loss(torch.randn(3, 2), torch.zeros(3)), "scores"),
    (lambda: mk.cosent_loss(torch.randn(3), torch.zeros(4)), "labels"),
    (lambda: mk.cosent_loss(torch.randn(3), torch.zeros(3), scale=-1.0), "scale"),
    (lambda: mk.cosent_embedding_loss(torch.randn(3, 2), torch.randn(3, 4), torch.zeros(3)), "embeddings_b"),
    (lambda: mk.circle_loss(torch.randn(3, 2), torch.zeros(3), gamma=0.0), "gamma"),
    (lambda: mk.circle_loss(torch.randn(3, 2), torch.zeros(3), anchor_block=0), "anchor_block"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_cosent_infinite_score_gives_an_infinite_loss():
    s = torch.tensor([0.1, float("inf"), -0.3, 0.2, 0.5] * 30)
    y = torch.tensor([1, 0, 2, 1, 2] * 30)
    assert mk.cosent_loss(s, y) == float("inf")


def check_cosent_infinite_score_of_the_top_label(device):
    """+inf on pairs of the largest label: no pair has them as the smaller label, so they add nothing; the
    loss is that of the other pairs and their gradient 0 (e^{+inf − inf} was NaN), as autograd through the
    masked O(B²) definition gives."""
    s = torch.tensor([0.0, 0.1, float("inf"), 0.3] * 40, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1] * 40, device=device)
    loss = mk.cosent_loss(s, y)
    loss.backward()
    finite = torch.isfinite(s.detach())
    kept = s.detach()[finite].double().requires_grad_()
    want = naive_cosent(kept, y[finite])
    want.backward()
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert (s.grad[~finite] == 0).all()
    torch.testing.assert_close(s.grad[finite].double(), kept.grad, rtol=1e-4, atol=1e-5)


def check_cosent_nan_label_gives_nan(device):
    """A NaN label has no place in the label order: loss and gradients are NaN, not a quiet answer."""
    s = torch.tensor([0.1, 0.2, 0.3, 0.4] * 10, device=device, requires_grad=True)
    y = torch.tensor([0.0, float("nan"), 1.0, 2.0] * 10, device=device)
    loss = mk.cosent_loss(s, y)
    loss.backward()
    assert loss.isnan() and s.grad.isnan().all()


def test_cosent_infinite_score_of_the_top_label():
    check_cosent_infinite_score_of_the_top_label("cpu")


def test_cosent_nan_label_gives_nan():
    check_cosent_nan_label_gives_nan("cpu")


def check_cosent_small_loss_keeps_its_digits(device):
    """A nearly solved batch: log(1 + x) computed as log of the rounded 1 + x gave 6% off at scale 40 and 0 at
    scale 45 in fp32 (a review's finding); softplus of the LSE keeps fp32's relative precision. Also a batch of
    many pairs whose terms all underflow the 1 + x."""
    for scale in (20.0, 40.0, 45.0):
        s = torch.tensor([0.0, 0.4], device=device, requires_grad=True)
        y = torch.tensor([0, 1], device=device)
        loss = mk.cosent_loss(s, y, scale=scale)
        loss.backward()
        ref = s.detach().double().requires_grad_()
        want = naive_cosent(ref, y.cpu(), scale)
        want.backward()
        torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), rtol=1e-5, atol=0.0)
        torch.testing.assert_close(s.grad.double().cpu(), ref.grad, rtol=1e-5, atol=0.0)
    y = torch.tensor([0, 1] * 50, device=device)
    s = y * 0.5  # 2500 pairs, each term e^{−20}: 1 + x with x ≈ 5e-6 kept only 2% of x in fp32
    want = naive_cosent(s.cpu().double(), y.cpu(), 40.0)
    assert 0 < want < 1e-5
    torch.testing.assert_close(mk.cosent_loss(s, y, scale=40.0).double().cpu(), want, rtol=1e-5, atol=0.0)


def test_cosent_small_loss_keeps_its_digits():
    check_cosent_small_loss_keeps_its_digits("cpu")


def test_zlpr_small_loss_keeps_its_digits_and_empty_sides_stay_finite():
    """log(1 + Σ e^s) as softplus(LSE): a confident row's 6e-9 was 0 in fp32; a row without negatives (or without
    positives) adds exactly 0 and a gradient of 0 there, not NaN."""
    s = torch.tensor([[-20.0, -20.0, 20.0, -25.0], [3.0, 1.0, -2.0, 0.5]], requires_grad=True)
    y = torch.tensor([[0, 0, 1, 0], [1, 1, 1, 1]])
    loss = mk.multilabel_categorical_crossentropy(s, y, reduction="none")
    ref = s.detach().double().requires_grad_()
    want = torch.stack([naive_zlpr(ref[i:i + 1], y[i:i + 1]).sum() for i in range(2)])
    assert 0 < want[0] < 1e-8
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0.0)
    grad, = torch.autograd.grad(loss.sum(), s)
    want_grad, = torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-12)


def test_zlpr_compiles_once_over_shapes():
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b: mk.multilabel_categorical_crossentropy(a, b), fullgraph=True, dynamic=True,
                             backend=counter)
    for N, C in ((5, 7), (9, 7), (9, 13)):
        s, y = torch.randn(N, C, requires_grad=True), torch.rand(N, C) < 0.3
        got, want = compiled(s, y), mk.multilabel_categorical_crossentropy(s, y)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])
    assert counter.frame_count == 1


def test_zlpr_compiled_with_non_binary_targets_gives_nan():
    """A compiled call cannot look at the targets' values (no graph break); a target that is not 0/1 makes its row
    NaN there, instead of counting as a positive (the eager call raises)."""
    s = torch.randn(3, 6)
    y = torch.tensor([[0, 0.5, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0], [2, 0, 0, 1, 0, 0]])
    compiled = torch.compile(lambda a, b: mk.multilabel_categorical_crossentropy(a, b, reduction="none"),
                             fullgraph=True, backend="aot_eager")
    rows = compiled(s, y)
    assert rows[0].isnan() and rows[2].isnan() and torch.isfinite(rows[1])
    torch.testing.assert_close(rows[1], mk.multilabel_categorical_crossentropy(s[1:2], y[1:2]))


def test_circle_loss_of_no_anchors_is_differentiable():
    x = torch.randn(0, 8, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = mk.circle_loss(x, torch.zeros(0, dtype=torch.long), reduction=reduction)
        loss.sum().backward()
        assert loss.numel() == (0 if reduction == "none" else 1) and x.grad.shape == (0, 8)


def test_cosent_unsigned_labels():
    """torch sorts no uint16/32/64 tensor: those labels go as int64 (a uint64 one past 2⁶³ is refused)."""
    s = torch.randn(40)
    y = torch.randint(0, 5, (40,))
    want = mk.cosent_loss(s, y)
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        torch.testing.assert_close(mk.cosent_loss(s, y.to(dtype)), want)
    with pytest.raises(ValueError, match="uint64 must be below 2"):
        mk.cosent_loss(s, torch.full((40,), 2**63 + 5, dtype=torch.uint64))


def test_large_losses_are_exact_in_float64():
    """log(1 + Σ e^v) just above v = 20, where F.softplus would return v itself (e^-21 = 8e-10 off): CoSENT, ZLPR and
    Circle match their definitions to float64 rounding."""
    scores, labels = torch.tensor([0.525, -0.525], dtype=torch.float64), torch.tensor([0, 1])  # one pair, v = 21
    loss = mk.cosent_loss(scores, labels, scale=20.0)
    torch.testing.assert_close(loss, naive_cosent(scores, labels), rtol=1e-15, atol=0)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(torch.tensor(21.0, dtype=torch.float64))), rtol=1e-15,
                               atol=0)
    s = torch.full((3, 1), 21.0, dtype=torch.float64)  # one negative at 21: log(1 + e^21)
    y = torch.zeros(3, 1, dtype=torch.bool)
    torch.testing.assert_close(mk.multilabel_categorical_crossentropy(s, y, reduction="none"), naive_zlpr(s, y),
                               rtol=1e-15, atol=0)
    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=torch.float64)
    circle_labels = torch.arange(12) % 3
    for gamma in (10.0, 12.0, 14.0):  # per-anchor values around 20
        torch.testing.assert_close(mk.circle_loss(x, circle_labels, gamma=gamma),
                                   naive_circle(x, circle_labels, gamma=gamma), rtol=1e-15, atol=0)
