"""The contrast summary: what a write's key retrieves just before the write, summarised per memory.

``diagnostics.trace_rows`` stores, per write position t, the mean over the traced evaluation sequences of
cos(v̄_t, v_t) (v̄_t = W_{t-1} φ(k_t), read just before v_t is written: PAPER §1.4, paper Eq. 20; §1.5 with the
normaliser), apart at first writes and at rewrites of a key; cos(v̄_t, v_prev) at rewrites (does the memory
return the value it holds under k_t?); and the interference ‖v̄_t‖ at first writes (what a never-written key
already retrieves: the crosstalk of PAPER §1.3). Here each figure becomes one number per memory: the median and
interquartile range of those per-position values over every position and finished seed, at the last evaluation
against S (or L), and at every stored evaluation against training step. Functions take DataFrames;
``contrast_summary_figure`` returns a Figure, never pyplot's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .colors import palette
from .figures import DOUBLE, _facets, _styled, _sweep_ticks
from .frames import NoDataError, fmt, memory_order, sweep_axis

# (name, the stored metric it reads, panel title, y label)
METRICS = (
    ("contrast_first", "contrast_cos_first", "contrast at first writes", r"$\cos(\bar v_t, v_t)$"),
    ("contrast_rewrite", "contrast_cos_rewrite", "contrast at rewrites", r"$\cos(\bar v_t, v_t)$"),
    ("recall_rewrite", "recall_cos_rewrite", "recall at rewrites", r"$\cos(\bar v_t, v_{prev})$"),
    ("interference", "interference", "interference at first writes", r"$\|\bar v_t\|$"),
)
SPLIT = ("contrast_cos_first", "contrast_cos_rewrite")
LABELS = {"contrast_first": "contrast, first writes", "contrast_rewrite": "contrast, rewrites",
          "recall_rewrite": "recall of previous value, rewrites", "interference": "interference, first writes"}
STATS = ["median", "q1", "q3", "n_values", "n_runs"]


def _keys(runs: pd.DataFrame) -> list[str]:
    """The columns that split a summary beside memory: task and d_key where they vary."""
    return [c for c in ("task", "d_key") if runs[c].nunique() > 1]


def contrast_rows(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """The per-position rows the summary reads, one metric name of ``METRICS`` each, of finished runs only.

    contrast_cos holds every write; diagnostics splits it into _first and _rewrite wherever a traced sequence
    rewrites a key, so a run that stores no split wrote each key once and its contrast_cos is the contrast at first
    writes. A diverged run's last record is of a broken state (the stability figure shows it), so only runs with
    status "done" count; non-finite values and t = 0 (a write into the empty memory, v̄_0 = 0 whatever the memory)
    are left out.

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.

    Returns:
        Columns run_id, step, position, metric, value, last (the step is the run's last evaluation with
        per-position rows), memory, task, d_key, num_keys and seq_len.
    """
    done = runs[runs["status"] == "done"]
    d = diagnostics[diagnostics["run_id"].isin(done["run_id"])]
    split = set(d.loc[d["metric"].isin(SPLIT), "run_id"])
    unsplit = (d["metric"] == "contrast_cos") & ~d["run_id"].isin(split)
    d = d.assign(metric=d["metric"].where(~unsplit, "contrast_cos_first"))
    d = d[(d["position"] > 0) & np.isfinite(d["value"])]
    names = {stored: name for name, stored, _, _ in METRICS}
    cols = ["run_id", "step", "position", "metric", "value"]
    rows = d[d["metric"].isin(names)].assign(metric=lambda f: f["metric"].map(names))[cols]
    rows = rows.assign(last=rows["step"] == rows.groupby("run_id")["step"].transform("max"))
    return rows.merge(done[["run_id", "memory", "task", "d_key", "num_keys", "seq_len"]], on="run_id")


def _summarise(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = rows.groupby(by, dropna=False)
    out = g["value"].agg(median="median", q1=lambda v: v.quantile(0.25), q3=lambda v: v.quantile(0.75),
                         n_values="size")
    return out.join(g["run_id"].nunique().rename("n_runs")).reset_index()


def contrast_summary(runs: pd.DataFrame, diagnostics: pd.DataFrame, over_training: bool = False) -> pd.DataFrame:
    """Median, quartiles and counts of each contrast figure per memory and S (L in a length sweep).

    Each stored value is the mean over the traced evaluation sequences at one write position; the statistics
    are over every stored position of every finished seed (pooled), so the spread is along the sequence and
    across seeds.

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.
        over_training: False: each run's last evaluation. True: every evaluation step stored, a row per step
            (seeds that stopped earlier leave the later steps).

    Returns:
        Columns task and d_key (where they vary), memory, the sweep column (num_keys or seq_len), step (with
        ``over_training``), metric (a name of ``METRICS``), median, q1, q3 (pandas' linear quantiles), n_values
        and n_runs; rows in memory order (``frames.memory_order``), then S, step and ``METRICS`` order.
    """
    rows = contrast_rows(runs, diagnostics)
    x = sweep_axis(runs)[0]
    by = _keys(runs) + ["memory", x] + (["step"] if over_training else []) + ["metric"]
    if not over_training:
        rows = rows[rows["last"]]
    if rows.empty:
        return pd.DataFrame(columns=by + STATS)
    out = _summarise(rows, by)
    rank = {m: i for i, m in enumerate(memory_order(runs))} | {m[0]: i for i, m in enumerate(METRICS)}
    return out.sort_values(by, key=lambda s: s.map(rank) if s.name in ("memory", "metric") else s,
                           ignore_index=True)


def shown_value(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> float:
    """The S (L) of one task that the table and the per-memory panels show: the largest among those where the
    most memories have diagnostics, whatever their status (as the per-position figures choose, so both show the
    same S); NaN without diagnostics."""
    x = sweep_axis(runs)[0]
    have = runs[runs["run_id"].isin(diagnostics["run_id"])]
    per_x = have.groupby(x)["memory"].nunique()
    return per_x[per_x == per_x.max()].index.max() if len(per_x) else np.nan


def _same(summary: pd.DataFrame, sub: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Rows of ``summary`` whose task/d_key are those of the facet ``sub``."""
    keep = pd.Series(True, index=summary.index)
    for k in keys:
        keep &= summary[k].isin(sub[k].unique())
    return keep


def contrast_table(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """report.md's table: per memory run at the S (L) of ``shown_value`` (per task), "median [q1, q3]" of each
    contrast figure at the last evaluation ("–" where no finished run holds it), and how many of its seeds
    finished with diagnostics; a figure no memory has is left out.

    Returns:
        Columns task and d_key (where they vary), memory, S (or L), seeds ("finished/run"), then one per figure
        (``LABELS``), rows in memory order; empty without contrast rows of a finished run.
    """
    summary = contrast_summary(runs, diagnostics)
    if summary.empty:
        return pd.DataFrame()
    x, _, sym = sweep_axis(runs)
    keys, rows = _keys(runs), contrast_rows(runs, diagnostics)
    parts = []
    for _, sub in _facets(runs, keys):
        at = sub[sub[x] == shown_value(sub, diagnostics)]
        seeds = at.groupby(keys + ["memory", x], dropna=False).agg(
            done=("run_id", lambda r: r.isin(rows["run_id"]).sum()), n=("run_id", "size"))
        cells = summary[summary["memory"].isin(at["memory"]) & summary[x].isin(at[x]) & _same(summary, sub, keys)]
        cells = cells.assign(cell=[f"{fmt(m)} [{fmt(a)}, {fmt(b)}]" for m, a, b in
                                   zip(cells["median"], cells["q1"], cells["q3"], strict=True)])
        wide = cells.pivot(index=keys + ["memory", x], columns="metric", values="cell")
        seeds = seeds.assign(seeds=[f"{d}/{n}" for d, n in zip(seeds["done"], seeds["n"], strict=True)])
        parts.append(seeds[["seeds"]].join(wide))
    table = pd.concat(parts)
    order = [m[0] for m in METRICS if m[0] in summary["metric"].unique()]
    table = table.reindex(columns=["seeds"] + order).rename(columns=LABELS).reset_index()
    rank = {m: i for i, m in enumerate(memory_order(runs))}
    table = table.sort_values(keys + ["memory"], key=lambda s: s.map(rank) if s.name == "memory" else s)
    return table.rename(columns={x: sym}).fillna("–").reset_index(drop=True)


def _views(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> list[tuple[str, list[tuple[str, pd.DataFrame]], list]]:
    """Per task (where it varies): its title; its views, ("memory", each memory at the S (L) of ``shown_value``,
    last evaluation), then (the sweep column, against S) where a memory is run at two or more, then ("step",
    over training at that S) where a run there stores two or more evaluations; the memories run at that S."""
    x, _, sym = sweep_axis(runs)
    keys, facets = _keys(runs), _facets(runs)
    final, steps = contrast_summary(runs, diagnostics), contrast_summary(runs, diagnostics, over_training=True)
    rows, out = contrast_rows(runs, diagnostics), []
    for head, sub in facets:
        value = shown_value(sub, diagnostics)
        mine, over = final[_same(final, sub, keys)], steps[_same(steps, sub, keys) & (steps[x] == value)]
        if not (mine[x] == value).any():
            continue
        views = [("memory", mine[mine[x] == value])]
        views += [(x, mine)] if mine.groupby("memory")[x].nunique().max() > 1 else []
        at = rows[rows["run_id"].isin(sub.loc[sub[x] == value, "run_id"])]
        views += [("step", over)] if at.groupby("run_id")["step"].nunique().max() > 1 else []
        where = ", ".join(filter(None, [head if len(facets) > 1 else "", f"{sym} = {fmt(value)}"]))
        out.append((where, views, sub.loc[sub[x] == value, "memory"].unique().tolist()))
    return out


def _forest(ax: Axes, stats: pd.DataFrame, memories: list[str], colors: dict[str, str]) -> None:
    """One row per memory (top to bottom in memory order): the median as a dot, the interquartile range a bar; a
    memory without rows (diverged, or no trace) is named in grey."""
    labels = []
    for i, mem in enumerate(memories):
        g = stats[stats["memory"] == mem]
        if len(g):
            ax.hlines(i, g["q1"], g["q3"], color=colors[mem], lw=2.0, alpha=0.6)
            ax.plot(g["median"], [i] * len(g), "o", color=colors[mem], ms=3.5, zorder=3)
        labels.append(mem if len(g) else f"{mem} (no data)")
    ax.set_yticks(range(len(memories)), labels, fontsize="small")
    for tick, mem in zip(ax.get_yticklabels(), memories, strict=True):
        tick.set_color("0.15" if (stats["memory"] == mem).any() else "0.6")
    ax.set_ylim(len(memories) - 0.5, -0.5)
    ax.grid(False, axis="y")
    if stats.empty:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _lines(ax: Axes, stats: pd.DataFrame, xcol: str, memories: list[str], colors: dict[str, str]) -> None:
    """Per memory the median against xcol (line and dots) and the interquartile range (band)."""
    for mem in memories:
        g = stats[stats["memory"] == mem].sort_values(xcol)
        if len(g):
            ax.plot(g[xcol], g["median"], color=colors[mem], lw=1.2, marker="o", ms=2.5, zorder=3)
            ax.fill_between(g[xcol], g["q1"], g["q3"], color=colors[mem], alpha=0.13, lw=0)


def _scale(set_scale, set_lim, metric: str, values: np.ndarray, lim: tuple[float, float]) -> None:
    """A cosine axis spans at least [-0.05, 1.05], so that panels compare at a glance; interference is on a log
    axis where it spans more than a decade and a half."""
    if metric == "interference":
        v = values[np.isfinite(values) & (values > 0)]
        if len(v) and v.max() > 30 * v.min():
            set_scale("log")
    else:
        set_lim(min(lim[0], -0.05), max(lim[1], 1.05))


def _panel(ax: Axes, kind: str, stats: pd.DataFrame, metric: tuple, where: str, runs: pd.DataFrame,
           memories: list[str], colors: dict[str, str]) -> None:
    """One panel: each memory at one S ("memory"), or the medians against S (the sweep column) or training step."""
    name, _, title, formula = metric
    x, xlabel, sym = sweep_axis(runs)
    values = stats[["q1", "median", "q3"]].to_numpy(float).ravel()
    if kind == "memory":
        _forest(ax, stats, memories, colors)
        _scale(ax.set_xscale, ax.set_xlim, name, values, ax.get_xlim())
        ax.set(title=f"{title}\n{where}, last evaluation", xlabel=formula)
    else:
        _lines(ax, stats, kind, memories, colors)
        _scale(ax.set_yscale, ax.set_ylim, name, values, ax.get_ylim())
        if kind == x:
            _sweep_ticks(ax, runs[x])
            if ax.get_xscale() == "linear":  # ten S side by side would overlap
                ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            elif len(ax.get_xticks()) > 5:  # a doubling sweep: every other value
                ax.set_xticks(ax.get_xticks()[::2], [f"{t:g}" for t in ax.get_xticks()[::2]])
            ax.set(title=f"{title}\nagainst {sym}, last evaluation", xlabel=xlabel)
        else:
            ax.set(title=f"{title}\nover training, {where}", xlabel="training step")
        ax.set_ylabel(formula)
    if name != "interference":
        (ax.axvline if kind == "memory" else ax.axhline)(0, color="0.6", lw=0.6, zorder=1)


@_styled
def contrast_summary_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> Figure:
    """The contrast figures per memory at a glance, one row per figure (``METRICS``) and task: the median over
    every position and finished seed (a dot, a line) and the interquartile range (a bar, a band).

    Columns: each memory at the S (L) of ``shown_value`` at its runs' last evaluation (the numbers of
    ``contrast_table``); against S where a memory is run at several; against training step at that S where the
    runs store several evaluations.

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.

    Raises:
        NoDataError: Without per-position contrast rows of a finished run.
    """
    if contrast_rows(runs, diagnostics).empty:
        raise NoDataError("no contrast diagnostics rows of finished runs")
    memories, facets = memory_order(runs), _views(runs, diagnostics)
    colors = palette(memories)
    cells = []  # one figure row: (where, metric, views, the memories of its per-memory panel)
    for where, views, run_at in facets:
        shown = [m for m in memories if m in run_at]
        cells += [(where, m, views, shown) for m in METRICS if any((s["metric"] == m[0]).any() for _, s in views)]
    heights = [max(1.5, 0.6 + 0.15 * len(shown)) for *_, shown in cells]
    ncols = max(len(views) for _, views, _ in facets)
    fig = Figure(figsize=(DOUBLE, sum(heights)), layout="constrained")
    grid = fig.subplots(len(cells), ncols, squeeze=False, gridspec_kw={"height_ratios": heights,
                                                                         "width_ratios": [1.25] + [1] * (ncols - 1)})
    for row, (where, metric, views, shown) in zip(grid, cells, strict=True):
        for ax in row[len(views):]:
            ax.set_visible(False)
        for ax, (kind, stats) in zip(row, views, strict=False):
            _panel(ax, kind, stats[stats["metric"] == metric[0]], metric, where, runs,
                   shown if kind == "memory" else memories, colors)
    drawn = {m for _, views, _ in facets for _, s in views for m in s["memory"]}
    handles = [Line2D([], [], color=colors[m], lw=1.5, marker="o", ms=3) for m in memories]
    labels = [m if m in drawn else f"{m} (no data)" for m in memories]
    ncol = min(len(labels), 3 if max(map(len, labels)) > 24 else 4)
    fig.set_figheight(fig.get_figheight() + 0.1 + 0.19 * -(-len(labels) // ncol))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)
    return fig
