"""The oracle (marginkern.reference) against materialised float64 math and F.cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from marginkern import reference
from tests.helpers import make_case


def naive_margin_ce(x, w, t, scale, m1, m2, m3, normalize, label_smoothing, ignore_index, reduction, lambda_=0.0):
    """Materialised N × C float64 logits, the target column replaced by the monotone margin (eased by
    A-Softmax's λ: (λ·cos + ψ)/(1 + λ))."""
    x, w = x.double(), w.double()
    if normalize:
        x, w = F.normalize(x, dim=1), F.normalize(w, dim=1)
    dots = x @ w.t()
    # normalised: the dots are the cosines (F.normalize's convention for a zero vector: it stays 0)
    norms = torch.ones_like(dots) if normalize else x.norm(dim=1)[:, None] * w.norm(dim=1)[None, :]
    cos = (dots / norms).clamp(-1, 1)
    phi = m1 * torch.acos(cos) + m2
    k = torch.floor(phi / math.pi)
    psi = (-1.0) ** k * torch.cos(phi) - 2 * k - m3
    psi = (lambda_ * cos + psi) / (1 + lambda_)
    logits = torch.where(torch.arange(w.shape[0])[None, :] == t[:, None], psi * norms, dots) * scale
    return F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)


CASES = [
    dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0, normalize=True),
    dict(scale=64.0, m1=1.0, m2=0.0, m3=0.35, normalize=True),
    dict(scale=30.0, m1=4.0, m2=0.0, m3=0.0, normalize=True),
    dict(scale=1.0, m1=3.0, m2=0.0, m3=0.0, normalize=False),
    dict(scale=16.0, m1=1.3, m2=0.2, m3=0.1, normalize=True),
    dict(scale=30.0, m1=4.0, m2=0.0, m3=0.0, normalize=True, lambda_=5.0),   # A-Softmax with its λ
    dict(scale=1.0, m1=3.0, m2=0.0, m3=0.0, normalize=False, lambda_=2.0),   # L-Softmax with its λ
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_materialised_float64(opts, label_smoothing, reduction):
    x, w, t = make_case(23, 57, 9, torch.float64, ignore=(2, 5))
    got = reference.margin_cross_entropy(x, w, t, label_smoothing=label_smoothing, reduction=reduction,
                                         class_chunk=13, **opts)
    want = naive_margin_ce(x, w, t, label_smoothing=label_smoothing, ignore_index=-100, reduction=reduction, **opts)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the exact margin gradient is autograd of the definition wherever |cos| < 1
    gx, gw = torch.autograd.grad(got.sum(), (x, w))
    ex, ew = torch.autograd.grad(want.sum(), (x, w))
    assert torch.allclose(gx, ex, rtol=1e-9, atol=1e-10) and torch.allclose(gw, ew, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("opts", [o for o in CASES if o["normalize"]])
def test_zero_vectors_follow_f_normalize(opts):
    """A zero embedding and a zero class centre (one of them a target): F.normalize leaves them 0 and divides their
    gradient by its eps (1e-12); the oracle once, as the definition (it divided the target's twice: 1e24)."""
    x, w, t = make_case(9, 13, 5, torch.float64)
    with torch.no_grad():
        x[4] = 0.0
        w[t[0]] = 0.0
    got = reference.margin_cross_entropy(x, w, t, **opts)
    want = naive_margin_ce(x, w, t, label_smoothing=0.0, ignore_index=-100, reduction="mean", **opts)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the gradients are ~1e12 where a zero vector is: float64 rounding (sin(m1·π/2) of SphereFace's m1 = 4 at the
    # zero centre's cos = 0) is then 1e-8 of the largest; the bug was a factor 1e12
    for g, e in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-6 * e.abs().max())


def test_no_margin_is_plain_cross_entropy():
    x, w, t = make_case(19, 31, 7, torch.float32, ignore=(0,))
    got = reference.margin_cross_entropy(x, w, t, scale=1.0, m1=1.0, m2=0.0, m3=0.0, normalize=False,
                                         label_smoothing=0.05)
    want = F.cross_entropy(x @ w.t(), t, label_smoothing=0.05)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_ignores_the_margin():
    x, w, t = make_case(11, 17, 5, torch.float64)
    got = reference.margin_cross_entropy(x, w, t, margin_grad="straight_through")
    # same forward value as the exact version ...
    assert torch.allclose(got, reference.margin_cross_entropy(x, w, t))
    # ... and the gradient of CE whose target logit is s·cos + (constant margin offset)
    xn, wn = F.normalize(x, dim=1), F.normalize(w, dim=1)
    cos = xn @ wn.t()
    onehot = F.one_hot(t, 17).bool()
    psi = torch.cos(torch.acos(cos.clamp(-1, 1)) + 0.5)
    logits = 64.0 * (cos + torch.where(onehot, psi - cos, torch.zeros_like(cos)).detach())
    want = F.cross_entropy(logits, t)
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_chunking_does_not_change_the_result():
    x, w, t = make_case(9, 40, 6, torch.float64)
    a = reference.margin_cross_entropy(x, w, t, class_chunk=7)
    b = reference.margin_cross_entropy(x, w, t, class_chunk=1000)
    assert torch.allclose(a, b, rtol=1e-13)


def test_all_rows_ignored_gives_zero_not_nan():
    x, w, t = make_case(4, 6, 3, torch.float64, ignore=range(4))
    loss = reference.margin_cross_entropy(x, w, t)
    assert float(loss.detach()) == 0.0
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert not gx.any() and not gw.any()


def test_reference_gradcheck():
    x, w, t = make_case(5, 7, 4, torch.float64, ignore=(1,))
    assert torch.autograd.gradcheck(
        lambda a, b: reference.margin_cross_entropy(a, b, t, m2=0.3, m3=0.1, scale=8.0, label_smoothing=0.1,
                                                    class_chunk=3), (x, w))
