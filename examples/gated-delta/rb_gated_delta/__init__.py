"""The gated delta rule of Gated DeltaNet as a retrieval-bench update rule (entry point ``gated-delta``).

Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025; PAPER
§5), in the paper's orientation (W ∈ R^{V×F}, read W φ(q)), with φ_t = φ(k_t) already normalised::

    W_t = α_t W_{t-1} (I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ,      ŷ = W_L φ(q)

β_t ∈ (0, 1) is the delta rule's writing strength and α_t ∈ (0, 1) a decay of everything stored; the model
makes both as σ(W_g x_t) because the rule declares ``gates = ("beta", "alpha")``. α ≡ 1 is the delta rule of
Schlag et al. 2021; β ≡ 0 only decays.

Any feature map composes with it: ``dpfp-1/gated-delta``, ``linear/gated-delta/l2``, ``favor-16/gated-delta``.
"""

from __future__ import annotations

import torch

from retrieval_bench import UpdateRule

__all__ = ["GatedDeltaRule", "gated_delta_query_backward"]


class GatedDeltaRule(UpdateRule):
    """W_t = α_t W_{t-1}(I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ; sum-normalised φ, no attention normaliser.

    ``step`` is the executable spec (``retrieval_bench.memories.reference.reference_loop`` runs it);
    ``forward`` is the training form, equal to it in outputs and gradients (``gated_delta_query_backward``).
    """

    name = "gated-delta"
    gates = ("beta", "alpha")
    default_norm = "sum"
    # Mixing z_t into the decayed recurrence has no form in the paper; decline rather than invent one.
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        """One write. k (B, F), v (B, V), g {"beta": (B,), "alpha": (B,)}.

        Written as the delta rule's "remove v̄, write v_new" after the decay,
        W_t = α_t W_{t-1} + (v_new - α_t v̄) ⊗ φ_t with v̄ = W_{t-1}φ_t and v_new = β_t v_t + α_t (1 - β_t) v̄,
        which expands to the equation above.
        """
        W = state["W"]  # (B, V, F)
        beta, alpha = g["beta"][:, None], g["alpha"][:, None]  # (B, 1)
        v_bar = (W * k[:, None, :]).sum(-1)  # (B, V): what φ_t retrieves before the write
        v_new = beta * v + alpha * (1 - beta) * v_bar
        W = alpha[..., None] * W + (v_new - alpha * v_bar)[:, :, None] * k[:, None, :]
        return {"W": W}, {"v_bar": v_bar, "v_new": v_new}

    def forward(self, k, v, q, gates, attn):
        """k (B, L, F), v (B, L, V), q (B, Q, F), gates {"beta", "alpha": (B, L)} -> (B, Q, V)."""
        return gated_delta_query_backward(k, v, gates["beta"], gates["alpha"], q)


def gated_delta_query_backward(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                               q: torch.Tensor) -> torch.Tensor:
    """W_L q for the gated delta rule without ever forming W: the query travels backwards through the writes.

    Since W_t c = α_t W_{t-1}(c - β_t φ_t (φ_t·c)) + β_t v_t (φ_t·c) for any vector c, starting from c_L = q::

        s_t = β_t φ_t·c_t,    c_{t-1} = α_t (c_t - s_t φ_t),    W_L q = Σ_t s_t v_t      (W_0 = 0)

    Unrolled, c_t = (Π_{s>t} α_s) d_t where d_t is the undecayed delta-rule query, so the decays from t to the
    end multiply each term, ŷ = Σ_t β_t v_t (φ_t·d_t) Π_{s>t} α_s; carrying them inside c needs no products of
    many α that could underflow and no division by them. Autograd keeps O(L·B·Q·F) numbers, not L states of
    B·V·F as the reference loop does.

    k (B, L, F), v (B, L, V), beta and alpha (B, L), q (B, Q, F) -> (B, Q, V).
    """
    c = q
    y = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    # unbind, not k[:, t]: indexing inside an autograd loop makes the backward quadratic in L.
    steps = list(zip(k.unbind(1), v.unbind(1), beta.unbind(1), alpha.unbind(1), strict=True))
    for t in reversed(range(len(steps))):
        k_t, v_t, beta_t, alpha_t = steps[t]
        s = (c * k_t[:, None, :]).sum(-1) * beta_t[:, None]  # (B, Q)
        y = y + s[..., None] * v_t[:, None, :]
        if t:  # c_0 would meet only W_0 = 0: α_1 never changes the read
            c = alpha_t[:, None, None] * (c - s[..., None] * k_t[:, None, :])
    return y
