"""linear_cross_entropy(return_token_accuracy=True): whether each token's target logit is its largest, from the
forward's own pass, on the CPU paths (C++ and PyTorch tiles, through the op), reductions, shapes, ties, compile and the
refusals."""
import pytest
import torch

import marginkern as mk


def separated_case(N, C, D, dtype, device="cpu", softcap=None):
    """Unit rows w_j and x_n = 5·w_{k_n} + small noise: the logit of class k_n is 5, every other one 5·cos ≤ 5·max cos;
    the case is drawn again until that lead exceeds 0.5 (far above any rounding); targets k_n on even rows
    (correct), the runner-up class on odd rows (wrong), row 1 ignored. Returns the inputs and the expected
    correctness."""
    while True:
        w = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=1)
        k = torch.randint(0, C, (N,))
        x = 5.0 * w[k] + 0.001 * torch.randn(N, D, dtype=torch.float64)
        z = x @ w.t()
        top2 = z.topk(2, dim=1).values
        if (z.argmax(1) == k).all() and (top2[:, 0] - top2[:, 1]).min() > 0.5:
            break
    # the wrong targets are each row's runner-up: the largest logit but one, so that a max missing a chunk shows
    t = torch.where(torch.arange(N) % 2 == 0, k, z.topk(2, dim=1).indices[:, 1])
    t[1] = -100
    expected = (t == k) & (t != -100)
    return (x.to(dtype).to(device), w.to(dtype).to(device), t.to(device), expected.to(device))


def check_token_accuracy(device, dtype, opts, shape=(37, 301, 45)):
    """Per token ("none"), the fraction ("mean") and the count ("sum") against the constructed answer; the loss and
    lse beside it unchanged."""
    x, w, t, expected = separated_case(*shape, dtype, device, opts.get("softcap"))
    b = (0.1 * torch.randn(shape[1])).to(dtype).to(device)
    valid = t != -100
    for reduction, want in (("none", expected.double()), ("mean", expected.sum().double() / valid.sum()),
                            ("sum", expected.sum().double())):
        loss, lse, accuracy = mk.linear_cross_entropy(x, w, t, b, reduction=reduction, return_lse=True,
                                                      return_token_accuracy=True, **opts)
        assert accuracy.dtype == loss.dtype and not accuracy.requires_grad
        torch.testing.assert_close(accuracy, want.to(accuracy.dtype), rtol=0, atol=0)
        plain_loss, plain_lse = mk.linear_cross_entropy(x, w, t, b, reduction=reduction, return_lse=True, **opts)
        torch.testing.assert_close(loss, plain_loss)
        torch.testing.assert_close(lse, plain_lse)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=50.0), dict(focal_gamma=2.0)])
def test_token_accuracy(backend, dtype, opts, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_token_accuracy("cpu", dtype, opts)


def test_matches_argmax_of_materialised_logits_and_gradients_are_unchanged():
    """Random logits (no separation): against argmax of the same logits, which ties cannot reach here; the gradient
    of the loss is the one of the plain call."""
    x = torch.randn(200, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = (x.detach() @ w.detach().t()).argmax(1)
    t[::3] = torch.randint(0, 50, (67,))
    t[5] = -100
    loss, accuracy = mk.linear_cross_entropy(x, w, t, return_token_accuracy=True, reduction="none")
    want = ((x @ w.t()).argmax(1) == t) & (t != -100)
    assert torch.equal(accuracy, want.double())
    got = torch.autograd.grad(loss.sum(), (x, w))
    plain = torch.autograd.grad(mk.linear_cross_entropy(x, w, t, reduction="none").sum(), (x, w))
    for g, e in zip(got, plain):
        torch.testing.assert_close(g, e)


def test_ties_count_as_correct_and_class_weight_does_not_weigh():
    """Exact ties (bit-identical logits) count as correct. (A duplicated class is not such a tie: its logit comes out
    of the GEMM, the target's from a gathered dot product, and the two may differ in their last bit.)"""
    x = torch.zeros(4, 8)  # every logit 0: each target is among the largest
    w = torch.randn(10, 8)
    t = torch.tensor([0, 3, -100, 9])
    _, accuracy = mk.linear_cross_entropy(x, w, t, return_token_accuracy=True, class_weight=torch.rand(10))
    assert accuracy == 1.0
    _, accuracy = mk.linear_cross_entropy(x, w, torch.full_like(t, -100), return_token_accuracy=True)
    assert accuracy == 0.0  # the mean over no tokens


def check_non_finite_rows_are_not_correct(device, dtype=torch.float32):
    """A NaN logit in another column (a NaN bias entry; the Triton kernels' max skips NaN, a review found the token
    counted correct there), a NaN target logit and a row of −inf logits: the loss is not finite, the token not
    correct; the other rows unchanged."""
    x, w, t, expected = separated_case(12, 40, 16, dtype, device)
    b = torch.zeros(40, dtype=dtype, device=device)
    b[(t[0] + 1) % 40] = float("nan")  # every row sees it: all rows NaN
    _, accuracy = mk.linear_cross_entropy(x, w, t, b, reduction="none", return_token_accuracy=True)
    assert not accuracy.any()
    x = x.clone()
    x[2] = float("nan")
    _, accuracy = mk.linear_cross_entropy(x, w, t, reduction="none", return_token_accuracy=True)
    assert accuracy[2] == 0 and torch.equal(accuracy[3:], expected[3:].to(accuracy.dtype))
    b = torch.full((40,), -float("inf"), dtype=dtype, device=device)
    _, accuracy = mk.linear_cross_entropy(x[3:], w, t[3:], b, reduction="none", return_token_accuracy=True)
    assert not accuracy.any()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_non_finite_rows_are_not_correct(backend, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_non_finite_rows_are_not_correct("cpu")


def test_sequence_shape_and_shift():
    x = torch.randn(2, 6, 8)
    w = torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 6))
    labels[:, 1:] = (x[:, :-1] @ w.t()).argmax(-1)  # every position predicts its next label
    loss, accuracy = mk.linear_cross_entropy(x, w, labels, shift=1, reduction="none", return_token_accuracy=True)
    assert accuracy.shape == loss.shape == (2, 6)
    assert (accuracy[:, :-1] == 1).all() and (accuracy[:, -1] == 0).all()
    _, mean = mk.linear_cross_entropy(x, w, labels, shift=1, return_token_accuracy=True)
    assert mean == 1.0


def test_op_path_compile_and_module():
    x, w, t, expected = separated_case(24, 60, 16, torch.float32)
    want = expected.sum() / (t != -100).sum()
    step = lambda a, ww, tt: mk.linear_cross_entropy(a, ww, tt, return_token_accuracy=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, t)[1], want)
    args = (x, w, t, None, -100, 0.0, 0.0, None, 0.0, 0.0, None, None, False, True)
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy.default, args)
    module = mk.LinearCrossEntropyLoss(return_lse=True, return_token_accuracy=True)
    assert "return_token_accuracy=True" in repr(module)
    loss, lse, accuracy = module(x, w, t)
    torch.testing.assert_close(accuracy, want)


def test_refusals():
    x, w, t, _ = separated_case(4, 9, 3, torch.float32)
    with pytest.raises(ValueError, match="return_token_accuracy=True needs logits_buffer_mb=None"):
        mk.linear_cross_entropy(x, w, t, return_token_accuracy=True, logits_buffer_mb=1)
    with pytest.raises(ValueError, match="return_token_accuracy=True needs logits_buffer_mb=None"):
        mk.LinearCrossEntropyLoss(return_token_accuracy=True, logits_buffer_mb=1)
    with pytest.raises(TypeError, match="return_token_accuracy must be a bool"):
        mk.linear_cross_entropy(x, w, t, return_token_accuracy="yes")


@pytest.mark.parametrize("tiles_kind", ["cpp", "reference"])
def test_row_max_over_many_class_chunks(tiles_kind):
    """The row max merged over class chunks (the targets' classes spread over all of them)."""
    from marginkern.cpp_tiles import CppTiles
    from marginkern.engine import TorchTiles
    from marginkern.linear_ce import LinearCEOptions, linear_ce_forward
    x, w, t, expected = separated_case(40, 1100, 64, torch.float32)
    tiles = CppTiles(buffer_bytes=40 * 4 * 256) if tiles_kind == "cpp" else TorchTiles(buffer_bytes=40 * 4 * 100)
    assert len(tiles.class_chunks(40, 1100, x)) >= 4
    opts = LinearCEOptions(-100, 0.0, 0.0, None, 0.0, 0.0)
    loss, lse, correct = linear_ce_forward(x, w, t, None, opts, tiles, token_accuracy=True)
    assert torch.equal(correct, expected)
    torch.testing.assert_close(lse, torch.logsumexp(x.double() @ w.double().t(), 1).float())
