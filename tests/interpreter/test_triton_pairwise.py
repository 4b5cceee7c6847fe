"""The fused pair-cosine Triton kernels (CoSENT from embeddings) against float64 math."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from tests.helpers import assert_close_rel
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_pairwise import naive_cosent


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
    torch.testing.assert_close(got.double(), naive_cosent(F.cosine_similarity(a.double(), b.double()), y))
