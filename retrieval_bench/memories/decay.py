"""The decay rule: linear attention whose state decays by a scalar gate at every step.

    W_t = α_t W_{t-1} + β_t v_t ⊗ φ(k_t),      y = W φ(q)

with W ∈ R^{V×F} in the paper's orientation, α_t, β_t ∈ (0, 1) one scalar each per step (the model's σ(W_g x_t)).
This is the scalar-decay recurrence shared by RetNet (Sun et al. 2023, "Retentive Network": recurrent retention,
with its fixed per-head γ made a per-step gate), Gated Linear Attention (Yang et al. 2024, GLA: its gated
recurrence with the gate vector reduced to a scalar) and Mamba-2 (Dao & Gu 2024, "Transformers are SSMs": the SSD
recurrence, whose A_t is a scalar times the identity). With the attention normaliser, the normaliser decays the
same way, z_t = α_t z_{t-1} + φ(k_t), and the read is y = W φ(q) / (z·φ(q) + eps) as the sum rule's. α ≡ β ≡ 1 is
the sum rule (PAPER Eqs. 15-19).

Unrolled, with w_{t→u} = Π_{t<s≤u} α_s the decay from step t to step u,

    W_u φ(q) = Σ_{t≤u} w_{t→u} β_t v_t (φ(k_t)·φ(q)),      z_u·φ(q) = Σ_{t≤u} w_{t→u} (φ(k_t)·φ(q)),

so both fast forms are linear attention with scores weighted by decays. Every decay is exp of a sum of log α over
the steps between (never a ratio of cumulative products, which underflow after a few hundred small gates and then
divide 0 by 0):

* the training form (one read after the last write) weights each score φ(k_t)·φ(q) by w_{t→L} β_t and reads the
  values as the sum rule does (``_DecayedRead``); w_{t→L} = exp of a reverse cumulative sum of log α;
* the all-positions form (``decay_causal``) is chunked: within a chunk of C steps the (C×C) scores are masked and
  weighted by exp(Σ_{j<r≤i} log α_r), each a sum of the log α between j and i alone (``segment_sums``); across
  chunks an F×V state is carried, decayed by each chunk's total decay (one scale-and-add per chunk), and read by
  every query of the next chunk at once. This is the chunked algorithm of Mamba-2's state-space duality (SSD)
  and of GLA, for a scalar decay, with a hand-written backward.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from ..registry import update_rules
from ..spec import RULE_DEFAULTS
from .chunked import _chunks, _values_grad, _values_read, one_hot_ids
from .normalisations import EPS
from .rules import UpdateRule

#: Steps per chunk of ``decay_causal``. Measured at B·H = 128, T = 1024, F = V = 64 (forward + backward, one
#: thread, a busy 2-core CPU, alternating in one process): C = 16 / 32 / 64 / 128 took 1.9 / 1.3 / 1.4 / 1.7 times
#: the sum rule's chunked form at its default chunk.
DECAY_CHUNK = 32


def log_gate(alpha: torch.Tensor) -> torch.Tensor:
    """log α, with α clamped at the dtype's smallest normal number: a gate that underflowed to 0 (σ of a logit
    below about -88 in float32) decays everything before it to exp(-87) or less, instead of giving -inf and NaN
    gradients."""
    return torch.log(alpha.clamp_min(torch.finfo(alpha.dtype).tiny))


def suffix_log_decay(log_alpha: torch.Tensor) -> torch.Tensor:
    """log w_{t→L} = Σ_{s>t} log α_s: (B, L) -> (B, L), 0 at t = L.

    A reverse cumulative sum, so that each entry adds up only the steps after t (no difference of two large
    prefix sums, which would lose the small decays of the last steps in float32)."""
    rev = log_alpha.flip(1).cumsum(1).flip(1)  # Σ_{s≥t}
    return torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], dim=1)


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = Σ_{j<r≤i} x[..., r] for j ≤ i (0 on the diagonal), -inf above it: x (..., C) -> (..., C, C).

    Each entry sums only the terms between j and i (a masked cumulative sum), so exp(out) is exact to rounding
    even where the prefix sums are large, and exp(-inf) = 0 masks the future.
    """
    C = x.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=x.device)
    terms = x[..., :, None].expand(*x.shape, C).masked_fill(~ones.tril(-1), 0)  # [r, j] = x_r where r > j
    return terms.cumsum(-2).masked_fill(~ones.tril(), -math.inf)


class _DecayCausal(torch.autograd.Function):
    """``decay_causal`` with a hand-written backward. Per chunk (B, n, C, ·): E = exp(segment_sums(log α)),
    P = Q Kᵀ, Y = (P ∘ E) U + g ∘ (Q S_in) with g = exp(cumsum log α); the chunk's writes (K ∘ e)ᵀ U with
    e = E[C-1, :]; S_in[c+1] = a_c S_in[c] + writes_c with a_c = exp(Σ_chunk log α). The backward carries the
    adjoint of S_in backwards over the chunks, Λ_c = ∂ℓ/∂S_in[c] = Q_cᵀ(g ∘ dY_c) + a_c Λ_{c+1}; everything else
    is batched over the chunks."""

    @staticmethod
    def forward(ctx, k, u, q, log_alpha, chunk):
        B, T, Fd = k.shape
        Vd = u.shape[-1]
        C = max(1, min(chunk, T))
        n = math.ceil(T / C)
        K, U, Q = _chunks(k, n, C), _chunks(u, n, C), _chunks(q, n, C)  # (B, n, C, ·); padding writes nothing
        la = _chunks(log_alpha, n, C)  # (B, n, C); padded with log 1 = 0
        E = segment_sums(la).exp_()  # (B, n, C, C), lower triangular: decays within the chunk
        P = Q @ K.mT  # the diagonal too: a position reads after its own write
        Y = (P * E) @ U  # (B, n, C, V): the chunk's own writes
        e = E[..., -1, :]  # (B, n, C): decay from each step to the chunk's end
        writes = (K * e[..., None]).mT @ U  # (B, n, F, V)
        a = la.sum(-1).exp()  # (B, n): each chunk's total decay
        S_in = k.new_empty(B, n, Fd, Vd)  # the state entering each chunk
        S_in[:, 0] = 0
        for c in range(n - 1):
            torch.addcmul(writes[:, c], S_in[:, c], a[:, c, None, None], out=S_in[:, c + 1])
        g = la.cumsum(-1).exp_()  # (B, n, C): decay from the chunk's start to each step, inclusive
        Y.addcmul_(Q @ S_in, g[..., None])
        ctx.save_for_backward(K, U, Q, E, P, g, S_in, a)
        return Y.reshape(B, n * C, Vd)[:, :T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        K, U, Q, E, P, g, S_in, a = ctx.saved_tensors
        B, n, C, Fd = K.shape
        T = gy.shape[1]
        dY = _chunks(gy, n, C)  # (B, n, C, V)
        e = E[..., -1, :]
        dA = dY @ U.mT  # (B, n, C, C)
        dU = (P * E).mT @ dY
        dE = dA * P
        dP = dA.mul_(E)
        dQ, dK = dP @ K, dP.mT @ Q
        H = dY @ S_in.mT  # (B, n, C, F)
        dg = (H * Q).sum(-1)  # (B, n, C)
        dQ.addcmul_(H, g[..., None])
        Lam = Q.mT @ (dY * g[..., None])  # (B, n, F, V): what each chunk reads from S_in directly
        for c in range(n - 2, -1, -1):
            Lam[:, c].addcmul_(Lam[:, c + 1], a[:, c, None, None])
        dW = torch.cat([Lam[:, 1:], torch.zeros_like(Lam[:, :1])], dim=1)  # (B, n, F, V): ∂ℓ/∂writes
        da = (dW * S_in).sum((-1, -2))  # (B, n)
        Kt = K * e[..., None]
        dKt = U @ dW.mT  # (B, n, C, F)
        dU += Kt @ dW
        dK.addcmul_(dKt, e[..., None])
        dE[..., -1, :] += (dKt * K).sum(-1)
        # D[i, j] = Σ_{j<r≤i} log α_r, so ∂ℓ/∂log α_r = Σ_{i≥r} Σ_{j<r} dD[i, j], with dD = dE ∘ E
        dD = dE.mul_(E)
        below = torch.cat([torch.zeros_like(dD[..., :1]), dD[..., :-1].cumsum(-1)], dim=-1)  # Σ_{j<r} dD[i, j]
        dla = below.tril_().sum(-2)
        dla += (dg * g).flip(-1).cumsum(-1).flip(-1)  # g_i = exp(Σ_{r≤i} log α_r)
        dla += (da * a)[..., None]  # a = exp(Σ_chunk log α)
        out = (x.reshape(B, n * C, -1)[:, :T] for x in (dK, dU, dQ))
        return (*out, dla.reshape(B, n * C)[:, :T], None)


def decay_causal(k: torch.Tensor, u: torch.Tensor, q: torch.Tensor, log_alpha: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
    """Decayed causal linear attention: y_t = Σ_{j≤t} exp(Σ_{j<r≤t} log α_r) u_j (k_j·q_t), every t.

    Per chunk of C steps, with E[i, j] = exp(Σ_{j<r≤i} log α_r) (lower triangular) and G_i = Σ_{r≤i} log α_r
    (from the chunk's start):

        Y = (Q Kᵀ ∘ E) U + exp(G) ∘ (Q S_in),      S_out = exp(G_C) S_in + (K ∘ exp(G_C - G))ᵀ U,

    where S_in (F, V) is the state entering the chunk: one scale-and-add of F×V per chunk carries it (an (n×n)
    matrix of decays between chunks would cost n² of them). Exact; O(T·C·(F + V) + T·F·V) work, n = ⌈T/C⌉
    states of F×V kept for the backward, which is hand-written (``_DecayCausal``).

    Args:
        k: keys (B, T, F). u: values (B, T, V), already scaled by their write strengths.
        q: queries (B, T, F). log_alpha: log decays (B, T), ≤ 0. chunk: C (default ``DECAY_CHUNK``).

    Returns:
        (B, T, V).
    """
    return _DecayCausal.apply(k, u, q, log_alpha, chunk or DECAY_CHUNK)


class _DecayedRead(torch.autograd.Function):
    """y = Σ_t c_t v_t (k_t·q) and n = Σ_t d_t (k_t·q) for per-step weights c, d (B, L), from the scores
    s = k qᵀ (B, L, Q): the sum rule's read (``chunked.sum_read``) with weighted scores. A hand-written backward
    scales the (B, L, Q) scores, never the (B, L, F) keys, and gives the keys a contiguous gradient."""

    @staticmethod
    def forward(ctx, k, c, d, v, q):
        s = k @ q.mT  # (B, L, Q)
        sc = s * c[..., None]
        ids = one_hot_ids(v)
        y = _values_read(sc.mT, v, ids)  # (B, Q, V); a gather for one-hot values
        n = (s * d[..., None]).sum(1)  # (B, Q)
        ctx.save_for_backward(k, c, d, v, ids, q, s, sc)
        return y, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gn):
        k, c, d, v, ids, q, s, sc = ctx.saved_tensors
        need_k, need_c, need_d, need_v, need_q = ctx.needs_input_grad
        gsc = _values_grad(gy, v, ids).mT  # (B, L, Q): v_t·gy
        gs = torch.addcmul(gsc * c[..., None], gn[:, None, :], d[..., None])  # (B, L, Q)
        gk = (gs * q if q.shape[1] == 1 else gs @ q) if need_k else None  # Q = 1: an outer product, no bmm
        return (gk, (gsc * s).sum(-1) if need_c else None, (gn[:, None, :] * s).sum(-1) if need_d else None,
                sc @ gy if need_v else None, gs.mT @ k if need_q else None)


def _alpha_beta(gates: dict, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gates α and β (B, L), checked against the keys (B, L, F)."""
    out = []
    for name in ("alpha", "beta"):
        if name not in gates:
            raise ValueError(f"decay rule: the gate {name!r} is missing (it needs 'alpha' and 'beta')")
        g = gates[name]
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(k.shape[:2]):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"decay rule: the gate {name!r} must be (B, L) = {tuple(k.shape[:2])}, got {got}")
        out.append(g)
    return out[0], out[1]


@update_rules.register("decay")
class DecayRule(UpdateRule):
    """Decayed linear attention, W_t = α_t W_{t-1} + β_t v_t ⊗ φ(k_t) (RetNet, Sun et al. 2023; GLA, Yang et al.
    2024; Mamba-2, Dao & Gu 2024; module docstring). The attention normaliser, where asked for, decays alike:
    z_t = α_t z_{t-1} + φ(k_t).

    Defaults as in the three papers: no normalisation of φ and no attention normaliser (none of them divides by
    a sum of scores). The decay gate starts at α = σ(3) = 0.953, amid where the papers start theirs: GLA's
    σ(0)^{1/16} = 0.958 (its temperature τ = 16), RetNet's fastest head γ = 1 - 2⁻⁵ = 0.969, Mamba-2's
    exp(-Δ·A) at the medians of its inits (Δ log-uniform in [1e-3, 0.1], A uniform in [1, 16]): 0.92. β keeps
    PyTorch's init (σ(0) = ½).
    """

    name = "decay"
    gates = ("beta", "alpha")
    gate_bias = MappingProxyType({"alpha": 3.0})
    default_norm, default_attn = RULE_DEFAULTS["decay"]  # none, no attention normaliser

    def step(self, state, k, v, g, t, attn):
        """One write: W_t = α_t W_{t-1} + β_t v_t ⊗ φ(k_t) [and z_t = α_t z_{t-1} + φ(k_t)].

        k (B, F), v (B, V), g {"alpha", "beta": (B,)}. The record's v_bar is W_{t-1}φ(k_t) [/ z_{t-1}·φ(k_t) + eps]
        (the memory's read before step t), v_new the written β_t v_t.
        """
        alpha, beta = g["alpha"][:, None], g["beta"][:, None]  # (B, 1)
        W = state["W"]
        v_bar = (W * k[:, None, :]).sum(-1)  # (B, V): W_{t-1}φ(k_t)
        v_new = beta * v
        new = {"W": alpha[..., None] * W + v_new[:, :, None] * k[:, None, :]}
        if attn:
            v_bar = v_bar / ((state["z"] * k).sum(-1, keepdim=True) + EPS)
            new["z"] = alpha * state["z"] + k
        return new, {"v_bar": v_bar, "v_new": v_new}

    def forward(self, k, v, q, gates, attn):
        """y = Σ_t w_{t→L} β_t v_t (φ(k_t)·φ(q)) [/ (Σ_t w_{t→L} φ(k_t)·φ(q) + eps)], w_{t→L} = Π_{s>t} α_s.

        k (B, L, F), v (B, L, V), q (B, Q, F), gates {"alpha", "beta": (B, L)} -> (B, Q, V). The decays scale the
        scores, then the values are read as the sum rule reads them (``_DecayedRead``: one mat-vec per
        sequence, a gather for one-hot values, a hand-written backward).
        """
        alpha, beta = _alpha_beta(gates, k)
        w = suffix_log_decay(log_gate(alpha)).exp()  # (B, L), in (0, 1]
        y, n = _DecayedRead.apply(k, w * beta, w, v, q)  # n: z_L·φ(q), the decayed normaliser's read
        return y / (n[..., None] + EPS) if attn else y

    def causal(self, k, v, q, gates, attn, chunk: int | None = None):
        """Every position's read after its write (``memories.causal``), by ``decay_causal``.

        k, q (B, T, F), v (B, T, V), gates {"alpha", "beta": (B, T)} -> (B, T, V). With the attention normaliser
        the normaliser rides along as one more value column, of ones (z is not scaled by β).
        """
        alpha, beta = _alpha_beta(gates, k)
        u = v * beta[..., None]
        if attn:
            u = torch.cat([u, torch.ones_like(u[..., :1])], dim=-1)
        y = decay_causal(k, u, q, log_gate(alpha), chunk)
        return y[..., :-1] / (y[..., -1:] + EPS) if attn else y
