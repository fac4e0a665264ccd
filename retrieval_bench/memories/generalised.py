"""RWKV-7's generalised delta rule (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution",
arXiv:2503.14456: its wkv state update), in this package's orientation (W ∈ R^{V×F}, read W q):

    W_t = W_{t-1} (diag(w_t) - κ_t (a_t ⊙ κ_t)ᵀ) + v_t k_tᵀ,   κ_t = k_t / ‖k_t‖,   y = W_L q

w_t ∈ (0, 1)^F is a decay per feature and a_t ∈ (0, 1)^F an in-context learning rate per feature: both are
gates of width F (``UpdateRule.gate_widths``), made by the model with F-wide projections. RWKV-7's own key
refinements (a replacement key k̃ that mixes a into k, and its bonus term) are left to the model: here the rule
writes the key it is given and removes along its unit direction κ. With w ≡ 1, a ≡ β, unit keys and values β v
the rule is the paper's delta rule with learning rate β (see ``GeneralisedDeltaRule``).

Fast forms (both exact, both chunked). Two steps i < j of a chunk see each other through the decay between them,
Π_{i<m<j} w_m = exp(l_{j-1} - l_i) with l the log-decay summed from the chunk's start. In each chunk whose total
log-decay is above -½ ln(max float) (-44 in float32: decays not all near 0), those C×C terms are one matmul of
e^{-l_i}-scaled and e^{l_{j-1}}-scaled rows, which cannot overflow there; in any other chunk each pair's decay
is formed (C times the work), so no decay can overflow or be divided by 0 (``_chunk_terms``).

* ``gd_query_read`` (training, one read after the last write): the query travels backwards as an F-vector,
  c_L = q, c_{t-1} = w_t ⊙ c_t - κ_t (ã_t·c_t) with ã_t = a_t ⊙ κ_t, and y = Σ_t (k_t·c_t) v_t. Per chunk
  the C scalars u_t = ã_t·c_t solve a unit upper-triangular system whose inverse does not depend on the
  query, so the sequential part is three small matmuls per chunk; no V×F state is formed.
* ``gd_causal`` (every position read after its own write): the chunkwise form of a diagonal-plus-low-rank
  recurrence. With e_t = W_{t-1} κ_t (what the write removes), W_t = W_{t-1} diag(w_t) + v_t k_tᵀ - e_t ã_tᵀ
  is gated linear attention with two writes per step; within a chunk the e's solve the transposed system, and
  the loop over chunks carries only the state.

Both run under autograd (no hand-written backward). Their gradients with respect to w go through log w: exact,
but d/dw of a decay near 0 carries an absolute error of ~ε·(the read's scale)/w; the gradient a model trains with,
through w = σ(z), is d/dz = w(1 - w) d/dw, which does not.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from ..registry import update_rules
from ..spec import RULE_DEFAULTS
from .chunked import _chunks, _values_read, one_hot_ids, unit_triangular_inverse
from .decay import log_gate
from .normalisations import EPS
from .rules import UpdateRule, _mv, _outer

#: Steps per chunk of both fast forms: the work within chunks grows with C, the sequential part shrinks with it.
#: Training step at S = L = 600, B = 32, linear φ (F = 64), one thread of a busy 2-core machine: 447 / 340 / 595 ms
#: at C = 8 / 16 / 32.
GD_CHUNK = 16


def unit_keys(k: torch.Tensor) -> torch.Tensor:
    """κ = k / max(‖k‖, eps) along the last dimension (exactly k for unit keys, 0 for a zero key)."""
    return k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(EPS)


def _per_feature(g: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A gate as (..., F) like k: a width-F gate as it is, a scalar gate (B,) / (B, L) broadcast over features."""
    if g.dim() == k.dim():
        return g
    if g.dim() == k.dim() - 1:
        return g[..., None].expand_as(k)
    raise ValueError(f"generalised-delta: a gate must be {tuple(k.shape[:-1])} or {tuple(k.shape)}, "
                     f"got {tuple(g.shape)}")


@update_rules.register("generalised-delta")
class GeneralisedDeltaRule(UpdateRule):
    """RWKV-7's generalised delta rule (Peng et al. 2025, the wkv state update):
    W_t = W_{t-1}(diag(w_t) - κ_t (a_t ⊙ κ_t)ᵀ) + v_t k_tᵀ, κ_t = k_t/‖k_t‖, read y = W_L φ(q).

    Gates ``w`` (decay) and ``a`` (in-context learning rate), both of width F; no β.

    * ``gate_bias``: w starts at σ(5) ≈ 0.993, a memory time constant of ~150 steps, since RWKV-7 initialises
      its decays close to 1 (a decay near σ(0) = ½ would forget a write within a few steps, before the model
      could learn to keep it); a starts at PyTorch's default, near σ(0) = ½, as RWKV-7's a₀ = 0 does.
    * ``default_norm`` is ``l2``: RWKV-7 reads with the raw receptance and writes the raw key, normalising only
      the removal direction κ; here φ's scale grows with its dimension (DPFP-ν: 2νK features), and a unit
      write key makes the step with a = 1, w = 1 a projector exactly as the l2 delta rule's (a key written
      last reads back its value at scale 1, which the squared retrieval loss needs). ``PHI/generalised-delta/
      none`` keeps RWKV-7's raw keys. l2 also composes with signed maps (no sum of features is divided by).
    * no attention-normalised form (RWKV-7 has none).

    Special case: with w ≡ 1, a ≡ β 1, ‖k_t‖ = 1 and values β_t v_t, W_t = W_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t
    k_tᵀ, the paper's delta rule (Eqs. 20-25) on l2-normalised keys.
    """

    name = "generalised-delta"
    gates = ("w", "a")
    gate_widths = MappingProxyType({"w": "F", "a": "F"})
    gate_bias = MappingProxyType({"w": 5.0})
    default_norm, default_attn = RULE_DEFAULTS["generalised-delta"]  # ("l2", False)
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        W = state["W"]  # (B, V, F)
        w, a = _per_feature(g["w"], k), _per_feature(g["a"], k)
        kappa = unit_keys(k)
        v_bar = _mv(W, k)  # what the memory returns at k before the write
        removed = _mv(W, kappa)  # e_t = W_{t-1} κ_t
        W = W * w[:, None, :] - _outer(removed, a * kappa) + _outer(v, k)
        return {"W": W}, {"v_bar": v_bar, "v_new": v}

    def forward(self, k, v, q, gates, attn):
        return gd_query_read(k, v, q, gates["w"], gates["a"])

    def causal(self, k, v, q, gates, attn, chunk: int | None = None):
        """Every position's read after its own write (``memories.causal.rule_causal``): ``gd_causal``."""
        return gd_causal(k, v, q, gates["w"], gates["a"], chunk)


def _pairwise_products(X: torch.Tensor, Y: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor,
                       upper: bool) -> torch.Tensor:
    """M[i, j] = Σ_f X[i, f] Y[j, f] exp(ly[j, f] - lx[i, f]) for j > i (``upper``) or j ≤ i (else), 0 elsewhere,
    with each pair's decay formed on its own: a (B, n, C, C, F) tensor, safe for any decay (every kept exponent
    is ≤ 0). X, Y, lx, ly (B, n, C, F) -> (B, n, C, C)."""
    C = X.shape[2]
    keep = torch.ones(C, C, dtype=torch.bool, device=X.device)
    keep = (keep.triu(1) if upper else keep.tril())[..., None]  # (C, C, 1)
    D = torch.exp(torch.where(keep, ly[:, :, None, :, :] - lx[:, :, :, None, :], -math.inf))
    return (X[:, :, :, None, :] * D * Y[:, :, None, :, :]).sum(-1)


def _factorisable(l_end: torch.Tensor) -> torch.Tensor:
    """Per chunk, whether its total log-decay keeps every e^{-l} and e^{l} within the dtype's range with room to
    spare (|l| ≤ ½ ln max: 44 in float32), so that its decays may be factorised. l_end (B, n, 1, F) ->
    (B, n, 1, 1) bool."""
    bound = 0.5 * math.log(torch.finfo(l_end.dtype).max)
    return l_end.amin(-1, keepdim=True) >= -bound


def _within_chunks(Xs: torch.Tensor, Ys: torch.Tensor, pairwise: tuple, upper: bool,
                   unsafe: torch.Tensor) -> torch.Tensor:
    """M = Xs Ysᵀ (rows already scaled by e^{-lx} and e^{ly}), kept above (``upper``: j > i) or on and below the
    diagonal; in the chunks listed in ``unsafe`` (flat indices into B·n) replaced by ``_pairwise_products`` of
    ``pairwise`` = (X, Y, lx, ly). (B, n, C, F) each -> (B, n, C, C)."""
    M = Xs @ Ys.mT
    M = M.triu(1) if upper else M.tril()
    if unsafe.numel() == 0:
        return M
    part = [x.flatten(0, 1).index_select(0, unsafe)[None] for x in pairwise]  # (1, m, C, F)
    exact = _pairwise_products(*part, upper=upper)[0]  # (m, C, C)
    return M.flatten(0, 1).index_copy(0, unsafe, exact).view_as(M)


def _chunk_terms(k: torch.Tensor, w: torch.Tensor, a: torch.Tensor, C: int,
                 factorised: bool | None = None) -> dict[str, torch.Tensor]:
    """What both fast forms share, per chunk of C steps (local steps i, j; all (B, n, C, ·)).

    l_i = Σ_{m≤i} log w_m and l⁻_i = l_{i-1} (0 at the chunk's start), so that Λ_i = exp(l_i) is the decay from
    the chunk's start through step i. The decay from after step i up to before step j (j > i) is
    D[i, j] = exp(l⁻_j - l_i) ≤ 1. With ã = a ⊙ κ:
        A[i, j] = Σ_f ã_i D[i, j] κ_j,   Bm[i, j] = Σ_f k_i D[i, j] κ_j   (strictly upper, C×C)
        Tm = (I + A)⁻¹,   Ar = ã ⊙ Λ_C/Λ_i,   Kr = k ⊙ Λ_C/Λ_i,   G = κ ⊙ Λ_{i-1},   lam_end = Λ_C (B, n, 1, F).

    A and Bm (and the causal form's reads within a chunk) are one matmul each of e^{-l}- and e^{l}-scaled rows,
    D[i, j] = e^{-l_i} e^{l⁻_j}, in the chunks where that cannot overflow (``_factorisable``: each product then
    keeps its relative precision; the masked-out entries are large but finite), and pairwise in the others
    (``_pairwise_products``). ``factorised``: True or False for every chunk (tests); None decides per chunk.
    """
    n = math.ceil(k.shape[1] / C)
    kappa = unit_keys(k)
    logw = log_gate(_per_feature(w, k))
    K, Kap = _chunks(k, n, C), _chunks(kappa, n, C)  # zero padding: k = 0, κ = 0, log w = 0 (w = 1): no-ops
    At = _chunks(_per_feature(a, k) * kappa, n, C)
    lw = _chunks(logw, n, C)
    l = lw.cumsum(2)  # (B, n, C, F)
    l_prev = l - lw  # l_{i-1}: the decay up to before step i
    l_end = l[:, :, -1:]  # (B, n, 1, F)
    safe = _factorisable(l_end) if factorised is None else torch.full_like(l_end[..., :1], factorised, dtype=bool)
    unsafe = (~safe).flatten().nonzero()[:, 0]  # flat chunk indices (one host sync)
    G = Kap * torch.exp(l_prev)
    # the scaled rows, with l = 0 in the unsafe chunks (finite there; _within_chunks replaces those chunks)
    ls, Gs = l, G
    if unsafe.numel():
        ls, Gs = torch.where(safe, l, 0), Kap * torch.exp(torch.where(safe, l_prev, 0))
    e_neg = torch.exp(-ls)
    Ae, Ke = At * e_neg, K * e_neg  # also the key sides of the causal form's reads
    A = _within_chunks(Ae, Gs, (At, Kap, l, l_prev), True, unsafe)  # (B, n, C, C)
    Bm = _within_chunks(Ke, Gs, (K, Kap, l, l_prev), True, unsafe)
    rel_end = torch.exp(l_end - l)  # Λ_C / Λ_i ≤ 1
    return {"K": K, "At": At, "l": l, "A": A, "Bm": Bm, "Tm": unit_triangular_inverse(A, upper=True),
            "Ar": At * rel_end, "Kr": K * rel_end, "G": G, "lam_end": torch.exp(l_end), "Ae": Ae, "Ke": Ke,
            "ls": ls, "unsafe": unsafe}


def gd_query_read(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
                  chunk: int | None = None, factorised: bool | None = None) -> torch.Tensor:
    """y = W_L q after all L writes of the generalised delta rule, exactly, without forming W (B, V, F).

    The query travels backwards: c_L = q, c_{t-1} = w_t ⊙ c_t - κ_t u_t with u_t = ã_t·c_t, and
    y = Σ_t s_t v_t with s_t = k_t·c_t. Within a chunk with c_end the query after it,
    c_i = (Λ_C/Λ_i) ⊙ c_end - Σ_{j>i} D[i, j] ⊙ κ_j u_j, so (rows: queries) u = (c_end Arᵀ) Tmᵀ,
    s = c_end Krᵀ - u Bmᵀ and c_start = Λ_C ⊙ c_end - u G (``_chunk_terms``).

    Args:
        k: keys (B, L, F). v: values (B, L, V). q: queries (B, Q, F). w, a: decays and learning rates in
            (0, 1), (B, L, F) (or (B, L), broadcast over features). chunk: C (default ``GD_CHUNK``).
        factorised: how the decays within chunks are formed (``_chunk_terms``): True or False for every chunk;
            None: factorised in each chunk where that is safe for its decays (``_factorisable``), else pairwise.

    Returns:
        (B, Q, V).
    """
    B, L, _ = k.shape
    C = max(1, min(chunk or GD_CHUNK, L))
    n = math.ceil(L / C)
    t = _chunk_terms(k, w, a, C, factorised)
    M1 = t["Ar"].mT @ t["Tm"].mT  # (B, n, F, C): u = c_end M1
    M2 = t["Kr"].mT - M1 @ t["Bm"].mT  # s = c_end M2
    M1_k, M2_k, G_k, lam_k = M1.unbind(1), M2.unbind(1), t["G"].unbind(1), t["lam_end"].unbind(1)
    c = q
    S = [None] * n
    for i in range(n - 1, -1, -1):
        u = torch.bmm(c, M1_k[i])  # (B, Q, C)
        S[i] = torch.bmm(c, M2_k[i])
        c = torch.baddbmm(c * lam_k[i], u, G_k[i], alpha=-1)
    s = torch.cat(S, dim=2)  # (B, Q, n·C): s_t = k_t·c_t
    return _values_read(s, v, one_hot_ids(v))


def gd_causal(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
              chunk: int | None = None, factorised: bool | None = None) -> torch.Tensor:
    """The generalised delta rule read at every position after its own write: y_t = W_t q_t.

    Per chunk with incoming state S (held as Sᵀ, F×V): the removed values e_i = W_{i-1} κ_i solve
    (I + Aᵀ) E = G Sᵀ + Bmᵀ V, so E = U + Wg Sᵀ with U = Tmᵀ Bmᵀ V and Wg = Tmᵀ G; then
    Y = (Q ⊙ Λ) Sᵀ + QK V - QA E with QK[i, j] = Σ_f q_i (Λ_i/Λ_j) k_j and QA[i, j] = Σ_f q_i (Λ_i/Λ_j) ã_j
    for j ≤ i, and the next state Sᵀ ← Λ_C ⊙ Sᵀ + Krᵀ V - Arᵀ E. The loop over chunks carries only the state;
    the reads are batched after it.

    Args:
        k, q: (B, T, F). v: (B, T, V). w, a: (B, T, F) in (0, 1) (or (B, T)). chunk: C (default ``GD_CHUNK``).
        factorised: as in ``gd_query_read``.

    Returns:
        (B, T, V).
    """
    B, T, Fd = k.shape
    Vd = v.shape[-1]
    C = max(1, min(chunk or GD_CHUNK, T))
    n = math.ceil(T / C)
    t = _chunk_terms(k, w, a, C, factorised)
    Vc, Qc = _chunks(v, n, C), _chunks(q, n, C)
    TmT = t["Tm"].mT
    U = TmT @ (t["Bm"].mT @ Vc)  # (B, n, C, V)
    Wg = TmT @ t["G"]  # (B, n, C, F)
    # per-chunk views by unbind (indexing [:, i] inside an autograd loop makes the backward quadratic in n)
    U_k, Wg_k, V_k = U.unbind(1), Wg.unbind(1), Vc.unbind(1)
    KrT_k, ArT_k = t["Kr"].mT.unbind(1), t["Ar"].mT.unbind(1)  # (B, F, C) each
    lam_k = t["lam_end"].mT.unbind(1)  # (B, F, 1) each
    St = k.new_zeros(B, Fd, Vd)
    states, removed = [], []
    for i in range(n):
        states.append(St)
        E = torch.baddbmm(U_k[i], Wg_k[i], St)  # (B, C, V)
        removed.append(E)
        St = torch.baddbmm(St * lam_k[i] + KrT_k[i] @ V_k[i], ArT_k[i], E, alpha=-1)
    S_in, E = torch.stack(states, 1), torch.stack(removed, 1)  # (B, n, F, V), (B, n, C, V)
    # the reads within a chunk, j ≤ i, through the decay Λ_i/Λ_j = exp(l_i - l_j)
    l, unsafe = t["l"], t["unsafe"]
    Qe = Qc * torch.exp(l)  # q_i ⊙ Λ_i, ≤ |q_i|
    Qs = Qe if not unsafe.numel() else Qc * torch.exp(t["ls"])
    QK = _within_chunks(Qs, t["Ke"], (Qc, t["K"], -l, -l), False, unsafe)
    QA = _within_chunks(Qs, t["Ae"], (Qc, t["At"], -l, -l), False, unsafe)
    # Y = Qe S_in + QK V - QA E, as one product over F + 2C instead of three small batched ones
    Y = torch.cat([Qe, QK, -QA], dim=-1) @ torch.cat([S_in, Vc, E], dim=-2)
    return Y.reshape(B, n * C, Vd)[:, :T]
