"""linear_cross_entropy(token_scaling=True): Dynamic Fine-Tuning (DFT), each token's loss times its detached target
probability, against TRL's dft_loss and a materialised float64 oracle, on the CPU paths (C++ and PyTorch tiles),
with every option, reductions, shapes, compile, the module, the refusals."""
import pytest
import torch

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case

OPTIONS = [dict(), dict(softcap=3.0), dict(label_smoothing=0.1, z_loss=1e-2), dict(focal_gamma=2.0),
           dict(gamma_ce=0.5), dict(class_weight=True), dict(class_weight=True, label_smoothing=0.2)]
IDS = ["plain", "softcap", "smoothing+z", "focal", "gamma_ce", "class_weight", "class_weight+smoothing"]


def trl_dft_loss(logits, labels, ignore_index=-100):
    """TRL's SFT dft_loss on (N, C) logits and targets: −sg(p_t)·log p_t, summed over the labelled tokens and
    divided by their number."""
    mask = labels != ignore_index
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.where(mask, labels, 0)[:, None])[:, 0]
    return (-logprobs.exp().detach() * logprobs * mask).sum() / mask.sum()


def oracle(x, w, t, b, reduction, class_weight=None, **opts):
    """Liger-Kernel's use_token_scaling in float64: the reference's per-row loss (every term) times p_t of the
    materialised (soft-capped) logits, detached; the reductions as the plain loss's."""
    z = x @ w.t() + (0.0 if b is None else b)
    if opts.get("softcap") is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    valid = t != -100
    p_t = torch.softmax(z.detach(), 1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0] * valid
    rows = reference.linear_cross_entropy(x, w, t, b, reduction="none", class_weight=class_weight, **opts) * p_t
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    divisor = valid.sum() if class_weight is None else class_weight[torch.where(valid, t, 0)][valid].sum()
    return rows.sum() / divisor


def check_token_scaling(device, dtype, opts, reduction, shape=(37, 301, 45)):
    """Loss and the three gradients (an upstream gradient per row for "none") against the float64 oracle."""
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0, 5))
    w = (w.detach() * 0.4).to(dtype).requires_grad_()  # logits of a few units: p_t spread over (0, 1)
    b = (0.5 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    opts = dict(opts)
    class_weight = torch.rand(C, dtype=torch.float64, device=device) + 0.5 if opts.pop("class_weight", False) else None
    upstream = torch.rand(N, dtype=torch.float64, device=device) if reduction == "none" else None

    def loss_and_grads(fn, xx, ww, bb, cw):
        xx, ww, bb = (a.detach().requires_grad_() for a in (xx, ww, bb))
        loss = fn(xx, ww, t, bb, reduction=reduction, class_weight=cw, **opts)
        out = (loss * (1.0 if upstream is None else upstream.to(loss.dtype))).sum()
        return (loss,) + torch.autograd.grad(out, (xx, ww, bb))

    got = loss_and_grads(lambda *a, **k: mk.linear_cross_entropy(*a, token_scaling=True, **k), x, w, b,
                         None if class_weight is None else class_weight.to(w.dtype))
    want = loss_and_grads(oracle, x.double(), w.double(), b.double(), class_weight)
    for name, g, e in zip(("loss", "grad input", "grad weight", "grad bias"), got, want):
        assert_close_rel(g, e, dtype, name, floor=1.0 if name == "loss" else 1e-3)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_oracle(backend, dtype, opts, reduction, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_token_scaling("cpu", dtype, opts, reduction)


def test_plain_equals_trls_dft_loss_and_scales_each_rows_gradient():
    x, w, t = make_case(50, 120, 16, torch.float64, ignore=(3, 4))
    loss = mk.linear_cross_entropy(x, w, t, token_scaling=True)
    want = trl_dft_loss(x @ w.t(), t)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    got = torch.autograd.grad(loss, (x, w))
    torch.testing.assert_close(got, torch.autograd.grad(want, (x, w)), rtol=1e-10, atol=1e-14)
    # the backward is the plain one with row n's gradient times p_t: the same as an upstream gradient of p_t / n
    rows = mk.linear_cross_entropy(x, w, t, reduction="none")
    p_t = torch.exp(-rows.detach()) * (t != -100) / (t != -100).sum()
    torch.testing.assert_close(got, torch.autograd.grad((rows * p_t).sum(), (x, w)), rtol=1e-10, atol=1e-14)


def test_all_ignored_empty_and_confident_rows():
    x, w, t = make_case(6, 40, 7, ignore=range(6))
    loss = mk.linear_cross_entropy(x, w, t, token_scaling=True, z_loss=1e-3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss == 0 and not gx.any() and not gw.any()
    x, w, t = make_case(0, 5, 3)
    assert mk.linear_cross_entropy(x, w, t, token_scaling=True) == 0
    # a confident row: p_t rounds to 1 (clamped there, never above), the loss is the plain one
    x = torch.zeros(2, 4)
    x[:, 0] = 30.0
    w = torch.eye(4)
    t = torch.tensor([0, 1])
    scaled = mk.linear_cross_entropy(x, w, t, token_scaling=True, reduction="none")
    plain = mk.linear_cross_entropy(x, w, t, reduction="none")
    assert scaled[0] == plain[0] and 0 < scaled[1] < 1e-10 * plain[1]


def test_sequence_shape_shift_and_extra_outputs():
    x = torch.randn(2, 6, 8)
    w = torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 6))
    labels[0, 2] = -100
    loss, lse, accuracy = mk.linear_cross_entropy(x, w, labels, shift=1, reduction="none", token_scaling=True,
                                                  return_lse=True, return_token_accuracy=True)
    plain, plain_lse, plain_accuracy = mk.linear_cross_entropy(x, w, labels, shift=1, reduction="none",
                                                               return_lse=True, return_token_accuracy=True)
    assert loss.shape == (2, 6) and loss[:, -1].eq(0).all()
    torch.testing.assert_close(loss, plain * torch.exp(-plain))
    assert torch.equal(lse, plain_lse) and torch.equal(accuracy, plain_accuracy)
    flat = mk.linear_cross_entropy(x[:, :-1].reshape(-1, 8), w, labels[:, 1:].reshape(-1), token_scaling=True)
    torch.testing.assert_close(mk.linear_cross_entropy(x, w, labels, shift=1, token_scaling=True), flat)


def test_compile_and_module():
    x, w, t = make_case(24, 60, 16, ignore=(2,))
    b = torch.randn(60)
    step = lambda a, ww, tt, bb: mk.linear_cross_entropy(a, ww, tt, bb, token_scaling=True, softcap=4.0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, t, b)
    want = step(x, w, t, b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w)))
    module = mk.LinearCrossEntropyLoss(token_scaling=True, softcap=4.0)
    assert "token_scaling=True" in repr(module)
    torch.testing.assert_close(module(x, w, t, b), want)


def test_refusals():
    x, w, t = make_case(4, 9, 3)
    for make in (lambda **k: mk.linear_cross_entropy(x, w, t, **k), lambda **k: mk.LinearCrossEntropyLoss(**k)):
        with pytest.raises(ValueError, match="token_scaling=True needs logits_buffer_mb=None"):
            make(token_scaling=True, logits_buffer_mb=1)
        with pytest.raises(TypeError, match="token_scaling must be a bool"):
            make(token_scaling=1)
