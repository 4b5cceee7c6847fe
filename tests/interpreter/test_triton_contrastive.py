"""The Triton chunk epilogues of SigLIP (triton_kernels/siglip.py) and InfoNCE (triton_kernels/info_nce.py), against
the float64 definitions of tests/test_contrastive.py, with the launchers counted so that a silent fallback to the
PyTorch epilogue fails."""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import chunked_epilogue, siglip
from tests.helpers import counted_launchers
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_contrastive import (check_siglip_matches_float64_of_its_inputs, clip_oracle, info_nce_oracle,
                                    siglip_oracle)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    from marginkern.triton_kernels import siglip as kernels
    return counted_launchers(monkeypatch, kernels, ("row_sums", "grad_chunk"))


@pytest.fixture
def info_nce_launches(monkeypatch):
    from marginkern.triton_kernels import info_nce as kernels
    return counted_launchers(monkeypatch, kernels, ("chunk_statistics", "grad_chunk"))


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunks(request, monkeypatch):
    if request.param == "many-chunks":  # chunks of 64 keys, the last one short
        monkeypatch.setattr(chunked_epilogue, "CHUNK_BYTES", 1)
        monkeypatch.setattr(chunked_epilogue, "MIN_CHUNK_CLASSES", 64)
    return request.param


def _case(B, M, D, dtype, seed):
    torch.manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(M, D, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    return q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_matches_float64_of_its_inputs(chunks, dtype, launches):
    """B = 37 and M = 200 cut the kernels' 32-row and 128-column blocks unevenly; a positive sits in every chunk."""
    check_siglip_matches_float64_of_its_inputs(DEVICE, dtype, B=37, M=200, D=24, seed=0)
    expected = 1 if chunks == "one-chunk" else 4  # 200 keys
    assert launches == {"row_sums": expected, "grad_chunk": expected}


def test_siglip_confident_pairs_keep_their_tiny_terms(launches):
    eye = torch.eye(4, device=DEVICE)
    got = mk.siglip_loss(eye, eye, scale=60.0, bias=-40.0, reduction="none")
    want = siglip_oracle(eye.cpu(), eye.cpu(), 60.0, -40.0)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-6, atol=0.0)
    assert launches["row_sums"] == 1


def test_siglip_raw_op_without_a_positive_and_a_strided_target(launches):
    """target −1: every key a negative of that row; a strided target view (a reviewer found the kernels reading it
    as contiguous) and non-unit scales."""
    q, k = _case(5, 9, 8, torch.float32, 1)
    target = torch.tensor([0, 7, -1, 7, 8, 7, 3, 7, -1, 7], device=DEVICE)[::2]
    row_scale, col_scale = torch.linspace(0.5, 2.0, 5, device=DEVICE), torch.linspace(1.5, 0.5, 9, device=DEVICE)
    rows, bias_grad = torch.ops.marginkern.siglip(q, k, target, torch.tensor(0.5, device=DEVICE), row_scale, col_scale)
    logits = row_scale.double()[:, None] * col_scale.double()[None, :] * (q.double() @ k.double().T) + 0.5
    labels = -torch.ones_like(logits)
    labels[[0, 2, 3], [0, 8, 3]] = 1
    torch.testing.assert_close(rows.double(), -F.logsigmoid(labels * logits).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias_grad.double(), (-labels * torch.sigmoid(-labels * logits)).sum(1), rtol=1e-5,
                               atol=1e-6)


def test_siglip_bf16_gradient_chunks(monkeypatch, launches):
    """The GPU path's bf16 H (written by the gradient kernel in bf16 for the GEMMs), here in the interpreter with
    bf16 inputs and the GEMMs on the CPU."""
    for module in (siglip, chunked_epilogue):  # the epilogue writes G in bf16, the GEMMs read bf16 operands
        monkeypatch.setattr(module, "backward_gemm_dtype", lambda x: x.dtype)
    q, k = _case(37, 150, 24, torch.bfloat16, 4)
    got = mk.siglip_loss(q, k, scale=10.0, bias=-5.0)
    want = siglip_oracle(q, k, 10.0, -5.0).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=2e-2 * w.double().abs().max().item())
    assert launches["grad_chunk"] == 1


@pytest.mark.parametrize("options", [dict(), dict(margin=0.2, label_smoothing=0.1)], ids=["plain", "margin-smoothing"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_info_nce_epilogues(chunks, options, symmetric, dtype, info_nce_launches):
    """B = 100 queries against M = 150 keys: 64-row and 64-column blocks cut unevenly, positives in two chunks of 64
    and keys past B in a third; a learned scale; against float64 of the same inputs."""
    q, k = _case(100, 150, 24, dtype, 5)
    scale = torch.tensor(14.0, device=DEVICE, requires_grad=True)
    if options:
        scale = 14.0  # a margin takes a float scale
    got = mk.info_nce_loss(q, k, scale=scale, symmetric=symmetric, reduction="none", **options)
    want = info_nce_oracle(q, k, scale, **options)
    if symmetric:
        want = (want + info_nce_oracle(k[:100], q, scale, **options)) / 2
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    weight = torch.linspace(0.5, 1.5, 100, device=DEVICE)
    inputs = (q, k) + ((scale,) if isinstance(scale, torch.Tensor) else ())
    for g, w in zip(torch.autograd.grad((got * weight).sum(), inputs),
                    torch.autograd.grad((want * weight.double()).sum(), inputs)):
        tol = 1e-5 if g.dtype == torch.float32 else 1e-3
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * w.double().abs().max().item())
    expected = 1 if chunks == "one-chunk" else 3
    assert info_nce_launches == {"chunk_statistics": expected, "grad_chunk": expected}


def test_info_nce_raw_op_with_an_offset(info_nce_launches):
    """Row i's positive is key offset + i (a rank's queries against every rank's keys)."""
    q, k = _case(6, 20, 8, torch.float32, 6)
    row_scale, col_scale = torch.full((6,), 3.0, device=DEVICE), torch.ones(20, device=DEVICE)
    loss = torch.ops.marginkern.info_nce(q, k, row_scale, col_scale, 11, False, 0.0, 0.0)[0]
    want = info_nce_oracle(q, k, 3.0, positive=torch.arange(11, 17), normalize=False)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=2e-6)


def test_info_nce_confident_pairs(info_nce_launches):
    base = torch.eye(13, 16, device=DEVICE)
    for symmetric in (False, True):
        got = mk.info_nce_loss(base, base, scale=30.0, symmetric=symmetric, reduction="sum")
        torch.testing.assert_close(got.double().cpu(), torch.tensor(13 * math.log1p(12 * math.exp(-30.0)),
                                                                    dtype=torch.float64), rtol=1e-5, atol=0.0)
    assert info_nce_launches["chunk_statistics"] == 2


def test_clip_matches_open_clip_on_triton(info_nce_launches):
    q, k = _case(37, 37, 24, torch.float32, 2)
    got = mk.info_nce_loss(q, k, scale=14.0, symmetric=True)
    want = clip_oracle(q, k, 14.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_epilogues_refuse_more_rows_than_their_grid_holds(monkeypatch):
    from marginkern.triton_kernels import device, info_nce as info_nce_kernels, proxy_anchor as proxy_kernels
    from marginkern.triton_kernels import siglip as siglip_kernels
    monkeypatch.setattr(device, "MAX_GRID_Y", 1)  # one row block per launch
    z = torch.zeros(65, 8, device=DEVICE)
    column = torch.zeros(65, dtype=torch.long, device=DEVICE)
    one = torch.zeros((), device=DEVICE)
    rows = torch.ones(65, device=DEVICE)
    with pytest.raises(ValueError, match="at most 32 rows per call, got 65"):
        siglip_kernels.row_sums(z, one, column, rows, rows[:8], 0)
    with pytest.raises(ValueError, match="at most 64 rows per call, got 65"):
        info_nce_kernels.chunk_statistics(z, rows, rows[:8], 0, 0)
    with pytest.raises(ValueError, match="at most 64 rows per call, got 65"):
        proxy_kernels.grad_chunk(z, rows, rows[:8], column, rows[:8], rows, one, 0, 1.0, 0.0, torch.float32)
    siglip_kernels.row_sums(z[:32], one, column[:32], rows[:32], rows[:8], 0)  # within the grid: runs


@pytest.fixture
def supcon_launches(monkeypatch):
    from marginkern.triton_kernels import supcon as kernels
    return counted_launchers(monkeypatch, kernels, ("chunk_statistics", "grad_chunk"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_supcon_on_the_triton_epilogues(chunks, dtype, supcon_launches):
    """SupCon's positives, negatives and own cells in the Triton kernels: 100 samples × 2 views, labels with repeats,
    several chunks; against the official code in float64 of the same inputs."""
    from tests.test_contrastive import official_supcon
    torch.manual_seed(7)
    f = torch.randn(100, 2, 24, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.arange(100, device=DEVICE) % 13
    labels[5] = 99  # a class of its own: two views, one positive each
    got = mk.supcon_loss(f, labels, temperature=0.1, reduction="none")
    want = official_supcon(F.normalize(f.double(), dim=2).cpu(), labels.cpu(), 0.1).reshape(-1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=2e-6)
    weight = torch.linspace(0.5, 1.5, 200, dtype=torch.float64)
    (g,), (w,) = torch.autograd.grad((got * weight.float()).sum(), f), torch.autograd.grad((want * weight).sum(), f)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * w.double().abs().max().item())
    expected = 1 if chunks == "one-chunk" else 4  # 200 rows as keys
    assert supcon_launches == {"chunk_statistics": expected, "grad_chunk": expected}


def test_supcon_contrast_mode_one_on_the_triton_epilogues(supcon_launches):
    """contrast_mode="one": 30 anchors (the first view) against 90 keys, one chunk."""
    from tests.test_contrastive import official_supcon
    torch.manual_seed(8)
    f = torch.randn(30, 3, 16, dtype=torch.float64).float().to(DEVICE).requires_grad_()
    labels = torch.arange(30, device=DEVICE) % 7
    got = mk.supcon_loss(f, labels, temperature=0.1, contrast_mode="one", reduction="none")
    ref = f.detach().double().cpu().requires_grad_()
    want = official_supcon(F.normalize(ref, dim=2), labels.cpu(), 0.1, contrast_mode="one").reshape(-1)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=2e-6)
    (g,), (w,) = torch.autograd.grad(got.sum(), f), torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(g.double().cpu(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert supcon_launches == {"chunk_statistics": 1, "grad_chunk": 1}


@pytest.mark.parametrize("case", range(3))
def test_supcon_gradients_stay_finite_where_exponentials_overflow_on_the_triton_epilogues(case, supcon_launches):
    """tests/test_contrastive.py's overflow cases through the Triton kernels (their expm1 had an e^{−a/2})."""
    from tests.test_contrastive import logsumexp_supcon, supcon_extreme_cases
    features, labels, temperature, normalize = supcon_extreme_cases()[case]
    f32 = features.float().to(DEVICE).requires_grad_()
    loss = mk.supcon_loss(f32, None if labels is None else labels.to(DEVICE), temperature=temperature,
                          base_temperature=temperature, normalize=normalize)
    (g,) = torch.autograd.grad(loss, f32)
    exact = features.clone().requires_grad_()
    want_loss = logsumexp_supcon(F.normalize(exact, dim=2) if normalize else exact, labels, temperature)
    (want,) = torch.autograd.grad(want_loss, exact)
    assert torch.isfinite(g).all() and supcon_launches == {"chunk_statistics": 1, "grad_chunk": 1}
    torch.testing.assert_close(loss.double().cpu(), want_loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.double().cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_supcon_confident_pairs_on_the_triton_epilogues(supcon_launches):
    """NT-Xent with identical views: the loss is log1p of the negatives' share, exact (the positive's term is e^0),
    and the positive cell's gradient is the kernel's expm1."""
    base = torch.eye(12, 16, device=DEVICE)
    f = torch.stack([base, base], 1).requires_grad_()
    rows = mk.supcon_loss(f, temperature=0.05, base_temperature=0.05, reduction="none")
    want = math.log1p(22 * math.exp(-20.0))
    torch.testing.assert_close(rows.double().cpu(), torch.full((24,), want, dtype=torch.float64), rtol=1e-5, atol=0.0)
    rows.sum().backward()
    assert torch.isfinite(f.grad).all() and supcon_launches == {"chunk_statistics": 1, "grad_chunk": 1}
    # the positive's cell is expm1((z − M) − log Σ) = −L in the kernel: along each row's own axis −2L/τ (the two
    # views' cells; normalize=False: no projection), not 0 (lse as one fp32 number: 20 + 4.5e-8 = 20)
    raw = torch.stack([base, base], 1).requires_grad_()
    mk.supcon_loss(raw, temperature=0.05, base_temperature=0.05, normalize=False, reduction="sum").backward()
    along_own_axis = raw.grad[torch.arange(12), :, torch.arange(12)]
    torch.testing.assert_close(along_own_axis.double().cpu(), torch.full((12, 2), -2 * want / 0.05, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
