"""SigLIP's Triton epilogues (triton_kernels/siglip.py) and InfoNCE on the Triton engine, against the float64
definitions of tests/test_contrastive.py, with SigLIP's launchers counted so that a silent fallback to the PyTorch
epilogue fails."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import siglip
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_contrastive import clip_oracle, siglip_oracle


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    from marginkern.triton_kernels import siglip as kernels
    counts = {"row_sums": 0, "grad_chunk": 0}
    for name in counts:
        launcher = getattr(kernels, name)

        def counted(*args, _launcher=launcher, _name=name):
            counts[_name] += 1
            return _launcher(*args)
        monkeypatch.setattr(kernels, name, counted)
    return counts


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunks(request, monkeypatch):
    if request.param == "many-chunks":  # chunks of 64 keys, the last one short
        monkeypatch.setattr(siglip, "CHUNK_BYTES", 1)
        monkeypatch.setattr(siglip, "MIN_CHUNK_CLASSES", 64)
    return request.param


def _case(B, M, D, dtype, seed):
    torch.manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(M, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_matches_float64_of_its_operands(chunks, dtype, launches):
    """B = 37 and M = 200 cut the kernels' 32-row and 128-column blocks unevenly; a positive sits in every chunk."""
    q, k = _case(37, 200, 24, dtype, 0)
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    got = mk.siglip_loss(q, k, scale=scale, bias=bias, reduction="none")
    weight = torch.linspace(0.5, 1.5, 37, device=DEVICE)
    rows = (F.normalize(q, dim=1) * scale).to(dtype).double()
    want = siglip_oracle(rows, F.normalize(k, dim=1).to(dtype), 1.0, bias.double(), normalize=False)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    inputs = (q, k, scale, bias)
    got_grads = torch.autograd.grad((got * weight).sum(), inputs)
    want_grads = torch.autograd.grad((want * weight.double()).sum(), inputs)
    for g, w in zip(got_grads, want_grads):
        tol = 1e-5 if g.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * w.double().abs().max().item())
    expected = 1 if chunks == "one-chunk" else 4  # 200 keys
    assert launches == {"row_sums": expected, "grad_chunk": expected}


def test_siglip_confident_pairs_keep_their_tiny_terms(launches):
    eye = torch.eye(4, device=DEVICE)
    got = mk.siglip_loss(eye, eye, scale=60.0, bias=-40.0, reduction="none")
    want = siglip_oracle(eye.cpu(), eye.cpu(), 60.0, -40.0)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-6, atol=0.0)
    assert launches["row_sums"] == 1


def test_siglip_raw_op_without_a_positive(launches):
    q, k = _case(5, 9, 8, torch.float32, 1)
    target = torch.tensor([0, -1, 8, 3, -1], device=DEVICE)
    rows, bias_grad = torch.ops.marginkern.siglip(q, k, target, torch.tensor(0.5, device=DEVICE))
    logits = q.double() @ k.double().T + 0.5
    labels = -torch.ones_like(logits)
    labels[[0, 2, 3], [0, 8, 3]] = 1
    torch.testing.assert_close(rows.double(), -F.logsigmoid(labels * logits).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias_grad.double(), (-labels * torch.sigmoid(-labels * logits)).sum(1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("learned", [False, True], ids=["float-scale", "learned-scale"])
def test_info_nce_on_the_triton_engine(learned):
    q, k = _case(37, 60, 24, torch.float32, 2)
    scale = torch.tensor(14.0, device=DEVICE, requires_grad=True) if learned else 14.0
    got = mk.info_nce_loss(q, k, scale=scale, symmetric=True)
    want = clip_oracle(q, k, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5 * w.abs().max().item())
