"""Key/query normalisations applied to φ(k) and φ(q) before any update rule (PAPER §1.5, §5).

``none`` leaves φ as it is; ``sum`` is the paper's Eq. 29, φ/Σφ; ``l2`` is DeltaNet's φ/‖φ‖. The attention
normaliser (the accumulator z_t) is a separate switch handled by the rules, since it changes their recurrences.
"""

from __future__ import annotations

import torch

from ..registry import normalisations

# DPFP can map a key to the all-zero vector (PAPER §1.6); the eps keeps φ/Σφ finite there. The paper's synthetic
# code adds the same 1e-6 to the query's sum.
EPS = 1e-6


@normalisations.register("none")
def no_norm(phi: torch.Tensor) -> torch.Tensor:
    return phi


@normalisations.register("sum")
def sum_norm(phi: torch.Tensor) -> torch.Tensor:
    """φ / (Σ_i φ_i + eps): for non-negative φ the entries sum to 1 (PAPER Eq. 29)."""
    return phi / (phi.sum(-1, keepdim=True) + EPS)


@normalisations.register("l2")
def l2_norm(phi: torch.Tensor) -> torch.Tensor:
    """φ / max(‖φ‖₂, eps) (Yang et al. 2024): with β = 1 the delta transition becomes a projector."""
    return phi / phi.norm(dim=-1, keepdim=True).clamp_min(EPS)
