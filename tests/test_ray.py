"""The Ray executor (DESIGN §6): same results as the local executor, a killed worker costs at most its run.

One local Ray instance (2 CPUs) serves the whole module. The tests that start it are marked ``slow`` (its start
alone takes ~5 s) and skip where Ray is not installed (CI installs the ``ray`` extra); the one about the
missing-Ray message runs everywhere.
"""

from __future__ import annotations

import io
import sys
import types

import pytest
from click.testing import CliRunner
from rich.console import Console

from retrieval_bench.cli import main
from retrieval_bench.executors import InlineExecutor, execute
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep


def ray_tiny(**train) -> dict:
    """Changes to the tiny experiment: 8 runs (S = 4, 6 x linear/sum, softmax x seeds 1, 2), batch 8, 60 steps
    with an evaluation every 20, no diagnostics; ``train`` changes more."""
    return dict(name="ray-tiny", seeds=[1, 2], task={"num_keys": [4, 6]}, model={"memory": ["linear/sum", "softmax"]},
                train={"max_steps": 60, "eval_every": 20, "diagnostics": False, "batch_size": 8, **train})


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module; executors find it initialised and use it as it is."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _sweep(exp, store, executor):
    return run_sweep(exp, store, executor, live=False, console=Console(file=io.StringIO()))


def _runs(store):
    return store.load("runs").set_index("run_id")


@pytest.mark.slow
def test_ray_matches_local_and_resumes(ray_session, tmp_path, tiny_experiment, record_events):
    from retrieval_bench.ray_executor import RayExecutor

    exp = tiny_experiment.load(**ray_tiny())
    local = Store(tmp_path / "local.db")
    _sweep(exp, local, InlineExecutor(threads=1))
    ex = RayExecutor(threads_per_run=1)
    rec = record_events(ex)
    remote = Store(tmp_path / "ray.db")
    state = _sweep(exp, remote, rec)
    assert (state.done, state.failed, state.total) == (8, 0, 8)

    a, b = _runs(local), _runs(remote)
    assert sorted(a.index) == sorted(b.index) and len(b) == 8
    assert (b["status"] == "done").all()
    for rid in a.index:  # the same job function on one thread each: bit-for-bit the same losses
        assert b.loc[rid, "final_loss"] == a.loc[rid, "final_loss"], rid
        assert b.loc[rid, "steps"] == a.loc[rid, "steps"], rid

    # the live view saw every run start and per-evaluation progress from the workers
    assert {e["run_id"] for e in rec.started} == set(b.index)
    assert {e["run_id"] for e in rec.progress} == set(b.index)
    assert {e["step"] for e in rec.progress} == {20, 40, 60}
    assert all(e["eval_loss"] is not None for e in rec.progress)

    # resume: everything is stored, so the same sweep runs nothing
    again = _sweep(exp, remote, ex)
    assert (again.total, again.skipped) == (0, 8)
    ex.close()
    assert ray_session.is_initialized()  # a session the executor did not start is left running


def _dying_job(marker_dir: str, die_once: str, die_always: str, raises: str):
    """A job that kills its worker: once for one run (Ray retries it), every time for another; and raises for
    a third. A closure, so that Ray ships it by value (the tests directory is not importable on the
    workers)."""

    def job(cfg, progress_queue=None):
        import os
        import pathlib

        from retrieval_bench.executors import as_run, execute

        rid = as_run(cfg).run_id
        if rid == die_always:
            os._exit(1)
        if rid == raises:
            raise RuntimeError("boom")
        if rid == die_once:
            marker = pathlib.Path(marker_dir) / f"{rid}.died"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), 9)
        return execute(cfg, progress_queue)

    return job


@pytest.mark.slow
def test_killed_worker_is_retried_or_stored_failed(ray_session, tmp_path, tiny_experiment):
    from retrieval_bench.ray_executor import RayExecutor

    # each run alone (group = 1): the job decides per run (tests/test_group.py and the next test cover groups)
    exp = tiny_experiment.load(**{**ray_tiny(max_steps=20, group=1), "model": {"memory": "linear/sum"}})
    ids = [r.run_id for r in exp.expand()]
    assert len(ids) == 4
    once, always, raises = ids[0], ids[1], ids[2]
    store = Store(tmp_path / "runs.db")
    ex = RayExecutor(threads_per_run=1, max_retries=1, job=_dying_job(str(tmp_path), once, always, raises))
    state = _sweep(exp, store, ex)
    runs = _runs(store)
    assert sorted(runs.index) == sorted(ids)  # every run has its row, none lost
    assert (tmp_path / f"{once}.died").exists()
    assert runs.loc[once, "status"] == "done"  # retried by Ray after its worker was killed
    assert runs.loc[always, "status"] == "failed"
    assert "WorkerCrashedError" in runs.loc[always, "error"]
    assert runs.loc[raises, "status"] == "failed" and "boom" in runs.loc[raises, "error"]
    assert (runs.drop(index=[always, raises])["status"] == "done").all()
    assert (state.done, state.failed) == (2, 2)

    # a rerun retries only the failed runs, which now succeed
    rerun = _sweep(exp, store, RayExecutor(threads_per_run=1, job=execute))
    assert (rerun.total, rerun.skipped, rerun.done) == (2, 2, 2)
    assert (_runs(store)["status"] == "done").all()


def _group_killer():
    """A job that kills its worker for every group and runs a run alone as usual (a closure: Ray ships it)."""

    def job(item, progress_queue=None):
        import os

        from retrieval_bench.executors import execute

        if isinstance(item, list):
            os._exit(1)
        return execute(item, progress_queue)

    return job


@pytest.mark.slow
def test_a_group_lost_on_ray_reruns_its_runs_alone(ray_session, tmp_path, tiny_experiment, record_events):
    from retrieval_bench.ray_executor import RayExecutor

    exp = tiny_experiment.load(**{**ray_tiny(max_steps=20, group=2), "model": {"memory": "linear/sum"}})
    store = Store(tmp_path / "runs.db")
    ex = record_events(RayExecutor(threads_per_run=1, max_retries=0, job=_group_killer()))
    state = _sweep(exp, store, ex)
    runs = _runs(store)
    assert len(runs) == 4 and (state.failed, state.done) == (0, 4) and (runs["status"] == "done").all()
    starts = [e["run_id"] for e in ex.started]  # two groups of two, each lost, then each run alone
    assert sorted(starts) == sorted(list(runs.index) * 2)


@pytest.mark.slow
def test_cli_runs_a_sweep_on_ray(ray_session, tmp_path, tiny_experiment):
    toml = tiny_experiment.toml(name="ray-cli", seeds=[1, 2], train={"diagnostics": False, "batch_size": 8})
    db = tmp_path / "cli.db"
    args = ["run", str(toml), "--executor", "ray", "--cpus-per-run", "1", "--store", str(db), "--no-report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (_runs(Store(db))["status"] == "done").sum() == 2
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "0 runs to do, 2 already stored" in result.output
    assert ray_session.is_initialized()


def test_without_ray_the_cli_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(main, ["run", "quick", "--executor", "ray", "--store", str(tmp_path / "r.db"),
                                       "--no-report"])
    assert result.exit_code == 2
    assert "pip install 'retrieval-bench[ray]'" in result.output


class _FakeRay(types.SimpleNamespace):
    """Stands in for the ``ray`` module to check what the executor starts and stops, without a cluster."""

    def __init__(self, initialized=False, cpus=2):
        super().__init__(calls=[], _init=initialized, _cpus=cpus)

    def is_initialized(self):
        return self._init

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self._init = True

    def shutdown(self):
        self.calls.append(("shutdown",))
        self._init = False

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": float(self._cpus)}}]

    def cluster_resources(self):
        return {"CPU": float(self._cpus)}


def test_connect_and_close(monkeypatch):
    pytest.importorskip("ray")
    from retrieval_bench import ray_executor
    from retrieval_bench.ray_executor import RayExecutor

    # a local instance it starts: sized by num_cpus, shut down by close()
    fake = _FakeRay()
    monkeypatch.setattr(ray_executor, "ray", fake)
    ex = RayExecutor(threads_per_run=2, num_cpus=2)
    ex._connect()
    assert fake.calls[0] == ("init", {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False,
                                      "ignore_reinit_error": True})
    assert ex.workers == 1
    ex.close()
    assert fake.calls[-1] == ("shutdown",)

    # a cluster given by address: connected to; close() only disconnects this driver (ray.shutdown in a
    # driver that joined a `ray start` cluster stops nothing of the cluster)
    fake = _FakeRay()
    monkeypatch.setattr(ray_executor, "ray", fake)
    ex = RayExecutor(address="head:6379")
    ex._connect()
    assert fake.calls[0][1]["address"] == "head:6379" and "num_cpus" not in fake.calls[0][1]

    # a session that already exists is used as it is and left running
    fake = _FakeRay(initialized=True)
    monkeypatch.setattr(ray_executor, "ray", fake)
    ex = RayExecutor()
    ex._connect()
    ex.close()
    assert fake.calls == [] and fake.is_initialized()

    # more CPUs per run than any node has: an error, not a sweep that waits forever
    fake = _FakeRay(cpus=2)
    monkeypatch.setattr(ray_executor, "ray", fake)
    with pytest.raises(ValueError, match="cpus-per-run 4"):
        RayExecutor(threads_per_run=4)._connect()

    # nothing to run: Ray is not even started
    fake = _FakeRay()
    monkeypatch.setattr(ray_executor, "ray", fake)
    assert list(RayExecutor().run([])) == []
    assert fake.calls == []


def test_gpus_per_run_sets_capacity_and_where_runs_train():
    """--gpus-per-run: a run takes its share of a GPU (capacity counts GPUs then), and a task that reserved none
    trains on the CPU even where device = "auto" would find one; an explicit device stays."""
    pytest.importorskip("ray")
    from retrieval_bench.config import RunConfig
    from retrieval_bench.ray_executor import RayExecutor, capacity, on_cpu_unless_given_gpus

    assert capacity({"CPU": 16.0, "GPU": 2.0}, 1) == 16
    assert capacity({"CPU": 16.0, "GPU": 2.0}, 1, 0.25) == 8
    assert capacity({"CPU": 4.0, "GPU": 2.0}, 2, 0.5) == 2
    assert capacity({"CPU": 16.0}, 1, 1.0) == 1  # never below one
    cfg = RunConfig.from_dict({"experiment": "x", "seed": 1, "task": {"name": "capacity", "num_keys": 4},
                               "model": {"memory": "softmax", "d_key": 4}, "train": {}})
    assert cfg.train.device == "auto"
    cpu = on_cpu_unless_given_gpus(cfg, 0.0)
    assert cpu.train.device == "cpu" and cpu.run_id == cfg.run_id
    assert on_cpu_unless_given_gpus(cfg, 0.5) is cfg
    explicit = RunConfig.from_dict({**cfg.to_dict(), "train": {"device": "cuda"}})
    assert on_cpu_unless_given_gpus(explicit, 0.0).train.device == "cuda"
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="gpus-per-run"):
            RayExecutor(gpus_per_run=bad)


def test_gpus_per_run_needs_ray(tmp_path):
    res = CliRunner().invoke(main, ["run", "quick", "--store", str(tmp_path / "s.db"), "--gpus-per-run", "1"])
    assert res.exit_code == 2 and "--gpus-per-run: only with --executor ray" in res.output, res.output
    assert not (tmp_path / "s.db").exists()


def test_auto_is_read_as_the_device_setting_reads_it():
    pytest.importorskip("ray")
    from retrieval_bench.config import RunConfig
    from retrieval_bench.ray_executor import on_cpu_unless_given_gpus

    cfg = RunConfig.from_dict({"experiment": "x", "seed": 1, "task": {"name": "capacity", "num_keys": 4},
                               "model": {"memory": "softmax", "d_key": 4}, "train": {"device": " AUTO "}})
    assert on_cpu_unless_given_gpus(cfg, 0.0).train.device == "cpu"


def test_a_slow_progress_drain_loses_no_events(monkeypatch):
    """A drain that does not answer within its time-out is read on the next call, not called again: the events it
    took from the progress actor (a group's finished records among them) still arrive."""
    pytest.importorskip("ray")
    from ray.exceptions import GetTimeoutError

    from retrieval_bench import ray_executor
    from retrieval_bench.ray_executor import RayExecutor

    class Actor:
        def __init__(self):
            self.calls = 0
            self.drain = types.SimpleNamespace(remote=self._remote)

        def _remote(self):
            self.calls += 1
            return f"ref{self.calls}"

    answers = {"ref1": [[{"step": 1}, {"result": {"run_id": "a"}}], None]}  # ref1 times out once, then answers

    def get(ref, timeout=None):
        pending = answers[ref]
        if pending[-1] is None:
            pending.pop()
            raise GetTimeoutError("slow")
        return pending[0]

    monkeypatch.setattr(ray_executor, "ray", types.SimpleNamespace(get=get))
    ex = RayExecutor()
    ex._progress_actor = actor = Actor()
    seen = []
    assert ex._drain(seen.append) == [] and seen == []
    assert ex._drain(seen.append) == [{"run_id": "a"}] and seen == [{"step": 1}]
    assert actor.calls == 1  # the timed-out call was awaited again, not replaced
