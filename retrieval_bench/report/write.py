"""``write_report``: every figure (PNG and PDF), the capacity table (CSV) and report.md of each experiment in a
store. Same store, same bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from . import contrast, lm
from .figures import (
    bench_figure,
    capacity_figure,
    contrast_figure,
    learning_curves_figure,
    normalisation_figure,
    stability_figure,
    style_rc,
)
from .frames import NoDataError, fmt, load_frames, sweep_axis
from .settings import report_dir, setting_groups
from .tables import accuracy_table, capacity_table, final_loss_table, margin_table, solved_table

log = logging.getLogger(__name__)

SECTIONS = {  # stem: (heading, caption); lines are medians over seeds, bands min-max
    "capacity": ("Capacity (paper Fig. 2)", "Final eval loss against {axis}; dotted: each memory's d_dot."),
    "learning_curves": ("Learning curves (paper Fig. 3)", "Eval loss at the smallest {sym} of each task."),
    "normalisation": ("Normalisation", "Final eval loss against {axis} per key/query normalisation (+attn: with "
                      "the attention normaliser), one panel per feature map and rule."),
    "stability": ("Stability", "State norm and normaliser along the sequence (last evaluation), and their "
                  "largest values over training."),
    "contrast_summary": ("Retrieved-vs-written contrast", "cos(v̄_t, v_t) between v̄_t, read at k_t just before "
                         "writing v_t, and v_t, at first writes of a key and at rewrites; cos(v̄_t, v_prev) with the "
                         "value k_t held before a rewrite; the interference ‖v̄_t‖ at first writes. A stored value is "
                         "the mean over the traced evaluation sequences at one write position: dots and lines are "
                         "the median over every position t > 0 and finished seed (diverged runs left out), bars and "
                         "bands the interquartile range. Left: each memory at the {sym} of the table below; then "
                         "against {axis}, and over training where runs store several evaluations."),
    "contrast": ("Retrieved-vs-written contrast along the sequence", "cos(v̄_t, v_t), v̄_t read at k_t just "
                 "before writing v_t, and interference, along the sequence (last evaluation)."),
    "bench": ("Speed", "Milliseconds per training step: fast form (solid), reference loop (dashed)."),
}
# figures that apply to some experiments only: elsewhere no section, not a skip
OPTIONAL = {"normalisation", "contrast_summary"}


def _markdown(df: pd.DataFrame) -> list[str]:
    head = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return head + ["| " + " | ".join(map(fmt, row)) + " |" for row in df.itertuples(index=False)]


def _save(fig: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    with mpl.rc_context(style_rc()):
        # no version or date in the files: the same store gives the same bytes
        fig.savefig(paths[0], dpi=300, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    return paths


def _report_md(name: str, runs: pd.DataFrame, table: pd.DataFrame, threshold: float, store: str,
               figures: dict[str, str], diagnostics: pd.DataFrame) -> str:
    x, axis, sym = sweep_axis(runs)
    counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().sort_index().items())
    values = {c: ", ".join(map(fmt, sorted(runs[c].dropna().unique()))) for c in ("task", x, "version")}
    # an absolute path names the writer's machine: keep only the file name then
    shown = store if not Path(store).is_absolute() else Path(store).name
    md = [f"# {name}", "", f"Store `{shown}`: {len(runs)} runs ({counts}); tasks {values['task']}; "
          f"{sym} = {values[x]}; {runs['seed'].nunique()} seeds; version {values['version'] or '–'}."]

    def section(stem: str) -> list[str]:
        (heading, caption), body = SECTIONS[stem], figures[stem]
        if body is None:  # an optional figure that does not apply to this experiment
            return []
        caption = caption.format(axis=axis.replace("$", ""), sym=sym)
        return ["", f"## {heading}", "", body] + ([] if body.startswith("_Skipped") else ["", caption])

    md += section("capacity") + section("learning_curves") + section("normalisation")
    md += ["", "## Capacity table", "", f"An {sym} is solved when the median final eval loss over seeds is "
           f"<= {threshold:g} (a diverged seed counts as unsolved); loss_at_largest_S is at the largest "
           f"{sym} swept. ([CSV](capacity_table.csv))", "", *_markdown(table)]

    def per_s(df: pd.DataFrame) -> list[str]:
        df = df.reset_index()
        return _markdown(df.set_axis([c if isinstance(c, str) else f"{sym} = {fmt(c)}" for c in df.columns], axis=1))

    md += ["", "## Final eval loss (median over finished seeds)", "", *per_s(final_loss_table(runs))]
    if runs.groupby(["task", "d_key", "memory", x], dropna=False).size().max() > 1:  # as solved_table counts
        md += ["", "## Seeds solved", "", f"Seeds whose final eval loss is <= {threshold:g}, of the seeds run (a "
               "diverged or failed seed counts as unsolved).", "", *per_s(solved_table(runs, threshold))]
    accuracy = accuracy_table(runs)
    if accuracy.notna().any().any():
        md += ["", "## Final eval accuracy (median over finished seeds)", "",
               "The fraction of queries whose largest output is the target.", "", *per_s(accuracy)]
    margins = margin_table(runs, diagnostics)
    if not margins.empty:
        md += ["", "## Readout margin (median over finished seeds, last evaluation)", "",
               "The mean over queries of ŷ[target] − max_{j≠target} ŷ[j], in the units of the read: 1 is a clean "
               "one-hot read. It weighs by how much each read wins or loses, where the accuracy counts only "
               "whether the target wins, so the two can rank memories differently.", "", *per_s(margins)]
    for stem in ("stability", "contrast_summary", "contrast", "bench"):
        md += section(stem)
        if stem == "contrast_summary" and figures[stem] is not None:
            md += ["", "Median [interquartile range] over positions and finished seeds at the last evaluation; "
                   "seeds: those finished with diagnostics, of those run.", "",
                   *_markdown(contrast.contrast_table(runs, diagnostics))]
    return "\n".join(md) + "\n"


def _write_experiment(name: str, frames: dict[str, pd.DataFrame], out: Path, threshold: float,
                      store: str, note: str = "") -> list[Path]:
    runs = frames["runs"][frames["runs"]["experiment"] == name]
    curves, diags = (frames[t][frames[t]["run_id"].isin(runs["run_id"])] for t in ("curves", "diagnostics"))
    bench = frames["bench"]
    if "experiment" in bench.columns and bench["experiment"].notna().any():  # else it serves every report
        bench = bench[bench["experiment"] == name]
    if lm.is_lm(runs):
        return _write_lm_experiment(name, runs, diags, out, str(store), note)
    builders = {
        "capacity": lambda: capacity_figure(runs, threshold),
        "learning_curves": lambda: learning_curves_figure(runs, curves, threshold=threshold),
        "normalisation": lambda: normalisation_figure(runs, threshold),
        "stability": lambda: stability_figure(runs, diags),
        "contrast_summary": lambda: contrast.contrast_summary_figure(runs, diags),
        "contrast": lambda: contrast_figure(runs, diags),
        "bench": lambda: bench_figure(bench),
    }
    out.mkdir(parents=True, exist_ok=True)
    written, figures = [], {}  # figures: stem -> its report.md body, None to leave its section out
    for stem, build in builders.items():
        try:
            written += _save(build(), out / stem)
            figures[stem] = f"![{SECTIONS[stem][0]}]({stem}.png)\n\n[PDF]({stem}.pdf)"
        except NoDataError as err:
            figures[stem] = None if stem in OPTIONAL else f"_Skipped: {err} in the store._"
            for stale in (out / f"{stem}.png", out / f"{stem}.pdf"):
                stale.unlink(missing_ok=True)  # an old figure must not outlive the data that explained it
    table = capacity_table(runs, threshold)
    table.to_csv(out / "capacity_table.csv", index=False, float_format="%.6g")
    md = _report_md(name, runs, table, threshold, store, figures, diags)
    (out / "report.md").write_text(md.replace("\n\n", "\n\n" + note, 1), encoding="utf-8")  # under the title
    written += [out / "capacity_table.csv", out / "report.md"]
    log.info("wrote %d files to %s", len(written), out)
    return written


LM_SECTIONS = {
    "state_size": ("Accuracy against state size", "Query accuracy at each point's best learning rate against the "
                   "floats of recurrent state over all layers and heads (softmax: its KV cache at the sequence "
                   "length); bars: min-max over seeds."),
    "pairs": ("Accuracy against the number of pairs", "Query accuracy at each point's best learning rate."),
    "extrapolation": ("Length extrapolation", "Query accuracy at evaluation lengths from the training length "
                      "up, at each point's best learning rate (median over seeds, band min-max)."),
    "layers": ("Diagnostics per layer", "Along the sequence, per layer (means over heads and traced sequences): "
               "the state norm, and the cosine between what a write's key read just before the write and what "
               "it writes."),
}


def _write_lm_experiment(name: str, runs: pd.DataFrame, diags: pd.DataFrame, out: Path, store: str,
                         note: str) -> list[Path]:
    """The report of a token-stream (``lm`` family) experiment: figures, tables and report.md."""
    builders = {"state_size": lambda: lm.state_size_figure(runs), "pairs": lambda: lm.pairs_figure(runs),
                "extrapolation": lambda: lm.extrapolation_figure(runs, diags),
                "layers": lambda: lm.layers_figure(runs, diags)}
    out.mkdir(parents=True, exist_ok=True)
    written, md_sections = [], []
    for stem, build in builders.items():
        heading, caption = LM_SECTIONS[stem]
        try:
            written += _save(build(), out / stem)
            md_sections += ["", f"## {heading}", "", f"![{heading}]({stem}.png)", "", f"[PDF]({stem}.pdf)", "",
                            caption]
        except NoDataError as err:
            md_sections += ["", f"## {heading}", "", f"_Skipped: {err} in the store._"]
            for stale in (out / f"{stem}.png", out / f"{stem}.pdf"):
                stale.unlink(missing_ok=True)
    table = lm.accuracy_by_state_table(runs)
    table.to_csv(out / "accuracy_table.csv", index=False, float_format="%.6g")
    counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().sort_index().items())
    shown = store if not Path(store).is_absolute() else Path(store).name
    values = {c: ", ".join(map(fmt, sorted(runs[c].dropna().unique())))
              for c in ("task", "seq_len", "num_keys", "d_model", "lr", "version")}
    md = [f"# {name}", "", note.strip() if note else "",
          f"Store `{shown}`: {len(runs)} runs ({counts}); task {values['task']}; T = {values['seq_len']}; "
          f"pairs = {values['num_keys']}; d_model = {values['d_model']}; lr = {values['lr']}; "
          f"{runs['seed'].nunique()} seeds; version {values['version'] or '–'}. Every point takes the learning "
          "rate with the best median accuracy over seeds (table below).", *md_sections,
          "", "## Accuracy (best learning rate, median over finished seeds)", "",
          "([CSV](accuracy_table.csv))", "", *_markdown(table),
          "", "## Learning rate per point", "", *_markdown(lm.best_lr_table(runs))]
    (out / "report.md").write_text("\n".join(line for line in md) + "\n", encoding="utf-8")
    return written + [out / "accuracy_table.csv", out / "report.md"]


def write_report(store_path: str | Path, out_dir: str | Path = "plots", experiment: str | None = None,
                 threshold: float = 1e-3) -> list[Path]:
    """Write figures (PNG at 300 dpi and PDF), capacity_table.csv and report.md into out_dir/<experiment>/.

    A figure without data is skipped (an old copy removed) and report.md says so, except an optional figure
    (``OPTIONAL``: normalisation) that does not apply to an experiment, whose section is left out. Same store,
    same files.

    Args:
        store_path: The SQLite results store.
        out_dir: The folder that receives one subfolder per experiment.
        experiment: Only this experiment; None for every experiment in the store.
        threshold: The final eval loss at or below which an S counts as solved.

    Returns:
        The paths written.

    Raises:
        ValueError: If ``experiment`` is not in the store (the message lists those that are).
        FileNotFoundError: If the store does not exist.
    """
    frames = load_frames(store_path)
    names = sorted(frames["runs"]["experiment"].dropna().unique())
    if experiment is not None:
        if experiment not in names:
            known = ", ".join(names) or "no runs"
            raise ValueError(f"unknown experiment {experiment!r}; the store has: {known}")
        names = [experiment]
    if not names:
        log.warning("no runs in %s: nothing to report", store_path)
    written = []
    for name in names:
        runs = frames["runs"][frames["runs"]["experiment"] == name]
        groups = setting_groups(runs)
        for i, (label, sub) in enumerate(groups):
            others = [report_dir(out_dir, name, lab).name for lab, _ in groups if lab != label]
            note = _settings_note(label, others, i == 0)
            written += _write_experiment(name, {**frames, "runs": sub}, report_dir(out_dir, name, label if i else ""),
                                         threshold, str(store_path), note)
    return written


def _settings_note(label: str, others: list[str], main: bool) -> str:
    """What report.md says when an experiment's runs were made with different settings: which runs it shows."""
    if not others:
        return ""
    which = "the most recent runs" if main else "other runs"
    return (f"_This store holds runs of this experiment made with different settings; they are reported apart. "
            f"This report shows {which}: {label}. The others: {', '.join(others)} (folders beside this one)._\n\n")
