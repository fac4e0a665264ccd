"""Tests of the report: figures of synthetic frames, the capacity table by hand, report.md of a tiny store."""

from __future__ import annotations

import ast
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from retrieval_bench import report
from retrieval_bench.report.colors import BUILTIN_COLORS, NORM_COLORS, palette
from retrieval_bench.report.frames import split_spec

D_DOT = {"linear/sum": 16, "dpfp-1/sum": 32, "softmax": None, "acme/plugin": 24}
SIZES = [8, 16, 24, 32, 48]
SEEDS = [0, 1]
DIVERGED = ("dpfp-1/sum", 48, 1)  # (memory, S, seed) of the one diverged capacity run
OVERWRITE = ["dpfp-1/delta", "dpfp-1/sum", "tanh/fwm"]


def _run(experiment, task, memory, s, length, d_dot, seed, loss, status="done"):
    return {"run_id": f"{experiment}-{memory}-{s}-{length}-{seed}", "experiment": experiment, "task": task,
            "memory": memory, "num_keys": s, "seq_len": length, "d_key": 16, "d_dot": d_dot, "seed": seed,
            "status": status, "steps": 1000, "final_loss": loss, "best_loss": loss, "final_acc": 1.0,
            "wall_s": 1.0, "config": "{}", "version": "0.1.0", "finished_at": "2024-01-01"}


def margin(s: int, seed: int) -> float:
    return 1 - s / 100 - 0.01 * seed


def synthetic_frames() -> dict[str, pd.DataFrame]:
    """A capacity sweep (4 memories x 5 S x 2 seeds, one diverged run) and an overwrite experiment, S = 20."""
    rng = np.random.default_rng(0)
    runs = []
    for memory, d_dot in D_DOT.items():
        for s in SIZES:
            for seed in SEEDS:
                # a cliff: solved below ~0.75 d_dot, then loss grows with S; softmax always solves
                cap = 1e9 if d_dot is None else 0.75 * d_dot
                loss = 1e-5 * (1 + seed) if s <= cap else 0.05 * s / cap * (1 + 0.2 * seed)
                diverged = (memory, s, seed) == DIVERGED
                runs.append(_run("capacity", "capacity", memory, s, s, d_dot, seed,
                                 np.nan if diverged else loss, "diverged" if diverged else "done"))
    for memory, loss in zip(OVERWRITE, [5e-4, 0.11, 1.7], strict=True):
        for seed in SEEDS:
            d_dot = None if memory == "tanh/fwm" else 40
            seeded = loss * (1 + 0.1 * seed)
            runs.append(_run("update_rules", "overwrite", memory, 20, 40, d_dot, seed, seeded))
    runs = pd.DataFrame(runs)
    curves, diags = [], []
    for r in runs.itertuples():
        final = r.final_loss if np.isfinite(r.final_loss) else 3.0
        last = 600 if r.status == "diverged" else 1000
        tau = 40 + 15 * (sum(map(ord, r.memory)) % 7)  # memories learn at different speeds
        for step in range(0, last + 1, 50):
            curves.append((r.run_id, step, "eval", "loss", final + (2.3 - final) * np.exp(-step / tau)))
            curves.append((r.run_id, step, "train", "loss", final + 2.3 * np.exp(-step / tau)))
        metrics = ["contrast_cos", "interference"]
        metrics += [] if r.memory == "softmax" else ["state_norm"]
        metrics += ["normaliser"] if r.memory.endswith("/sum") else []
        metrics += ["contrast_cos_first", "contrast_cos_rewrite"] if r.task == "overwrite" else []
        for step in (500, last):
            for t in range(r.seq_len):
                for m in metrics:
                    # a diverged run's state blows up halfway along the sequence
                    value = rng.uniform(0.5, 1) * (t + 1)
                    value = np.inf if r.status == "diverged" and t > r.seq_len // 2 else value
                    diags.append((r.run_id, step, t, m, value if "cos" not in m else rng.uniform(0, 1)))
            for m in [] if r.memory == "softmax" else ["max_state_norm", "max_normaliser"]:
                diags.append((r.run_id, step, None, m, step / 100 + rng.uniform()))
            # the readout margin: -1 before the last evaluation, so that a table reading anything else shows it
            diags.append((r.run_id, step, None, "margin", margin(r.num_keys, r.seed) if step == last else -1.0))
    speed = {"linear/sum": 1.0, "dpfp-1/sum": 2.0, "softmax": 0.5}  # ms per step per key, fast form
    bench = pd.DataFrame([
        {"memory": m, "num_keys": s, "seq_len": s, "form": form, "threads": 1, "ms_eval": 1.0,
         "peak_mb": 10.0, "max_diff": 1e-7, "status": "ok", "ms_step": v * s * (1 if form == "fast" else 3)}
        for m, v in speed.items() for s in SIZES for form in ("fast", "reference")
    ])
    # the reference loop of dpfp-1/sum at the largest S has no timing (out of memory)
    bench.loc[(bench["memory"] == "dpfp-1/sum") & (bench["num_keys"] == 48) & (bench["form"] == "reference"),
              "ms_step"] = np.nan
    return {
        "runs": runs,
        "curves": pd.DataFrame(curves, columns=["run_id", "step", "split", "metric", "value"]),
        "diagnostics": pd.DataFrame(diags, columns=["run_id", "step", "position", "metric", "value"]),
        "bench": bench,
    }


def write_store(path: Path, frames: dict[str, pd.DataFrame]) -> Path:
    with sqlite3.connect(path) as con:
        for name, df in frames.items():
            df.to_sql(name, con, index=False)
    con.close()
    return path


@pytest.fixture(scope="module")
def frames():
    return synthetic_frames()


@pytest.fixture
def store(tmp_path, frames):
    return write_store(tmp_path / "results.db", frames)


def _legend_memories(fig: Figure) -> set[str]:
    return {t.get_text().split(" (")[0] for leg in fig.legends for t in leg.get_texts()}


def _capacity(frames):
    return frames["runs"][frames["runs"]["experiment"] == "capacity"]


FIGURES = {
    "capacity": lambda f: report.capacity_figure(_capacity(f)),
    "learning_curves": lambda f: report.learning_curves_figure(_capacity(f), f["curves"]),
    "stability": lambda f: report.stability_figure(_capacity(f), f["diagnostics"]),
    "contrast": lambda f: report.contrast_figure(_capacity(f), f["diagnostics"]),
    "contrast_overwrite": lambda f: report.contrast_figure(f["runs"], f["diagnostics"]),
    "bench": lambda f: report.bench_figure(f["bench"]),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_is_labelled_and_legend_names_every_memory(frames, name):
    fig = FIGURES[name](frames)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    memories = frames["bench" if name == "bench" else "runs"]
    if name not in ("bench", "contrast_overwrite"):
        memories = _capacity(frames)
    assert set(memories["memory"]) <= _legend_memories(fig)
    # paper-sized and readable: a column width, no text below 8 pt
    assert fig.get_figwidth() in (report.SINGLE, report.DOUBLE)
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and a.get_visible())]
    assert min(sizes) >= 8


def test_capacity_figure_marks_d_dot_and_diverged(frames):
    fig = report.capacity_figure(_capacity(frames))
    ax = fig.axes[0]
    assert _crosses(ax) == [DIVERGED[1]]
    verticals = {line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"}
    assert verticals == {16, 24, 32}  # softmax (no d_dot) gets no mark
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "diverged / failed run" in labels
    assert ax.get_yscale() == "log" and "number of keys" in ax.get_xlabel()
    # d_dot = 40 lies past the only S (20): arrows at the edge instead of stretching the axis
    runs = frames["runs"][frames["runs"]["experiment"] == "update_rules"]
    ax = report.capacity_figure(runs).axes[0]
    assert sum(line.get_marker() == ">" for line in ax.get_lines()) == 2 and ax.get_xlim()[1] < 40


def _crosses(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "x"]


def test_learning_curves_mark_diverged_run_at_its_last_step(frames):
    runs, curves = _capacity(frames), frames["curves"]
    fig = report.learning_curves_figure(runs, curves, num_keys=DIVERGED[1])
    assert _crosses(fig.axes[0]) == [600] and "S = 48" in fig.axes[0].get_title()
    assert "S = 8" in report.learning_curves_figure(runs, curves).axes[0].get_title()  # the smallest S
    # a run that failed before its first evaluation is marked where it stopped
    bad_id = runs.loc[runs["status"] == "diverged", "run_id"].iloc[0]
    fig = report.learning_curves_figure(runs, curves[curves["run_id"] != bad_id], num_keys=DIVERGED[1])
    assert _crosses(fig.axes[0]) == [1000]


def test_contrast_overwrite_shows_first_writes_beside_rewrites(frames):
    fig = report.contrast_figure(frames["runs"], frames["diagnostics"])
    titles = [ax.get_title() + ax.get_ylabel() for ax in fig.axes if ax.get_visible()]
    assert any("task = overwrite" in t and "first writes" in t for t in titles)
    assert any("task = overwrite" in t and "rewrites" in t for t in titles)
    assert not any("task = capacity" in t and "rewrites" in t for t in titles)


def test_stability_marks_non_finite_state_of_diverged_run(frames):
    fig = report.stability_figure(_capacity(frames), frames["diagnostics"])
    norm_ax = next(ax for ax in fig.axes if ax.get_ylabel() == r"$\|W_t\|$")
    assert _crosses(norm_ax) == [DIVERGED[1] // 2]  # its last finite position
    assert "S = 48" in norm_ax.get_title()  # the largest S by default
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "softmax (no data)" in labels  # softmax has no state: said in the legend, not silently dropped


def test_diagnostics_shown_at_the_largest_S_most_memories_have(frames):
    runs, diags = _capacity(frames), frames["diagnostics"]
    with_diags = runs[runs["run_id"].isin(diags["run_id"]) & (runs["num_keys"] == 48)]
    src = with_diags.iloc[[0]]
    extra = src.assign(run_id="extra", num_keys=96, seq_len=96)  # one memory alone swept further
    extra_diags = diags[diags["run_id"] == src["run_id"].iloc[0]].assign(run_id="extra")
    fig = report.stability_figure(pd.concat([runs, extra]), pd.concat([diags, extra_diags]))
    titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
    assert titles and all("S = 48" in t for t in titles), titles
    # with no other memory left at 48, the largest S wins again
    alone = pd.concat([runs[runs["memory"] == src["memory"].iloc[0]], extra])
    fig = report.stability_figure(alone, pd.concat([diags, extra_diags]))
    assert all("S = 96" in ax.get_title() for ax in fig.axes if ax.get_visible())


def _hand_runs():
    rows = []
    for seed in (0, 1):
        for s, loss in [(20, 1e-5), (40, 5e-4), (60, 0.02)]:
            rows.append(_run("e", "capacity", "linear/sum", s, s, 64, seed, loss * (1 + seed)))
        for s in (20, 40, 60):
            # seed 1 diverges at S = 40: median(loss, inf) = inf, so S = 40 is not solved
            bad = seed == 1 and s == 40
            rows.append(_run("e", "capacity", "dpfp-1/sum", s, s, 128, seed, np.nan if bad else 1e-6,
                             "diverged" if bad else "done"))
        rows.append(_run("e", "capacity", "softmax", 20, 20, None, seed, 1e-6))
        rows.append(_run("e", "capacity", "softmax", 60, 60, None, seed, 0.5))
    return pd.DataFrame(rows)


def test_capacity_table_numbers():
    table = report.capacity_table(_hand_runs()).set_index("memory")
    assert list(table.index) == ["linear/sum", "dpfp-1/sum", "softmax"]  # d_dot order, softmax last
    lin = table.loc["linear/sum"]
    assert lin["largest_solved_S"] == 40 and lin["first_failed_S"] == 60
    assert lin["ratio_to_d_dot"] == pytest.approx(40 / 64)
    assert lin["loss_at_largest_S"] == pytest.approx(np.median([0.02, 0.04]))
    assert lin["n_seeds"] == 2 and lin["n_diverged"] == 0
    dpfp = table.loc["dpfp-1/sum"]
    assert dpfp["largest_solved_S"] == 60 and dpfp["first_failed_S"] == 40 and dpfp["n_diverged"] == 1
    soft = table.loc["softmax"]
    assert soft["largest_solved_S"] == 20 and np.isnan(soft["d_dot"]) and np.isnan(soft["ratio_to_d_dot"])
    strict = report.capacity_table(_hand_runs(), threshold=1e-6).set_index("memory")["largest_solved_S"]
    assert strict.isna().to_dict() == {"linear/sum": True, "dpfp-1/sum": False, "softmax": False}
    assert list(report.capacity_table(_hand_runs()).columns[:7]) == [
        "memory", "d_dot", "largest_solved_S", "ratio_to_d_dot", "loss_at_largest_S", "n_seeds", "n_diverged"]


def test_final_loss_table_is_median_over_finished_seeds():
    table = report.final_loss_table(_hand_runs())
    assert list(table.columns) == [20, 40, 60]
    assert table.loc["linear/sum", 40] == pytest.approx(np.median([5e-4, 1e-3]))
    assert table.loc["dpfp-1/sum", 40] == pytest.approx(1e-6)  # the diverged seed is left out
    assert np.isnan(table.loc["softmax", 40])


def test_accuracy_table_is_median_over_finished_seeds():
    runs = _hand_runs()
    runs["final_acc"] = np.where(runs["status"] == "done", 0.9 - 0.1 * runs["seed"], 0.0)
    table = report.accuracy_table(runs)
    assert list(table.columns) == [20, 40, 60] and list(table.index) == ["linear/sum", "dpfp-1/sum", "softmax"]
    assert table.loc["linear/sum", 40] == pytest.approx(0.85)
    assert table.loc["dpfp-1/sum", 40] == pytest.approx(0.9)  # the diverged seed is left out
    assert np.isnan(table.loc["softmax", 40])
    assert report.accuracy_table(runs.iloc[:0]).empty


def test_solved_table_counts_seeds_under_the_threshold():
    table = report.solved_table(_hand_runs())
    assert list(table.columns) == [20, 40, 60] and list(table.index) == ["linear/sum", "dpfp-1/sum", "softmax"]
    assert list(table.loc["linear/sum"]) == ["2/2", "2/2", "0/2"]  # 1e-3 at S = 40, seed 1: on the threshold
    assert list(table.loc["dpfp-1/sum"]) == ["2/2", "1/2", "2/2"]  # the diverged seed did not solve
    assert list(table.loc["softmax"]) == ["2/2", "", "0/2"]  # nothing ran at S = 40
    assert list(report.solved_table(_hand_runs(), threshold=1e-4).loc["linear/sum"]) == ["2/2", "0/2", "0/2"]


def test_margin_table_is_the_median_over_finished_seeds_at_the_last_evaluation(frames):
    runs = frames["runs"][frames["runs"]["experiment"] == "capacity"]
    table = report.margin_table(runs, frames["diagnostics"])
    assert list(table.columns) == SIZES and list(table.index) == ["linear/sum", "acme/plugin", "dpfp-1/sum", "softmax"]
    for s in SIZES[:-1]:
        assert table.loc["dpfp-1/sum", s] == pytest.approx(np.median([margin(s, seed) for seed in SEEDS]))
    assert table.loc["dpfp-1/sum", 48] == pytest.approx(margin(48, 0))  # seed 1 diverged there: left out
    # a NaN at a run's last evaluation stays NaN: the run's earlier, healthy evaluation does not stand in for it
    diags = frames["diagnostics"].copy()
    first = runs[(runs["memory"] == "linear/sum") & (runs["num_keys"] == 8) & (runs["seed"] == 0)]["run_id"]
    diags.loc[diags["run_id"].isin(first) & (diags["metric"] == "margin") & (diags["step"] == 1000), "value"] = np.nan
    assert report.margin_table(runs, diags).loc["linear/sum", 8] == pytest.approx(margin(8, 1))
    one = runs[~((runs["memory"] == "softmax") & (runs["num_keys"] == 8))]  # no run there: NaN, still a column
    assert np.isnan(report.margin_table(one, frames["diagnostics"]).loc["softmax", 8])
    no_margin = frames["diagnostics"][frames["diagnostics"]["metric"] != "margin"]
    assert report.margin_table(runs, no_margin).empty


def test_length_sweep_plots_against_writes(frames):
    runs = pd.DataFrame([_run("len", "overwrite", "dpfp-1/delta", 20, n, 40, 0, 1e-4) for n in (20, 40, 80)])
    fig = report.capacity_figure(runs)
    ax = fig.axes[0]
    assert "number of writes" in ax.get_xlabel()
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [20, 40, 80]  # doubling: a log2 axis
    # d_dot (40 here) bounds the number of keys, not of writes: no d_dot mark on an L axis
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert list(report.final_loss_table(runs).columns) == [20, 40, 80]
    even = runs.assign(num_keys=[20, 40, 60], seq_len=[20, 40, 60])
    assert report.capacity_figure(even).axes[0].get_xscale() == "linear"


def test_load_frames_fills_missing_tables(tmp_path, frames):
    path = write_store(tmp_path / "runs_only.db", {"runs": frames["runs"].drop(columns=["final_acc"])})
    loaded = report.load_frames(path)
    assert len(loaded["runs"]) == len(frames["runs"]) and loaded["runs"]["final_acc"].isna().all()
    assert loaded["runs"]["d_dot"].dtype.kind == "f"  # NULL d_dot (softmax) -> NaN, not None
    for name in ("curves", "diagnostics", "bench"):
        assert loaded[name].empty and set(report.SCHEMA[name].split()) <= set(loaded[name].columns)
    missing = tmp_path / "nope.db"
    with pytest.raises(FileNotFoundError):
        report.load_frames(missing)
    assert not missing.exists()


# fake_save (conftest): rendering PNG + PDF is the slow part, so logic tests skip it; the two tests whose names
# say "renders" render for real (the one that renders every figure is marked slow).


@pytest.mark.slow  # 5-12 s on two busy cores: five figures, each as PNG and PDF
def test_write_report_renders_every_file_and_links_each_png(store, tmp_path):
    out = tmp_path / "plots"
    paths = report.write_report(store, out, experiment="update_rules")
    stems = ("capacity", "learning_curves", "stability", "contrast_summary", "contrast", "bench")
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    expected |= {"capacity_table.csv", "report.md"}
    assert {p.name for p in paths} == expected and all(p.parent == out / "update_rules" for p in paths)
    assert all(p.stat().st_size > 0 for p in paths)
    assert (out / "update_rules" / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "update_rules" / "capacity.pdf").read_bytes()[:4] == b"%PDF"
    md = (out / "update_rules" / "report.md").read_text()
    for stem in stems:
        assert f"]({stem}.png)" in md and f"]({stem}.pdf)" in md
    assert "Skipped" not in md and "](capacity_table.csv)" in md


def test_write_report_covers_every_experiment_and_is_deterministic(store, tmp_path, fake_save):
    out = tmp_path / "plots"
    paths = report.write_report(store, out)
    assert {p.parent.name for p in paths} == {"capacity", "update_rules"}
    md = (out / "capacity" / "report.md").read_text()
    assert "| linear/sum | 16 | 8 | 0.5 |" in md  # the capacity table, in report.md too
    assert "## Readout margin" in md and "| linear/sum | 0.915 | 0.835 |" in md  # margin(8, ·), margin(16, ·)
    assert "## Final eval accuracy" in md and "| linear/sum | 1 | 1 |" in md
    assert "## Seeds solved" in md and "| dpfp-1/sum | 2/2 | 2/2 | 2/2 | 0/2 | 0/2 |" in md
    csv = pd.read_csv(out / "capacity" / "capacity_table.csv")
    assert set(csv["memory"]) == set(D_DOT)
    before = [(out / "capacity" / name).read_bytes() for name in ("report.md", "capacity_table.csv")]
    report.write_report(store, out, experiment="capacity")
    assert [(out / "capacity" / name).read_bytes() for name in ("report.md", "capacity_table.csv")] == before


def test_write_report_leaves_out_margin_and_seeds_where_they_do_not_apply(tmp_path, frames, fake_save):
    no_margin = {**frames, "diagnostics": frames["diagnostics"][frames["diagnostics"]["metric"] != "margin"]}
    report.write_report(write_store(tmp_path / "results.db", no_margin), tmp_path / "plots", experiment="capacity")
    md = (tmp_path / "plots" / "capacity" / "report.md").read_text()
    assert "## Final eval loss" in md and "margin" not in md.lower()
    one_seed = {**no_margin, "runs": frames["runs"][frames["runs"]["seed"] == SEEDS[0]]}
    report.write_report(write_store(tmp_path / "one.db", one_seed), tmp_path / "one", experiment="capacity")
    assert "Seeds solved" not in (tmp_path / "one" / "capacity" / "report.md").read_text()  # nothing to count


def test_write_report_unknown_experiment_lists_known(store, tmp_path):
    with pytest.raises(ValueError, match="capacity, update_rules"):
        report.write_report(store, tmp_path, experiment="nope")


def test_empty_diagnostics_are_skipped_and_said(tmp_path, frames, fake_save):
    empty = {**frames, "diagnostics": frames["diagnostics"].iloc[:0]}
    del empty["bench"]
    store = write_store(tmp_path / "r.db", empty)
    with pytest.raises(report.NoDataError):
        report.stability_figure(frames["runs"], empty["diagnostics"])
    out = tmp_path / "plots"
    (out / "capacity").mkdir(parents=True)
    (out / "capacity" / "stability.png").write_bytes(b"stale")
    names = {p.name for p in report.write_report(store, out, experiment="capacity")}
    assert {"capacity.png", "learning_curves.png", "report.md", "capacity_table.csv"} <= names
    assert not names & {"stability.png", "contrast.png", "bench.png"}
    assert not (out / "capacity" / "stability.png").exists()  # a stale figure does not outlive its data
    md = (out / "capacity" / "report.md").read_text()
    assert md.count("_Skipped:") == 3 and "no stability diagnostics rows" in md


def test_memory_colors_are_stable_and_distinct():
    name = "acme/plugin-variant"
    assert report.memory_color(name) == report.memory_color(name)
    assert report.memory_color("dpfp-3/sum") == BUILTIN_COLORS["dpfp-3/sum"]
    # Python salts hash() per process; the colour must not depend on it
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.memory_color(sys.argv[2]))")
    colors_py = Path(report.__file__).with_name("colors.py")
    seen = {subprocess.run([sys.executable, "-c", code, str(colors_py), name], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout.strip()
            for seed in ("1", "2")}
    assert seen == {report.memory_color(name)}
    # the paper's figures (tasks/capacity.toml, tasks/update_rules.toml) need no collision handling
    for figure in (["linear/sum", "dpfp-1/sum", "dpfp-2/sum", "dpfp-3/sum", "favor-64/sum", "favor-128/sum",
                    "favor-512/sum", "softmax"],
                   ["dpfp-1/delta", "dpfp-2/delta", "linear/delta", "favor-64/delta", "favor-128/delta",
                    "dpfp-1/sum", "tanh/fwm", "dpfp-1/fwm"]):
        assert len({report.memory_color(m) for m in figure}) == len(figure)
    names = list(BUILTIN_COLORS) + [f"plugin-{i}" for i in range(6)]  # as many as there are free colours
    assert len(set(palette(names).values())) == len(names)
    assert palette(names) == palette(reversed(names))  # a report's colours depend on its set of names only


def test_report_imports_only_the_plotting_stack_and_the_name_grammar():
    """The report must load fast on any machine that holds a store: plotting stack, stdlib, its own modules and
    the torch-free grammar of memory names (``retrieval_bench.spec``); test_cli runs it with torch refused."""
    allowed = {"__future__", "numpy", "pandas", "matplotlib", "seaborn", "..spec"} | set(sys.stdlib_module_names)
    modules = sorted(Path(report.__file__).parent.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "figures.py", "frames.py", "colors.py"}
    for module in modules:
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # level 1 is the report package itself; level 2 would reach the rest of retrieval_bench (torch)
                base = "." * node.level + (node.module or "")
                names = ([node.module] if node.level == 0 else [base] if node.module
                         else [base + alias.name for alias in node.names])  # from .. import spec -> ..spec
            else:
                continue
            for name in names:
                own = name.startswith(".") and not name.startswith("..")
                assert own or name in allowed or name.split(".")[0] in allowed, f"{module.name} imports {name}"


def test_bench_marks_missing_timing_only_where_it_breaks_a_line(frames):
    bench = frames["bench"].copy()
    # softmax has no reference form at all: nothing to mark; dpfp-1/sum's reference is too big at S = 48
    bench.loc[(bench["memory"] == "softmax") & (bench["form"] == "reference"), "ms_step"] = np.nan
    fig = report.bench_figure(bench)
    assert _crosses(fig.axes[0]) == [48]
    assert fig.axes[0].get_yscale() == "log" and "ms per training step" in fig.axes[0].get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"fast form", "reference form", "no timing (skipped, failed)"} <= set(labels)


NORMS = {"sum": 1e-5, "sum+attn": 1e-3, "l2": 1e-1}  # base final loss of each normalisation of the delta rule
NORM_FAILED = ("linear/delta/l2", 40, 1)  # (memory, S, seed) of the one diverged normalisation run


def _norm_runs() -> pd.DataFrame:
    """2 feature maps x 3 normalisations x 3 S x 2 seeds (one diverged), beside softmax and dpfp-1/sum, which
    have no normalisation to compare and are left out of the figure."""
    rows = []
    for seed in SEEDS:
        for s in (20, 40, 60):
            for phi in ("dpfp-1", "linear"):
                for norm, base in NORMS.items():
                    memory = f"{phi}/delta/{norm}"
                    bad = (memory, s, seed) == NORM_FAILED
                    rows.append(_run("normalisation", "overwrite", memory, s, 2 * s, 64, seed,
                                     np.nan if bad else base * s / 20 * (1 + seed), "diverged" if bad else "done"))
            for memory in ("softmax", "dpfp-1/sum"):
                rows.append(_run("normalisation", "overwrite", memory, s, 2 * s, None, seed, 1e-6))
    return pd.DataFrame(rows)


def _drawn(ax) -> dict[str, tuple]:
    """Colour -> (x, y) of each line drawn with markers (the medians; not the threshold or the x marks)."""
    return {line.get_color(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if line.get_marker() == "o"}


def test_normalisation_figure_draws_one_line_per_normalisation_per_panel():
    fig = report.normalisation_figure(_norm_runs())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["task = overwrite, φ = dpfp-1, delta",
                                               "task = overwrite, φ = linear, delta"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["sum", "sum+attn", "l2", "solved threshold (0.001)", "diverged / failed run"]
    colors = dict(zip(labels, [h.get_color() for h in fig.legends[0].legend_handles], strict=True))
    assert {n: colors[n] for n in NORMS} == {n: NORM_COLORS[n] for n in NORMS}  # the same in every report
    for ax in axes:
        drawn = _drawn(ax)
        assert set(drawn) == {colors[n] for n in NORMS}  # one line per normalisation, no softmax, no dpfp-1/sum
        assert all(xs == [20, 40, 60] for xs, _ in drawn.values())
        assert ax.get_yscale() == "log" and "number of keys" in ax.get_xlabel() and ax.get_ylabel()
    # the median over seeds; at the diverged run's S only the finished seed counts
    assert _drawn(axes[0])[colors["sum+attn"]][1] == pytest.approx([1.5e-3, 3e-3, 4.5e-3])
    assert _drawn(axes[1])[colors["l2"]][1] == pytest.approx([0.15, 0.2, 0.45])
    crosses = [(line.get_xdata()[0], line.get_color()) for line in axes[1].get_lines() if line.get_marker() == "x"]
    assert crosses == [(NORM_FAILED[1], colors["l2"])] and _crosses(axes[0]) == []
    assert fig.get_figwidth() == report.DOUBLE
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and a.get_visible())]
    assert min(sizes) >= 8


def test_normalisation_labels_read_specs_like_parse_spec_and_keep_their_order():
    runs = pd.DataFrame([_run("n", "capacity", m, 20, 20, 32, 0, 0.0) for m in
                         ["dpfp-1/delta/zz", "dpfp-1/delta/attn", "dpfp-1/delta/none", "dpfp-1/delta/l2",
                          "dpfp-1/delta/sum+attn", "dpfp-1/delta", "dpfp-1/delta/l2+attn"]])
    fig = report.normalisation_figure(runs)
    labels = [t.get_text() for t in fig.legends[0].get_texts()][:-1]  # less the threshold
    # no NORM: the delta rule's default, sum; "attn" alone is none+attn; then the rest alphabetically
    assert labels == ["sum", "sum+attn", "l2", "none", "l2+attn", "none+attn", "zz"]
    assert len({line.get_color() for line in fig.axes[0].get_lines() if line.get_marker() == "o"}) == 7
    # a loss of exactly 0 sits at the log floor
    assert all(ys == [report.LOG_FLOOR] for _, ys in _drawn(fig.axes[0]).values())
    assert fig.axes[0].get_title() == "task = capacity, φ = dpfp-1, delta"


def test_split_spec_agrees_with_parse_spec():
    memories = pytest.importorskip("retrieval_bench.memories")  # torch: only here, the report never needs it
    from retrieval_bench.registry import RegistryError, update_rules

    builtin = {name for name, origin in update_rules.origins().items() if origin == "built-in"}
    assert set(report.RULE_DEFAULTS) == builtin
    for name in builtin:
        rule = update_rules.get(name)
        assert report.RULE_DEFAULTS[name] == (rule.default_norm, rule.default_attn)
    for spec in ["dpfp-1/sum", "dpfp-1/delta", "tanh/fwm", "linear/delta/sum", "dpfp-2/delta/l2+attn",
                 "dpfp-1/delta/attn", "linear/sum/none", "dpfp-1/fwm/l2"]:
        ms = memories.parse_spec(spec)
        assert split_spec(spec) == (ms.phi, ms.rule, ms.norm + ("+attn" if ms.attn else "")), spec
    for spec in ("softmax", "dpfp-1/delta/sum+gate"):  # registered, not PHI/RULE; malformed: nothing to plot
        with pytest.raises(RegistryError):
            memories.parse_spec(spec)
        assert split_spec(spec) is None
    assert split_spec("acme/rule") is None  # a plugin rule's default normalisation is unknown here


@pytest.mark.parametrize("memories", [["softmax", "dpfp-1/sum"], ["dpfp-1/delta", "dpfp-1/delta/sum", "linear/sum"],
                                      OVERWRITE])
def test_normalisation_figure_needs_two_normalisations_of_one_memory(memories):
    runs = pd.DataFrame([_run("e", "overwrite", m, s, s, 32, 0, 1e-3) for m in memories for s in (20, 40)])
    with pytest.raises(report.NoDataError, match="normalisation"):
        report.normalisation_figure(runs)
    # the same normalisations of different feature maps, or of different tasks, are not compared either
    runs = pd.DataFrame([_run("e", task, m, 20, 20, 32, 0, 1e-3) for task, m in
                         [("a", "dpfp-1/delta/sum"), ("a", "linear/delta/l2"), ("b", "dpfp-1/delta/l2")]])
    with pytest.raises(report.NoDataError):
        report.normalisation_figure(runs)


def test_write_report_shows_normalisation_only_where_it_applies(tmp_path, frames, fake_save):
    store = write_store(tmp_path / "r.db", {**frames, "runs": pd.concat([frames["runs"], _norm_runs()])})
    out = tmp_path / "plots"
    (out / "capacity").mkdir(parents=True)
    (out / "capacity" / "normalisation.png").write_bytes(b"stale")
    paths = report.write_report(store, out)
    drawn = {p.parent.name for p in paths if p.stem == "normalisation"}
    assert drawn == {"normalisation"}
    assert {p.name for p in paths if p.parent.name == "normalisation"} >= {"normalisation.png", "normalisation.pdf"}
    assert not (out / "capacity" / "normalisation.png").exists()  # a stale figure does not outlive its data
    md = (out / "normalisation" / "report.md").read_text()
    assert "## Normalisation" in md and "![Normalisation](normalisation.png)" in md
    assert "](normalisation.pdf)" in md and "per key/query normalisation" in md
    assert md.index("## Learning curves") < md.index("## Normalisation") < md.index("## Capacity table")
    for name in ("capacity", "update_rules"):  # no section, not even a skip line, where it does not apply
        md = (out / name / "report.md").read_text()
        assert "ormalisation" not in md and "_Skipped" not in md


def test_write_report_renders_normalisation_figure(tmp_path, monkeypatch):
    real = report.write._save

    def save(fig, stem):  # the normalisation figure for real; the capacity figure's rendering is tested above
        return real(fig, stem) if stem.name == "normalisation" else [stem.with_suffix(".png"), stem.with_suffix(".pdf")]

    monkeypatch.setattr(report.write, "_save", save)
    store = write_store(tmp_path / "r.db", {"runs": _norm_runs()})
    out = tmp_path / "plots"
    paths = report.write_report(store, out)
    assert {p.name for p in paths} == {"capacity.png", "capacity.pdf", "normalisation.png", "normalisation.pdf",
                                       "capacity_table.csv", "report.md"}
    assert (out / "normalisation" / "normalisation.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "normalisation" / "normalisation.pdf").read_bytes()[:4] == b"%PDF"


def test_a_d_key_set_per_memory_is_no_panel_axis():
    """Memories given their own d_key (matched state sizes) share a panel; a d_key swept for one memory splits."""
    from retrieval_bench.report.figures import _facets

    per_memory = pd.DataFrame({"task": "capacity", "memory": ["a", "a", "b"], "d_key": [32, 32, 16]})
    assert [t for t, _ in _facets(per_memory)] == ["task = capacity"]
    swept = pd.DataFrame({"task": "capacity", "memory": ["a", "a", "b"], "d_key": [32, 16, 16]})
    assert [t for t, _ in _facets(swept)] == ["d_key = 16", "d_key = 32"]


def test_two_tasks_at_one_s_keep_s_as_the_axis():
    """capacity (L = S) and overwrite (L = 2S) at one S differ in L by design: S stays the axis."""
    from retrieval_bench.report.frames import sweep_axis

    two = pd.DataFrame({"task": ["capacity", "overwrite"], "num_keys": [16, 16], "seq_len": [16, 32]})
    assert sweep_axis(two)[0] == "num_keys"
    long = pd.DataFrame({"task": ["overwrite", "overwrite"], "num_keys": [20, 20], "seq_len": [40, 80]})
    assert sweep_axis(long)[0] == "seq_len"
