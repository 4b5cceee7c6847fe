"""Sparse multilabel categorical CE (bert4keras's sparse ZLPR, GPLinker's loss) against the dense loss of the
same positives and against bert4keras's own formula, both in float64."""
import json

import pytest
import torch

import marginkern as mk
from tests.helpers import run_python
from tests.test_pairwise import check_zlpr_row_blocks_match_one_block, naive_zlpr


def bert4keras_sparse_zlpr(s, positives, mask_zero=False):
    """bert4keras.backend.sparse_multilabel_categorical_crossentropy (c1ae0dc), ported line by line: padding is
    index 0 with mask_zero; the negatives' term is LSE_all + log(clip(1 − e^{LSE_pos − LSE_all}, 1e-7, 1))."""
    zeros = torch.zeros_like(s[..., :1])
    s = torch.cat([s, zeros], -1)
    if mask_zero:
        infs = zeros + float("inf")
        s = torch.cat([infs, s[..., 1:]], -1)
    y_pos_2 = torch.gather(s, -1, positives)
    y_pos_1 = torch.cat([y_pos_2, zeros], -1)
    if mask_zero:
        s = torch.cat([-infs, s[..., 1:]], -1)
        y_pos_2 = torch.gather(s, -1, positives)
    pos_loss = torch.logsumexp(-y_pos_1, -1)
    all_loss = torch.logsumexp(s, -1)
    aux_loss = torch.logsumexp(y_pos_2, -1) - all_loss
    aux_loss = torch.clamp(1 - torch.exp(aux_loss), 1e-7, 1)
    return pos_loss + all_loss + torch.log(aux_loss)


def dense_targets(positives, C, ignore_index=-100, mask_zero=False):
    """The 0/1 targets (..., C) that mark each row's listed classes (padding marks nothing)."""
    named = positives != ignore_index
    if mask_zero:
        named &= positives != 0
    y = torch.zeros(*positives.shape[:-1], C + 1)
    return y.scatter_(-1, torch.where(named, positives, C), 1.0)[..., :C]


def random_positives(shape, C, P, generator, padding=-100, low=0, ragged=True):
    """(…, P) distinct class indices per row in [low, C), a random number of them padding (ragged)."""
    rows = torch.rand(*shape, C - low, generator=generator).argsort(-1)[..., :P] + low
    count = torch.randint(0, P + 1, (*shape, 1), generator=generator) if ragged else torch.full((*shape, 1), P)
    return torch.where(torch.arange(P) < count, rows, padding)


@pytest.mark.parametrize("shape", [(6,), (3, 4), (1,)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sparse_zlpr_equals_the_dense_loss_of_its_positives(shape, reduction):
    g = torch.Generator().manual_seed(0)
    C = 37
    s = torch.randn(*shape, C, dtype=torch.float64, generator=g) * 3
    positives = random_positives(shape, C, 5, g)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = mk.sparse_multilabel_categorical_crossentropy(x1, positives, reduction=reduction)
    rows = naive_zlpr(x2, dense_targets(positives, C))
    want = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x1)[0], torch.autograd.grad(want.sum(), x2)[0],
                               rtol=1e-12, atol=1e-12)
    # and bit for bit the dense op on those targets (one implementation of the loss)
    dense = mk.multilabel_categorical_crossentropy(s, dense_targets(positives, C), reduction=reduction)
    assert torch.equal(mk.sparse_multilabel_categorical_crossentropy(s, positives, reduction=reduction), dense)


@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_zlpr_matches_bert4keras(mask_zero):
    """Where bert4keras's formula is accurate (float64, the negatives holding the mass), the same values; with
    mask_zero, index 0 pads and class 0 is out of the loss (the dense loss over classes 1..C−1). Without mask_zero
    bert4keras has no padding (every row lists P classes)."""
    g = torch.Generator().manual_seed(1)
    C = 50
    s = torch.randn(8, C, dtype=torch.float64, generator=g) * 2
    padding = 0 if mask_zero else -100
    positives = random_positives((8,), C, 6, g, padding=padding, low=1 if mask_zero else 0, ragged=mask_zero)
    got = mk.sparse_multilabel_categorical_crossentropy(s, positives, mask_zero=mask_zero, reduction="none")
    torch.testing.assert_close(got, bert4keras_sparse_zlpr(s, positives, mask_zero), rtol=1e-10, atol=1e-12)
    if mask_zero:
        dense = naive_zlpr(s[:, 1:], dense_targets(positives, C, mask_zero=True)[:, 1:])
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


def test_sparse_zlpr_mask_zero_gives_class_zero_no_gradient():
    s = torch.randn(5, 9, requires_grad=True)
    positives = torch.tensor([[0, 3], [2, 0], [0, 0], [1, 8], [4, 0]])
    loss = mk.sparse_multilabel_categorical_crossentropy(s, positives, mask_zero=True)
    (grad,) = torch.autograd.grad(loss, s)
    assert not grad[:, 0].any() and grad[:, 1:].abs().min() > 0


def test_sparse_zlpr_keeps_its_digits_where_bert4keras_cancels():
    """Positives holding the softmax mass (GPLinker's confident spans): bert4keras's 1 − e^{LSE_pos − LSE_all}
    cancels (fp32: the negatives' term is off by orders of magnitude, or clipped at 1e-7); ours sums the negatives
    themselves, within fp32's rounding of the float64 definition."""
    C = 1000
    s = torch.full((3, C), -8.0)
    positives = torch.tensor([[5, 17], [100, 101], [999, 0]])
    for row, ids in enumerate(positives.tolist()):
        s[row, ids] = 12.0
    want = naive_zlpr(s.double(), dense_targets(positives, C))
    got = mk.sparse_multilabel_categorical_crossentropy(s, positives, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
    b4k = bert4keras_sparse_zlpr(s, positives)
    assert ((b4k.double() - want).abs() / want).max() > 0.1  # the port's own error, the reason for the dense sum


def test_sparse_zlpr_duplicates_and_padding_name_nothing_twice():
    s = torch.randn(2, 6, dtype=torch.float64)
    once = torch.tensor([[1, 4, -100, -100], [2, -100, -100, -100]])
    twice = torch.tensor([[1, 4, 4, 1], [-100, 2, 2, -100]])
    torch.testing.assert_close(mk.sparse_multilabel_categorical_crossentropy(s, twice, reduction="none"),
                               mk.sparse_multilabel_categorical_crossentropy(s, once, reduction="none"), rtol=0, atol=0)


def test_sparse_zlpr_without_positives_and_without_classes():
    s = torch.randn(3, 7, requires_grad=True)
    none = torch.empty(3, 0, dtype=torch.long)
    rows = mk.sparse_multilabel_categorical_crossentropy(s, none, reduction="none")
    torch.testing.assert_close(rows, torch.nn.functional.softplus(torch.logsumexp(s, -1)).detach())
    empty = torch.randn(4, 0, requires_grad=True)
    rows = mk.sparse_multilabel_categorical_crossentropy(empty, torch.full((4, 2), -100), reduction="none")
    assert rows.shape == (4,) and (rows == 0).all()
    assert torch.autograd.grad(rows.sum(), empty)[0].shape == (4, 0)


def test_sparse_zlpr_masked_spans_are_left_out():
    """GlobalPointer's −inf spans: neither negatives nor positives (a positive on one adds nothing), finite."""
    s = torch.randn(4, 8, dtype=torch.float64)
    masked = s.clone()
    masked[:, 5:] = -float("inf")
    masked.requires_grad_()
    positives = torch.tensor([[0, 6], [1, -100], [7, 2], [3, 4]])
    rows = mk.sparse_multilabel_categorical_crossentropy(masked, positives, reduction="none")
    (grad,) = torch.autograd.grad(rows.sum(), masked)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all() and not grad[:, 5:].any()
    torch.testing.assert_close(rows, naive_zlpr(s[:, :5], dense_targets(positives, 8)[:, :5]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_zlpr_half_logits(dtype):
    """16-bit logits are summed in fp32: the loss within fp32 rounding of float64 on the same (rounded) logits, the
    gradient within the 16-bit output's rounding."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(16, 300, generator=g) * 4).to(dtype).requires_grad_()
    positives = random_positives((16,), 300, 8, g)
    rows = mk.sparse_multilabel_categorical_crossentropy(s, positives, reduction="none")
    (grad,) = torch.autograd.grad(rows.sum(), s)
    s64 = s.detach().double().requires_grad_()
    want = naive_zlpr(s64, dense_targets(positives, 300))
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(rows.double(), want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_sparse_zlpr_by_row_blocks_matches_one_block(monkeypatch):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(7, 5, 33, generator=g) * 4
    positives = random_positives((7, 5), 33, 4, g)
    check_zlpr_row_blocks_match_one_block(
        monkeypatch, s, lambda x: mk.sparse_multilabel_categorical_crossentropy(x, positives, reduction="none"))


def test_sparse_zlpr_ops_opcheck():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 3, 9, dtype=torch.float64, generator=g) * 3
    s[0, 0, 2] = -float("inf")
    positives = random_positives((4, 3), 9, 3, g)
    for mask_zero in (False, True):
        args = (s.clone().requires_grad_(), positives, mask_zero, -100)
        torch.library.opcheck(torch.ops.marginkern.sparse_multilabel_ce.default, args)
        _, L_neg, L_pos = torch.ops.marginkern.sparse_multilabel_ce(s, positives, mask_zero, -100)
        torch.library.opcheck(torch.ops.marginkern.sparse_multilabel_ce_backward.default,
                              (torch.rand(12, dtype=torch.float64), s, positives, L_neg, L_pos, mask_zero, -100))
    x = torch.randn(6, 40, requires_grad=True)
    before = x.detach().clone()
    ids = torch.randint(0, 40, (6, 3))
    g = torch.autograd.grad(mk.sparse_multilabel_categorical_crossentropy(x, ids), x, create_graph=True)[0]
    assert torch.equal(x.detach(), before)
    with pytest.raises(RuntimeError, match="sparse_multilabel_ce cannot be differentiated twice"):
        g.sum().backward()


def test_sparse_zlpr_compiles_once_over_shapes_and_marks_bad_rows_nan():
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b: mk.sparse_multilabel_categorical_crossentropy(a, b, mask_zero=True),
                             fullgraph=True, dynamic=True, backend=counter)
    g = torch.Generator().manual_seed(6)
    for N, C, P in ((5, 7, 2), (9, 7, 3), (9, 13, 3)):
        s = torch.randn(N, C, generator=g, requires_grad=True)
        positives = random_positives((N,), C, P, g, padding=0, low=1)
        got, want = compiled(s, positives), mk.sparse_multilabel_categorical_crossentropy(s, positives, mask_zero=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])
    assert counter.frame_count == 1
    # a compiled call cannot look at the values: a row naming a class outside [0, C) is NaN (eager calls raise)
    rows = torch.compile(lambda a, b: mk.sparse_multilabel_categorical_crossentropy(a, b, reduction="none"),
                         fullgraph=True, backend="aot_eager")(torch.randn(3, 6), torch.tensor([[1, 6], [2, -100],
                                                                                                [-1, 0]]))
    assert rows[0].isnan() and rows[2].isnan() and torch.isfinite(rows[1])


def test_sparse_zlpr_errors_name_the_argument():
    s = torch.randn(3, 5)
    f = mk.sparse_multilabel_categorical_crossentropy
    with pytest.raises(TypeError, match="positives must hold integer class indices"):
        f(s, torch.ones(3, 2))
    with pytest.raises(TypeError, match="positives must hold integer class indices"):
        f(s, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positives must have shape \(\*\(3,\), P\)"):
        f(s, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positives must have shape"):
        f(s, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positives holds class 5, outside \[0, 5\) and not ignore_index=-100"):
        f(s, torch.tensor([[0, 5], [1, 2], [3, 4]]))
    with pytest.raises(ValueError, match=r"positives holds class -1"):
        f(s, torch.tensor([[0, -1], [1, 2], [3, 4]]))
    with pytest.raises(ValueError, match=r"positives holds class 0, outside \[0, 0\)"):
        f(torch.randn(3, 0), torch.tensor([[0], [-100], [-100]]))
    with pytest.raises(TypeError, match="mask_zero must be a bool"):
        f(s, torch.zeros(3, 1, dtype=torch.long), mask_zero=1)
    with pytest.raises(TypeError, match="ignore_index"):
        f(s, torch.zeros(3, 1, dtype=torch.long), ignore_index=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        f(s, torch.zeros(3, 1, dtype=torch.long), reduction="avg")
    with pytest.raises(TypeError, match="logits"):
        f(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long))
    # another ignore_index pads instead
    torch.testing.assert_close(f(s, torch.tensor([[1, -1], [2, -1], [-1, -1]]), ignore_index=-1),
                               f(s, torch.tensor([[1, -100], [2, -100], [-100, -100]])))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64])
def test_sparse_zlpr_integer_dtypes_of_positives(dtype):
    """Any integer dtype of index (aminmax has no uint16/32/64 kernel: the check reads them as int64); in a narrow
    dtype a class that equals ignore_index only after wrapping (156 = −100 in uint8) is a class, and refused."""
    s = torch.randn(2, 300, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 250], [3, 3, 7]])
    got = mk.sparse_multilabel_categorical_crossentropy(s, ids.to(dtype), reduction="none")
    torch.testing.assert_close(got, mk.sparse_multilabel_categorical_crossentropy(s, ids, reduction="none"))
    with pytest.raises(ValueError, match="positives holds class 156"):
        mk.sparse_multilabel_categorical_crossentropy(torch.randn(2, 10), torch.tensor([[1, 156], [2, 3]],
                                                                                        dtype=torch.uint8))


def test_sparse_zlpr_mask_zero_padding_without_classes():
    rows = mk.sparse_multilabel_categorical_crossentropy(torch.randn(2, 0), torch.zeros(2, 2, dtype=torch.long),
                                                         mask_zero=True, reduction="none")
    assert (rows == 0).all()


SPARSE_ZLPR_MEMORY_PROBE = """
import json, torch, marginkern as mk
torch.manual_seed(0)
N, C = 512, 50_000
s = torch.randn(N, C, requires_grad=True)
positives = torch.randint(0, C, (N, 16))
mk.sparse_multilabel_categorical_crossentropy(s[:4], positives[:4]).backward()  # warm-up
before = peak()
mk.sparse_multilabel_categorical_crossentropy(s, positives).backward()
print(json.dumps(dict(extra=peak() - before, logits_bytes=N * C * 4)))
"""


def test_sparse_zlpr_memory_is_the_gradient_and_a_few_row_blocks():
    """fwd+bwd over (512, 50000) fp32 logits with 16 positives per row: the gradient and a few 8 MB row blocks, as
    the dense op (2.0× the logits measured there); no (N, C) targets are made (they would add 0.25× as bool)."""
    result = json.loads(run_python(SPARSE_ZLPR_MEMORY_PROBE, peak_memory=True))
    assert result["extra"] < 2.5 * result["logits_bytes"], result
