"""Sweeps: resume skips stored runs; a driver killed mid-way loses no finished run and completes later."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from retrieval_bench.config import from_dict
from retrieval_bench.executors import InlineExecutor, LocalExecutor
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep

TINY = """
name = "tiny"
seeds = [1, 2]
[task]
name = "capacity"
num_keys = [4, 6]
[model]
memory = ["linear/sum", "softmax"]
d_key = 8
[train]
eval_every = 10
max_steps = {steps}
stop_loss = 0.0
patience = 100
diagnostics = false
"""


def experiment(steps=30):
    import tomllib

    return from_dict(tomllib.loads(TINY.format(steps=steps)))


def test_resume_skips_finished_runs(tmp_path):
    st = Store(tmp_path / "r.db")
    exp = experiment()
    first = run_sweep(exp, st, InlineExecutor(threads=1), live=False)
    assert first.done == 8 and first.skipped == 0
    again = run_sweep(exp, st, InlineExecutor(threads=1), live=False)
    assert again.total == 0 and again.skipped == 8
    rerun = run_sweep(exp, st, InlineExecutor(threads=1), rerun=True, live=False)
    assert rerun.done == 8 and len(st.load("runs")) == 8


def test_process_pool_gives_the_same_numbers_as_inline(tmp_path):
    exp = experiment(steps=20)
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    run_sweep(exp, a, InlineExecutor(threads=1), live=False)
    run_sweep(exp, b, LocalExecutor(workers=2), live=False)
    fa = a.load("runs").set_index("run_id")["final_loss"].sort_index()
    fb = b.load("runs").set_index("run_id")["final_loss"].sort_index()
    assert fa.index.equals(fb.index) and (fa == fb).all()


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def test_killed_driver_loses_no_finished_run_and_completes_without_duplicates(tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY.format(steps=150))
    db = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "retrieval_bench", "run", str(toml), "--store", str(db), "--workers", "1",
           "--no-report"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _count(db)
    assert 2 <= kept < 8, "the kill should land mid-sweep"
    before = Store(db).load("runs").set_index("run_id")["final_loss"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{8 - kept} runs to do, {kept} already stored" in done.stderr
    runs = Store(db).load("runs")
    assert len(runs) == 8 and runs["run_id"].is_unique and (runs["status"] == "done").all()
    after = runs.set_index("run_id")["final_loss"]
    assert (after[before.index] == before).all()  # finished runs were kept, not redone
