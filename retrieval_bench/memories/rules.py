"""Update rules: each rule's step function (the spec that ``reference.py`` loops over) and its training form.

Orientation follows the paper: the fast weight W ∈ R^{V×F}, written with outer products v ⊗ φ(k) and read as
W φ(q). Inputs to every method are features already mapped by φ and normalised:

    k (B, L, F)   v (B, L, V)   q (B, Q, F)   gates {name: (B, L), or (B, L, F) if of width F}   ->   y (B, Q, V)

The query is read once, after the last write (PAPER §2.2), so a training form never needs the per-step states.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

from ..registry import update_rules
from ..spec import RULE_DEFAULTS
from .checkpointed import fwm_state
from .chunked import delta_chunkwise, delta_query_read, score_read, sum_read
from .normalisations import EPS

State = dict[str, torch.Tensor]


class UpdateRule:
    """Base class of update rules.

    Class attributes:
        gates: per-step inputs in (0, 1) that the model must provide, e.g. ``("beta",)``. The model
            makes one sigmoid gate per name, so a rule needing a decay declares ``("beta", "alpha")``.
        gate_widths: the gates that are vectors, one value per feature of the state: ``{"w": "F"}`` makes w
            a (B, L, F) input (F = φ's dimension) from an F-wide projection. Gates not named are scalars per
            step, (B, L). "F" is the only width; a rule given a (B, L) tensor for a width-F gate (F = 1) must
            broadcast it over the features.
        gate_bias: initial bias of some gates' projections, ``{"alpha": 3.0}``: the gate starts near σ(3) =
            0.95 instead of σ(0) = ½ (a decay that should start slow). Gates not named keep PyTorch's init.
        default_norm: the key/query normalisation used when a memory name gives none.
        default_attn: whether the attention normaliser is on when a memory name gives no normalisation.
        supports_attn: whether the rule has an attention-normalised form.
        loop_states: V×F states the reference loop keeps alive per step under autograd (what a memory estimate
            of the loop counts: FWM keeps two, before and after its norm clipping).
    """

    name = ""
    loop_states = 1
    gates: tuple[str, ...] = ("beta",)
    gate_widths: Mapping[str, str] = MappingProxyType({})
    gate_bias: Mapping[str, float] = MappingProxyType({})
    default_norm = "none"
    default_attn = False
    supports_attn = True

    # ---- the spec: one step at a time ----------------------------------------------------------
    def init_state(self, batch: int, d_value: int, d_feat: int, like: torch.Tensor, attn: bool) -> State:
        state = {"W": like.new_zeros(batch, d_value, d_feat)}
        if attn:
            state["z"] = like.new_zeros(batch, d_feat)
        return state

    def step(self, state: State, k: torch.Tensor, v: torch.Tensor, g: dict[str, torch.Tensor], t: int,
             attn: bool) -> tuple[State, dict[str, torch.Tensor]]:
        """One write. k (B, F), v (B, V), g {name: (B,), or (B, F) for a width-F gate}. Returns the new state and
        a record holding ``v_bar`` (B, V), what the memory retrieved at k just before the write, and ``v_new``
        (B, V)."""
        raise NotImplementedError

    def read(self, state: State, q: torch.Tensor, attn: bool) -> torch.Tensor:
        """q (B, Q, F) -> (B, Q, V)."""
        y = torch.einsum("bvf,bqf->bqv", state["W"], q)
        if attn:
            y = y / ((q * state["z"][:, None, :]).sum(-1, keepdim=True) + EPS)
        return y

    # ---- the training form ----------------------------------------------------------------------
    def forward(self, k, v, q, gates, attn: bool) -> torch.Tensor:
        """Training form; the default is the reference loop (exact, but keeps every state in autograd)."""
        from .reference import reference_loop

        return reference_loop(self, k, v, q, gates, attn)[0]


def _mv(W: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W (B, V, F) · k (B, F) -> (B, V), as mul + sum (a bmm with a trailing 1 is far slower on CPU)."""
    return (W * k[:, None, :]).sum(-1)


def _outer(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return v[:, :, None] * k[:, None, :]


@update_rules.register("sum")
class SumRule(UpdateRule):
    """Purely additive write, W_t = W_{t-1} + v_t ⊗ φ(k_t) (PAPER Eqs. 15-19); attention-normalised by
    default."""

    name = "sum"
    gates = ()
    default_norm, default_attn = RULE_DEFAULTS["sum"]

    def step(self, state, k, v, g, t, attn):
        v_bar = _mv(state["W"], k)
        new = {"W": state["W"] + _outer(v, k)}
        if attn:
            v_bar = v_bar / ((state["z"] * k).sum(-1, keepdim=True) + EPS)
            new["z"] = state["z"] + k
        return new, {"v_bar": v_bar, "v_new": v}

    def forward(self, k, v, q, gates, attn):
        # y = Σ_t v_t (φ(k_t)·φ(q)) [/ Σ_t φ(k_t)·φ(q)]: a weighted sum of L values, no V×F state.
        return sum_read(k, v, q, EPS if attn else None)

    def read_scores(self, s, v, attn):
        """The same read from scores s (B, L, Q) = φ(k_t)·φ(q), where the feature map computes them itself."""
        return score_read(s, v, EPS if attn else None)


def attn_key_denominators(k: torch.Tensor) -> torch.Tensor:
    """c_t = z_{t-1}·φ(k_t) for the attention-normalised delta rule (PAPER §1.5); 1 at t = 0.

    k (B, L, F) -> (B, L). Clamped at EPS: sparse maps (DPFP) can make φ(k_t) orthogonal to every earlier key,
    where W_{t-1}φ(k_t) is then 0 as well.
    """
    z_prev = torch.cumsum(k, dim=1) - k
    c = (z_prev * k).sum(-1).clamp_min(EPS)
    c = torch.cat([torch.ones_like(c[:, :1]), c[:, 1:]], dim=1)
    return c


@update_rules.register("delta")
class DeltaRule(UpdateRule):
    """The paper's delta rule (Eqs. 20-25): W_t = W_{t-1} + β_t (v_t - W_{t-1}φ_t) ⊗ φ_t, read after the
    write.

    Sum-normalised φ by default ("ours" in the official code). With the attention normaliser (§1.5):
    v̄_t = W_{t-1}φ_t / (z_{t-1}·φ_t) and y = W φ(q) / (z·φ(q) + eps).
    """

    name = "delta"
    default_norm, default_attn = RULE_DEFAULTS["delta"]

    def step(self, state, k, v, g, t, attn):
        beta = g["beta"][:, None]
        W = state["W"]
        v_bar = _mv(W, k)
        new = {}
        if attn:
            c = torch.ones_like(k[:, 0]) if t == 0 else (state["z"] * k).sum(-1).clamp_min(EPS)
            v_bar = v_bar / c[:, None]
            new["z"] = state["z"] + k
        v_new = beta * v + (1 - beta) * v_bar
        new["W"] = W + _outer(v_new - v_bar, k)  # Eq. 23: remove v̄, write v_new
        return new, {"v_bar": v_bar, "v_new": v_new}

    def forward(self, k, v, q, gates, attn):
        beta = gates["beta"]
        # The attention-normalised rule is the generalised delta rule with read key b_t = φ_t / c_t (§1.5).
        rho = attn_key_denominators(k).reciprocal() if attn else None
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (k, v, beta, q))
        if not grad and q.shape[1] > v.shape[-1]:
            # Many queries (evaluation): building W (B, V, F) once costs O(L·V·F) against O(Q·L·F) for
            # carrying every query backwards; both are exact.
            read_k = None if rho is None else k * rho[..., None]
            W = delta_chunkwise(k, v, beta, None, read_k=read_k)[1]
            y = q @ W.transpose(1, 2)
        else:
            y = delta_query_read(k, v, beta, q, rho)
        if attn:
            y = y / ((q * k.sum(1)[:, None, :]).sum(-1, keepdim=True) + EPS)
        return y


def delta_query_read_stepwise(a, b, v, beta, q):
    """Read of the generalised delta rule W_t = W_{t-1}(I - β_t b_t a_tᵀ) + β_t v_t a_tᵀ, without W: a forward
    read that walks the writes backwards, the plain step-by-step form of ``chunked.delta_query_read`` (which the
    training form uses), kept as a readable spec.

    Unrolled, W_L q = Σ_t β_t v_t (a_t·c_t) with c_L = q and c_{t-1} = c_t - β_t b_t (a_t·c_t): the query
    travels backwards through the writes as an F-vector. a, b (B, L, F), v (B, L, V), beta (B, L),
    q (B, Q, F).
    """
    c = q
    y = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    # unbind, not a[:, t]: indexing inside an autograd loop makes the backward quadratic in L.
    steps = list(zip(a.unbind(1), b.unbind(1), v.unbind(1), beta.unbind(1), strict=True))
    for a_t, b_t, v_t, beta_t in reversed(steps):
        s = (c * a_t[:, None, :]).sum(-1) * beta_t[:, None]  # (B, Q)
        y = y + s[..., None] * v_t[:, None, :]
        c = c - s[..., None] * b_t[:, None, :]
    return y


@update_rules.register("fwm")
class FWMRule(UpdateRule):
    """Fast Weight Memory (Schlag, Munkhdalai & Schmidhuber 2021; PAPER §1.8).

    W_1 = β_1 v_1 ⊗ φ_1; then the delta write followed by W ← W / max(1, ‖W‖_F); read LayerNorm(W φ(q))
    without affine parameters (eps 1e-5). The norm clipping admits no parallel form, so training runs the loop
    (``checkpointed.fwm_state``, whose backward recomputes states from checkpoints instead of storing them).
    """

    loop_states = 2

    name = "fwm"
    default_norm, default_attn = RULE_DEFAULTS["fwm"]
    supports_attn = False

    def step(self, state, k, v, g, t, attn):
        beta = g["beta"][:, None]
        W = state["W"]
        if t == 0:
            v_bar = torch.zeros_like(v)
            return {"W": _outer(beta * v, k)}, {"v_bar": v_bar, "v_new": beta * v}
        v_bar = _mv(W, k)
        v_new = beta * v + (1 - beta) * v_bar
        W = W + _outer(v_new - v_bar, k)
        norm = torch.linalg.vector_norm(W, dim=(1, 2)).clamp_min(1.0)
        return {"W": W / norm[:, None, None]}, {"v_bar": v_bar, "v_new": v_new}

    def read(self, state, q, attn):
        y = torch.einsum("bvf,bqf->bqv", state["W"], q)
        return F.layer_norm(y, y.shape[-1:], eps=1e-5)

    def forward(self, k, v, q, gates, attn):
        # The loop itself, with a backward that recomputes states from O(√L) checkpoints (checkpointed.fwm_state).
        y = q @ fwm_state(k, v, gates["beta"]).transpose(1, 2)  # (B, Q, V)
        return F.layer_norm(y, y.shape[-1:], eps=1e-5)


def update_rule(name: str) -> UpdateRule:
    """An instance of a registered update rule."""
    return update_rules.get(name)()
