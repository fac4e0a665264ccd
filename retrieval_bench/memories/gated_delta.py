"""The gated delta rule of Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule", ICLR 2025; PAPER §5), in the paper's orientation (W ∈ R^{V×F}, read W φ(q))::

    W_t = α_t W_{t-1} (I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ        ŷ = W_L φ(q)

β_t ∈ (0, 1) is the delta rule's writing strength, α_t ∈ (0, 1) a decay of everything stored; α ≡ 1 is the delta
rule (Schlag et al. 2021, PAPER Eqs. 20-25), β ≡ 0 only decays. The fast forms compute the same numbers as the
step function:

* ``gated_delta_query_read``: the training form (one read after the last write). The query travels backwards
  through the writes as an F-vector; chunks of C steps solve a C×C unit-triangular system each.
* ``gated_delta_causal``: every position read after its own write, the chunkwise WY / UT form of the delta rule
  (``causal.delta_causal``) with the decays inside the chunk.

Both carry the decays as chunk-local cumulative log-decays lg_i = Σ_{m≤i} log α_m, and every product of α from
step j to step i as exp(lg_i - lg_j) with i ≥ j (at most 1): no product of many α that underflows is ever
divided by. Plain torch ops: autograd gives the gradients.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from ..registry import update_rules
from ..spec import RULE_DEFAULTS
from .causal import DELTA_CHUNK
from .chunked import (
    MANY_QUERIES_CHUNK,
    QUERY_CHUNK,
    _chunks,
    _small_matmul,
    _values_read,
    chunk_length,
    one_hot_ids,
    unit_triangular_inverse,
)
from .decay import log_gate
from .rules import UpdateRule, _mv, _outer

#: initial bias of the decay gate's projection: α starts near σ(5) = 0.993, a time constant of ~150 steps.
#: Gated DeltaNet initialises its decay as Mamba2 does, α = exp(-A·Δ) with A ~ U(0, 16) and Δ log-uniform in
#: [0.001, 0.1]: a spread over heads from about 0.2 to 1, median exp(-0.08) = 0.92. One gate per head cannot hold
#: that spread, and the median forgets a sequence's first bindings within tens of tokens: a one-head language
#: model with α ≈ 0.92 at the start did not learn mqar_quick in 2,100 steps (accuracy 0.007, where the delta rule
#: reaches 0.715 in 1,000). So α starts at the slow end of the paper's range, where training can lower it.
ALPHA_BIAS = 5.0


@update_rules.register("gated-delta")
class GatedDeltaRule(UpdateRule):
    """The gated delta rule (Gated DeltaNet, Yang et al. 2025): W_t = α_t W_{t-1}(I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ.

    L2-normalised φ by default, as Gated DeltaNet normalises its keys and queries (then with β = 1 the
    transition α(I - φφᵀ) is a scaled projector, and the state stays bounded). No attention normaliser: the
    paper has none for the decayed recurrence.
    """

    name = "gated-delta"
    gates = ("beta", "alpha")
    gate_bias = MappingProxyType({"alpha": ALPHA_BIAS})
    default_norm, default_attn = RULE_DEFAULTS["gated-delta"]  # l2, no attention normaliser
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        """One write, k (B, F), v (B, V), g {"beta", "alpha": (B,)}: the delta rule's "remove v̄, write v_new"
        after the decay, W_t = α_t W_{t-1} + (v_new - α_t v̄) ⊗ φ_t with v̄ = W_{t-1}φ_t and
        v_new = β_t v_t + α_t (1 - β_t) v̄, which expands to the equation above."""
        W = state["W"]  # (B, V, F)
        beta, alpha = g["beta"][:, None], g["alpha"][:, None]  # (B, 1)
        v_bar = _mv(W, k)  # (B, V): what φ_t retrieves just before the write
        v_new = beta * v + alpha * (1 - beta) * v_bar
        W = alpha[..., None] * W + _outer(v_new - alpha * v_bar, k)
        return {"W": W}, {"v_bar": v_bar, "v_new": v_new}

    def forward(self, k, v, q, gates, attn):
        """k (B, L, F), v (B, L, V), q (B, Q, F), gates {"beta", "alpha": (B, L)} -> (B, Q, V)."""
        return gated_delta_query_read(k, v, gates["beta"], gates["alpha"], q)

    def causal(self, k, v, q, gates, attn, chunk: int | None = None):
        """Every position's read after its write (``causal.rule_causal``): k, q (B, T, F), v (B, T, V) ->
        (B, T, V)."""
        return gated_delta_causal(k, v, q, gates["beta"], gates["alpha"], chunk)


def _pair_decays(lg: torch.Tensor, lower: bool, diagonal: int) -> torch.Tensor:
    """exp(lg_i - lg_j) on the lower triangle (j ≤ i, from ``diagonal`` = 0 or -1) or exp(lg_j - lg_i) on the
    upper (j ≥ i), 0 elsewhere: the product of the decays between two steps of a chunk. lg (..., C) ->
    (..., C, C). The masked entries are set to -inf before the exp, where exp(lg_i - lg_j) could overflow."""
    C = lg.shape[-1]
    diff = lg[..., :, None] - lg[..., None, :]  # [i, j] = lg_i - lg_j
    keep = torch.ones(C, C, dtype=torch.bool, device=lg.device)
    keep = keep.tril(diagonal) if lower else keep.triu(-diagonal)
    return torch.where(keep, diff if lower else -diff, -math.inf).exp()


def gated_delta_query_read(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                           q: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """W_L q after all L writes of the gated delta rule, exactly, without forming W.

    For any vector c, W_t c = α_t W_{t-1}(c - β_t φ_t (φ_t·c)) + β_t v_t (φ_t·c), so from c_L = q::

        s_t = β_t φ_t·c_t,    c_{t-1} = α_t (c_t - s_t φ_t),    W_L q = Σ_t s_t v_t      (W_0 = 0).

    In a chunk of steps 1..C entered (from the later chunks) with c_end, c_i = γ_i c_end - Σ_{j>i} Γ_ij s_j φ_j
    with γ_i = Π_{m>i} α_m and Γ_ij = Π_{i<m≤j} α_m, so the C scalars s (one row per query) solve
    s (I + Nᵀ) = p diag(β γ) with p = c_end Φᵀ and N_ij = β_i Γ_ij φ_i·φ_j (j > i). T = (I + N)⁻¹ does not
    depend on the query: all are formed at once, and the sequential part is s = p diag(βγ) Tᵀ and
    c_start = (Π_chunk α) c_end - (s ⊙ g) Φ with g_j = Π_{m≤j} α_m, per chunk.

    Args:
        k: features (B, L, F). v: values (B, L, V). beta, alpha: gates (B, L). q: queries (B, Q, F).
        chunk: steps per chunk (default ``QUERY_CHUNK`` for few queries, ``MANY_QUERIES_CHUNK`` for many).

    Returns:
        (B, Q, V).
    """
    B, L, F = k.shape
    if chunk is None:
        chunk = QUERY_CHUNK if q.shape[1] < 16 else MANY_QUERIES_CHUNK
    C = chunk_length(L, chunk)
    n = math.ceil(L / C)
    # zero padding at the end: φ = 0, β = 0 and log α = 0 (α = 1) is an identity write
    K, be, lg = _chunks(k, n, C), _chunks(beta, n, C), _chunks(log_gate(alpha), n, C).cumsum(-1)
    Gam = _pair_decays(lg, lower=False, diagonal=-1)  # (B, n, C, C): Γ_ij for j > i
    T = unit_triangular_inverse(be[..., :, None] * Gam * (K @ K.mT), upper=True)
    gam = (lg[..., -1:] - lg).exp()  # γ_i = Π_{m>i} α_m, (B, n, C)
    g = lg.exp()  # g_j = Π_{m≤j} α_m
    Mb = (be * gam)[..., :, None] * T.mT  # s = p Mb
    K_k, Mb_k, g_k, G_k = K.unbind(1), Mb.unbind(1), g[:, :, None, :].unbind(1), g[:, :, -1].unbind(1)
    c = q
    Ss = []
    for i in range(n - 1, -1, -1):
        # _small_matmul: with one query (training) these are row-vector products, which a bmm runs slowly
        s = _small_matmul(_small_matmul(c, K_k[i].mT), Mb_k[i])  # (B, Q, C)
        Ss.append(s)
        if i:  # the first chunk's c_start would meet only W_0 = 0
            c = G_k[i][:, None, None] * c - _small_matmul(s * g_k[i], K_k[i])
    S = torch.cat(Ss[::-1], dim=2)  # (B, Q, n·C)
    return _values_read(S, v, one_hot_ids(v))


def gated_delta_causal(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, beta: torch.Tensor,
                       alpha: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The gated delta rule read at every position, y_t = W_t q_t after the write at t.

    Chunkwise WY / UT form (Yang et al. 2024; Gated DeltaNet §3.3), as ``causal.delta_causal`` with decays. With
    δ_t = β_t (v_t - α_t W_{t-1} φ_t), W_t = α_t W_{t-1} + δ_t φ_tᵀ. In a chunk entered with state S and
    g_i = Π_{m≤i} α_m, W_i = g_i S + Σ_{j≤i} (g_i / g_j) δ_j φ_jᵀ, so the chunk's δ solve
    (I + N) δ = diag(β) V - diag(β g) Φ Sᵀ with N_ij = β_i (g_i / g_j) φ_i·φ_j (j < i): δ = U - W Sᵀ with
    T = (I + N)⁻¹, U = T diag(β) V, W = T diag(β g) Φ. The reads are Y = diag(g) Q Sᵀ + (tril(Q Φᵀ) ⊙ Γ) δ with
    Γ_ij = g_i / g_j, and the next state is Sᵀ ← g_C Sᵀ + Φᵀ diag(g_C / g_j) δ.

    k, q (B, T, F); v (B, T, V); beta, alpha (B, T) -> (B, T, V). chunk: C (default ``causal.DELTA_CHUNK``).
    """
    B, T, F = k.shape
    Vd = v.shape[-1]
    C = max(1, min(chunk or DELTA_CHUNK, T))
    n = math.ceil(T / C)
    K, Qc, Vc = _chunks(k, n, C), _chunks(q, n, C), _chunks(v, n, C)  # (B, n, C, ·)
    be, lg = _chunks(beta, n, C), _chunks(log_gate(alpha), n, C).cumsum(-1)  # (B, n, C)
    Gam = _pair_decays(lg, lower=True, diagonal=0)  # Γ_ij = g_i / g_j for j ≤ i
    X = unit_triangular_inverse((be[..., :, None] * Gam * (K @ K.mT)).tril(-1), upper=False)
    g = lg.exp()
    W = X @ (K * (be * g)[..., None])  # (B, n, C, F)
    U = X @ (Vc * be[..., None])  # (B, n, C, V)
    QK = (Qc @ K.mT) * Gam  # (B, n, C, C), lower triangle with the diagonal: a position reads its own write
    Kd = K * (lg[..., -1:] - lg).exp()[..., None]  # φ_j g_C / g_j
    per_chunk = zip(Kd.unbind(1), Qc.unbind(1), W.unbind(1), U.unbind(1), QK.unbind(1), g.unbind(1), strict=True)
    St = k.new_zeros(B, F, Vd)  # Sᵀ
    ys = []
    for kd, qc, w, u, qk, gc in per_chunk:
        delta = torch.baddbmm(u, w, St, alpha=-1)  # (B, C, V)
        ys.append(torch.baddbmm(gc[..., None] * torch.bmm(qc, St), qk, delta))
        St = torch.baddbmm(gc[:, -1, None, None] * St, kd.mT, delta)
    return torch.cat(ys, dim=1)[:, :T]
