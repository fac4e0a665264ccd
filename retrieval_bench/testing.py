"""Contract checks for memories, update rules and feature maps, to call from a plugin's own tests.

The contract (DESIGN §3, docs/plugins.md)::

    keys (B, L, K)  values (B, L, V)  betas (B, L)  queries (B, Q, K)  **gates {name: (B, L)}  ->  (B, Q, V)

Usage, in any test runner::

    from retrieval_bench.testing import check_feature_map, check_memory, check_update_rule

    def test_my_rule():
        check_update_rule("my-rule")             # the rule under several φ and every normalisation
        check_memory("dpfp-1/my-rule", d_key=4)  # one memory, every check

Every check raises ``AssertionError`` whose message names the memory and the check that failed, e.g.
``dpfp-1/my-rule: reference [B2-L6-Q3-K4-V2, float64]: outputs differ ...``. Nothing here imports pytest.

Random feature maps (FAVOR+) are reseeded before every call, so the fast form, the reference loop and the
trace of one check see the same draw; the global torch RNG is left as it was found.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .feature_maps import FeatureMap, feature_map
from .memories import Memory, memory
from .memories.rules import UpdateRule
from .registry import RegistryError, feature_maps, normalisations, update_rules

Shape = tuple[int, int, int, int, int]  # (B, L, Q, K, V)

#: Feature maps a rule is composed with by ``check_update_rule``; (φ, normalisation or None for the rule's
#: default). Identity features are signed and unbounded, so they go through l2 (a sum could be ~0).
RULE_COMPOSITIONS: tuple[tuple[str, str | None], ...] = (
    ("linear", None), ("dpfp-1", None), ("favor-4", None), ("identity", "l2"), ("tanh", "l2"),
)

# Per-step trace entries the diagnostics read, and the trailing shape each must have after (B, L).
_TRACE_PER_STEP = {"v_bar": "V", "v_new": "V", "v": "V", "state_norm": "", "normaliser": "",
                   "normaliser_l1": "", "beta": ""}


def default_shapes(d_key: int) -> list[Shape]:
    """(B, L, Q, K, V) cases: L = 1, K ≠ V both ways, K = V, several queries, another K, and a sequence longer
    than 32 steps (the chunk length of chunked fast forms)."""
    return [(2, 1, 1, d_key, d_key + 1), (2, 6, 3, d_key, 2), (1, 9, 2, d_key, d_key),
            (3, 5, 2, d_key + 2, 3), (1, 37, 2, d_key, 3)]


def short_shapes(d_key: int) -> list[Shape]:
    """Fewer, shorter cases for sweeps over many compositions."""
    return [(2, 1, 1, d_key, d_key + 1), (2, 7, 3, d_key, 2)]


class _Checker:
    """Builds the memory under test and raises AssertionErrors that name it and the check."""

    def __init__(self, spec_or_memory: str | Memory, d_key: int, memory_kwargs: dict[str, Any]):
        self.spec = spec_or_memory if isinstance(spec_or_memory, str) else None
        self.instance = None if self.spec is not None else spec_or_memory
        self.label = self.spec or getattr(spec_or_memory, "spec_name", None) or type(spec_or_memory).__name__
        self.d_key = d_key
        self.memory_kwargs = memory_kwargs
        self._built: dict[int, Memory] = {}

    def fail(self, check: str, detail: str) -> AssertionError:
        return AssertionError(f"{self.label}: {check}: {detail}")

    def build(self, d_key: int) -> Memory:
        """The memory for keys of width ``d_key`` (an instance under test is used as it is)."""
        if self.instance is not None:
            return self.instance
        if d_key not in self._built:
            try:
                self._built[d_key] = memory(self.spec, d_key=d_key, **self.memory_kwargs)
            except Exception as e:  # a broken plugin may fail in any way; report it as this check's failure
                raise self.fail("build", f"memory({self.spec!r}, d_key={d_key}) raised "
                                         f"{type(e).__name__}: {e}") from e
            if not isinstance(self._built[d_key], nn.Module):
                got = type(self._built[d_key]).__name__
                raise self.fail("build", f"expected a torch.nn.Module, got {got}")
        return self._built[d_key]

    def close(self, check: str, actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float,
              rtol: float) -> None:
        try:
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        except AssertionError as e:
            raise self.fail(check, f"{what} differ: {e}") from None

    def finite(self, check: str, t: torch.Tensor | None, what: str, required: bool = True) -> None:
        if t is None:
            if required:
                raise self.fail(check, f"no gradient reaches {what} (it does not enter the output)")
            return
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise self.fail(check, f"{what} has {bad} non-finite entries")


# Gradients that must reach their input in every case. A gate or a parameter may legitimately not enter an
# output (a decay at t = 1 acts on the empty state), so for those only finiteness is checked here, and the
# model check asks that every declared gate reach the loss over a longer sequence.
_REQUIRED_GRADS = ("keys", "values", "queries")


def _reseed(mem: nn.Module) -> None:
    """Make the next call's random draws equal to the last call's (FAVOR+'s Ω, a plugin's global-RNG use)."""
    for m in mem.modules():
        if isinstance(m, FeatureMap):
            m.seed(0)
    torch.default_generator.manual_seed(0)  # CPU only: fork_rng below restores no device generator


def _call(mem: nn.Module, fn: Callable, *args, **kwargs):
    _reseed(mem)
    return fn(*args, **kwargs)


def _inputs(mem: Memory, shape: Shape, dtype: torch.dtype, g: torch.Generator):
    """Random inputs as the model makes them: betas (or None without a beta gate) and the other gates in
    (0, 1), as leaf tensors that require grad. Returns (args, gates, named leaves)."""
    B, L, Q, K, V = shape
    keys = torch.randn(B, L, K, generator=g, dtype=dtype)
    values = torch.randn(B, L, V, generator=g, dtype=dtype)
    queries = torch.randn(B, Q, K, generator=g, dtype=dtype)
    gate_names = tuple(getattr(mem, "gates", ()))
    gates = {name: torch.sigmoid(torch.randn(B, L, generator=g, dtype=dtype)) for name in gate_names}
    betas = gates.pop("beta", None)
    leaves = {"keys": keys, "values": values, "queries": queries}
    if betas is not None:
        leaves["betas"] = betas
    leaves.update({f"gate {name!r}": t for name, t in gates.items()})
    for t in leaves.values():
        t.requires_grad_(True)
    return (keys, values, betas, queries), gates, leaves


def _grads(y: torch.Tensor, leaves: dict[str, torch.Tensor], params: dict[str, nn.Parameter],
           cotangent: torch.Tensor) -> dict[str, torch.Tensor | None]:
    wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
    grads = torch.autograd.grad(y, list(wrt.values()), cotangent, allow_unused=True)
    return dict(zip(wrt, grads, strict=True))


def _shape_id(shape: Shape) -> str:
    return "B{}-L{}-Q{}-K{}-V{}".format(*shape)


def check_memory(spec_or_memory: str | Memory, d_key: int = 4, *, shapes: Sequence[Shape] | None = None,
                 atol: float = 1e-10, rtol: float = 1e-10, check_model: bool = True, **memory_kwargs) -> None:
    """Run every contract check on one memory; raise AssertionError naming the memory and the check.

    Checks, for every (B, L, Q, K, V) in ``shapes`` (default ``default_shapes(d_key)``):

    * ``forward``: in float32 the output is (B, Q, V), float32 and finite;
    * ``gradients``: finite gradients reach keys, values and queries, and are finite on betas (where the
      memory declares the ``beta`` gate), every other declared gate and every parameter;
    * ``reference`` (where the memory has a ``reference`` method): in float64 the training form equals the
      reference loop to ``atol``/``rtol`` in outputs and in every gradient;
    * ``trace`` (where ``trace`` returns a dict): ``trace(...)["y"]`` equals the forward output, and per-step
      entries the diagnostics read (v_bar, state_norm, ...) are (B, L[, V]);
    * ``state_size``: ``state_size(K, V, L)`` is a positive integer;

    and once, ``model`` (unless ``check_model=False``): a ``RetrievalModel`` around the memory makes one gate
    per name in ``memory.gates`` and gets finite gradients on every parameter, each gate's included.

    Args:
        spec_or_memory: a spec string (``"dpfp-1/my-rule"``, a registered memory's name), built per key width
            with ``retrieval_bench.memory``; or a Memory instance, used as it is with K = ``d_key``.
        d_key: K of the default shapes (and of the model check).
        shapes: (B, L, Q, K, V) cases.
        atol, rtol: tolerance of the float64 comparisons (reference, trace).
        check_model: also run the memory inside the model.
        **memory_kwargs: passed to ``retrieval_bench.memory`` (e.g. ``redraw="fixed"`` for FAVOR+).
    """
    ck = _Checker(spec_or_memory, d_key, memory_kwargs)
    shapes = list(shapes) if shapes is not None else default_shapes(d_key)
    if ck.instance is not None:  # a built instance has one key width
        shapes = [(B, L, Q, d_key, V) for B, L, Q, _, V in shapes]
    built = ck.build(d_key)
    gates = tuple(getattr(built, "gates", ()))
    if not all(isinstance(gname, str) and gname.isidentifier() for gname in gates):
        raise ck.fail("gates", f"memory.gates must be a tuple of identifier strings, got {gates!r}")
    bias = dict(getattr(built, "gate_bias", {}))
    if not set(bias) <= set(gates) or not all(math.isfinite(float(b)) for b in bias.values()):
        raise ck.fail("gate_bias", f"memory.gate_bias must map some of its gates {gates!r} to finite numbers, "
                                   f"got {bias!r}")
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(1234)
        for shape in shapes:
            try:
                _check_shape(ck, shape, g, atol, rtol)
            except AssertionError:
                raise
            except Exception as e:  # e.g. a backward that fails: still name the memory and the case
                raise ck.fail(f"[{_shape_id(shape)}]", f"raised {type(e).__name__}: {e}") from e
        if check_model:
            _check_model(ck, d_key, g)


def _check_shape(ck: _Checker, shape: Shape, g: torch.Generator, atol: float, rtol: float) -> None:
    B, L, Q, K, V = shape
    sid = _shape_id(shape)
    mem = ck.build(K)
    was_training = mem.training
    mem.train()
    try:
        # float32: shapes and finite gradients, as training runs it
        args, gates, leaves = _inputs(mem, shape, torch.float32, g)
        try:
            y = _call(mem, mem, *args, **gates)
        except Exception as e:
            raise ck.fail(f"forward [{sid}]", f"raised {type(e).__name__}: {e}") from e
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (B, Q, V):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ck.fail(f"forward [{sid}]", f"expected output shape (B, Q, V) = {(B, Q, V)}, got {got}")
        if y.dtype != torch.float32:
            raise ck.fail(f"forward [{sid}]", f"float32 inputs gave a {y.dtype} output")
        ck.finite(f"forward [{sid}]", y, "the output")
        params = {n: p for n, p in mem.named_parameters() if p.requires_grad}
        for what, grad in _grads(y, leaves, params, torch.randn(y.shape, generator=g)).items():
            ck.finite(f"gradients [{sid}]", grad, f"d/d {what}", required=what in _REQUIRED_GRADS)

        # float64: the training form against the reference loop and the trace
        mem64 = copy.deepcopy(mem).to(torch.float64)
        args, gates, leaves = _inputs(mem64, shape, torch.float64, g)
        params = {n: p for n, p in mem64.named_parameters() if p.requires_grad}
        y = _call(mem64, mem64, *args, **gates)
        cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
        reference = getattr(mem64, "reference", None)
        if callable(reference):
            check = f"reference [{sid}, float64]"
            try:
                y_ref = _call(mem64, reference, *args, **gates)
            except Exception as e:
                raise ck.fail(check, f"reference raised {type(e).__name__}: {e}") from e
            ck.close(check, y, y_ref, "outputs of forward and reference", atol, rtol)
            grads = _grads(y, leaves, params, cot)
            grads_ref = _grads(y_ref, leaves, params, cot)
            wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
            for what, grad in grads.items():
                ref = grads_ref[what]
                if grad is None and ref is None:
                    continue
                zero = torch.zeros_like(wrt[what])  # an input that does not enter a form has zero gradient
                ck.close(check, zero if grad is None else grad, zero if ref is None else ref,
                         f"d/d {what} of forward and reference", atol, rtol)
        _check_trace(ck, mem64, args, gates, y.detach(), shape, atol, rtol)
    finally:
        mem.train(was_training)

    try:
        size = mem.state_size(K, V, L)
    except NotImplementedError:
        raise ck.fail(f"state_size [{sid}]", "the memory does not implement state_size()") from None
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0:
        raise ck.fail(f"state_size [{sid}]",
                      f"state_size({K}, {V}, {L}) must be a positive int, got {size!r}")


def _check_trace(ck: _Checker, mem: nn.Module, args, gates, y: torch.Tensor, shape: Shape, atol: float,
                 rtol: float) -> None:
    trace_fn = getattr(mem, "trace", None)
    if not callable(trace_fn):
        return
    B, L, Q, K, V = shape
    check = f"trace [{_shape_id(shape)}, float64]"
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        rec = _call(mem, trace_fn, *detached, **{n: t.detach() for n, t in gates.items()})
    except NotImplementedError:
        return
    except Exception as e:
        raise ck.fail(check, f"trace raised {type(e).__name__}: {e}") from e
    if rec is None:
        return
    if not isinstance(rec, dict) or "y" not in rec:
        raise ck.fail(check, "a trace must be a dict holding 'y', the forward output")
    ck.close(check, rec["y"], y, "trace['y'] and the forward output", atol, rtol)
    for name, tail in _TRACE_PER_STEP.items():
        if name in rec:
            want = (B, L, V) if tail else (B, L)
            if tuple(rec[name].shape) != want:
                raise ck.fail(check, f"trace[{name!r}] must be {want}, got {tuple(rec[name].shape)}")


def _check_model(ck: _Checker, d_key: int, g: torch.Generator) -> None:
    """The memory inside the paper's model: one σ(W_g x) per declared gate, one finite training step."""
    from .model import RetrievalModel, retrieval_loss

    S, B, L = 5, 3, 6
    mem = copy.deepcopy(ck.build(d_key)).to(torch.float32)
    try:
        model = RetrievalModel(S, mem, d_key=d_key)
        keys = torch.randint(0, S, (B, L), generator=g)
        values = torch.randint(0, S, (B, L), generator=g)
        queries = torch.randint(0, S, (B, 2), generator=g)
        y = _call(mem, model, keys, values, queries)
    except Exception as e:
        raise ck.fail("model", f"RetrievalModel forward raised {type(e).__name__}: {e}") from e
    if tuple(y.shape) != (B, 2, S):
        raise ck.fail("model", f"expected (B, Q, V) = {(B, 2, S)}, got {tuple(y.shape)}")
    retrieval_loss(y, queries).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            what = f"model parameter {name!r}" + (" (a declared gate)" if name.startswith("W_g.") else "")
            ck.finite("model", p.grad, what)


def check_update_rule(rule_name: str, d_key: int = 4, *,
                      compositions: Iterable[tuple[str, str | None]] = RULE_COMPOSITIONS,
                      shapes: Sequence[Shape] | None = None, atol: float = 1e-10,
                      rtol: float = 1e-10) -> None:
    """Check a registered update rule's class attributes, then ``check_memory`` on the rule composed with
    several feature maps (``compositions``: (φ, normalisation or None for the rule's default)) and with every
    registered normalisation on ``linear``, with and without the attention normaliser where the rule
    supports it.
    """
    label = f"update rule {rule_name!r}"
    try:
        cls = update_rules.get(rule_name)
    except Exception as e:
        raise AssertionError(f"{label}: load: {type(e).__name__}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
        raise AssertionError(f"{label}: class: expected a subclass of retrieval_bench.UpdateRule, "
                             f"got {cls!r}")
    gates = cls.gates
    if not isinstance(gates, tuple) or not all(isinstance(n, str) and n.isidentifier() for n in gates):
        raise AssertionError(f"{label}: gates: must be a tuple of identifier strings, got {gates!r}")
    if cls.default_norm not in normalisations.names():
        raise AssertionError(f"{label}: default_norm: {cls.default_norm!r} is not a registered normalisation "
                             f"({', '.join(normalisations.names())})")
    if cls.default_attn and not cls.supports_attn:
        raise AssertionError(f"{label}: default_attn: True, but supports_attn is False")
    if cls.step is UpdateRule.step:
        raise AssertionError(f"{label}: step: the rule does not implement step(), its executable spec")

    specs = [f"{phi}/{rule_name}" + (f"/{norm}" if norm else "") for phi, norm in compositions]
    for norm in normalisations.names():
        specs.append(f"linear/{rule_name}/{norm}")
        if cls.supports_attn:
            specs.append(f"linear/{rule_name}/{norm}+attn")
    shapes = list(shapes) if shapes is not None else short_shapes(d_key)
    for spec in dict.fromkeys(specs):
        check_memory(spec, d_key=d_key, shapes=shapes, atol=atol, rtol=rtol, check_model=spec == specs[0])


def _loadable(reg) -> list[str]:
    names = []
    for name in reg.names():
        try:
            reg.get(name)
        except RegistryError:
            continue
        names.append(name)
    return names


def check_feature_map(name: str, d_key: int = 4, *, rules: Iterable[str] | None = None,
                      shapes: Sequence[Shape] | None = None, atol: float = 1e-10,
                      rtol: float = 1e-10) -> None:
    """Check a registered feature map: ``dim(K)`` matches its output (..., F), the output and its gradient are
    finite, features are >= 0 where the map says ``non_negative``; then ``check_memory`` on the map composed
    with every registered update rule (or ``rules``), each with its default normalisation. By default a rule
    plugin that fails to load is left out: it fails its own checks, not every feature map's.
    """
    label = f"feature map {name!r}"
    try:
        feature_maps.resolve(name)
        fm = feature_map(name)
    except Exception as e:
        raise AssertionError(f"{label}: build: {type(e).__name__}: {e}") from e
    if not isinstance(fm, FeatureMap):
        raise AssertionError(f"{label}: class: expected a retrieval_bench.FeatureMap, "
                             f"got {type(fm).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        F_dim = fm.dim(d_key)
        if not isinstance(F_dim, int) or F_dim < 1:
            raise AssertionError(f"{label}: dim: dim({d_key}) must be a positive int, got {F_dim!r}")
        fm.begin_call(d_key, None, torch.float32)
        x = torch.randn(2, 3, d_key, requires_grad=True)
        phi = fm(x)
        if tuple(phi.shape) != (2, 3, F_dim):
            raise AssertionError(f"{label}: shape: (2, 3, {d_key}) -> expected (2, 3, dim={F_dim}), "
                                 f"got {tuple(phi.shape)}")
        if not torch.isfinite(phi).all():
            raise AssertionError(f"{label}: forward: non-finite features")
        if fm.non_negative and (phi < 0).any():
            raise AssertionError(f"{label}: non_negative: the map says non_negative but gave "
                                 f"{phi.min().item()}")
        (grad,) = torch.autograd.grad(phi.sum(), x)
        if not torch.isfinite(grad).all():
            raise AssertionError(f"{label}: gradients: non-finite d/d x")
    shapes = list(shapes) if shapes is not None else short_shapes(d_key)
    for i, rule in enumerate(rules if rules is not None else _loadable(update_rules)):
        check_memory(f"{name}/{rule}", d_key=d_key, shapes=shapes, atol=atol, rtol=rtol, check_model=i == 0)
