"""Registries and memory specs: close-match errors, spec defaults, isolation, duplicates and plugins."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.feature_maps import Tanh
from retrieval_bench.memories import MemorySpec
from retrieval_bench.registry import Registry, RegistryError, split_param
from retrieval_bench.testing import scoped_registries

# ------------------------------------------------------------------------------------------------------------
# Unknown names
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,suggestion",
    [
        (lambda: rb.feature_map("dpfq"), "'dpfp'"),
        (lambda: rb.feature_map("linaer"), "'linear'"),
        (lambda: rb.update_rule("detla"), "'delta'"),
        (lambda: rb.task("capacty", num_keys=3), "'capacity'"),
        (lambda: rb.memory("linear/dleta"), "'delta'"),
        (lambda: rb.memory("lnear/sum"), "'linear'"),
        (lambda: rb.memory("linear/delta/suum"), "'sum'"),
    ],
    ids=["fm-dpfq", "fm-linaer", "rule-detla", "task-capacty", "spec-rule", "spec-phi", "spec-norm"],
)
def test_unknown_names_raise_with_close_matches(build, suggestion):
    with pytest.raises(RegistryError, match=f"did you mean .*{suggestion}"):
        build()


def test_unknown_name_without_close_match_lists_known_names():
    with pytest.raises(RegistryError) as info:
        rb.update_rule("zzzzzz")
    assert "did you mean" not in str(info.value)
    for name in rb.names("update_rules"):
        assert name in str(info.value)


def test_registry_error_is_a_value_error_and_unknown_kind_raises():
    assert issubclass(RegistryError, ValueError)
    with pytest.raises(RegistryError, match="memories"):
        rb.names("memory")


def test_misspelt_registered_memory_suggests_close_match():
    with pytest.raises(RegistryError, match="did you mean 'softmax'"):
        rb.memory("softmx")


@pytest.mark.parametrize("kind,singular", [("memories", "memory"), ("feature_maps", "feature map")],
                         ids=["memories", "feature_maps"])
def test_messages_name_the_kind_in_the_singular(kind, singular):
    reg = Registry(kind)
    reg.register("a", int, origin="pkg-a")
    reg.register("a", float, origin="pkg-b")
    with pytest.raises(RegistryError, match=f"unknown {singular} 'zzz'"):
        reg.get("zzz")
    with pytest.raises(RegistryError, match=f"^{singular} 'a' is claimed twice"):
        reg.get("a")


def test_builtin_names_are_registered():
    assert {"softmax"} <= set(rb.names("memories"))
    assert {"linear", "tanh", "dpfp", "favor", "identity"} <= set(rb.names("feature_maps"))
    assert {"sum", "delta", "fwm"} <= set(rb.names("update_rules"))
    assert {"none", "sum", "l2"} <= set(rb.names("normalisations"))
    assert {"capacity", "overwrite"} <= set(rb.names("tasks"))
    assert registry.feature_maps.origin("dpfp-3") == registry.BUILTIN


# ------------------------------------------------------------------------------------------------------------
# Parametrised names
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [("dpfp-3", ("dpfp", {"n": 3})), ("favor-128", ("favor", {"n": 128})), ("linear", ("linear", {})),
     ("my-map", ("my-map", {})), ("a-b-2", ("a-b", {"n": 2}))],
    ids=["dpfp-3", "favor-128", "linear", "my-map", "a-b-2"],
)
def test_split_param(name, expected):
    assert split_param(name) == expected


def test_parametrised_feature_maps_take_their_parameter():
    assert rb.feature_map("dpfp-3").n == 3
    assert rb.feature_map("favor-16").m == 16
    assert rb.feature_map("dpfp").n == 1


def test_parameter_on_a_parameterless_map_is_a_registry_error():
    with pytest.raises(RegistryError, match="linear"):
        rb.parse_spec("linear-2/sum")


# ------------------------------------------------------------------------------------------------------------
# Memory specs
# ------------------------------------------------------------------------------------------------------------


SPEC_DEFAULTS = [
    ("linear/sum", MemorySpec("linear", "sum", "none", True)),  # "sum" = attention-normalised (PAPER §4.3)
    ("dpfp-1/delta", MemorySpec("dpfp-1", "delta", "sum", False)),  # "ours" = sum-normalised
    ("tanh/fwm", MemorySpec("tanh", "fwm", "none", False)),
    ("linear/sum/none", MemorySpec("linear", "sum", "none", False)),
    ("linear/sum/attn", MemorySpec("linear", "sum", "none", True)),
    ("linear/delta/sum+attn", MemorySpec("linear", "delta", "sum", True)),
    ("linear/delta/attn", MemorySpec("linear", "delta", "none", True)),
    ("dpfp-1/delta/l2", MemorySpec("dpfp-1", "delta", "l2", False)),
    ("favor-8/sum", MemorySpec("favor-8", "sum", "none", True)),
]


@pytest.mark.parametrize("spec,expected", SPEC_DEFAULTS, ids=[s for s, _ in SPEC_DEFAULTS])
def test_parse_spec_defaults(spec, expected):
    parsed = rb.parse_spec(spec)
    assert parsed == expected
    assert rb.parse_spec(parsed.name) == parsed  # the canonical name parses back to the same spec
    mem = rb.memory(spec, d_key=4)
    assert (mem.norm_name, mem.attn) == (expected.norm, expected.attn)


SPEC_ERRORS = [
    ("tanh/fwm/sum+attn", "no attention-normalised form"),
    ("tanh/fwm/attn", "no attention-normalised form"),
    ("linear/sum/foo", "normalisation 'foo'"),
    ("linear/sum/sum+foo", r"\+foo"),
    ("linear", "'linear'"),
    ("linear/sum/none/extra", "PHI/RULE"),
    ("linear//none", "PHI/RULE"),
    ("nope/sum", "feature map 'nope'"),
    ("linear/nope", "update rule 'nope'"),
]


@pytest.mark.parametrize("spec,message", SPEC_ERRORS, ids=[s for s, _ in SPEC_ERRORS])
def test_parse_spec_errors(spec, message):
    with pytest.raises(RegistryError, match=message):
        rb.parse_spec(spec)
    with pytest.raises(RegistryError):
        rb.memory(spec)


# ------------------------------------------------------------------------------------------------------------
# Isolation, duplicates, plugins
# ------------------------------------------------------------------------------------------------------------


class _Double(rb.FeatureMap):
    """A toy plugin map: φ(x) = [relu(x); relu(-x)], F = 2K, non-negative."""

    def dim(self, d_key):
        return 2 * d_key

    def forward(self, x):
        return torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)


def test_scoped_registration_vanishes_afterwards():
    with registry.feature_maps.scoped() as reg:
        reg.register("double", _Double)
        assert "double" in rb.names("feature_maps")
        mem = rb.memory("double/delta", d_key=3)  # a plugin map composes with every rule at once
        assert mem.d_dot(3) == 6
        k, v, q = torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.randn(2, 2, 3)
        torch.testing.assert_close(mem(k, v, None, q), mem.reference(k, v, None, q))
    assert "double" not in rb.names("feature_maps")
    with pytest.raises(RegistryError):
        rb.feature_map("double")


class _Echo(rb.Memory):
    def state_size(self, d_key, d_value, seq_len):
        return d_value

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return values[:, -1:].expand(-1, queries.shape[1], -1)


def test_scoped_registries_fixture_isolates_a_registered_memory(scoped_registries):
    scoped_registries["memories"].register("echo")(_Echo)
    assert "echo" in rb.names("memories")
    assert isinstance(rb.memory("echo"), _Echo)


def test_scoped_registries_remove_what_was_registered_inside_and_keep_the_rest():
    """What the fixture above does on teardown, in one test (runs alone or in any order)."""
    before = {kind: rb.names(kind) for kind in rb.REGISTRIES}
    with scoped_registries() as regs:
        assert set(regs) == set(rb.REGISTRIES)
        regs["memories"].register("echo")(_Echo)
        regs["feature_maps"].register("echo-map", Tanh)
        assert "echo" in rb.names("memories") and "echo-map" in rb.names("feature_maps")
    assert "echo" not in rb.names("memories") and "echo-map" not in rb.names("feature_maps")
    assert {kind: rb.names(kind) for kind in rb.REGISTRIES} == before


def test_same_name_from_two_origins_errors_naming_both():
    reg = Registry("widgets")
    reg.register("w", int, origin="pkg-a")
    reg.register("w", float, origin="pkg-b")
    with pytest.raises(RegistryError, match="pkg-a") as info:
        reg.get("w")
    assert "pkg-b" in str(info.value) and "'w'" in str(info.value)


def test_re_registering_the_same_object_is_harmless():
    reg = Registry("widgets")
    reg.register("w", int)
    reg.register("w", int)
    assert reg.get("w") is int
    assert reg.names() == ["w"]


def test_decorator_registration_returns_the_class():
    reg = Registry("widgets")

    @reg.register("thing")
    class Thing:
        pass

    assert reg.get("thing") is Thing
    assert "thing" in reg and "other" not in reg


def test_scoped_restores_a_plain_registry():
    reg = Registry("widgets")
    reg.register("a", int)
    with reg.scoped():
        reg.register("b", float)
        reg.register("a", str, origin="elsewhere")  # a conflict inside the scope
        with pytest.raises(RegistryError):
            reg.get("a")
    assert reg.names() == ["a"] and reg.get("a") is int


def test_scoped_does_not_leak_into_existing_conflicts():
    reg = Registry("widgets")
    reg.register("w", int, origin="pkg-a")
    reg.register("w", float, origin="pkg-b")
    with reg.scoped():
        reg.register("w", str, origin="pkg-c")
    with pytest.raises(RegistryError) as info:
        reg.get("w")
    assert "pkg-c" not in str(info.value)


def test_entry_point_plugin_loads_lazily_and_names_its_origin():
    reg = Registry("feature_maps")
    ep = EntryPoint("signed", "retrieval_bench.feature_maps:Tanh", "retrieval_bench.feature_maps")
    reg.add_entry_point(ep, origin="fake-dist")
    assert "signed" in reg.names()
    assert reg.origins()["signed"] == "fake-dist"
    assert reg.get("signed") is Tanh


def test_broken_plugin_fails_only_when_used_naming_its_distribution():
    reg = Registry("feature_maps")
    reg.register("fine", int)
    ep = EntryPoint("broken", "no_such_module_for_tests:Thing", "retrieval_bench.feature_maps")
    reg.add_entry_point(ep, origin="broken-dist")
    assert reg.names() == ["broken", "fine"]  # listing does not import it
    assert reg.get("fine") is int
    with pytest.raises(RegistryError, match="broken-dist") as info:
        reg.get("broken")
    assert "no_such_module_for_tests" in str(info.value)


def test_plugin_shadowing_a_builtin_is_a_conflict():
    with registry.feature_maps.scoped() as reg:
        ep = EntryPoint("dpfp", "retrieval_bench.feature_maps:Tanh", reg.group)
        reg.add_entry_point(ep, origin="evil-dist")
        with pytest.raises(RegistryError, match="evil-dist"):
            rb.feature_map("dpfp-2")
    assert rb.feature_map("dpfp-2").n == 2  # restored


def test_a_scope_opened_first_keeps_the_built_ins_and_submodules_are_attributes():
    """In a fresh interpreter (built-ins not yet loaded): a scope opened before any lookup must not throw the
    built-ins away when it closes; rb.<submodule> works without importing it first; a failed load of the
    built-ins fails again on the next lookup instead of leaving empty registries."""
    import subprocess
    import sys

    code = """
import retrieval_bench as rb
from retrieval_bench.registry import tasks
with tasks.scoped():
    assert "capacity" in tasks.names()
assert "capacity" in rb.names("tasks") and "delta" in rb.names("update_rules")
assert rb.feature_maps.DPFP and rb.registry.REGISTRIES and callable(rb.lm)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    broken = """
import sys
sys.modules["torch"] = None  # torch cannot be imported
import retrieval_bench as rb
for _ in range(2):
    try:
        rb.names("tasks")
    except ImportError:
        print("failed")
"""
    res = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, timeout=300)
    assert res.stdout.split() == ["failed", "failed"], (res.stdout, res.stderr[-2000:])
