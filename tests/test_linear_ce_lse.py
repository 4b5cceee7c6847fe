"""linear_cross_entropy(return_lse=True): the per-token log-sum-exp beside the loss, and its gradient, against
materialised float64 logits on the CPU paths (C++ tiles, PyTorch tiles, through the op), autograd tooling, the
module and the refusals."""
import pytest
import torch

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case

OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0), dict(focal_gamma=2.0),
           dict(gamma_ce=0.5, label_smoothing=0.1)]


def materialised_lse(x, w, b, softcap=None, **unused):
    z = x.double() @ w.double().t() + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.logsumexp(z, 1)


def check_lse_and_its_gradient(device, dtype, opts, shape=(37, 301, 45), class_weight=False):
    """The returned lse against materialised float64, and the gradients of loss + a random weighted sum of lse and
    lse² (a custom z-loss) against the library's own loss plus autograd through materialised float64 logits."""
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0, 3))
    w = (w.detach() * 0.3).to(dtype)
    b = torch.randn(C, device=device).to(dtype)
    weights = dict(class_weight=torch.rand(C, device=device) + 0.5) if class_weight else {}
    u = torch.randn(N, device=device, dtype=torch.float64)
    oracle_opts = {k: v for k, v in opts.items() if k != "grad_filter_eps"}

    def with_lse(fn_loss, fn_lse):
        leaves = [v.detach().requires_grad_() for v in (x, w, b)]
        loss, lse = fn_loss(*leaves), fn_lse(*leaves)
        total = loss + (u.to(lse.dtype) * lse).sum() + 0.01 * (lse * lse).mean()
        return (lse.detach(),) + torch.autograd.grad(total, leaves)

    def ours(*leaves):
        ours.lse = None
        loss, lse = mk.linear_cross_entropy(*leaves[:2], t, leaves[2], return_lse=True, **opts, **weights)
        ours.lse = lse
        return loss
    got = with_lse(ours, lambda *leaves: ours.lse)
    want = with_lse(lambda xx, ww, bb: reference.linear_cross_entropy(xx.double(), ww.double(), t, bb.double(),
                                                                      **oracle_opts, **weights),
                    lambda xx, ww, bb: materialised_lse(xx, ww, bb, **opts))
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got[0].shape == (N,)
    assert_close_rel(got[0], want[0], dtype, "lse", floor=1.0)
    for name, g, e in zip(("grad input", "grad weight", "grad bias"), got[1:], want[1:]):
        assert_close_rel(g, e, dtype, name)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTIONS)
def test_lse_and_gradient_match_materialised(backend, dtype, opts, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_lse_and_its_gradient("cpu", dtype, opts)


def test_with_class_weight_and_filtering():
    check_lse_and_its_gradient("cpu", torch.float64, dict(label_smoothing=0.1), class_weight=True)
    check_lse_and_its_gradient("cpu", torch.float64, dict(grad_filter_eps=1e-30))


def test_lse_alone_and_loss_alone():
    """Only one of the two outputs in the graph: the other one's gradient is None (eager) or zeros (the op)."""
    x, w, t = make_case(12, 50, 8, torch.float64, ignore=(1,))
    _, lse = mk.linear_cross_entropy(x, w, t, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (x, w))
    want = torch.autograd.grad(torch.logsumexp(x @ w.t(), 1).sum(), (x, w))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    loss, _ = mk.linear_cross_entropy(x, w, t, return_lse=True)
    for g, e in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(mk.linear_cross_entropy(x, w, t), (x, w))):
        torch.testing.assert_close(g, e)


def test_shapes_shift_and_in_place_edits():
    """lse takes the target's shape, (B, T) with shift=1 (every position, the last one's too); editing it in place
    (lse[pad] = 0) leaves the backward pass alone."""
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 7))
    loss, lse = mk.linear_cross_entropy(x, w, labels, shift=1, reduction="none", return_lse=True)
    assert loss.shape == lse.shape == (2, 7)
    torch.testing.assert_close(lse, torch.logsumexp(x @ w.t(), -1))
    lse[:, -1] = 0.0
    (loss.sum() + lse.sum()).backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    z = x2 @ w2.t()
    want = torch.nn.functional.cross_entropy(z[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    (want + torch.logsumexp(z[:, :-1], -1).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_gradcheck_opcheck_and_compile():
    x, w, t = make_case(5, 8, 4, torch.float64, ignore=(1,))
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fn(a, ww, bb):
        loss, lse = mk.linear_cross_entropy(a, ww, t, bb, label_smoothing=0.1, softcap=3.0, return_lse=True)
        return loss + (lse * lse).mean()
    assert torch.autograd.gradcheck(fn, (x, w, b))

    args = (x.float(), w.float(), t, b.float(), -100, 0.1, 1e-3, None, 0.0, 0.0, None, None, True)
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy.default, args)
    _, lse, _ = torch.ops.marginkern.linear_cross_entropy(*args)
    bwd = (torch.rand(5), x.detach().float(), w.detach().float(), t, b.detach().float(), lse.detach()) + args[4:11] + (
        True, True, None, torch.randn(5))
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy_backward.default, bwd)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g, e in zip(torch.autograd.grad(compiled(x, w, b), (x, w, b)), torch.autograd.grad(fn(x, w, b), (x, w, b))):
        torch.testing.assert_close(g, e)


def test_module_and_refusals():
    x, w, t = make_case(6, 30, 8)
    loss, lse = mk.LinearCrossEntropyLoss(return_lse=True, z_loss=1e-3)(x, w, t)
    torch.testing.assert_close(lse, torch.logsumexp(x @ w.t(), 1).detach(), rtol=1e-5, atol=1e-5)
    assert "return_lse=True" in repr(mk.LinearCrossEntropyLoss(return_lse=True))
    with pytest.raises(ValueError, match="return_lse=True needs logits_buffer_mb=None"):
        mk.linear_cross_entropy(x, w, t, return_lse=True, logits_buffer_mb=1)
    with pytest.raises(ValueError, match="return_lse=True needs logits_buffer_mb=None"):
        mk.LinearCrossEntropyLoss(return_lse=True, logits_buffer_mb=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        mk.linear_cross_entropy(x, w, t, return_lse=1)
