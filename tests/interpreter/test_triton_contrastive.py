"""SigLIP's Triton epilogues (triton_kernels/siglip.py) and InfoNCE on the Triton engine, against the float64
definitions of tests/test_contrastive.py, with SigLIP's launchers counted so that a silent fallback to the PyTorch
epilogue fails."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import siglip, symmetric_info_nce
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_contrastive import check_siglip_matches_float64_of_its_operands, info_nce_oracle, siglip_oracle


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
        for module in (siglip, symmetric_info_nce):
            monkeypatch.setattr(module, "CHUNK_BYTES", 1)
            monkeypatch.setattr(module, "MIN_CHUNK_CLASSES", 64)
    return request.param


@pytest.fixture
def symmetric_launches(monkeypatch):
    from marginkern.triton_kernels import symmetric_info_nce as kernels
    counts = {"chunk_statistics": 0, "grad_chunk": 0}
    for name in counts:
        launcher = getattr(kernels, name)

        def counted(*args, _launcher=launcher, _name=name):
            counts[_name] += 1
            return _launcher(*args)
        monkeypatch.setattr(kernels, name, counted)
    return counts


def _case(B, M, D, dtype, seed):
    torch.manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(M, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_matches_float64_of_its_operands(chunks, dtype, launches):
    """B = 37 and M = 200 cut the kernels' 32-row and 128-column blocks unevenly; a positive sits in every chunk."""
    check_siglip_matches_float64_of_its_operands(DEVICE, dtype, B=37, M=200, D=24, seed=0)
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


@pytest.mark.parametrize("options", [dict(), dict(margin=0.2, label_smoothing=0.1)], ids=["plain", "margin-smoothing"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_symmetric_info_nce_epilogues(chunks, options, dtype, symmetric_launches):
    """B = 100 queries against M = 150 keys: 64-row and 64-column blocks cut unevenly, positives in two chunks of 64
    and keys past B in a third; against float64 of the same scaled unit rows."""
    q, k = _case(100, 150, 24, dtype, 5)
    got = mk.info_nce_loss(q, k, scale=14.0, symmetric=True, reduction="none", **options)
    rows = (F.normalize(q, dim=1) * 14.0).to(dtype).double()
    keys = F.normalize(k, dim=1).to(dtype).double()
    margin, smoothing = options.get("margin", 0.0), options.get("label_smoothing", 0.0)
    want = (info_nce_oracle(rows, keys, 1.0, margin=14.0 * margin, label_smoothing=smoothing, normalize=False)
            + info_nce_oracle(keys[:100], rows, 1.0, margin=14.0 * margin, label_smoothing=smoothing,
                              normalize=False)) / 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    weight = torch.linspace(0.5, 1.5, 100, device=DEVICE)
    for g, w in zip(torch.autograd.grad((got * weight).sum(), (q, k)),
                    torch.autograd.grad((want * weight.double()).sum(), (q, k))):
        tol = 1e-5 if dtype == torch.float32 else 5e-3
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * w.double().abs().max().item())
    expected = 1 if chunks == "one-chunk" else 3
    assert symmetric_launches == {"chunk_statistics": expected, "grad_chunk": expected}


def test_symmetric_info_nce_confident_pairs(symmetric_launches):
    import math
    base = torch.eye(13, 16, device=DEVICE)
    got = mk.info_nce_loss(base, base, scale=30.0, symmetric=True, reduction="sum")
    torch.testing.assert_close(got.double().cpu(), torch.tensor(13 * math.log1p(12 * math.exp(-30.0)),
                                                                dtype=torch.float64), rtol=1e-5, atol=0.0)
    assert symmetric_launches["chunk_statistics"] == 1


@pytest.mark.parametrize("learned", [False, True], ids=["float-scale", "learned-scale"])
def test_info_nce_on_the_triton_engine(learned):
    q, k = _case(37, 60, 24, torch.float32, 2)
    scale = torch.tensor(14.0, device=DEVICE, requires_grad=True) if learned else 14.0
    got = mk.info_nce_loss(q, k, scale=scale)
    want = info_nce_oracle(q, k, scale).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_siglip_bf16_gradient_chunks(monkeypatch, launches):
    """The GPU path's bf16 dL/dz (written by the gradient kernel in bf16 for the GEMMs), here in the interpreter with
    bf16 inputs and the GEMMs on the CPU."""
    monkeypatch.setattr(siglip, "backward_gemm_dtype", lambda x: x.dtype)
    q, k = _case(37, 150, 24, torch.bfloat16, 4)
    got = mk.siglip_loss(q, k, scale=10.0, bias=-5.0)
    rows = (F.normalize(q, dim=1) * 10.0).to(torch.bfloat16).double()
    want = siglip_oracle(rows, F.normalize(k, dim=1).to(torch.bfloat16), 1.0, -5.0, normalize=False).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=2e-2 * w.double().abs().max().item())
    assert launches["grad_chunk"] == 1


def test_epilogues_refuse_more_rows_than_their_grid_holds(monkeypatch):
    from marginkern.triton_kernels import device, proxy_anchor as proxy_kernels, siglip as siglip_kernels
    from marginkern.triton_kernels import symmetric_info_nce as symmetric_kernels
    monkeypatch.setattr(device, "MAX_GRID_Y", 1)  # one row block per launch
    z = torch.zeros(65, 8, device=DEVICE)
    column = torch.zeros(65, dtype=torch.long, device=DEVICE)
    one = torch.zeros((), device=DEVICE)
    rows = torch.zeros(65, device=DEVICE)
    with pytest.raises(ValueError, match="at most 32 rows per call, got 65"):
        siglip_kernels.row_sums(z, one, column, 0)
    with pytest.raises(ValueError, match="at most 64 rows per call, got 65"):
        symmetric_kernels.chunk_statistics(z, 0)
    with pytest.raises(ValueError, match="at most 64 rows per call, got 65"):
        proxy_kernels.grad_chunk(z, rows, rows[:8], column, rows[:8], rows, one, 0, 1.0, 0.0, torch.float32)
    siglip_kernels.row_sums(z[:32], one, column[:32], 0)  # within the grid: runs
