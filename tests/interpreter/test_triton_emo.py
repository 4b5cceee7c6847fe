"""EMO through the Triton kernels (cost cosines per tile) against the oracle."""
import pytest
import torch

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_emo import grads


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 2, 4, 4), (19, 65, 16, 33)])
def test_emo_matches_oracle(dtype, anchored, shape):
    N, C, D, E = shape
    x, w, t = make_case(N, C, D, dtype, device=DEVICE, ignore=(0,))
    w = (w.detach() * 0.3).to(dtype)
    cost = torch.randn(C, E, device=DEVICE).to(dtype)
    fn, ref = (mk.emo_cross_entropy, reference.emo_cross_entropy) if anchored else (mk.emo_loss, reference.emo_loss)
    got = grads(fn, x, w, t, cost_embedding=cost)
    want = grads(ref, x.double(), w.double(), t, cost_embedding=cost.double())
    assert_close_rel(got[0], want[0], dtype, "loss", floor=1.0)
    assert_close_rel(got[1], want[1], dtype, "grad input")
    assert_close_rel(got[2], want[2], dtype, "grad weight")


def test_default_cost_is_the_weight():
    x, w, t = make_case(9, 40, 16, device=DEVICE)
    got = grads(mk.emo_cross_entropy, x, w, t)
    want = grads(reference.emo_cross_entropy, x.double(), w.double(), t)
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32, floor=1.0)
