"""Plugins: entry points discovered without installing anything, composed, checked and run end to end.

Every test fakes an installed distribution with
``Registry.add_entry_point(EntryPoint(name, "tests.fake_plugin:X", group), origin=...)`` inside ``scoped()``
registries, so nothing it registers outlives the test. One test goes a step further and lets
``importlib.metadata`` itself find a distribution (a ``.dist-info`` folder on sys.path).
"""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.cli import main
from retrieval_bench.config import ConfigError, from_dict
from retrieval_bench.executors import InlineExecutor
from retrieval_bench.registry import Registry, RegistryError
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep
from retrieval_bench.testing import check_feature_map, check_memory, check_update_rule

ROOT = Path(__file__).resolve().parents[1]
DIST = "fake-dist"

# name, object in tests/fake_plugin.py, registry kind
FAKES = [("fake", "Fake", "update_rules"), ("fakemap", "FakeMap", "feature_maps"),
         ("fake-mem", "FakeMemory", "memories"), ("fake-task", "FakeTask", "tasks")]


@pytest.fixture
def plugins(scoped_registries, monkeypatch):
    """The fake distribution's entry points, one per group, as an installed package would declare them."""
    monkeypatch.syspath_prepend(str(ROOT))  # so that "tests.fake_plugin" imports however pytest was started
    for name, attr, kind in FAKES:
        reg = scoped_registries[kind]
        reg.add_entry_point(EntryPoint(name, f"tests.fake_plugin:{attr}", reg.group), origin=DIST)
    return scoped_registries


def _add(kind: str, name: str, value: str, origin: str) -> None:
    reg = registry.REGISTRIES[kind]
    reg.add_entry_point(EntryPoint(name, value, reg.group), origin=origin)


# ---- discovery and composition -----------------------------------------------------------------------------

def test_fake_entry_points_are_listed_with_their_origin(plugins):
    for name, _, kind in FAKES:
        assert name in rb.names(kind)
        assert plugins[kind].origins()[name] == DIST
    assert registry.update_rules.origin("delta") == registry.BUILTIN


def test_plugin_rule_composes_with_every_feature_map(plugins):
    check_update_rule("fake")  # linear, dpfp-1, favor-4, identity, tanh and every normalisation
    check_memory("dpfp-2/fake", d_key=4)
    mem = rb.memory("dpfp-2/fake", d_key=4)
    assert mem.gates == ("beta", "alpha") and mem.d_dot(4) == 16


def test_plugin_feature_map_composes_with_every_rule(plugins):
    check_feature_map("fakemap")  # every registered rule, the fake one included
    assert rb.memory("fakemap/delta", d_key=3).d_dot(3) == 6


def test_plugin_memory_passes_the_contract(plugins):
    check_memory("fake-mem", d_key=4)


def test_model_makes_one_gate_per_declared_name(plugins):
    model = rb.RetrievalModel(4, "linear/fake", d_key=4)
    assert set(model.W_g) == {"beta", "alpha"}
    batch = rb.task("capacity", num_keys=4).sample(2, torch.Generator().manual_seed(0))
    k, v, betas, q, gates = model.inputs(batch.keys, batch.values, batch.query[:, None])
    assert betas.shape == (2, 4) and set(gates) == {"alpha"} and gates["alpha"].shape == (2, 4)
    assert ((gates["alpha"] > 0) & (gates["alpha"] < 1)).all()


# ---- an experiment, end to end -----------------------------------------------------------------------------

def _plugin_tiny(task: str, memories: list[str]) -> dict:
    """Changes to the tiny experiment: one seed of S = 4 on ``task`` per memory, 10 steps of batch 8."""
    return dict(name="plugin-tiny", task={"name": task}, model={"memory": memories},
                train={"batch_size": 8, "eval_every": 5, "max_steps": 10})


def test_cli_runs_an_experiment_naming_a_plugin_rule(plugins, tmp_path, tiny_experiment):
    toml = tiny_experiment.toml(**_plugin_tiny("capacity", ["dpfp-1/fake", "fakemap/delta"]))
    db = tmp_path / "r.db"
    result = CliRunner().invoke(main, ["run", str(toml), "--store", str(db), "--workers", "1", "--no-report"])
    assert result.exit_code == 0, result.output
    runs = Store(db).load("runs")
    assert sorted(runs["memory"]) == ["dpfp-1/fake", "fakemap/delta"]
    assert (runs["status"] == "done").all(), runs[["memory", "status", "error"]]
    assert set(runs["d_dot"]) == {16}


def test_sweep_runs_a_plugin_memory_on_a_plugin_task(plugins, tmp_path, tiny_experiment):
    exp = tiny_experiment.load(**_plugin_tiny("fake-task", ["fake-mem"]))
    st = Store(tmp_path / "r.db")
    state = run_sweep(exp, st, InlineExecutor(threads=1), live=False)
    assert state.done == 1 and state.failed == 0
    row = st.load("runs").iloc[0]
    assert row["task"] == "fake-task" and row["memory"] == "fake-mem" and row["state_size"] == 4 * (8 + 4)


def test_list_shows_plugins_with_their_origin(plugins):
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name, _, _ in FAKES:
        assert any(name in line.split() and DIST in line for line in lines), f"{name} ({DIST}) not in:\n" + \
            result.output
    assert any("delta" in line.split() and "built-in" in line for line in lines)


# ---- failures name who to blame ----------------------------------------------------------------------------

def test_broken_plugin_fails_only_when_asked_for_naming_its_distribution(scoped_registries, tmp_path,
                                                                        tiny_experiment):
    _add("update_rules", "broken", "no_such_module_for_plugin_tests:Rule", "broken-dist")
    # listing, other rules, and the CLI's list do not import it
    assert "broken" in rb.names("update_rules")
    check_memory("linear/delta", d_key=4, shapes=[(1, 3, 1, 4, 2)], check_model=False)
    listed = CliRunner().invoke(main, ["list"])
    assert listed.exit_code == 0 and "broken-dist" in listed.output
    # asking for it fails, naming the distribution and the missing module
    with pytest.raises(RegistryError, match="broken-dist") as info:
        rb.memory("linear/broken", d_key=4)
    assert "no_such_module_for_plugin_tests" in str(info.value) and "'broken'" in str(info.value)
    with pytest.raises(ConfigError, match="broken-dist"):
        from_dict(tiny_experiment.raw(model={"memory": "linear/broken"}))
    with pytest.raises(AssertionError, match="broken-dist"):
        check_update_rule("broken")
    toml = tiny_experiment.toml(**_plugin_tiny("capacity", ["linear/broken"]))
    ran = CliRunner().invoke(main, ["run", str(toml), "--store", str(tmp_path / "r.db"), "--workers", "1",
                                    "--no-report"])
    assert ran.exit_code != 0 and "broken-dist" in ran.output


def test_name_claimed_twice_names_both_claimants(scoped_registries):
    _add("feature_maps", "twin", "tests.fake_plugin:FakeMap", "dist-a")
    _add("feature_maps", "twin", "tests.fake_plugin:FakeMap", "dist-b")
    with pytest.raises(RegistryError, match="dist-a and dist-b"):
        rb.memory("twin/delta", d_key=4)
    # a plugin claiming a built-in name is a conflict too, and the built-in is not silently replaced
    _add("update_rules", "delta", "tests.fake_plugin:Fake", "evil-dist")
    with pytest.raises(RegistryError, match="built-in and evil-dist"):
        rb.memory("linear/delta", d_key=4)


def test_scoped_plugins_vanish_afterwards(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    with registry.update_rules.scoped():
        _add("update_rules", "fake", "tests.fake_plugin:Fake", DIST)
        assert rb.memory("linear/fake", d_key=4).gates == ("beta", "alpha")
    assert "fake" not in rb.names("update_rules")
    with pytest.raises(RegistryError, match="unknown update rule 'fake'"):
        rb.memory("linear/fake", d_key=4)


def test_installed_distribution_is_found_through_importlib_metadata(tmp_path, monkeypatch):
    """A ``.dist-info`` on sys.path is what pip leaves behind; a fresh registry lists its entry points under
    the distribution's name without importing them, and loads one when asked."""
    monkeypatch.syspath_prepend(str(ROOT))
    info = tmp_path / "rb_fake_installed-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rb-fake-installed\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [retrieval_bench.update_rules]
        fake-installed = tests.fake_plugin:Fake
        broken-installed = no_such_module_for_plugin_tests:Rule
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("update_rules")
    assert reg.origins()["fake-installed"] == "rb-fake-installed"
    assert reg.origins()["broken-installed"] == "rb-fake-installed"
    assert reg.get("fake-installed").__name__ == "Fake"
    with pytest.raises(RegistryError, match="rb-fake-installed"):
        reg.get("broken-installed")


def test_rule_sets_the_initial_bias_of_its_gates(plugins):
    from tests.fake_plugin import Fake

    class SlowDecay(Fake):
        gate_bias = {"alpha": 3.0}

    torch.manual_seed(0)
    ref = rb.RetrievalModel(4, rb.FastWeightMemory(rb.feature_map("linear"), Fake()), d_key=4)
    torch.manual_seed(0)
    model = rb.RetrievalModel(4, rb.FastWeightMemory(rb.feature_map("linear"), SlowDecay()), d_key=4)
    assert model.W_g["alpha"].bias.item() == 3.0
    # only that bias moves: every other parameter, β's projection included, is drawn as without gate_bias
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if name != "W_g.alpha.bias":
            assert torch.equal(p, p_ref), name
    batch = rb.task("capacity", num_keys=4).sample(2, torch.Generator().manual_seed(0))
    _, _, betas, _, gates = model.inputs(batch.keys, batch.values, batch.query[:, None])
    assert gates["alpha"].min() > 0.8 and betas.max() < 0.8  # α starts slow; β as before, near ½
    check_memory(model.memory, d_key=4)  # the contract accepts it


def test_gate_bias_for_a_gate_the_memory_lacks_is_a_clear_error(plugins):
    from tests.fake_plugin import Fake

    class Typo(Fake):
        gate_bias = {"alhpa": 3.0}

    with pytest.raises(ValueError, match=r"gate_bias names \['alhpa'\].*its gates: \['beta', 'alpha'\]"):
        rb.RetrievalModel(4, rb.FastWeightMemory(rb.feature_map("linear"), Typo()), d_key=4)


def test_contract_names_a_gate_bias_that_is_not_a_gate(plugins):
    from tests.fake_plugin import Fake

    class Typo(Fake):
        gate_bias = {"alhpa": 3.0}

    with pytest.raises(AssertionError, match="gate_bias"):
        check_memory(rb.FastWeightMemory(rb.feature_map("linear"), Typo()), d_key=4)
