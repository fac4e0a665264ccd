"""The contrast summary (report/contrast.py): its numbers against a direct computation from the diagnostics table,
the figure, and its table in report.md, on a store of tiny real runs and on hand-made rows."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from retrieval_bench import report
from retrieval_bench.config import from_dict
from retrieval_bench.executors import InlineExecutor
from retrieval_bench.report import contrast
from retrieval_bench.report.frames import load_frames
from retrieval_bench.store import Store
from retrieval_bench.sweep import run_sweep

MEMORIES = ["linear/sum", "dpfp-1/delta"]
STORED = {"contrast_first": "contrast_cos_first", "contrast_rewrite": "contrast_cos_rewrite",
          "recall_rewrite": "recall_cos_rewrite", "interference": "interference"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Eight tiny overwrite runs (2 memories x S = 4, 6 x 2 seeds), three evaluations each, diagnostics on."""
    exp = from_dict({"name": "tiny_overwrite", "seeds": [1, 2],
                     "task": {"name": "overwrite", "num_keys": [4, 6]},
                     "model": {"memory": MEMORIES, "d_key": 8},
                     "train": {"eval_every": 10, "max_steps": 30, "stop_loss": 0.0}})
    path = tmp_path_factory.mktemp("contrast") / "results.db"
    state = run_sweep(exp, Store(path), InlineExecutor(threads=1), live=False)
    assert state.done == 8
    return path


@pytest.fixture(scope="module")
def frames(store):
    return load_frames(store)


def _direct(frames, memory: str, s: int, metric: str, step: int | None = None) -> np.ndarray:
    """The values a summary cell pools, picked from the raw tables by hand: each finished run's last evaluation
    (or ``step``), write positions t > 0."""
    runs, d = frames["runs"], frames["diagnostics"]
    ids = runs.loc[(runs["memory"] == memory) & (runs["num_keys"] == s) & (runs["status"] == "done"), "run_id"]
    values = []
    for rid in ids:
        mine = d[(d["run_id"] == rid) & d["position"].notna()]
        at = mine["step"].max() if step is None else step
        pick = mine[(mine["step"] == at) & (mine["metric"] == metric) & (mine["position"] > 0)]
        values += pick["value"].tolist()
    return np.asarray(values)


def test_summary_is_the_quartiles_of_every_position_and_seed(frames):
    summary = contrast.contrast_summary(frames["runs"], frames["diagnostics"])
    # every memory and S has all four figures (the overwrite task rewrites keys), pooled over both seeds
    assert len(summary) == len(MEMORIES) * 2 * len(STORED)
    assert list(summary["memory"].unique()) == report.frames.memory_order(frames["runs"])
    assert (summary["n_runs"] == 2).all()
    for row in summary.itertuples():
        values = _direct(frames, row.memory, row.num_keys, STORED[row.metric])
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        assert row.n_values == len(values) > 2
        assert (row.q1, row.median, row.q3) == pytest.approx((q1, median, q3), rel=1e-12, abs=1e-15)


def test_summary_over_training_has_a_row_per_evaluation(frames):
    summary = contrast.contrast_summary(frames["runs"], frames["diagnostics"], over_training=True)
    assert sorted(summary["step"].unique()) == [10, 20, 30]
    row = summary[(summary["memory"] == "linear/sum") & (summary["num_keys"] == 6) & (summary["step"] == 10)
                  & (summary["metric"] == "interference")].iloc[0]
    values = _direct(frames, "linear/sum", 6, "interference", step=10)
    assert row["median"] == pytest.approx(np.median(values)) and row["n_values"] == len(values)


def _run(run_id: str, task: str, status: str = "done") -> dict:
    return {"run_id": run_id, "experiment": "hand", "task": task, "memory": "linear/sum", "num_keys": 4,
            "seq_len": 8, "d_key": 8, "d_dot": 8, "seed": int(run_id[-1]), "status": status}


def test_a_run_without_rewrites_reads_its_contrast_cos_and_t0_and_diverged_runs_are_left_out():
    runs = pd.DataFrame([_run("a1", "capacity"), _run("a2", "capacity", "diverged")])
    rows = [(rid, 10, t, "contrast_cos", v) for rid in ("a1", "a2") for t, v in enumerate([0.0, 0.1, 0.2, 0.9])]
    rows += [("a1", 5, 1, "contrast_cos", -1.0), ("a1", 10, 2, "interference", np.inf)]  # an earlier step; inf
    diags = pd.DataFrame(rows, columns=["run_id", "step", "position", "metric", "value"])
    summary = contrast.contrast_summary(runs, diags)
    assert summary[["metric", "median", "q1", "q3", "n_values", "n_runs"]].values.tolist() == [
        ["contrast_first", 0.2, pytest.approx(0.15), pytest.approx(0.55), 3, 1]]
    # a run that splits its writes: contrast_cos (all writes) is not the contrast at first writes
    split = pd.DataFrame([(rid, 10, 1, m, v) for rid in ("a1",) for m, v in
                          [("contrast_cos", 0.5), ("contrast_cos_first", 0.25), ("contrast_cos_rewrite", 0.75)]],
                         columns=diags.columns)
    got = contrast.contrast_summary(runs, split).set_index("metric")["median"].to_dict()
    assert got == {"contrast_first": 0.25, "contrast_rewrite": 0.75}
    with pytest.raises(report.NoDataError, match="contrast"):
        contrast.contrast_summary_figure(runs, diags[diags["run_id"] == "a2"])


def test_table_holds_the_summary_at_the_largest_s(frames):
    table = contrast.contrast_table(frames["runs"], frames["diagnostics"])
    assert list(table.columns) == ["memory", "S", "seeds", *contrast.LABELS.values()]
    assert table["memory"].tolist() == report.frames.memory_order(frames["runs"]) and (table["S"] == 6).all()
    summary = contrast.contrast_summary(frames["runs"], frames["diagnostics"])
    cell = summary[(summary["memory"] == "dpfp-1/delta") & (summary["num_keys"] == 6)
                   & (summary["metric"] == "interference")].iloc[0]
    fmt = report.frames.fmt
    expected = f"{fmt(cell['median'])} [{fmt(cell['q1'])}, {fmt(cell['q3'])}]"
    assert table.set_index("memory").loc["dpfp-1/delta", "interference, first writes"] == expected
    assert (table["seeds"] == "2/2").all()


def test_figure_shows_each_memory_against_s_and_over_training(frames):
    fig = contrast.contrast_summary_figure(frames["runs"], frames["diagnostics"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(STORED) * 3  # per figure: each memory at S = 6, against S, over training
    forest, against_s, training = axes[:3]
    assert [t.get_text() for t in forest.get_yticklabels()] == report.frames.memory_order(frames["runs"])
    assert "S = 6" in forest.get_title() and against_s.get_xlabel() == "number of keys $S$"
    assert training.get_xlabel() == "training step" and "S = 6" in training.get_title()
    assert len(training.lines[0].get_xdata()) == 3  # one point per evaluation
    assert {t.get_text() for t in fig.legends[0].get_texts()} == set(MEMORIES)


def test_report_md_leads_contrast_with_the_summary_and_its_table(store, tmp_path, monkeypatch):
    real = report.write._save

    def save(fig, stem):  # the summary for real; the other figures are rendered in test_report.py
        return real(fig, stem) if stem.name == "contrast_summary" else [stem.with_suffix(".png"),
                                                                         stem.with_suffix(".pdf")]

    monkeypatch.setattr(report.write, "_save", save)
    out = tmp_path / "plots"
    report.write_report(store, out)
    folder = out / "tiny_overwrite"
    assert (folder / "contrast_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "contrast_summary.pdf").read_bytes()[:4] == b"%PDF"
    md = (folder / "report.md").read_text()
    assert md.index("## Stability") < md.index("](contrast_summary.png)") < md.index("](contrast.png)")
    frames = load_frames(store)
    table = contrast.contrast_table(frames["runs"], frames["diagnostics"])
    assert "| memory | S | seeds | contrast, first writes |" in md
    for row in table.itertuples(index=False):
        assert "| " + " | ".join(map(str, row)) + " |" in md


def test_report_without_contrast_rows_leaves_the_summary_out(store, tmp_path, fake_save):
    copy = tmp_path / "copy.db"
    with sqlite3.connect(store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
        dst.execute("DELETE FROM diagnostics WHERE metric LIKE 'contrast%' OR metric IN "
                    "('interference', 'recall_cos_rewrite')")
    src.close()
    dst.close()
    report.write_report(copy, tmp_path / "plots")
    md = (tmp_path / "plots" / "tiny_overwrite" / "report.md").read_text()
    assert "contrast_summary" not in md and "## Stability" in md
