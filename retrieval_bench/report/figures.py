"""Figures: DataFrames in, a ``matplotlib.figure.Figure`` out (never pyplot, so nothing is shown or kept alive),
drawn under seaborn's paper style. A diverged or failed run is an x at the top of its axis."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from .colors import NORM_COLORS, palette
from .frames import FAILED, LOG_FLOOR, NoDataError, fmt, memory_order, normalisation_runs, sweep_axis

SINGLE, DOUBLE = 3.25, 6.75  # paper column widths, inches
# Diagnostics panels: (metrics, the first present wins; y label; x axis; y scale: "auto" = log if it spans
# decades)
STABILITY = [
    (("state_norm",), r"$\|W_t\|$", "position", "auto"),
    (("normaliser", "normaliser_l1"), "attention normaliser", "position", "auto"),
    (("max_state_norm",), r"largest $\|W_t\|$ over $t$", "step", "auto"),
    (("max_normaliser",), "largest normaliser over $t$", "step", "auto"),
]
CONTRAST = [  # a cosine lives in [-1, 1]: always a linear axis
    (("contrast_cos",), r"$\cos(\bar v_t, v_t)$, all writes", "position", "linear"),
    (("recall_cos_rewrite",), r"$\cos(\bar v_t, v_{prev})$, rewrites", "position", "linear"),
    (("contrast_cos_rewrite",), r"$\cos(\bar v_t, v_t)$, rewrites", "position", "linear"),
    (("interference",), r"interference $\|\bar v_t\|$, first writes", "position", "auto"),
]
XLABEL = {"position": "write position $t$", "step": "training step"}
NORM_ORDER = ("sum", "sum+attn", "l2", "none")  # then any other normalisation, alphabetically
FAILED_STYLE = {"ls": "none", "marker": "x", "ms": 6, "mew": 1.5}


# ---------------------------------------------------------------------------------------------------- helpers
def style_rc() -> dict:
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("paper"), "pdf.fonttype": 42}


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under seaborn's paper style (fonts 8.8-9.6 pt) without touching global rcParams."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(style_rc()):  # ticks made at draw time copy the first tick, made here: style sticks
            return fn(*args, **kwargs)

    return wrapper


def _require(df: pd.DataFrame | None, what: str) -> pd.DataFrame:
    if df is None or df.empty:
        raise NoDataError(f"no {what} rows")
    return df


def _sweep_ticks(ax: Axes, values: pd.Series) -> None:
    """Integer ticks; a doubling sweep (L = 40, 80, ..., 2560) on a log2 axis, ticked at its values."""
    v = np.sort(values.dropna().unique())
    if len(v) >= 3 and v[0] > 0 and np.allclose(v[1:] / v[:-1], 2.0):
        ax.set_xscale("log", base=2)
        ax.set_xticks(v, [f"{x:g}" for x in v])
        ax.minorticks_off()
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _facets(df: pd.DataFrame, keys: Iterable[str] = ("task", "d_key")) -> list[tuple[str, pd.DataFrame]]:
    """One panel per task (and d_key etc. when they vary): lines of different tasks never share an axis. A d_key
    that each memory has one of (set per memory, to match their state sizes, as in ``modern``) is no axis: those
    memories share their panels."""
    keys = [k for k in keys if k in df.columns and df[k].nunique() > 1]
    if "d_key" in keys and "memory" in df.columns and (df.groupby("memory")["d_key"].nunique() <= 1).all():
        keys.remove("d_key")
    if not keys:  # one panel, still titled with its task
        tasks = df["task"].dropna().unique() if "task" in df.columns else []
        return [(f"task = {tasks[0]}" if len(tasks) else "", df)]
    return [(", ".join(f"{k} = {fmt(v)}" for k, v in zip(keys, vals, strict=True)), g)
            for vals, g in df.groupby(keys, sort=True, dropna=False)]


class _Panels:
    """A grid of panels sharing one legend of memories, placed below the axes so that it hides no data."""

    def __init__(self, n: int, memories: list[str], width: float | None = None, height: float = 2.4,
                 ncols: int = 2, colors: dict[str, str] | None = None):
        ncols, nrows, width = min(n, ncols), math.ceil(n / ncols), width or (SINGLE if n == 1 else DOUBLE)
        self.fig = Figure(figsize=(width, height * nrows), layout="constrained")
        axes = list(self.fig.subplots(nrows, ncols, squeeze=False).ravel())
        for ax in axes[n:]:
            ax.set_visible(False)
        self.axes, self.memories, self.colors = axes[:n], memories, colors or palette(memories)
        self.drawn: set[str] = set()
        self.marked: list[Axes] = []

    def lines(self, ax: Axes, df: pd.DataFrame, x: str, y: str, **kw) -> None:
        """Per memory, the median over seeds as a line and min-max as a band; non-finite values left out."""
        df = df[np.isfinite(df[y])]
        for mem in self.memories:
            g = df[df["memory"] == mem].groupby(x)[y].agg(["median", "min", "max"]).sort_index()
            if len(g):
                ax.plot(g.index, g["median"], color=self.colors[mem], lw=1.3, zorder=3, **kw)
                ax.fill_between(g.index, g["min"], g["max"], color=self.colors[mem], alpha=0.15, lw=0)
                self.drawn.add(mem)

    def failed(self, ax: Axes, memories: Iterable[str], xs: Iterable[float]) -> None:
        """An x at the top of the axis at each (memory, x) of a diverged or failed run."""
        points = sorted({(m, float(x)) for m, x in zip(memories, xs, strict=True) if not pd.isna(x)})
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for mem, x in points:
            ax.plot([x], [0.96], color=self.colors[mem], transform=top, clip_on=False, zorder=5,
                    label="_failed", **FAILED_STYLE)
            self.drawn.add(mem)
        self.marked += [ax] if points else []

    def finish(self, extras: list[tuple[str, dict]], failed_label: str = "diverged / failed run") -> Figure:
        for ax in self.marked:  # headroom, so the row of x marks sits above the data rather than on it
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * (hi / lo) ** 0.15 if ax.get_yscale() == "log" else hi + 0.15 * (hi - lo))
        extras = extras + ([(failed_label, FAILED_STYLE)] if self.marked else [])
        handles = [Line2D([], [], color=self.colors[m], lw=1.5) for m in self.memories]
        handles += [Line2D([], [], **{"color": "0.35", "lw": 1.0, **style}) for _, style in extras]
        labels = [m if m in self.drawn else f"{m} (no data)" for m in self.memories]
        labels += [label for label, _ in extras]
        ncol = min(len(labels), 4 if self.fig.get_figwidth() > SINGLE else 2)
        # the legend gets room of its own, so many memories do not squeeze the axes
        self.fig.set_figheight(self.fig.get_figheight() + 0.1 + 0.19 * math.ceil(len(labels) / ncol))
        self.fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)
        return self.fig


def _threshold(ax: Axes, threshold: float) -> tuple[str, dict]:
    ax.axhline(threshold, color="0.5", ls="--", lw=0.8)
    return f"solved threshold ({threshold:g})", {"ls": "--", "color": "0.5"}


def _final_loss_panel(p: _Panels, ax: Axes, sub: pd.DataFrame, x: str, xlabel: str, title: str,
                      threshold: float) -> list[tuple[str, dict]]:
    """One panel of final eval loss against x (log scale, floored at LOG_FLOOR), an x mark per diverged or
    failed run, and the threshold line; returns the legend extras."""
    done = sub[sub["status"] == "done"]
    p.lines(ax, done.assign(final_loss=done["final_loss"].clip(lower=LOG_FLOOR)), x, "final_loss", marker="o", ms=3)
    bad = sub[sub["status"].isin(FAILED)]
    p.failed(ax, bad["memory"], bad[x])
    extras = [_threshold(ax, threshold)]
    _sweep_ticks(ax, sub[x])
    ax.set(yscale="log", xlabel=xlabel, ylabel="final eval loss", title=title)
    return extras


# ---------------------------------------------------------------------------------------------------- figures
@_styled
def capacity_figure(runs: pd.DataFrame, threshold: float = 1e-3) -> Figure:
    """Paper Fig. 2: final eval loss against the number of keys S (or of writes L), one line per memory.

    Lines are the median over finished seeds, bands their min-max; dotted verticals mark each memory's d_dot
    (none for softmax; an arrow at the right edge when past the swept range); an x at the top marks an S where
    a seed diverged or failed.

    Args:
        runs: The ``runs`` table of one experiment.
        threshold: The "solved" loss, drawn dashed.
    """
    x, xlabel, _ = sweep_axis(_require(runs, "runs"))
    facets = _facets(runs)
    p = _Panels(len(facets), memory_order(runs), width=DOUBLE, height=2.6, ncols=1)
    marks: set[str] = set()  # which d_dot marks were drawn: "in" (a dotted line), "beyond" (an arrow)
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        extras = _final_loss_panel(p, ax, sub, x, xlabel, title, threshold)
        row = 0
        for mem in p.memories if x == "num_keys" else []:  # d_dot bounds S, not the number of writes
            for d_dot in sorted(sub.loc[sub["memory"] == mem, "d_dot"].dropna().unique()):
                if d_dot <= 1.05 * sub[x].max():
                    ax.axvline(d_dot, color=p.colors[mem], ls=":", lw=1.0)
                    marks.add("in")
                else:  # past the swept range: an arrow at the right edge, so the axis keeps to the data
                    ax.plot([0.985], [0.06 + 0.08 * row], color=p.colors[mem], transform=ax.transAxes,
                            clip_on=False, ls="none", marker=">", ms=5)
                    row += 1
                    marks.add("beyond")
    styles = {"in": ("$d_{dot}$ of the memory", {"ls": ":"}),
              "beyond": ("$d_{dot}$ beyond the axis", {"ls": "none", "marker": ">", "ms": 5})}
    return p.finish(extras + [styles[m] for m in ("in", "beyond") if m in marks])


@_styled
def learning_curves_figure(runs: pd.DataFrame, curves: pd.DataFrame, num_keys: int | None = None,
                           threshold: float = 1e-3) -> Figure:
    """Paper Fig. 3: eval loss against training step per memory, at one S per task (default: the smallest).

    Args:
        runs: The ``runs`` table of one experiment.
        curves: The ``curves`` table (its eval loss rows are used).
        num_keys: The S to show; None picks the smallest swept value.
        threshold: The "solved" loss, drawn dashed.
    """
    evals = curves[(curves["split"] == "eval") & (curves["metric"] == "loss")]
    evals = _require(evals[evals["run_id"].isin(_require(runs, "runs")["run_id"])], "eval loss curve")
    x, _, sym = sweep_axis(runs)
    facets = _facets(runs)
    p = _Panels(len(facets), memory_order(runs), height=2.6)
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        sel = sub if num_keys is None else sub[sub["num_keys"] == num_keys]
        traced = sel[sel["run_id"].isin(evals["run_id"])]
        value = (traced if len(traced) else sel)[x].min()
        sel = sel[sel[x] == value]
        c = evals.merge(sel[["run_id", "memory"]], on="run_id")
        p.lines(ax, c.assign(value=c["value"].clip(lower=LOG_FLOOR)), "step", "value")
        # a failed run is marked at its last finite evaluation, or where it stopped if it has no curve
        last = c[np.isfinite(c["value"])].groupby("run_id")["step"].max()
        bad = sel[sel["status"].isin(FAILED)]
        p.failed(ax, bad["memory"], bad["run_id"].map(last).fillna(bad["steps"]).fillna(0))
        extras = [_threshold(ax, threshold)]
        where = f"{sym} = {fmt(value)}" if len(sel) else f"no runs at S = {num_keys}"
        title = ", ".join(filter(None, [title, where]))
        ax.set(yscale="log", xlabel="training step", ylabel="eval loss", title=title)
    return p.finish(extras, "diverged / failed run (last step)")


def _diagnostics_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame, panels: list, num_keys: int | None,
                        what: str) -> Figure:
    """Diagnostics panels at one S per task (default: the largest where the most memories have diagnostics, where
    stress shows), each task on rows of its own; per-position metrics from each run's last evaluation (the
    trained memory)."""
    diags = diagnostics[diagnostics["run_id"].isin(_require(runs, "runs")["run_id"])]
    per_pos = diags[diags["position"].notna()]
    last = per_pos.groupby("run_id")["step"].transform("max")
    diags = pd.concat([per_pos[per_pos["step"] == last], diags[diags["position"].isna()]])
    x, _, sym = sweep_axis(runs)
    cells = []  # (title, y label, x column, y scale, rows of the panel's metric); None = an empty cell
    for title, sub in _facets(runs):
        sel = sub if num_keys is None else sub[sub["num_keys"] == num_keys]
        have = diags[diags["run_id"].isin(sel["run_id"])]
        # the largest S among those where the most memories have diagnostics (so that a sweep extended for one
        # memory does not leave the others out of the figure)
        per_x = sel[sel["run_id"].isin(have["run_id"])].groupby(x)["memory"].nunique()
        sel = sel[sel[x] == per_x[per_x == per_x.max()].index.max()] if len(per_x) else sel.iloc[:0]
        have = have.merge(sel[["run_id", "memory", "status"]], on="run_id")
        row = []
        for candidates, ylabel, xcol, scale in panels:
            rows = have[have["position"].notna() == (xcol == "position")]
            metric = next((m for m in candidates if (rows["metric"] == m).any()), None)
            if metric is not None:
                head = ", ".join(filter(None, [title, f"{sym} = {fmt(sel[x].iloc[0])}"]))
                row.append((head, ylabel, xcol, scale, rows[rows["metric"] == metric]))
        cells += row + [None] * (len(row) % 2)  # each task starts on a new row of the 2-column grid
    if not any(cells):
        raise NoDataError(f"no {what} diagnostics rows")
    p = _Panels(len(cells), memory_order(runs), height=2.2)
    for ax, cell in zip(p.axes, cells, strict=True):
        if cell is None:
            ax.set_visible(False)
            continue
        head, ylabel, xcol, scale, rows = cell
        p.lines(ax, rows, xcol, "value")
        # a diverged run is marked where its record stops being finite (at its start if it never was)
        bad = rows[rows["status"].isin(FAILED)]
        stop = bad[np.isfinite(bad["value"])].groupby("run_id")[xcol].max()
        bad = bad.drop_duplicates("run_id")
        p.failed(ax, bad["memory"], bad["run_id"].map(stop).fillna(rows[xcol].min()))
        v = rows["value"][np.isfinite(rows["value"]) & (rows["value"] > 0)]
        if scale == "auto" and len(v) and v.max() > 100 * v.min():  # a diverging state spans decades
            ax.set_yscale("log")
        ax.set(xlabel=XLABEL[xcol], ylabel=ylabel, title=head)
    return p.finish([])


@_styled
def normalisation_figure(runs: pd.DataFrame, threshold: float = 1e-3) -> Figure:
    """Final eval loss against the number of keys S (or of writes L), one line per key/query normalisation.

    One panel per task, feature map φ and update rule that is run under two or more normalisations (d_key
    too when it varies); other memories (softmax, a φ/rule with one normalisation) are left out. Labels are
    the normalisation plus "+attn" with the attention normaliser, in the order sum, sum+attn, l2, none, then
    the others alphabetically, each in its colour of ``NORM_COLORS``. Lines are the median over finished seeds,
    bands their min-max; an x at the top marks an S where a seed diverged or failed.

    Args:
        runs: The ``runs`` table of one experiment.
        threshold: The "solved" loss, drawn dashed.

    Raises:
        NoDataError: If no feature map and rule is run under two or more normalisations.
    """
    df = normalisation_runs(_require(runs, "runs"))
    if df.empty:
        raise NoDataError("no memories that differ only in normalisation")
    x, xlabel, _ = sweep_axis(df)
    keys = ["task"] + (["d_key"] if df["d_key"].nunique() > 1 else [])
    facets = list(df.groupby(keys + ["phi", "rule"], sort=True, dropna=False))
    rank = {n: i for i, n in enumerate(NORM_ORDER)}
    labels = sorted(df["norm"].unique(), key=lambda n: (rank.get(n, len(rank)), n))
    p = _Panels(len(facets), labels, width=DOUBLE, height=2.4, colors=palette(labels, NORM_COLORS))
    for ax, (vals, sub) in zip(p.axes, facets, strict=True):
        *head, phi, rule = vals
        title = ", ".join([f"{k} = {fmt(v)}" for k, v in zip(keys, head, strict=True)] + [f"φ = {phi}", rule])
        extras = _final_loss_panel(p, ax, sub, x, xlabel, title, threshold)
    return p.finish(extras)


@_styled
def stability_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame, num_keys: int | None = None) -> Figure:
    """State norm ‖W_t‖ and attention normaliser against write position t, and their largest values against
    training step, per memory (median over seeds, min-max band).

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.
        num_keys: The S to show; None picks the largest swept value among those where the most memories have
            diagnostics.
    """
    return _diagnostics_figure(runs, diagnostics, STABILITY, num_keys, "stability")


@_styled
def contrast_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame, num_keys: int | None = None) -> Figure:
    """Cosine between v̄_t (read at k_t just before writing) and v_t, and interference, against write position
    t per memory; for the overwrite task, first writes beside rewrites.

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.
        num_keys: The S to show; None picks the largest swept value among those where the most memories have
            diagnostics.
    """
    return _diagnostics_figure(runs, diagnostics, CONTRAST, num_keys, "contrast")


@_styled
def bench_figure(bench: pd.DataFrame) -> Figure:
    """Milliseconds per training step against S per memory: fast form (solid) vs reference loop (dashed).

    Args:
        bench: The ``bench`` table; a row without a finite ``ms_step`` (skipped as too big, or failed) is an x
            where it breaks its memory's line.
    """
    x, xlabel, _ = sweep_axis(_require(bench, "bench"))
    facets = _facets(bench, ("task", "d_key", "threads", "batch_size"))
    p = _Panels(len(facets), sorted(bench["memory"].dropna().unique()), height=2.6)
    styles = {"fast": "-", "reference": "--"}
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        for form, ls in styles.items():
            p.lines(ax, sub[sub["form"] == form], x, "ms_step", ls=ls, marker="o", ms=3)
        # a row without timing (skipped: too big for the reference loop, or failed) is marked where it
        # breaks a line; a memory with no reference form at all has no line to break
        timed = sub[np.isfinite(sub["ms_step"])].groupby(["memory", "form"]).size()
        bad = sub[~np.isfinite(sub["ms_step"])]
        # a boolean array, not a list: an empty list would select no columns instead of no rows
        bad = bad[np.array([key in timed.index for key in zip(bad["memory"], bad["form"], strict=True)], bool)]
        p.failed(ax, bad["memory"], bad[x])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(yscale="log", xlabel=xlabel, ylabel="ms per training step", title=title or "speed")
    forms = [(f"{form} form", {"ls": ls}) for form, ls in styles.items()]
    return p.finish(forms, "no timing (skipped, failed)")
