"""Proxy-Anchor's Triton epilogues (triton_kernels/proxy_anchor.py) against the float64 definition and the official
code's formula, with the launchers counted so that a silent fallback to the PyTorch epilogue fails."""
import pytest
import torch

import marginkern as mk
from marginkern import proxy_anchor, reference
from tests.helpers import counted_launchers
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_proxy_anchor import case, check_proxy_anchor_matches_float64, grads, official_proxy_anchor


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    """Counts the two Triton launchers' calls."""
    from marginkern.triton_kernels import proxy_anchor as kernels
    return counted_launchers(monkeypatch, kernels, ("negative_terms", "grad_chunk"))


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


def test_bf16_gradient_chunks(monkeypatch, launches):
    """The GPU path's bf16 dL/d(x·w) (written by the gradient kernel in bf16 for the GEMMs), here in the interpreter
    with bf16 inputs; the GEMMs themselves on the CPU (the fused dW kernel's bf16 tl.dot is wrong in the interpreter:
    MARGINKERN_FUSED_DW=0)."""
    monkeypatch.setattr(proxy_anchor, "backward_gemm_dtype", lambda x: x.dtype)
    monkeypatch.setenv("MARGINKERN_FUSED_DW", "0")
    x, w, t = case(N=70, C=300, D=40, dtype=torch.bfloat16, seed=5)
    loss = mk.proxy_anchor_loss(x, w, t)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = reference.proxy_anchor_loss(x64, w64, t)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)
    for got, expected in zip(grads(loss, x, w), grads(want, x64, w64)):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    assert launches["grad_chunk"]


def test_forced_triton_refuses_float64():
    x, w, t = case(dtype=torch.float64)
    with pytest.raises(mk.BackendUnavailable, match="triton"):
        mk.proxy_anchor_loss(x, w, t)


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


class _OneRankOfTwo:
    """A class shard as distributed.ProcessGroupShard, without a process group: this 'rank' holds [start, start + C)
    of num_classes and its sums are its own (what the Triton epilogues see on one rank of a sharded loss)."""

    def __init__(self, start, num_classes):
        self.start, self.num_classes = start, num_classes

    def sum_rows(self, values):
        return values.clone()

    def sum_input_grad(self, grad_x):
        return grad_x


def test_foreign_rows_of_a_class_shard_match_the_pytorch_epilogue(launches, monkeypatch):
    """Rows whose class is another rank's (column −2) are negatives of every proxy here and have no positive term: the
    Triton epilogues agree with PyTorch's (tested against the single-process loss on gloo, tests/test_distributed.py)."""
    x, w, t = case(N=50, C=90, D=24, dtype=torch.float32, seed=4, classes=90)
    t[[1, 2]] = -100
    shard, local = _OneRankOfTwo(40, 90), w.detach()[40:80]
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("MARGINKERN_BACKEND", backend)
        loss, negative, row_weight, num_positive = proxy_anchor.proxy_anchor_forward(x.detach(), local, t, 0.1, 32.0,
                                                                                     -100, shard)
        grads = proxy_anchor.proxy_anchor_backward(torch.tensor(0.7), x.detach(), local, t, negative, row_weight,
                                                   num_positive, 0.1, 32.0, -100, shard=shard)
        results.append((loss, negative, row_weight, *grads))
    assert launches["negative_terms"] and launches["grad_chunk"]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
