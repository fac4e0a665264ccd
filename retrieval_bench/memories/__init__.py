"""Memories: what a retrieval layer stores from a written sequence and returns for a query.

The contract (DESIGN §3)::

    keys (B, L, K)   values (B, L, V)   betas (B, L)   queries (B, Q, K)   ->   retrieved (B, Q, V)

A memory is named by a spec string: ``softmax`` (or any name in the ``memories`` registry), or a composed
fast-weight memory ``PHI/RULE[/NORM[+attn]]``, whose grammar (and each built-in rule's default normalisation)
lives in ``retrieval_bench.spec``; ``parse_spec`` checks the parts against the registries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from .. import spec as _spec
from ..feature_maps import FeatureMap, feature_map
from ..registry import RegistryError, feature_maps, memories, update_rules
from ..registry import normalisations as norm_registry
from ..spec import MemorySpec
from . import causal as _causal
from . import decay as _decay  # noqa: F401  (registers the decay rule)
from . import gated_delta as _gated_delta  # noqa: F401  (registers gated-delta)
from . import generalised as _generalised  # noqa: F401  (importing registers the rule)
from .normalisations import EPS  # noqa: F401  (importing registers the built-in normalisations)
from .reference import reference_loop
from .rules import UpdateRule


class Memory(nn.Module):
    """Base class of every memory. Subclasses implement ``forward``; ``trace`` is optional."""

    #: names of the per-step gates in (0, 1) the model must pass (``betas`` is the gate named "beta").
    gates: tuple[str, ...] = ()
    #: initial bias of some gates' projections ({"alpha": 3.0}: that gate starts near σ(3)); others keep
    #: PyTorch's default init, around σ(0) = ½.
    gate_bias: Mapping[str, float] = MappingProxyType({})
    #: how the model initialises its key/query projections: "paper" (U(±1/√K)) or "xavier".
    projection_init = "paper"

    def d_dot(self, d_key: int) -> int | None:
        """Feature dimension F of the state, or None where the memory has no fixed-size state."""
        return None

    def gate_dim(self, name: str, d_key: int) -> int:
        """Width of the gate ``name`` for keys of width ``d_key``: 1 for a scalar per step, passed as (B, L); a
        wider gate (one value per feature of the state) is passed as (B, L, width) and projected as wide."""
        return 1

    def state_size(self, d_key: int, d_value: int, seq_len: int) -> int:
        """Floats of state the memory carries after ``seq_len`` writes."""
        raise NotImplementedError

    def reference_bytes(self, batch: int, seq_len: int, num_queries: int, d_key: int, d_value: int) -> int:
        """Estimated autograd memory of a training step through the reference loop (bytes); 0 where unknown."""
        return 0

    def trace(self, keys, values, betas=None, queries=None, **gates) -> dict[str, torch.Tensor] | None:
        """Per-step diagnostics under no_grad, or None where the memory offers none."""
        return None

    def causal(self, keys, values, queries, betas=None, **gates) -> torch.Tensor:
        """The all-positions causal form (DESIGN §9): position t writes (k_t, v_t), then is read with q_t.

        keys, queries (B, T, K), values (B, T, V), betas and gates (B, T) -> (B, T, V). This default reads
        every prefix with ``forward`` (T calls: slow, with a ``SlowCausalFormWarning`` once per class); a
        memory overrides it with a fast form equal to ``causal_reference``. A gate of width F (``gate_dim``)
        is (B, T, F).
        """
        _causal.check_inputs(keys, values, queries, betas, gates, _causal.gate_widths(self, keys, gates))
        cls = type(self)
        _causal.warn_once(f"memory:{cls.__module__}.{cls.__qualname__}",
                          f"memory {cls.__name__} has no all-positions causal form (a method causal); reading "
                          "every prefix with its forward (slow)")
        return _causal.prefix_reads(self.forward, keys, values, queries, betas, gates)

    def causal_reference(self, keys, values, queries, betas=None, **gates) -> torch.Tensor:
        """The spec of ``causal``: reads of every prefix with ``reference`` where the memory has one, else with
        ``forward``. Shapes as ``causal``."""
        read = getattr(self, "reference", None)
        return _causal.prefix_reads(read if callable(read) else self.forward, keys, values, queries, betas, gates)


def parse_spec(spec: str) -> MemorySpec:
    """Parse ``PHI/RULE[/NORM[+attn]]`` and check every part against its registry.

    A signed feature map (``non_negative = False`` on its class: identity, tanh; a plugin map is taken as
    non-negative unless it says otherwise, which its contract test checks) with a rule whose default divides by
    a sum of features (sum normalisation: delta; the attention normaliser: sum) is refused unless the spec names
    the normalisation: a sum of signed features can be near 0, and the read then blows up (outputs of 1e27 and
    more on random keys for identity/delta and tanh/delta, 1e4-1e5 for identity/sum and tanh/sum). A signed map
    that says ``positive_kernel = True`` (taylor: φ(k)·φ(q) ≥ ½) keeps the attention normaliser by default.
    """
    if "/" not in spec:
        memories.resolve(spec)  # raises with close matches among the registered memories
    try:
        phi, rule_name, part = _spec.split(spec)
    except _spec.SpecError:
        raise RegistryError(
            f"memory {spec!r} is neither a registered memory ({', '.join(memories.names())}) "
            f"nor of the form {_spec.FORM}"
        ) from None
    feature_maps.resolve(phi)
    rule_cls = update_rules.get(rule_name)
    if part is None:
        norm, attn = rule_cls.default_norm, rule_cls.default_attn
        phi_cls = feature_maps.resolve(phi)[0]
        signed = not getattr(phi_cls, "non_negative", True)
        # a signed map whose kernel φ(k)·φ(q) is bounded away from 0 (taylor: ≥ ½) is safe under the attention
        # normaliser, not under sum normalisation
        if signed and (norm == "sum" or (attn and not getattr(phi_cls, "positive_kernel", False))):
            what = ("sum normalisation divides φ by Σφ" if norm == "sum"
                    else "attention normaliser divides by Σ_t φ(k_t)·φ(q)")
            raise RegistryError(
                f"memory {spec!r}: {phi} gives signed features, and {rule_name}'s default {what}, which can be "
                f"near 0 for signed features; name the normalisation, e.g. {phi}/{rule_name}/l2 (or "
                f"{MemorySpec(phi, rule_name, norm, attn).name} to keep the default)")
    else:
        try:
            norm, attn = _spec.parse_norm(spec, part)
        except _spec.SpecError as e:
            raise RegistryError(str(e)) from None
        norm_registry.resolve(norm)
    if attn and not rule_cls.supports_attn:
        raise RegistryError(f"memory {spec!r}: rule {rule_name!r} has no attention-normalised form")
    return MemorySpec(phi, rule_name, norm, attn)


def _defined_in(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _own(cls: type, shortcut: str) -> bool:
    """Whether ``shortcut`` is defined by the class that defines ``forward`` (not only by a base class)."""
    where = _defined_in(cls, shortcut)
    return where is not None and where is _defined_in(cls, "forward")


class FastWeightMemory(Memory):
    """φ × update rule × normalisation (PAPER §1): features of keys and queries, then the rule."""

    def __init__(self, phi: FeatureMap, rule: UpdateRule, norm: str = "none", attn: bool = False,
                 spec: MemorySpec | None = None):
        super().__init__()
        self.phi = phi
        self.rule = rule
        self.norm_name = norm
        self.norm = norm_registry.get(norm)
        self.attn = attn
        self.spec = spec
        self.gates = rule.gates
        self.gate_bias = dict(rule.gate_bias)
        # the sum rule reads only φ(k_t)·φ(q): a map with a cheaper kernel (FAVOR+) may give those directly
        # (each where the class that defines forward also defines the shortcut: a plugin subclass that changes
        # forward alone is not bypassed)
        self._scores_read = norm == "none" and _own(type(rule), "read_scores") and _own(type(phi), "kernel")

    def d_dot(self, d_key: int) -> int:
        return self.phi.dim(d_key)

    def gate_dim(self, name: str, d_key: int) -> int:
        """F = φ's dimension for a gate the rule declares of width "F" (``UpdateRule.gate_widths``), else 1."""
        width = self.rule.gate_widths.get(name)
        if width not in (None, "F"):
            raise ValueError(f"rule {self.rule.name!r}: gate {name!r} has width {width!r}; only 'F' is known")
        return 1 if width is None else self.phi.dim(d_key)

    def state_size(self, d_key: int, d_value: int, seq_len: int) -> int:
        like = torch.zeros(1)
        state = self.rule.init_state(1, d_value, self.d_dot(d_key), like, self.attn)
        return sum(t.numel() for t in state.values())


    def reference_bytes(self, batch: int, seq_len: int, num_queries: int, d_key: int, d_value: int) -> int:
        # the loop keeps each step's V×F state(s) (rule.loop_states); the factor 2 covers the temporaries alive
        # at the same time
        return 2 * self.rule.loop_states * seq_len * batch * d_value * self.d_dot(d_key) * 4
    def features(self, keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised φ of keys (B, L, F) and queries (B, Q, F); one draw of a random φ serves both."""
        self.phi.begin_call(keys.shape[-1], keys.device, keys.dtype)
        return self.norm(self.phi(keys)), self.norm(self.phi(queries))

    def _gates(self, keys, betas, gates):
        out = dict(gates)
        if "beta" in self.rule.gates:
            out["beta"] = betas if betas is not None else keys.new_ones(keys.shape[:2])
        missing = [g for g in self.rule.gates if g not in out]
        if missing:
            raise ValueError(f"memory needs the gates {missing} (rule {self.rule.name!r})")
        return out

    def forward(self, keys, values, betas=None, queries=None, **gates):
        if self._scores_read and queries.shape[1] == 1:  # one query per sequence: training
            self.phi.begin_call(keys.shape[-1], keys.device, keys.dtype)
            return self.rule.read_scores(self.phi.kernel(keys, queries), values, self.attn)
        k, q = self.features(keys, queries)
        return self.rule.forward(k, values, q, self._gates(keys, betas, gates), self.attn)

    def reference(self, keys, values, betas=None, queries=None, **gates):
        """The same read through the naive per-step loop (the spec)."""
        k, q = self.features(keys, queries)
        return reference_loop(self.rule, k, values, q, self._gates(keys, betas, gates), self.attn)[0]

    #: steps per chunk of the chunked causal forms; None: each form's default (causal.SUM_CHUNK, DELTA_CHUNK)
    causal_chunk: int | None = None

    def causal(self, keys, values, queries, betas=None, **gates):
        """Every position's read after its write (``Memory.causal``): φ once for keys and queries, then the
        rule's all-positions form (``causal.rule_causal``)."""
        if not _own(type(self), "causal"):  # a subclass that changes forward alone: read its prefixes
            return super().causal(keys, values, queries, betas, **gates)
        _causal.check_inputs(keys, values, queries, betas, gates, _causal.gate_widths(self, keys, gates))
        k, q = self.features(keys, queries)
        return _causal.rule_causal(self.rule, k, values, q, self._gates(keys, betas, gates), self.attn,
                                   self.causal_chunk)

    def causal_reference(self, keys, values, queries, betas=None, **gates):
        """The spec of ``causal``: the rule's step function with a read after every step."""
        if not _own(type(self), "causal_reference"):
            return super().causal_reference(keys, values, queries, betas, **gates)
        k, q = self.features(keys, queries)
        return _causal.causal_loop(self.rule, k, values, q, self._gates(keys, betas, gates), self.attn)

    @torch.no_grad()
    def trace(self, keys, values, betas=None, queries=None, **gates):
        k, q = self.features(keys, queries)
        g = self._gates(keys, betas, gates)
        y, rec = reference_loop(self.rule, k, values, q, g, self.attn, record=True)
        rec["v"] = values
        if "beta" in g:
            rec["beta"] = g["beta"]
        rec["y"] = y
        return rec


@memories.register("softmax")
class SoftmaxMemory(Memory):
    """Softmax attention of each query over the written pairs: y = Σ_t softmax_t(k_t·q/√K) v_t (PAPER E1)."""

    projection_init = "xavier"

    def state_size(self, d_key: int, d_value: int, seq_len: int) -> int:
        return seq_len * (d_key + d_value)  # a KV cache


    def reference_bytes(self, batch: int, seq_len: int, num_queries: int, d_key: int, d_value: int) -> int:
        return batch * num_queries * seq_len * 1024  # the loop keeps a graph node per scalar dot product
    def attention(self, keys, queries):
        return torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1]), dim=-1)  # (B, Q, L)

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return self.attention(keys, queries) @ values

    def reference(self, keys, values, betas=None, queries=None, **gates):
        B, Q, _ = queries.shape
        out = []
        for b in range(B):
            rows = []
            for i in range(Q):
                w = torch.stack([keys[b, t] @ queries[b, i] for t in range(keys.shape[1])]) / math.sqrt(
                    keys.shape[-1])
                w = torch.exp(w - w.max())
                rows.append((w[:, None] * values[b]).sum(0) / w.sum())
            out.append(torch.stack(rows))
        return torch.stack(out)

    def causal(self, keys, values, queries, betas=None, **gates):
        """Causal softmax attention, y_t = Σ_{j≤t} softmax_j(k_j·q_t/√K) v_j, by
        ``scaled_dot_product_attention(is_causal=True)``. keys, queries (B, T, K), values (B, T, V) -> (B, T, V)."""
        if not _own(type(self), "causal"):  # a subclass that changes forward alone: read its prefixes
            return super().causal(keys, values, queries, betas, **gates)
        _causal.check_inputs(keys, values, queries, betas, gates)
        return _causal.softmax_causal(keys, values, queries)

    def causal_reference(self, keys, values, queries, betas=None, **gates):
        if not _own(type(self), "causal_reference"):
            return super().causal_reference(keys, values, queries, betas, **gates)
        return _causal.softmax_causal_reference(keys, values, queries)

    @torch.no_grad()
    def trace(self, keys, values, betas=None, queries=None, **gates):
        a = self.attention(keys, queries)
        entropy = -(a * a.clamp_min(1e-30).log()).sum(-1)  # (B, Q)
        return {"attn_entropy": entropy, "y": a @ values, "v": values}


def memory_options(spec: str, **options) -> dict:
    """The ``options`` that the constructor behind ``spec`` takes (its feature map's, for a composed memory; the
    memory's own, for a registered one): what a model passes to ``memory`` without knowing the spec's kind, e.g.
    ``memory_options("favor-64/sum", redraw="call")`` keeps ``redraw`` and ``memory_options("dpfp-1/sum", ...)``
    drops it."""
    import inspect

    if spec in memories.names():
        cls = memories.get(spec)
    else:
        cls = feature_maps.resolve(parse_spec(spec).phi)[0]
    params = inspect.signature(cls).parameters  # named parameters only: a **kwargs catch-all names no option
    return {k: v for k, v in options.items() if k in params and params[k].kind != params[k].VAR_KEYWORD}


def memory(spec: str, d_key: int = 64, **kwargs) -> Memory:
    """Build a memory from its spec string, e.g. ``"dpfp-3/delta"``, ``"linear/sum"``, ``"softmax"``.

    ``d_key`` is checked against the feature map (DPFP-ν needs ν < d_key), and given to a map whose constructor
    takes it (a learned map sized by K, hedgehog), so its parameters exist before any optimizer is made. Extra
    kwargs go to the feature map (``redraw=`` for FAVOR+) or to a registered memory's constructor.
    """
    if spec in memories.names():
        mem = memories.get(spec)(**kwargs)
        mem.spec_name = spec
        return mem
    s = parse_spec(spec)
    import inspect

    sized = {"d_key": d_key} if "d_key" in inspect.signature(feature_maps.get(s.phi)).parameters else {}
    phi = feature_map(s.phi, **sized, **kwargs)
    phi.dim(d_key)  # raises on impossible sizes
    mem = FastWeightMemory(phi, update_rules.get(s.rule)(), s.norm, s.attn, spec=s)
    mem.spec_name = spec
    return mem
