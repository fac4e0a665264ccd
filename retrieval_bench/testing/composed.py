"""``check_update_rule`` and ``check_feature_map``: a rule or a feature map on its own, then composed into
memories that ``check_memory`` checks."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch

from ..feature_maps import FeatureMap, feature_map
from ..memories import parse_spec
from ..memories.rules import UpdateRule
from ..registry import RegistryError, feature_maps, normalisations, update_rules
from ._base import Shape, default_shapes, short_shapes
from .memory import check_memory

#: Feature maps a rule is composed with by ``check_update_rule``; (φ, normalisation or None for the rule's
#: default). Identity features are signed and unbounded, so they go through l2 (a sum could be ~0).
RULE_COMPOSITIONS: tuple[tuple[str, str | None], ...] = (
    ("linear", None), ("dpfp-1", None), ("favor-4", None), ("identity", "l2"), ("tanh", "l2"),
)


def check_update_rule(rule_name: str, d_key: int = 4, *,
                      compositions: Iterable[tuple[str, str | None]] = RULE_COMPOSITIONS,
                      shapes: Sequence[Shape] | None = None, atol: float = 1e-10,
                      rtol: float = 1e-10) -> None:
    """Check a registered update rule's class attributes, then ``check_memory`` on the rule composed with
    several feature maps (``compositions``: (φ, normalisation or None for the rule's default)) and with every
    registered normalisation on ``linear``, with and without the attention normaliser where the rule
    supports it.

    The compositions run on ``default_shapes(d_key)`` (whose 37-step case spans several chunks of a chunked
    fast form), the normalisations on ``short_shapes(d_key)``; ``shapes`` replaces both.
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

    specs = {f"{phi}/{rule_name}" + (f"/{norm}" if norm else ""): default_shapes for phi, norm in compositions}
    for norm in normalisations.names():
        specs.setdefault(f"linear/{rule_name}/{norm}", short_shapes)
        if cls.supports_attn:
            specs.setdefault(f"linear/{rule_name}/{norm}+attn", short_shapes)
    for spec, cases in specs.items():
        check_memory(spec, d_key=d_key, shapes=shapes if shapes is not None else cases(d_key), atol=atol, rtol=rtol)


def composition(phi: str, rule: str) -> str:
    """The spec of ``phi`` under ``rule``: ``phi/rule``, with the rule's default normalisation, where the registry
    accepts it; else (a signed map under a default that divides by a sum of features) ``phi/rule/l2``."""
    spec = f"{phi}/{rule}"
    try:
        parse_spec(spec)
    except RegistryError:
        return f"{spec}/l2"
    return spec


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
    """Check a registered feature map on its own, at key widths ``d_key`` and ``d_key + 3``:

    * ``dim``: ``dim(K)`` is a positive int and the output is (..., dim(K)), finite;
    * ``non_negative``: features are >= 0 where the map says ``non_negative``, and some are < 0 on N(0, 4)
      inputs where it says it is signed; ``positive_kernel``: φ(x)·φ(y) > 0 for every pair where it says so;
    * ``rows``: each row's features depend on that row alone, and two calls after one ``begin_call`` agree;
    * ``gradients``: the gradient is finite and passes ``torch.autograd.gradcheck`` in float64 (maps may
      carry hand-written backwards), and every parameter of a learned map gets a finite, non-zero gradient;

    then ``check_memory`` on the map composed with every registered update rule (or ``rules``), each with its
    default normalisation where the registry accepts it, else with l2 (``composition``). By default a rule
    plugin that fails to load is left out: it fails its own checks, not every feature map's.
    """
    label = f"feature map {name!r}"
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        for K in (d_key, d_key + 3):
            _check_map_alone(_build_map(name, label, K), label, K)
    shapes = list(shapes) if shapes is not None else short_shapes(d_key)
    for rule in rules if rules is not None else _loadable(update_rules):
        check_memory(composition(name, rule), d_key=d_key, shapes=shapes, atol=atol, rtol=rtol)


def _build_map(name: str, label: str, K: int) -> FeatureMap:
    """The map for keys of width K: a map whose constructor takes ``d_key`` (learned, sized by K) is given it, as
    ``retrieval_bench.memory`` does."""
    try:
        factory = feature_maps.resolve(name)[0]
        sized = {"d_key": K} if "d_key" in inspect.signature(factory).parameters else {}
        fm = feature_map(name, **sized)
    except Exception as e:
        raise AssertionError(f"{label}: build: {type(e).__name__}: {e}") from e
    if not isinstance(fm, FeatureMap):
        raise AssertionError(f"{label}: class: expected a retrieval_bench.FeatureMap, "
                             f"got {type(fm).__name__}")
    return fm


def _check_map_alone(fm: FeatureMap, label: str, K: int) -> None:
    F_dim = fm.dim(K)
    if not isinstance(F_dim, int) or F_dim < 1:
        raise AssertionError(f"{label}: dim: dim({K}) must be a positive int, got {F_dim!r}")
    fm.seed(0)
    fm.begin_call(K, None, torch.float32)
    x = (2 * torch.randn(3, 5, K)).requires_grad_()
    phi = fm(x)
    if tuple(phi.shape) != (3, 5, F_dim):
        raise AssertionError(f"{label}: dim: (3, 5, {K}) -> expected (3, 5, dim={F_dim}), got {tuple(phi.shape)}")
    if not torch.isfinite(phi).all():
        raise AssertionError(f"{label}: forward: non-finite features")
    if fm.non_negative and (phi < 0).any():
        raise AssertionError(f"{label}: non_negative: the map says non_negative but gave {phi.min().item()}")
    if not fm.non_negative and not (phi < 0).any():
        raise AssertionError(f"{label}: non_negative: the map says it is signed (non_negative = False) but gave "
                             f"no negative feature on N(0, 4) inputs")
    if getattr(fm, "positive_kernel", False):  # a signed map that the attention normaliser accepts (taylor)
        with torch.no_grad():
            scores = phi.flatten(0, 1) @ phi.flatten(0, 1).T  # every pair of the 15 rows
        if not (scores > 0).all():
            raise AssertionError(f"{label}: positive_kernel: the map says φ(x)·φ(y) > 0 but gave "
                                 f"{scores.min().item()}")
    params = {n: p for n, p in fm.named_parameters() if p.requires_grad}  # a learned map's (hedgehog's W, b)
    # a random cotangent: the gradient of φ.sum() is 0 for a map whose features have a fixed sum (softmax)
    grad, *grads = torch.autograd.grad(phi, [x, *params.values()], torch.randn_like(phi), allow_unused=True)
    if not torch.isfinite(grad).all():
        raise AssertionError(f"{label}: gradients: non-finite d/d x")
    for n, gp in zip(params, grads, strict=True):
        if gp is None or not torch.isfinite(gp).all() or not bool(gp.abs().sum() > 0):
            raise AssertionError(f"{label}: gradients: the map's parameter {n!r} gets "
                                 f"{'no' if gp is None else 'a zero or non-finite'} gradient")
    with torch.no_grad():
        rows, again = fm(x[1:2]), fm(x)
    try:
        torch.testing.assert_close(rows, phi[1:2], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(again, phi, atol=0, rtol=0)
    except AssertionError as e:
        raise AssertionError(f"{label}: rows: a row's features depend on other rows, or two calls differ: "
                             f"{e}") from None

    fm.seed(0)
    fm.begin_call(K, None, torch.float64)
    x64 = torch.randn(2, 3, K, dtype=torch.float64)
    x64 = (x64 + 0.2 * x64.sign()).requires_grad_()  # away from a kink at 0 (relu in DPFP)
    try:
        torch.autograd.gradcheck(fm, (x64,))
    except Exception as e:  # gradcheck raises GradcheckError with the two Jacobians
        raise AssertionError(f"{label}: gradients: gradcheck in float64 failed: {e}") from None
    fm.to(torch.float32)
