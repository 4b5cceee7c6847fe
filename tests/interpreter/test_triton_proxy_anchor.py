"""Proxy-Anchor's Triton epilogues (triton_kernels/proxy_anchor.py) against the float64 definition and the official
code's formula, with the launchers counted so that a silent fallback to the PyTorch epilogue fails."""
import pytest
import torch

import marginkern as mk
from marginkern import proxy_anchor
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_proxy_anchor import case, check_proxy_anchor_matches_float64, grads, official_proxy_anchor


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    """Counts the two Triton launchers' calls."""
    from marginkern.triton_kernels import proxy_anchor as kernels
    counts = {"negative_terms": 0, "grad_chunk": 0}
    for name in counts:
        launcher = getattr(kernels, name)

        def counted(*args, _launcher=launcher, _name=name):
            counts[_name] += 1
            return _launcher(*args)
        monkeypatch.setattr(kernels, name, counted)
    return counts


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunks(request, monkeypatch):
    if request.param == "many-chunks":  # chunks of 64 proxies, the last one short
        monkeypatch.setattr(proxy_anchor, "CHUNK_BYTES", 1)
        monkeypatch.setattr(proxy_anchor, "MIN_CHUNK_CLASSES", 64)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(chunks, dtype, launches):
    check_proxy_anchor_matches_float64(DEVICE, dtype)
    expected = 1 if chunks == "one-chunk" else 5  # 300 proxies
    assert launches == {"negative_terms": expected, "grad_chunk": expected}


def test_matches_the_official_code_with_ignored_rows(chunks, launches):
    x, w, t = case(N=70, C=130, D=24, dtype=torch.float32, seed=3)
    t[[0, 9]] = -100
    keep = t != -100
    loss = mk.proxy_anchor_loss(x, w, t)
    x_kept = x.detach()[keep].double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = official_proxy_anchor(x_kept, w64, t[keep])
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)
    gx, gw = grads(loss, x, w)
    gx_want, gw_want = grads(want, x_kept, w64)
    assert torch.all(gx[~keep] == 0)
    torch.testing.assert_close(gx[keep].double(), gx_want, rtol=0, atol=2e-5 * gx_want.abs().max().item())
    torch.testing.assert_close(gw.double(), gw_want, rtol=0, atol=2e-5 * gw_want.abs().max().item())
    assert launches["negative_terms"] and launches["grad_chunk"]


def test_edge_cases():
    for N in (5, 0):  # every row ignored, and no rows
        x, w, t = case(N=N, dtype=torch.float32)
        loss = mk.proxy_anchor_loss(x, w, torch.full((N,), -100))
        assert loss.item() == 0.0
        assert all(torch.all(g == 0) for g in grads(loss, x, w))
    x, w, t = case(C=1, dtype=torch.float32)  # one proxy: no negatives at all
    torch.testing.assert_close(mk.proxy_anchor_loss(x, w, t).double(),
                               official_proxy_anchor(x.detach().double(), w.detach().double(), t), rtol=2e-5, atol=0)
    with torch.no_grad():
        x[2, 0] = float("nan")
    assert torch.isnan(mk.proxy_anchor_loss(x, w, t))
