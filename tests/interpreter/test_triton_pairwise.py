"""The fused pair-cosine Triton kernels (CoSENT from embeddings) against float64 math."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from tests.helpers import assert_close_rel
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_pairwise import (check_cosent_infinite_score_of_the_top_label, check_cosent_nan_label_gives_nan,
                                 naive_cosent)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 45), (1, 1), (16, 300), (0, 8)])
def test_pairwise_cosine_kernels(dtype, shape):
    a = torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()
    b = torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()
    cos, _, _ = torch.ops.marginkern.pairwise_cosine(a, b)
    g = torch.randn(shape[0], device=DEVICE)
    ga, gb = torch.autograd.grad(cos, (a, b), g)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.cosine_similarity(a64, b64, eps=1e-12)
    ra, rb = torch.autograd.grad(ref, (a64, b64), g.double())
    assert_close_rel(cos, ref, dtype, "cos", floor=1.0)
    assert_close_rel(ga, ra, dtype, "grad a")
    assert_close_rel(gb, rb, dtype, "grad b")


def test_cosent_embedding_loss_through_triton():
    a, b = torch.randn(50, 20, device=DEVICE), torch.randn(50, 20, device=DEVICE)
    y = torch.randint(0, 4, (50,), device=DEVICE)
    got = mk.cosent_embedding_loss(a, b, y)
    want = naive_cosent(F.cosine_similarity(a.double(), b.double()), y)
    assert_close_rel(got, want, torch.float32, "loss", floor=1.0)  # an fp32 loss: fp32 rounding


@pytest.mark.parametrize("B, num_labels", [(0, 1), (1, 1), (2, 2), (9, 1), (64, 3), (65, 2), (150, 4), (300, 300),
                                           (257, 37), (1500, 2), (1500, 900)])
@pytest.mark.parametrize("float_labels", [False, True])
def test_cosent_scan_kernel(B, num_labels, float_labels):
    """The CoSENT scan kernels (label groups spanning many 64-pair blocks in the interpreter, or none
    shared) against the O(B²) definition: loss and gradient."""
    torch.manual_seed(B)
    s = (torch.rand(B, device=DEVICE) * 2 - 1).requires_grad_()
    y = torch.randint(0, num_labels, (B,), device=DEVICE)
    if float_labels:
        y = y.float() / 7
    loss = mk.cosent_loss(s, y)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    want = naive_cosent(s64, y)
    (want_grad,) = torch.autograd.grad(want, s64)
    assert loss.dtype == torch.float32
    assert_close_rel(loss, want, torch.float32, "loss", floor=1.0)
    assert_close_rel(grad, want_grad, torch.float32, "grad", floor=1.0)


def test_cosent_infinite_score_gives_an_infinite_loss():
    # a +inf score of a pair below a larger-label pair makes a term e^{+inf}: the loss is +inf, not NaN
    s = torch.tensor([0.1, float("inf"), -0.3, 0.2, 0.5] * 30, device=DEVICE)
    y = torch.tensor([1, 0, 2, 1, 2] * 30, device=DEVICE)
    assert mk.cosent_loss(s, y) == float("inf")


def test_cosent_infinite_score_of_the_top_label():
    check_cosent_infinite_score_of_the_top_label(DEVICE)


def test_cosent_nan_label_gives_nan():
    check_cosent_nan_label_gives_nan(DEVICE)


def test_cosent_small_loss_keeps_its_digits():
    from tests.test_pairwise import check_cosent_small_loss_keeps_its_digits
    check_cosent_small_loss_keeps_its_digits(DEVICE)
