"""ψ and dψ/dc (marginkern/margin.py) against float64 math written out independently here."""
import math

import pytest
import torch

from marginkern.margin import EXACT_SLOPE_MIN_ANGLE, MarginPsi, margin_psi, margin_slope

THETA = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
COS = torch.cos(THETA)
MARGINS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (4.0, 0.0, 0.0), (2.0, 0.0, 0.0), (1.35, 0.25, 0.1), (1.0, 0.0, 0.0)]


def test_arcface_is_cos_theta_plus_m_below_pi_minus_m():
    m = 0.5
    keep = THETA < math.pi - m
    assert torch.allclose(margin_psi(COS, 1.0, m, 0.0)[keep], torch.cos(THETA[keep] + m), atol=1e-12)
    # beyond π − m the monotone extension −cos(θ + m) − 2 takes over (insightface's current code is non-monotone there)
    far = THETA > math.pi - m + 1e-9
    assert torch.allclose(margin_psi(COS, 1.0, m, 0.0)[far], -torch.cos(THETA[far] + m) - 2.0, atol=1e-12)


def test_cosface_is_cos_minus_m():
    assert torch.allclose(margin_psi(COS, 1.0, 0.0, 0.35), COS - 0.35, atol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_sphereface_is_chebyshev_below_pi_over_m(m):
    # cos(mθ) = T_m(c) = Σ_n (−1)^n C(m, 2n) c^{m−2n} (1 − c²)^n  (PML's "Equation 7")
    cheb = sum((-1) ** n * math.comb(m, 2 * n) * COS ** (m - 2 * n) * (1 - COS ** 2) ** n for n in range(m // 2 + 1))
    keep = THETA < math.pi / m
    assert torch.allclose(margin_psi(COS, float(m), 0.0, 0.0)[keep], cheb[keep], atol=1e-10)


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_psi_is_continuous_and_decreasing_in_theta(m1, m2, m3):
    psi = margin_psi(COS, m1, m2, m3)
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-12).all(), "ψ must not increase with θ"
    assert steps.abs().max() < 0.05, "ψ must not jump (th/mm-style fallbacks jump by 0.117 at θ = π − m)"


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_exact_slope_matches_autograd_of_the_formula(m1, m2, m3):
    theta = torch.linspace(0.05, math.pi - 0.05, 999, dtype=torch.float64)
    c = torch.cos(theta).requires_grad_()
    phi = m1 * torch.acos(c) + m2
    k = torch.floor(phi / math.pi).detach()
    direct = (-1.0) ** k * torch.cos(phi) - 2 * k - m3
    (expected,) = torch.autograd.grad(direct.sum(), c)
    assert torch.allclose(margin_slope(c.detach(), m1, m2, exact=True), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_exact_slope_is_bounded_and_finite_at_the_poles(m1, m2, m3):
    c = torch.tensor([1.0, -1.0, 1 - 1e-12, -1 + 1e-12, 1 + 1e-7, -1 - 1e-7], dtype=torch.float64)
    s = margin_slope(c, m1, m2, exact=True)
    assert torch.isfinite(s).all() and (s >= 0).all()
    assert s.max() <= m1 / math.sin(EXACT_SLOPE_MIN_ANGLE) + 1e-6


def test_sphereface_slope_near_zero_angle_keeps_its_limit():
    # ψ' = m·sin(mθ)/sin θ = m·U_{m−1}(c) → m² as θ → 0: clamping θ must not turn this into something else
    s = margin_slope(torch.tensor([1.0], dtype=torch.float64), 4.0, 0.0, exact=True)
    assert abs(float(s) - 16.0) < 1e-4


def test_straight_through_slope_is_one():
    assert torch.equal(margin_slope(COS, 1.0, 0.5, exact=False), torch.ones_like(COS))


def test_margin_psi_function_gradcheck():
    c = torch.linspace(-0.95, 0.95, 17, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: MarginPsi.apply(v, 1.2, 0.3, 0.1), (c,))
