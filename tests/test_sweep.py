"""Sweeps: resume skips stored runs; the process pool gives the inline numbers; a driver killed mid-way loses no
finished run and completes later, and leaves no process behind.

Every test that starts a process pool or a driver process is marked ``slow`` (5-25 s each on two busy cores):
``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_sweep_killed, count_runs, default_sigint  # tests/ is on sys.path

from retrieval_bench.executors import InlineExecutor, LocalExecutor
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep


def sweep(steps: int) -> dict:
    """Changes to the tiny experiment: 8 runs (S = 4, 6 x linear/sum, softmax x seeds 1, 2) of ``steps`` steps
    each, none stopping early, no diagnostics."""
    return dict(seeds=[1, 2], task={"num_keys": [4, 6]}, model={"memory": ["linear/sum", "softmax"]},
                train={"eval_every": 10, "max_steps": steps, "stop_loss": 0.0, "patience": 100,
                       "diagnostics": False})


def test_resume_skips_finished_runs(tmp_path, tiny_experiment):
    st = Store(tmp_path / "r.db")
    exp = tiny_experiment.load(**sweep(30))
    first = run_sweep(exp, st, InlineExecutor(threads=1), live=False)
    assert first.done == 8 and first.skipped == 0
    again = run_sweep(exp, st, InlineExecutor(threads=1), live=False)
    assert again.total == 0 and again.skipped == 8
    rerun = run_sweep(exp, st, InlineExecutor(threads=1), rerun=True, live=False)
    assert rerun.done == 8 and len(st.load("runs")) == 8


@pytest.mark.slow
def test_process_pool_gives_the_same_numbers_as_inline_and_reports_progress(tmp_path, tiny_experiment,
                                                                             record_events):
    exp = tiny_experiment.load(**sweep(20))
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    run_sweep(exp, a, InlineExecutor(threads=1), live=False)
    pool = record_events(LocalExecutor(workers=2))
    run_sweep(exp, b, pool, live=False)
    fa = a.load("runs").set_index("run_id")["final_loss"].sort_index()
    fb = b.load("runs").set_index("run_id")["final_loss"].sort_index()
    assert fa.index.equals(fb.index) and (fa == fb).all()
    ids = {r.run_id for r in exp.expand()}
    assert set(fb.index) == ids
    assert {e["run_id"] for e in pool.started} == ids
    # each run's evaluations (every 10 steps) reach the driver from the worker that trained it
    assert {(e["run_id"], e["step"]) for e in pool.progress} == {(i, s) for i in ids for s in (10, 20)}


def _dying_job(cfg, progress_queue=None):
    """A job that kills its worker: once for the run named by RB_TEST_DIE_ONCE, every time for RB_TEST_DIE_ALWAYS.
    Module-level, so that the pool's workers can import it; the workers inherit the environment.

    RB_TEST_DIE_ALWAYS dies only once RB_TEST_DIE_ONCE's marker is there: started together, the two would race,
    and were `always` to break the pool first, the pool would kill `once`'s worker before it left its marker, and
    `once` would then die a second time, alone (one start more than the test counts). The wait is bounded, so a
    driver that never starts `once` fails the test instead of hanging it."""
    from retrieval_bench.executors import as_run, execute

    rid = as_run(cfg).run_id
    if rid == os.environ["RB_TEST_DIE_ALWAYS"]:
        once_died = Path(os.environ["RB_TEST_MARKERS"]) / f"{os.environ['RB_TEST_DIE_ONCE']}.died"
        deadline = time.monotonic() + 300
        while not once_died.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(1)
    if rid == os.environ["RB_TEST_DIE_ONCE"]:
        marker = Path(os.environ["RB_TEST_MARKERS"]) / f"{rid}.died"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return execute(cfg, progress_queue)


@pytest.mark.slow
def test_dead_worker_fails_only_its_own_run(tmp_path, monkeypatch, tiny_experiment):
    exp = tiny_experiment.load(**sweep(20))
    ids = [r.run_id for r in exp.expand()]
    once, always = ids[0], ids[1]  # started together on two workers, so each breaks a pool the other shares
    monkeypatch.setenv("RB_TEST_DIE_ONCE", once)
    monkeypatch.setenv("RB_TEST_DIE_ALWAYS", always)
    monkeypatch.setenv("RB_TEST_MARKERS", str(tmp_path))
    starts: dict[str, int] = {}

    def count(ev):
        starts[ev["run_id"]] = starts.get(ev["run_id"], 0) + 1

    ex = LocalExecutor(workers=2, max_retries=1, job=_dying_job)
    rows = {res["row"]["run_id"]: res["row"] for res in ex.run([r.to_dict() for r in exp.expand()], count)}
    assert sorted(rows) == sorted(ids)  # every run has its row, none lost or doubled
    assert (tmp_path / f"{once}.died").exists()
    assert rows[always]["status"] == "failed" and "worker process died" in rows[always]["error"]
    assert all(rows[i]["status"] == "done" for i in ids if i != always)
    # the shared pool broke: both reran alone; `once` then finished, `always` broke its own pool twice
    # (1 + max_retries) and was stored failed; no other run was ever in flight beside a dying one
    assert starts == {i: 3 if i == always else 2 if i == once else 1 for i in ids}


@pytest.mark.slow
def test_killed_driver_loses_no_finished_run_and_completes_without_duplicates(tmp_path, tiny_experiment):
    toml = tiny_experiment.toml(**sweep(150))
    db = tmp_path / "r.db"
    cmd = cli_sweep_killed(toml, db)
    kept = count_runs(db)
    assert 2 <= kept < 8, "the kill should land mid-sweep"
    before = Store(db).load("runs").set_index("run_id")["final_loss"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{8 - kept} runs to do, {kept} already stored" in done.stderr
    runs = Store(db).load("runs")
    assert len(runs) == 8 and runs["run_id"].is_unique and (runs["status"] == "done").all()
    after = runs.set_index("run_id")["final_loss"]
    assert (after[before.index] == before).all()  # finished runs were kept, not redone


def _processes():
    """(pid, state, ppid, pgrp, cmdline) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        yield int(entry.name), state, int(ppid), int(pgrp), cmdline


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: orphans are reparented to a pid 1 that, in a
    container, may never reap them, so a finished process can linger as a zombie and must not count."""
    return [pid for pid, state, _, pgrp, _ in _processes() if pgrp == pgid and state != "Z"]


def _pool_sweep(toml: Path, stderr) -> tuple[subprocess.Popen, Path]:
    """Start a two-worker sweep of ``toml`` in a process group of its own, as a terminal runs it."""
    db = toml.with_name("r.db")
    cmd = [sys.executable, "-m", "retrieval_bench", "run", str(toml), "--store", str(db), "--workers", "2",
           "--no-report"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    return proc, db


def _start_pool_sweep(toml: Path, stderr=subprocess.PIPE) -> tuple[subprocess.Popen, Path]:
    """``_pool_sweep``, returned once two runs are stored."""
    proc, db = _pool_sweep(toml, stderr)
    deadline = time.time() + 120
    while count_runs(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return proc, db


def _group_gone(pgid: int, seconds: float = 20) -> bool:
    """Whether the process group empties within ``seconds`` (workers notice a dead driver within a few)."""
    deadline = time.time() + seconds
    while _group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)
    return not _group_alive(pgid)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")


@pytest.mark.slow
@needs_proc
def test_ctrl_c_exits_130_keeps_finished_runs_and_leaves_no_process(tiny_experiment):
    proc, db = _start_pool_sweep(tiny_experiment.toml(**sweep(400)))
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver and its workers alike
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: every finished run is stored" in err
    assert "Traceback" not in err
    kept = count_runs(db)
    assert 2 <= kept < 8, "the interrupt should land mid-sweep"
    assert _group_gone(proc.pid), "a worker or helper process outlived the interrupted sweep"


@pytest.mark.slow
@needs_proc
def test_driver_killed_while_its_workers_start_leaves_no_process_behind(tmp_path, tiny_experiment):
    with open(tmp_path / "err.txt", "w") as err:
        proc, _ = _pool_sweep(tiny_experiment.toml(**sweep(400)), stderr=err)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _spawned_children(proc.pid):
        time.sleep(0.02)
    assert _spawned_children(proc.pid), "the driver should have started its workers"
    proc.kill()  # while the workers are still importing torch, before they can watch their parent
    proc.wait(timeout=60)
    assert _group_gone(proc.pid), "a worker outlived a driver killed while it started"


def _spawned_children(pid: int) -> list[int]:
    """Pool workers (spawned processes) whose parent is ``pid``."""
    return [p for p, _, ppid, _, cmdline in _processes() if ppid == pid and b"spawn_main" in cmdline]


@pytest.mark.slow
@needs_proc
def test_killed_pool_driver_leaves_no_process_behind(tmp_path, tiny_experiment):
    # stderr to a file, not a pipe: a surviving child would hold a pipe open and hang the read
    with open(tmp_path / "err.txt", "w") as err:
        proc, _ = _start_pool_sweep(tiny_experiment.toml(**sweep(400)), stderr=err)
    proc.kill()  # SIGKILL: the driver cannot tell anything to stop
    proc.wait(timeout=60)
    assert _group_gone(proc.pid), "a worker or helper process outlived its SIGKILLed driver"
