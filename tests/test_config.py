"""Experiment files: grid expansion, canonical run ids, overrides, and one clear error per bad input."""

from __future__ import annotations

import pytest

from retrieval_bench.config import ConfigError, RunConfig, from_dict, load, shipped_experiments
from retrieval_bench.overrides import parse_value


def base(tiny_experiment, **changes):
    """Eight runs (S = 4, 8 x linear/sum, softmax x seeds 1, 2), changed by ``section__field=value`` or
    ``key=value``."""
    raw = tiny_experiment.raw(seeds=[1, 2], task={"num_keys": [4, 8]}, model={"memory": ["linear/sum", "softmax"]})
    for path, val in changes.items():
        sec, _, key = path.partition("__")
        if key:
            raw[sec][key] = val
        else:
            raw[sec] = val
    return raw


def test_expand_is_the_product_of_list_leaves_times_seeds(tiny_experiment):
    runs = from_dict(base(tiny_experiment)).expand()
    assert len(runs) == 2 * 2 * 2
    combos = {(r.task.kwargs()["num_keys"], r.model.memory, r.seed) for r in runs}
    assert combos == {(s, m, seed) for s in (4, 8) for m in ("linear/sum", "softmax") for seed in (1, 2)}
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_id_is_canonical_and_round_trips(tiny_experiment):
    a = from_dict(base(tiny_experiment)).expand()
    b = from_dict(base(tiny_experiment)).expand()
    assert [r.run_id for r in a] == [r.run_id for r in b]
    r = a[0]
    assert RunConfig.from_dict(r.to_dict()) == r
    assert RunConfig.from_dict(r.to_dict()).run_id == r.run_id
    changed = from_dict(base(tiny_experiment, train__lr=2e-3)).expand()[0]
    assert changed.run_id != r.run_id


def test_override_applies_to_one_memory_only(tiny_experiment):
    raw = base(tiny_experiment)
    raw["override"] = [{"memory": "softmax", "train": {"lr": 1e-4, "batch_size": 128}}]
    runs = from_dict(raw).expand()
    for r in runs:
        if r.model.memory == "softmax":
            assert (r.train.lr, r.train.batch_size) == (1e-4, 128)
        else:
            assert (r.train.lr, r.train.batch_size) == (1e-3, 32)


def test_set_overrides_and_makes_axes(tiny_experiment):
    sets = ("task.num_keys=[4, 6, 8]", "model.memory=dpfp-1/delta", "train.lr=0.01")
    exp = from_dict(base(tiny_experiment), sets=sets)
    runs = exp.expand()
    assert {r.task.kwargs()["num_keys"] for r in runs} == {4, 6, 8}
    assert {r.model.memory for r in runs} == {"dpfp-1/delta"}
    assert all(r.train.lr == 0.01 for r in runs)
    assert parse_value("[1, 2]") == [1, 2] and parse_value("linear/sum") == "linear/sum"


@pytest.mark.parametrize("changes, field", [
    ({"model__memory": "linaer/sum"}, "model.memory"),
    ({"model__memory": "softmx"}, "model.memory"),
    ({"task__name": "capacty"}, "task.name"),
    ({"model__d_key": "64"}, "model.d_key"),
    ({"train__lr": "fast"}, "train.lr"),
    ({"train__batchsize": 32}, "train.batchsize"),
    ({"task__num_key": 4}, "task.num_key"),
    ({"task__num_keys": 0}, "num_keys"),
    ({"task__seq_len": 9}, "seq_len"),
    ({"model__memory": "dpfp-8/sum"}, "d_key"),
    ({"train__max_steps": 0}, "train.max_steps"),
    ({"model__memory": "tanh/fwm/sum+attn"}, "model.memory"),
    ({"seeds": []}, "seeds"),
    ({"trian": {}}, "trian"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_input_names_the_field(changes, field, tiny_experiment):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(base(tiny_experiment, **changes))


def test_misspelt_memory_suggests_close_match(tiny_experiment):
    with pytest.raises(ConfigError, match="did you mean 'softmax'"):
        from_dict(base(tiny_experiment, model__memory="softmx"))


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[task\nnum_keys = 3")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="did you mean quick"):
        load("quik")


@pytest.mark.parametrize("name", sorted(shipped_experiments()))
def test_shipped_experiments_load(name):
    exp = load(name)
    assert exp.name == name and exp.expand()


def test_a_list_of_tasks_is_an_axis_and_every_knob_must_suit_each():
    exp = from_dict({"name": "two", "task": {"name": ["capacity", "overwrite"], "num_keys": [4, 8]},
                     "model": {"memory": "softmax", "d_key": 8}})
    runs = exp.expand()
    assert sorted((r.task.name, dict(r.task.params)["num_keys"]) for r in runs) == [
        ("capacity", 4), ("capacity", 8), ("overwrite", 4), ("overwrite", 8)]
    assert len({r.run_id for r in runs}) == 4
    with pytest.raises(ConfigError, match="task.length_factor"):  # overwrite's knob, which capacity lacks
        from_dict({"name": "two", "task": {"name": ["capacity", "overwrite"], "length_factor": 2},
                   "model": {"memory": "softmax", "d_key": 8}})
    with pytest.raises(ConfigError, match="task.name"):
        from_dict({"name": "two", "task": {"name": ["capacity", "capacty"]}, "model": {"memory": "softmax"}})
