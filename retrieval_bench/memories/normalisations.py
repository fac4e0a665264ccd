"""Key/query normalisations applied to φ(k) and φ(q) before any update rule (PAPER §1.5, §5).

``none`` leaves φ as it is; ``sum`` is the paper's Eq. 29, φ/Σφ; ``l2`` is DeltaNet's φ/‖φ‖. The attention
normaliser (the accumulator z_t) is a separate switch handled by the rules, since it changes their recurrences.

``sum`` and ``l2`` run as one rescaling y = φ·r per row with a hand-written backward: autograd's backward of a
broadcast division takes five passes over φ and divides in most of them, which made the normalisation a quarter
of a delta-rule training step. ``sum_norm_reference`` and ``l2_norm_reference`` are the plain formulas, the spec
the tests compare them against.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..registry import normalisations

# DPFP can map a key to the all-zero vector (PAPER §1.6); the eps keeps φ/Σφ finite there. The paper's synthetic
# code adds the same 1e-6 to the query's sum.
EPS = 1e-6


def sum_norm_reference(phi: torch.Tensor) -> torch.Tensor:
    return phi / (phi.sum(-1, keepdim=True) + EPS)


def l2_norm_reference(phi: torch.Tensor) -> torch.Tensor:
    return phi / phi.norm(dim=-1, keepdim=True).clamp_min(EPS)


class _Rescale(torch.autograd.Function):
    """y = φ / d per row, d = Σφ + eps (sum) or max(‖φ‖, eps) (l2).

    Backward, with g = ∂ℓ/∂y and r = 1/d: sum, ∂ℓ/∂φ = (g − g·y) r; l2, ∂ℓ/∂φ = (g − y (g·y)) r where ‖φ‖ > eps
    and g r where the clamp holds d constant. Two passes over φ and one dot product per row.

    Unlike the plain formula it saves its output (an in-place edit of the normalised φ raises in backward), and
    it has no second derivative, forward-mode rule or ``torch.func`` support: nothing here uses them, and each
    raises rather than giving a wrong number.
    """

    @staticmethod
    def forward(ctx, phi: torch.Tensor, l2: bool) -> torch.Tensor:
        if l2:
            norm = torch.linalg.vector_norm(phi, dim=-1, keepdim=True)
            den = norm.clamp_min(EPS)
        else:
            den = phi.sum(-1, keepdim=True) + EPS
        r = den.reciprocal()
        y = phi * r
        ctx.l2 = l2
        ctx.save_for_backward(y, r, (norm >= EPS).to(phi.dtype) if l2 else None)  # clamp_min's gradient at a tie
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        y, r, live = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, y).unsqueeze(-1)  # g·y per row
        if ctx.l2:
            return torch.addcmul(g, y, dot.mul_(live), value=-1).mul_(r), None
        return torch.sub(g, dot).mul_(r), None


@normalisations.register("none")
def no_norm(phi: torch.Tensor) -> torch.Tensor:
    return phi


@normalisations.register("sum")
def sum_norm(phi: torch.Tensor) -> torch.Tensor:
    """φ / (Σ_i φ_i + eps): for non-negative φ the entries sum to 1 (PAPER Eq. 29)."""
    return _Rescale.apply(phi, False)


@normalisations.register("l2")
def l2_norm(phi: torch.Tensor) -> torch.Tensor:
    """φ / max(‖φ‖₂, eps) (Yang et al. 2024): with β = 1 the delta transition becomes a projector."""
    return _Rescale.apply(phi, True)
