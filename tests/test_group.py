"""Many runs per step (group.py): a run's record in a group equals its record alone; groups form from runs of one
shape only; a group's finished runs reach the store at once, and a dead worker, a killed driver and resume treat
every run of a group as they treat a run alone.

Records are compared within float tolerance: the stacked front end's batched matmuls may round differently
from a run's own (on this CPU they mostly agree to the bit).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_sweep_killed  # tests/ is on sys.path

from retrieval_bench.config import from_dict
from retrieval_bench.executors import InlineExecutor, LocalExecutor, execute
from retrieval_bench.families.retrieval import RetrievalFamily
from retrieval_bench.group import CPU_GROUP_AUTO, form_groups, group_size, shape_key, spread, train_group
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep
from retrieval_bench.train import _Run, train_run

RTOL = 1e-5


def runs(memory="dpfp-1/sum", seeds=(1, 2), lrs=(1e-3, 3e-3), num_keys=6, **train):
    raw = {"name": "g", "seeds": list(seeds),
           "task": {"name": "capacity", "num_keys": num_keys, "eval_sequences": 4},
           "model": {"memory": memory, "d_key": 8},
           "train": {"eval_every": 10, "max_steps": 40, "batch_size": 8, "lr": list(lrs), "diagnostics": True,
                     "diag_positions": 8, **train}}
    return from_dict(raw).expand()


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-7)


def assert_same_record(solo: dict, grouped: dict, diag_rtol: float = RTOL) -> None:
    a, b = solo["row"], grouped["row"]
    for key in ("run_id", "status", "stop_reason", "steps", "state_size", "d_dot"):
        assert a.get(key) == b.get(key), (key, a.get(key), b.get(key))
    for key in ("final_loss", "best_loss", "final_acc"):
        assert close(a[key], b[key]), (key, a[key], b[key])
    for rows, rtol in (("curves", RTOL), ("diagnostics", diag_rtol)):
        assert len(solo[rows]) == len(grouped[rows]), rows
        for x, y in zip(solo[rows], grouped[rows], strict=True):
            assert x[:-1] == y[:-1] and (close(x[-1], y[-1]) or math.isclose(x[-1], y[-1], rel_tol=rtol)), (
                rows, x, y)


def by_id(results) -> dict[str, dict]:
    return {r["row"]["run_id"]: r for r in results}


# --- a run's record does not depend on its group --------------------------------------------------------------

@pytest.mark.parametrize("memory", ["dpfp-1/sum", "linear/delta/sum", "softmax", "linear/gated-delta",
                                    "linear/generalised-delta", "tanh/fwm"])
def test_grouped_records_equal_solo_records(memory):
    cfgs = runs(memory, num_keys=6 if memory != "tanh/fwm" else 4)
    solo = {c.run_id: train_run(c) for c in cfgs}
    grouped = by_id(train_group(cfgs))
    assert sorted(grouped) == sorted(solo)
    for rid in solo:
        assert_same_record(solo[rid], grouped[rid])


def lm_runs(memory, seeds=(1, 2), lrs=(3e-3, 1e-2), **train):
    raw = {"name": "l", "seeds": list(seeds),
           "task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "eval_sequences": 16},
           "model": {"kind": "lm", "memory": memory, "d_model": 16, "n_heads": 2, "conv": 4},
           "train": {"batch_size": 8, "lr": list(lrs), "max_steps": 20, "eval_every": 10, "warmup": 0.1,
                     "schedule": "cosine", "grad_clip": 1.0, "weight_decay": 0.1, "diag_positions": 8, **train}}
    return from_dict(raw).expand()


@pytest.mark.parametrize("memory", ["softmax", "linear/sum", "linear/delta", "linear/gated-delta",
                                    "linear/generalised-delta"])
def test_grouped_language_models_equal_solo_ones(memory):
    # the stacked embedding, norms, convolution, projections and MLP; each run's clipping, AdamW and schedule
    cfgs = lm_runs(memory, lrs=(3e-3,)) + lm_runs(memory, seeds=(3,), lrs=(1e-2,), max_steps=10)
    assert len({shape_key(c) for c in cfgs}) == 1
    solo = {c.run_id: train_run(c) for c in cfgs}
    grouped = by_id(train_group(cfgs))
    for rid in solo:  # the per-head diagnostics (differences of near-equal terms) to 1e-4
        assert_same_record(solo[rid], grouped[rid], diag_rtol=1e-4)


def test_a_failing_group_step_lets_each_run_go_on_alone(monkeypatch):
    cfgs = runs("dpfp-1/sum")
    solo = {c.run_id: train_run(c) for c in cfgs}
    real, calls = RetrievalFamily.group_loss, []

    def fails_on_the_third(self, models, batches):  # as a GPU out of memory would, at step 3
        calls.append(len(models))
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, models, batches)

    monkeypatch.setattr(RetrievalFamily, "group_loss", fails_on_the_third)
    grouped = by_id(train_group(cfgs))
    assert calls == [4, 4, 4]  # no group step after the failure: the runs went on alone from step 3
    for rid in solo:  # each with the batch it had drawn for step 3, so its record is still its own
        assert_same_record(solo[rid], grouped[rid])


def test_records_say_how_many_runs_trained_together_and_bad_ids_are_refused():
    cfgs = runs(seeds=(1, 2, 3), lrs=(1e-3,))
    grouped = list(train_group(cfgs))
    assert [r["row"]["config"]["train"]["group"] for r in grouped] == [3, 3, 3]
    assert train_run(cfgs[0])["row"]["config"]["train"]["group"] == 1
    assert all(r["row"]["run_id"] in {c.run_id for c in cfgs} for r in grouped)  # the id ignores it
    run = _Run(cfgs[0], None)
    batch = run.batch()
    RetrievalFamily().check_batch(run.model, batch)
    bad = type(batch)(batch.keys, batch.values + run.model.num_values, batch.query, batch.target)
    with pytest.raises(ValueError, match="values ids must lie in"):
        RetrievalFamily().check_batch(run.model, bad)


def test_runs_that_stop_early_leave_the_group_at_their_own_step():
    # protocol scalars may differ within a group: each run keeps its own cadence, cap and stop rule
    cfgs = [*runs(max_steps=15, eval_every=5), *runs(seeds=(3,), max_steps=40, eval_every=10),
            *runs(seeds=(4,), lrs=(1e-12,), patience=1, max_steps=60, stop_loss=0.0)]
    assert len({shape_key(c) for c in cfgs}) == 1
    order = [r["row"]["run_id"] for r in train_group(cfgs)]
    solo = {c.run_id: train_run(c) for c in cfgs}
    grouped = by_id(train_group(cfgs))
    steps = {rid: solo[rid]["row"]["steps"] for rid in solo}
    assert sorted(set(steps.values())) == [15, 20, 40]  # lr 1e-12 ends by patience at its second evaluation
    assert [steps[rid] for rid in order] == sorted(steps[rid] for rid in order)  # handed back as they end
    for rid in solo:
        assert_same_record(solo[rid], grouped[rid])
        assert grouped[rid]["row"]["wall_s"] > 0


def test_a_diverging_run_ends_alone_and_leaves_the_others_untouched():
    cfgs = [*runs(lrs=(1e-3,)), *runs(seeds=(5,), lrs=(1e30,))]  # a rate that overflows: NaN from step 2
    solo = {c.run_id: train_run(c) for c in cfgs}
    grouped = by_id(train_group(cfgs))
    statuses = sorted(r["row"]["status"] for r in solo.values())
    assert statuses == ["diverged", "done", "done"]
    for rid in solo:
        assert_same_record(solo[rid], grouped[rid])


def test_one_group_step_gives_each_run_its_own_loss_and_gradients():
    cfgs = runs("linear/generalised-delta", lrs=(1e-3,), seeds=(1, 2, 3))
    fam, group = RetrievalFamily(), [_Run(c, None) for c in cfgs]
    batches = [r.batch() for r in group]
    alone = []
    for r, b in zip(group, batches, strict=True):
        loss = fam.train_loss(r.model, b)
        grads = torch.autograd.grad(loss, list(r.model.parameters()))
        alone.append((loss.detach(), grads))
    losses = fam.group_loss([r.model for r in group], batches)
    for i, r in enumerate(group):  # each run's loss and gradient from the stacked step
        grads = torch.autograd.grad(losses[i], list(r.model.parameters()), retain_graph=True)
        torch.testing.assert_close(losses[i], alone[i][0], rtol=1e-6, atol=1e-7)
        for g, h in zip(grads, alone[i][1], strict=True):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
        others = [p for j, q in enumerate(group) if j != i for p in q.model.parameters()]
        assert all(g is None or not g.any()
                   for g in torch.autograd.grad(losses[i], others, retain_graph=True, allow_unused=True))


def test_memories_with_state_of_their_own_train_alone_in_their_group():
    cfgs = runs("favor-8/sum")
    fam = RetrievalFamily()
    assert "holds a state" in fam.group_blocker(_Run(cfgs[0], None).model)
    assert "holds a state" in fam.group_blocker(_Run(runs("hedgehog/sum")[0], None).model)
    assert fam.group_blocker(_Run(runs("dpfp-2/delta")[0], None).model) is None
    solo = {c.run_id: train_run(c) for c in cfgs}
    grouped = by_id(train_group(cfgs))
    for rid in solo:
        assert_same_record(solo[rid], grouped[rid])


def test_a_run_that_cannot_be_built_fails_alone():
    good = runs(lrs=(1e-3,), seeds=(1,))
    bad = runs(lrs=(1e-3,), seeds=(2,), max_steps=10)[0]
    broken = type(bad)(bad.experiment, bad.task, bad.model.__class__(**{**bad.model.__dict__, "memory": "nope"}),
                       bad.train, bad.seed)
    results = by_id(train_group([*good, broken]))
    assert results[broken.run_id]["row"]["status"] == "failed"
    assert results[good[0].run_id]["row"]["status"] == "done"


# --- which runs form a group ------------------------------------------------------------------------------------

def test_groups_hold_runs_of_one_shape_as_evenly_as_they_can():
    cfgs = runs(seeds=(1, 2, 3, 4, 5, 6, 7), lrs=(1e-3,), group=4) + runs(memory="softmax", group=4)
    items = form_groups(cfgs)
    sizes = [len(i) if isinstance(i, list) else 1 for i in items]
    assert sizes == [4, 3, 4]
    for item in items:
        assert len({shape_key(c) for c in item}) == 1
    # another d_key, task size or batch size is another shape; language models group among themselves
    other = runs(num_keys=8, group=4) + runs(batch_size=4, group=4)
    assert [len(i) for i in form_groups(cfgs[:2] + other)] == [2, 4, 4]
    lm = lm_runs("linear/sum", group=4)
    assert [len(i) for i in form_groups(lm + cfgs[:2])] == [4, 2]


def test_groups_are_split_evenly_until_every_worker_has_one():
    cfgs = runs(seeds=(1, 2, 3, 4), lrs=(1e-3, 3e-3), group=8)
    assert [len(i) for i in form_groups(cfgs, workers=1)] == [8]
    assert [len(i) for i in form_groups(cfgs, workers=2)] == [4, 4]
    assert [len(i) for i in form_groups(cfgs, workers=3)] == [3, 3, 2]
    assert form_groups(cfgs, workers=20) == cfgs
    # the largest parts split first; runs alone stay as they are
    items = [cfgs[:6], cfgs[6], cfgs[7:]]
    assert [len(i) if isinstance(i, list) else 1 for i in spread(items, 4)] == [3, 3, 1, 1]
    # a device named by the executor decides "auto": 16 on a GPU, whatever this machine has
    big = runs(seeds=tuple(range(1, 19)), lrs=(1e-3,), num_keys=64, batch_size=32)
    assert [len(i) for i in form_groups(big, device="cuda")] == [9, 9]
    assert form_groups(big, device="cpu") == big


def test_group_auto_on_the_cpu_groups_small_steps_only_and_one_means_alone():
    small, large = runs(device="cpu"), runs(device="cpu", num_keys=64, batch_size=32)  # 48 and 2048 pairs a step
    assert group_size(small[0]) == CPU_GROUP_AUTO and [len(i) for i in form_groups(small)] == [4]
    assert group_size(large[0]) == 1 and form_groups(large) == large
    assert form_groups(runs(group=1)) == runs(group=1)
    overwrite = from_dict({"name": "o", "task": {"name": "overwrite", "num_keys": 20},  # L = 2S = 40
                           "model": {"memory": "linear/sum", "d_key": 8},
                           "train": {"batch_size": 32, "device": "cpu"}}).expand()[0]
    assert group_size(overwrite) == 1  # 32 · 40 pairs
    if not torch.cuda.is_available():
        assert group_size(runs()[0]) == CPU_GROUP_AUTO


# --- sweeps: the store, a dead worker, a killed driver ---------------------------------------------------------

def sweep(steps: int, **train) -> dict:
    """8 runs in 2 shapes of 4 (linear/sum and softmax, S = 4, seeds 1-2, lr 1e-3 and 3e-3)."""
    return dict(seeds=[1, 2], model={"memory": ["linear/sum", "softmax"]},
                train={"eval_every": 10, "max_steps": steps, "stop_loss": 0.0, "patience": 100,
                       "diagnostics": False, "lr": [1e-3, 3e-3], **train})


def test_a_grouped_sweep_stores_what_a_solo_sweep_stores(tmp_path, tiny_experiment, record_events):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    run_sweep(tiny_experiment.load(**sweep(20, group=1)), a, InlineExecutor(threads=1), live=False)
    ex = record_events(InlineExecutor(threads=1))
    state = run_sweep(tiny_experiment.load(**sweep(20, group=4)), b, ex, live=False)
    assert state.done == 8
    ra, rb = (s.load("runs").set_index("run_id").sort_index() for s in (a, b))
    assert ra.index.equals(rb.index) and (ra["steps"] == rb["steps"]).all()
    assert ((ra["final_loss"] - rb["final_loss"]).abs() <= RTOL * ra["final_loss"].abs()).all()
    assert {e["run_id"] for e in ex.started} == set(ra.index)
    assert {(e["run_id"], e["step"]) for e in ex.progress} == {(i, s) for i in ra.index for s in (10, 20)}
    again = run_sweep(tiny_experiment.load(**sweep(20, group=4)), b, InlineExecutor(threads=1), live=False)
    assert again.total == 0 and again.skipped == 8  # the group setting is no part of a run's identity


def _streams_one_then_dies(item, progress_queue=None):
    """A job that, for the group whose first run is RB_TEST_DIES_FOR, trains and hands on that first run alone,
    then kills its worker (once: a marker file in RB_TEST_MARKERS); every other item runs normally. Only one
    group may die: were both to race, the first death could kill the other worker before it handed its first
    run on. Module-level, so that pool workers import it."""
    marker = Path(os.environ["RB_TEST_MARKERS"]) / "died"
    if (isinstance(item, list) and item[0].run_id == os.environ["RB_TEST_DIES_FOR"]
            and not marker.exists()):
        first = execute(item[0])
        progress_queue.put({"run_id": first["row"]["run_id"], "result": first})
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return execute(item, progress_queue)


@pytest.mark.slow
def test_a_dead_worker_reruns_only_the_unfinished_runs_of_its_group(tmp_path, monkeypatch, tiny_experiment):
    monkeypatch.setenv("RB_TEST_MARKERS", str(tmp_path))
    exp = tiny_experiment.load(**sweep(20, group=4))
    items = form_groups(exp.expand())
    assert [len(i) for i in items] == [4, 4]
    monkeypatch.setenv("RB_TEST_DIES_FOR", items[0][0].run_id)
    starts: dict[str, int] = {}

    def count(ev):
        starts[ev["run_id"]] = starts.get(ev["run_id"], 0) + 1

    ex = LocalExecutor(workers=2, max_retries=1, job=_streams_one_then_dies)
    results = list(ex.run(items, count))
    ids = [r.run_id for r in exp.expand()]
    assert sorted(r["row"]["run_id"] for r in results) == sorted(ids)  # each stored once
    assert all(r["row"]["status"] == "done" for r in results)
    first = items[0][0].run_id
    # the group that died handed on its first run: that one never reran; the rest of its group reran alone
    assert (tmp_path / "died").exists() and starts[first] == 1
    assert sum(1 for v in starts.values() if v == 2) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_killed_driver_keeps_the_runs_its_groups_finished(tmp_path, tiny_experiment, workers):
    # in each group of 4, the two runs capped at 30 steps end long before the two at 3000
    toml = tiny_experiment.toml(seeds=[1, 2], model={"memory": ["linear/sum", "softmax"]},
                                train={"eval_every": 10, "max_steps": [30, 3000], "stop_loss": 0.0,
                                       "patience": 1000, "diagnostics": False, "group": 4})
    db = tmp_path / "r.db"
    cmd = cli_sweep_killed(toml, db, workers)
    kept = Store(db).load("runs")
    assert 2 <= len(kept) < 8 and (kept["steps"] == 30).all(), "the short runs are stored while groups train on"
    done = subprocess.run([*cmd, "--set", "train.max_steps=[30, 40]"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    runs_ = Store(db).load("runs")
    assert set(kept["run_id"]) <= set(runs_["run_id"]) and runs_["run_id"].is_unique
    after = runs_.set_index("run_id")["final_loss"]
    assert (after[kept["run_id"]].values == kept["final_loss"].values).all()  # kept, not redone


def test_cli_group_option_sets_the_groups_and_refuses_nonsense(tiny_experiment):
    from click.testing import CliRunner

    from retrieval_bench.cli import main

    toml = str(tiny_experiment.toml(seeds=[1, 2, 3], model={"memory": ["linear/sum", "softmax"]}))
    out = CliRunner().invoke(main, ["run", toml, "--dry-run", "--group", "2"])
    assert out.exit_code == 0, out.output
    assert "6 runs in experiment" in out.output  # 3 of each shape: a group of 2 and a run alone
    assert "4 of them in 2 groups of up to 2 runs" in out.output
    alone = CliRunner().invoke(main, ["run", toml, "--dry-run", "--group", "1"])
    assert alone.exit_code == 0 and "groups" not in alone.output
    for bad in ("0", "x", "-2"):
        refused = CliRunner().invoke(main, ["run", toml, "--dry-run", "--group", bad])
        assert refused.exit_code == 2 and "--group" in refused.output, (bad, refused.output)
    broken = CliRunner().invoke(main, ["run", toml, "--dry-run", "--set", "train.group=0"])
    assert broken.exit_code == 2 and "train.group: must be 'auto' or a number of runs >= 1" in broken.output
