"""The combined angular margin ψ of DESIGN.md §4 and its derivative, per row (O(N) work).

ψ(c) = (−1)^k cos φ − 2k − m3 with θ = arccos c, φ = m1·θ + m2, k = ⌊φ/π⌋.
This is continuous and strictly decreasing in θ for m1 ≥ 1, m2 ≥ 0 (L-Softmax's monotone extension);
ArcFace (1, m, 0), CosFace (1, 0, m) and SphereFace/L-Softmax (m, 0, 0) are special cases.
m2 and m3 may also be per-row tensors (AdaFace, MagFace, ElasticFace: a margin per sample, of any sign for
m2: ψ stays continuous and decreasing in θ for every real φ), differentiable through margin_psi_dm2.

Only the target column carries a margin, so every kernel receives ψ already evaluated per row and
substitutes it for the target logit: the streaming kernels never need acos.
"""
import math

import torch

# dψ/dc = (−1)^k·m1·sin φ / sin θ diverges as θ → 0 or π when sin φ ≠ 0 (ArcFace at c → ±1).
# The exact slope is evaluated at θ clamped to [θ_min, π − θ_min]. Below 1e-3 rad an fp32 cosine
# cannot resolve θ anyway (the fp32 spacing 6e-8 of c near 1 is a 6% error in θ at 1e-3), so this
# changes nothing resolvable and bounds |dψ/dc| by m1 / sin(1e-3) ≈ 1000·m1.
EXACT_SLOPE_MIN_ANGLE = 1e-3


def _angles(cosine, m1, m2):
    theta = torch.acos(cosine.clamp(-1.0, 1.0))
    phi = m1 * theta + m2
    k = torch.floor(phi / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (−1)^k
    return theta, phi, k, sign


def margin_psi(cosine, m1, m2, m3):
    """ψ(c) for a tensor of target cosines (any float dtype; computed in that dtype)."""
    _, phi, k, sign = _angles(cosine, m1, m2)
    return sign * torch.cos(phi) - 2.0 * k - m3


def margin_slope(cosine, m1, m2, exact):
    """dψ/dc: exact (bounded, see EXACT_SLOPE_MIN_ANGLE) or 1 for the straight-through estimator."""
    if not exact:
        return torch.ones_like(cosine)
    theta, _, _, _ = _angles(cosine, m1, m2)
    theta = theta.clamp(EXACT_SLOPE_MIN_ANGLE, math.pi - EXACT_SLOPE_MIN_ANGLE)
    phi = m1 * theta + m2
    k = torch.floor(phi / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    # (−1)^k sin φ ≥ 0 on [kπ, (k+1)π]: the slope is never negative (ψ is monotone).
    return (sign * m1 * torch.sin(phi) / torch.sin(theta)).clamp_min(0.0)


def margin_psi_dm2(cosine, m1, m2):
    """∂ψ/∂m2 = −(−1)^k sin φ, at the unclamped angle (bounded: a margin's own gradient needs no clamp;
    continuous across the branches, where sin φ = 0). ∂ψ/∂m3 is −1."""
    _, phi, _, sign = _angles(cosine, m1, m2)
    return -sign * torch.sin(phi)


def blend_psi(psi, cosine, lambda_):
    """A-Softmax's and L-Softmax's λ: the target's ψ eased toward the plain cosine, (λ·c + ψ(c))/(1 + λ)
    (λ = 0: ψ itself, to the last bit)."""
    return (lambda_ * cosine + psi) / (1.0 + lambda_)


def blend_slope(slope, lambda_):
    """d/dc of blend_psi: (λ + ψ'(c))/(1 + λ) (straight-through, ψ' = 1, stays 1)."""
    return (lambda_ + slope) / (1.0 + lambda_)


class MarginPsi(torch.autograd.Function):
    """ψ(c) with the bounded exact slope as its derivative (autograd through acos would give ±inf at |c| = 1);
    per-row tensor margins m2, m3 get their gradients too. straight_through=True: dψ/dc := 1 (the margins'
    gradients stay exact)."""

    @staticmethod
    def forward(ctx, cosine, m1, m2, m3, straight_through=False):
        ctx.save_for_backward(cosine, *(m for m in (m2,) if isinstance(m, torch.Tensor)))
        ctx.margins = (m1, m2 if not isinstance(m2, torch.Tensor) else None)
        ctx.straight_through = straight_through
        return margin_psi(cosine, m1, m2, m3)

    @staticmethod
    def backward(ctx, grad):
        cosine, *row_m2 = ctx.saved_tensors
        m1, m2 = ctx.margins
        m2 = row_m2[0] if row_m2 else m2
        grad_c = grad * margin_slope(cosine, m1, m2, exact=not ctx.straight_through)
        grad_m2 = grad * margin_psi_dm2(cosine, m1, m2) if ctx.needs_input_grad[2] else None
        grad_m3 = -grad if ctx.needs_input_grad[3] else None
        return grad_c, None, grad_m2, grad_m3, None
