"""The SQLite store: round trips with the right dtypes, atomic replacement, finished-run queries."""

from __future__ import annotations

import math

from retrieval_bench.store import Store


def row(rid, status="done", loss=0.5, experiment="e"):
    return {"run_id": rid, "experiment": experiment, "task": "capacity", "memory": "linear/sum", "num_keys": 4,
            "seq_len": 4, "d_key": 8, "d_dot": 8, "seed": 1, "status": status, "steps": 10, "final_loss": loss,
            "best_loss": loss, "final_acc": 1.0, "wall_s": 0.1, "config": {"a": 1}, "version": "x"}


def test_round_trip_and_dtypes(tmp_path):
    st = Store(tmp_path / "r.db")
    st.write_run(row("a"), curves=[(10, "eval", "loss", 0.5)], diagnostics=[(10, 3, "state_norm", 2.0),
                                                                           (10, None, "margin", 0.1)])
    runs = st.load("runs")
    assert runs.loc[0, "run_id"] == "a" and runs["num_keys"].dtype.kind == "i"
    assert runs["final_loss"].dtype.kind == "f" and runs.loc[0, "config"] == '{"a": 1}'
    diag = st.load("diagnostics")
    assert len(diag) == 2 and math.isnan(diag.set_index("metric").loc["margin", "position"])
    assert st.load("curves").loc[0, "value"] == 0.5


def test_rewrite_replaces_without_duplicates(tmp_path):
    st = Store(tmp_path / "r.db")
    st.write_run(row("a", status="failed"), curves=[(1, "eval", "loss", 1.0)])
    assert st.finished_ids() == set()  # failed runs are retried
    st.write_run(row("a", status="done"), curves=[(1, "eval", "loss", 0.2), (2, "eval", "loss", 0.1)])
    assert len(st.load("runs")) == 1 and len(st.load("curves")) == 2
    assert st.finished_ids(["a", "b"]) == {"a"}


def test_load_filters_by_experiment(tmp_path):
    st = Store(tmp_path / "r.db")
    st.write_run(row("a", experiment="x"), curves=[(1, "eval", "loss", 1.0)])
    st.write_run(row("b", experiment="y"), curves=[(1, "eval", "loss", 2.0)])
    assert list(st.load("runs", "x")["run_id"]) == ["a"]
    assert list(st.load("curves", "y")["value"]) == [2.0]
