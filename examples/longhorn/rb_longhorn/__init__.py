"""The Longhorn update rule as a retrieval-bench update rule (entry point ``longhorn``).

Liu, Wang, Wu, Feng, Stone & Liu 2024, "Longhorn: State Space Models are Amortized Online Learners" (ICLR 2025).
Longhorn reads a recurrent state as the solution of an online regression problem: each write solves

    W_t = argmin_W ‖W - W_{t-1}‖²_F + β_t ‖W φ_t - v_t‖²

exactly (an implicit, proximal step rather than a gradient step). By Sherman-Morrison its closed form is, in the
paper's orientation (W ∈ R^{V×F}, read W φ(q)), with φ_t = φ(k_t) already normalised::

    W_t = W_{t-1} (I - ε_t φ_t φ_tᵀ) + ε_t v_t φ_tᵀ,      ε_t = β_t / (1 + β_t φ_tᵀφ_t),      ŷ = W_L φ(q)

This is the full-matrix form of the paper's objective; the paper's SSM then keeps a diagonal approximation of it
(one ε per state row) to fit a selective-scan kernel. The step size ε_t < 1/‖φ_t‖² whatever β_t and the key's
norm, so the transition I - ε_t φ_t φ_tᵀ never overshoots (its eigenvalue along φ_t is 1/(1 + β_t‖φ_t‖²)):
unlike the delta rule, the rule needs no key normalisation to stay stable, and uses none by default.

It is the delta rule with the writing strength ε_t in place of β_t, so the plugin reuses retrieval-bench's exact
fast forms of the delta rule and autograd carries the gradient through ε to β and φ.
"""

from __future__ import annotations

import torch

from retrieval_bench import UpdateRule
from retrieval_bench.memories.causal import delta_causal
from retrieval_bench.memories.chunked import delta_query_read

__all__ = ["LonghornRule", "step_sizes"]


def step_sizes(k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ε = β / (1 + β φᵀφ): k (..., F), beta (...) -> (...)."""
    return beta / (1 + beta * (k * k).sum(-1))


class LonghornRule(UpdateRule):
    """W_t = W_{t-1}(I - ε_t φ_t φ_tᵀ) + ε_t v_t φ_tᵀ, ε_t = β_t / (1 + β_t φ_tᵀφ_t); no normalisation by default,
    no attention normaliser.

    ``step`` is the executable spec (``retrieval_bench.memories.reference.reference_loop`` runs it);
    ``forward`` (the training form) and ``causal`` (every position read after its write) are equal to it in
    outputs and gradients.
    """

    name = "longhorn"
    gates = ("beta",)
    default_norm = "none"
    # The paper has no attention normaliser; decline rather than invent one.
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        """One write. k (B, F), v (B, V), g {"beta": (B,)}.

        As the delta rule's "remove v̄, write v_new" with the step size ε_t: W_t = W_{t-1} + (v_new - v̄) ⊗ φ_t
        with v̄ = W_{t-1}φ_t and v_new = ε_t v_t + (1 - ε_t) v̄, which expands to the equation above.
        """
        W = state["W"]  # (B, V, F)
        eps = step_sizes(k, g["beta"])[:, None]  # (B, 1)
        v_bar = (W * k[:, None, :]).sum(-1)  # (B, V): what φ_t retrieves before the write
        v_new = eps * v + (1 - eps) * v_bar
        W = W + (v_new - v_bar)[:, :, None] * k[:, None, :]
        return {"W": W}, {"v_bar": v_bar, "v_new": v_new}

    def forward(self, k, v, q, gates, attn):
        """k (B, L, F), v (B, L, V), q (B, Q, F), gates {"beta": (B, L)} -> (B, Q, V): the delta rule's
        query-backward training form with writing strengths ε."""
        return delta_query_read(k, v, step_sizes(k, gates["beta"]), q)

    def causal(self, k, v, q, gates, attn):
        """k, q (B, T, F), v (B, T, V), gates {"beta": (B, T)} -> (B, T, V): the delta rule's chunkwise
        all-positions form with writing strengths ε."""
        return delta_causal(k, v, q, step_sizes(k, gates["beta"]))
