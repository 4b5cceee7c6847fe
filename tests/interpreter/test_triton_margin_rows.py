"""The margin losses' per-row Triton kernels (triton_kernels/margin_rows.py) against their PyTorch twins
(margin_ce.target_rows / target_grad_rows) and the float64 margin math.

Run with TRITON_INTERPRET=1 in its own process (see test_triton_kernels.py), or on a GPU.
"""
import math
import os

import pytest
import torch

from marginkern.margin import margin_psi, margin_slope
from marginkern.margin_ce import MarginOptions, target_grad_rows, target_rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 in its own pytest process, or a GPU")
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# (scale, m1, m2, m3, normalize): ArcFace, CosFace, SphereFace, the combined margin with a fractional m1
# (φ crosses several multiples of π), a large additive margin, L-Softmax (normalize=False)
MARGINS = [(64.0, 1.0, 0.5, 0.0, True), (64.0, 1.0, 0.0, 0.35, True), (30.0, 4.0, 0.0, 0.0, True),
           (32.0, 1.35, 0.3, 0.2, True), (64.0, 1.0, 1.2, 0.0, True), (1.0, 3.0, 0.0, 0.0, False),
           (0.5, 1.5, 0.2, 0.1, False)]


def options(margin, exact=True, smoothing=0.0, lambda_=0.0):
    scale, m1, m2, m3, normalize = margin
    return MarginOptions.of(scale, m1, m2, m3, normalize, exact, smoothing, -100, 1, lambda_)


def triton_tiles():
    from marginkern.triton_kernels import TritonTiles
    return TritonTiles()


def hard_case(N, C, D, dtype):
    """Random rows plus the edge cases of the target geometry: x parallel and antiparallel to its centre
    (c = ±1), a zero embedding, a zero class centre, an ignored row, and targets spread over all classes."""
    x = torch.randn(N, D, dtype=torch.float64)
    w = torch.randn(C, D, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x[0] = 3.0 * w[t[0]]
    x[1] = -0.5 * w[t[1]]
    x[2] = 0.0
    w[t[3]] = 0.0
    t[4] = -100
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), t.to(DEVICE)


def test_acos_and_margin_math_match_float64():
    """ψ and dψ/dc of the kernel (through target_grad_rows' row state) over a dense grid of cosines
    including ±1, against margin.py in float64."""
    cosine = torch.cat([torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64),
                        torch.tensor([1 - 1e-7, -1 + 1e-7, 0.5, -0.5, 0.5 + 1e-7], dtype=torch.float64)])
    N = cosine.numel()
    for margin in MARGINS:
        scale, m1, m2, m3, normalize = margin
        opts = options(margin)
        # a one-class "w" and x with exactly these cosines: x = c·e0 + √(1−c²)·e1, w = e0
        x = torch.stack([cosine, (1 - cosine ** 2).clamp_min(0).sqrt()], 1).float().to(DEVICE)
        w = torch.tensor([[1.0, 0.0]], device=DEVICE)
        rows = triton_tiles().margin_target_rows(x, w, torch.zeros(N, dtype=torch.int64, device=DEVICE), opts)
        c = rows.row_state[:, 2].double().cpu()
        psi = margin_psi(c, m1, m2, m3)
        assert (rows.row_state[:, 3].double().cpu() - psi).abs().max() < 2e-6 * max(1.0, m1), margin
        grad = triton_tiles().margin_target_grad_rows(
            rows.row_state, torch.zeros(N, device=DEVICE), torch.ones(N, device=DEVICE),
            torch.zeros(N, dtype=torch.int64, device=DEVICE), opts, 1, 1)
        # with lse = 0 and one class: dL/dT = exp(T) − 1, so target_grad / that / s (/ norms) = dψ/dc
        dl_dt = torch.exp(rows.target_logit.double().cpu()) - 1.0
        slope = grad.target_grad.double().cpu() / (dl_dt * scale)
        if normalize:
            slope = slope * rows.row_state[:, 0].double().cpu()  # ‖w‖ = 1
        expected = margin_slope(c, m1, m2, exact=True)
        usable = dl_dt.abs() > 1e-3
        err = ((slope - expected).abs() / expected.abs().clamp_min(1.0))[usable].max()
        assert err < 1e-4, (margin, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("sharded", [False, True])
def test_target_rows_match_pytorch(dtype, margin, sharded):
    N, C, D = 45, 37, 70  # D crosses the kernel's D blocks only on the GPU (256); N crosses row blocks (32)
    x, w, t = hard_case(N, C, D, dtype)
    opts = options(margin)
    start = 10 if sharded else None
    w_local = w[10:30] if sharded else w
    got = triton_tiles().margin_target_rows(x, w_local, t, opts, start)
    ref = target_rows(x, w_local, t, opts, start)
    assert torch.equal(got.column, ref.column)
    # ‖x‖, ‖w_y‖, c: summation order only. ψ from the kernel's own cosine: near c = ±1, acos turns a
    # one-ulp difference of c into a visible one of θ (the test above checks ψ(c) itself)
    torch.testing.assert_close(got.row_state[:, :3], ref.row_state[:, :3], rtol=1e-5, atol=1e-6)
    scale, m1, m2, m3, normalize = margin
    psi = margin_psi(got.row_state[:, 2].double(), m1, m2, m3)
    torch.testing.assert_close(got.row_state[:, 3].double(), psi, rtol=0, atol=2e-6 * m1)
    torch.testing.assert_close(got.row_scale, ref.row_scale, rtol=1e-5, atol=0)
    owned = got.column >= 0
    assert torch.equal(got.target_logit[~owned], torch.zeros_like(got.target_logit[~owned]))
    expected_t = scale * psi if normalize else scale * psi * got.row_state[:, 0].double() * got.row_state[:, 1].double()
    torch.testing.assert_close(got.target_logit[owned].double(), expected_t[owned], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("margin", [MARGINS[2], MARGINS[5]])  # SphereFace, L-Softmax: the margins λ eases
@pytest.mark.parametrize("exact", [True, False])
def test_lambda_eased_target_rows_match_pytorch(margin, exact):
    """A-Softmax's λ: the forward's ψ and the backward's slope of both kernels against PyTorch's."""
    N, C, D = 45, 37, 16
    x, w, t = hard_case(N, C, D, torch.float32)
    opts = options(margin, exact=exact, smoothing=0.1, lambda_=5.0)
    got, ref = triton_tiles().margin_target_rows(x, w, t, opts), target_rows(x, w, t, opts)
    torch.testing.assert_close(got.row_state, ref.row_state, rtol=1e-5, atol=2e-6 * margin[1])
    lse = torch.randn(N, device=DEVICE) * 3 + 10
    grad_loss = torch.rand(N, device=DEVICE)
    got = triton_tiles().margin_target_grad_rows(ref.row_state, lse, grad_loss, t, opts, C, C)
    want = target_grad_rows(ref.row_state, lse, grad_loss, t, opts, C, C)
    for name in ("target_logit", "target_grad", "radial"):
        a, b = getattr(got, name), getattr(want, name)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max().clamp_min(1.0)), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [2, 3])
def test_subcenter_target_rows_match_pytorch(dtype, K):
    """The target's best sub-centre (its index, ‖w_y‖, c_y) as PyTorch's target_rows finds it, also when the
    edge cases of hard_case sit in one sub-centre of the target class and a near-copy (a tie to within
    rounding: either index is right, the geometry must agree) in another."""
    N, C, D = 45, 37, 70
    x, w, t = hard_case(N, C * K, D, dtype)
    t = torch.where(t == -100, t, t % C)
    w = w.clone()
    w[t[5] * K + K - 1] = w[t[5] * K]  # an exact tie: the first sub-centre must win in both
    opts = options(MARGINS[0])
    opts = MarginOptions.of(opts.scale, opts.m1, opts.m2, opts.m3, True, True, 0.0, -100, K)
    got = triton_tiles().margin_target_rows(x, w, t, opts)
    ref = target_rows(x, w, t, opts)
    assert got.row_state.shape == ref.row_state.shape == (N, 5)
    assert torch.equal(got.column, ref.column)
    assert torch.equal(got.row_state[:, 4], ref.row_state[:, 4]), "another sub-centre chosen"
    torch.testing.assert_close(got.row_state[:, :3], ref.row_state[:, :3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.target_logit, ref.target_logit, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_target_grad_rows_match_pytorch(margin, exact, sharded):
    N, C, D = 45, 37, 16
    x, w, t = hard_case(N, C, D, torch.float32)
    opts = options(margin, exact=exact, smoothing=0.1)
    start, num_local = (10, 20) if sharded else (None, C)
    w_local = w[10:30] if sharded else w
    row_state = target_rows(x, w_local, t, opts, start).row_state
    lse = torch.randn(N, device=DEVICE) * 3 + 10
    grad_loss = torch.rand(N, device=DEVICE)
    got = triton_tiles().margin_target_grad_rows(row_state, lse, grad_loss, t, opts, C, num_local, start)
    ref = target_grad_rows(row_state, lse, grad_loss, t, opts, C, num_local, start)
    assert torch.equal(got.column, ref.column)
    for name in ("row_scale", "target_logit", "coef_p", "coef_u", "target_grad", "radial"):
        a, b = getattr(got, name), getattr(ref, name)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max().clamp_min(1.0)), msg=name)


def test_empty_batch():
    opts = options(MARGINS[0])
    x, w = torch.randn(0, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    rows = triton_tiles().margin_target_rows(x, w, t, opts)
    assert rows.row_state.shape == (0, 4) and rows.column.shape == (0,)
    grad = triton_tiles().margin_target_grad_rows(rows.row_state, torch.zeros(0, device=DEVICE),
                                                  torch.zeros(0, device=DEVICE), t, opts, 5, 5)
    assert grad.target_grad.shape == (0,)


def test_parity_sign_beyond_two_pi():
    """SphereFace m1 = 4 at θ near π: φ ≈ 4π, k up to 3 or 4, the sign must alternate."""
    c = torch.tensor([math.cos(t) for t in (2.5, 2.9, 3.1, math.pi)], dtype=torch.float64)
    opts = options((30.0, 4.0, 0.0, 0.0, True))
    x = torch.stack([c, (1 - c ** 2).clamp_min(0).sqrt()], 1).float().to(DEVICE)
    w = torch.tensor([[1.0, 0.0]], device=DEVICE)
    rows = triton_tiles().margin_target_rows(x, w, torch.zeros(4, dtype=torch.int64, device=DEVICE), opts)
    psi = rows.row_state[:, 3].double().cpu()
    assert (psi.diff() < 0).all(), "ψ is strictly decreasing in θ"
    torch.testing.assert_close(psi, margin_psi(rows.row_state[:, 2].double().cpu(), 4.0, 0.0, 0.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding_stays_non_finite(bad):
    """A NaN/inf embedding's row state is NaN (NaN-propagating clamps), not a finite ‖x‖ = ε."""
    x, w, t = hard_case(45, 37, 16, torch.float32)
    x[7, 2] = bad
    t[7] = 5
    rows = triton_tiles().margin_target_rows(x, w, t, options(MARGINS[0]))
    assert torch.isnan(rows.row_state[7, 2]) and torch.isnan(rows.target_logit[7])
    others = torch.cat([rows.row_state[:7], rows.row_state[8:]])
    assert torch.isfinite(others).all()


@pytest.mark.parametrize("options", [dict(), dict(normalize=False), dict(lambda_=0.5, label_smoothing=0.1),
                                     dict(margin_grad="straight_through"), dict(subcenters=3)],
                         ids=["arcface-like", "l-softmax", "lambda-smoothing", "straight-through", "subcenters"])
def test_row_margins_match_the_materialised_definition(options, monkeypatch):
    """Per-row m2 (both signs) and m3 through the Triton kernels (margin_rows.py's ROW_MARGINS) and the engine:
    loss and the gradients of x, w and both margins (tests/test_adaptive_margins.py runs the CPU backends)."""
    from tests.helpers import check_row_margins_match_oracle
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")
    check_row_margins_match_oracle(DEVICE, torch.float32, **options)


def test_row_margin_kernels_match_their_twins():
    """margin_target_rows / margin_target_grad_rows with row_margins against target_rows / target_grad_rows."""
    N, C, D = 70, 30, 24
    x, w, t = hard_case(N, C, D, torch.float32)
    margins = (torch.rand(N, 2, dtype=torch.float32, device=DEVICE) - 0.5)
    for margin in MARGINS:
        opts = options(margin, smoothing=0.1, lambda_=0.25)
        got = triton_tiles().margin_target_rows(x, w, t, opts, None, margins)
        want = target_rows(x, w, t, opts, None, margins)
        torch.testing.assert_close(got.row_state, want.row_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.target_logit, want.target_logit, rtol=1e-5, atol=1e-4)
        lse = want.target_logit + torch.rand(N, device=DEVICE)
        grad_loss = torch.rand(N, device=DEVICE)
        got = triton_tiles().margin_target_grad_rows(want.row_state, lse, grad_loss, t, opts, C, C, None, margins)
        ref = target_grad_rows(want.row_state, lse, grad_loss, t, opts, C, C, None, margins)
        for name in ("target_logit", "coef_p", "coef_u", "target_grad", "radial"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
def test_a_nan_margin_on_an_ignored_row_stays_there(normalize, monkeypatch):
    from tests.helpers import check_nan_margin_on_an_ignored_row
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")
    check_nan_margin_on_an_ignored_row(DEVICE, torch.float32, normalize)


@pytest.mark.parametrize("case", [dict(), dict(coefficients=(0.0, 1.12, 0.12), m2=0.0, m3=0.35, label_smoothing=0.1),
                                  dict(coefficients=(-0.5, 1.3, 0.25), m3=0.1), dict(subcenters=3),
                                  dict(coefficients=(0.0, 2e5, 0.0)),
                                  dict(coefficients=(0.0, 0.0, 0.0), threshold=0.1, m2=0.0, m3=0.35)],
                         ids=["curricular", "mv-am-smoothing", "any-quadratic", "subcenters", "steep",
                              "interclass-filtering"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_hard_negatives_match_the_materialised_definition(case, dtype, monkeypatch):
    """The hard-negative re-weighting (HAS_HARD_NEGATIVES in both streaming kernels; CurricularFace, MV-Softmax):
    loss and both gradients against the official-style float64 formula (tests/test_hard_negatives.py runs the CPU
    backends); fp16 through the scaled 16-bit G, whose bound counts the re-weighted slope ("steep": without it, the
    hard cells' dL/da would pass fp16's 65504 and saturate)."""
    from tests.helpers import check_hard_negatives_match_oracle
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")
    check_hard_negatives_match_oracle(DEVICE, dtype, **case)
