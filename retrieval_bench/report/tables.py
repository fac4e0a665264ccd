"""Tables: the capacity per memory (largest S solved, its ratio to d_dot, the first S failed), and per memory and
S the final loss, the final accuracy, the seeds solved and the readout margin."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .frames import memory_order, sweep_axis


def _keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in ("task", "d_key") if runs[c].nunique() > 1] + ["memory"]


def _sorted(df: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(memory_order(runs))}
    return df.sort_values(keys, key=lambda s: s.map(rank) if s.name == "memory" else s)


def capacity_table(runs: pd.DataFrame, threshold: float = 1e-3) -> pd.DataFrame:
    """Capacity per memory: the largest S solved and its ratio to d_dot (PAPER.md §3).

    S counts as solved when the median final eval loss over seeds is <= ``threshold``; a diverged or failed
    seed counts as unsolved (loss inf), so a memory that diverges in most seeds gets no credit.

    Args:
        runs: The ``runs`` table of one experiment.
        threshold: The solved loss.

    Returns:
        Columns memory, d_dot, largest_solved_S (NaN if none), ratio_to_d_dot, loss_at_largest_S (median over
        finished seeds at the largest S swept), n_seeds, n_diverged and n_failed (runs that raised or lost their
        worker, kept apart from those whose numbers diverged), and first_failed_S (the paper's cliff);
        task and d_key come first when they vary. S reads L in a length sweep.
    """
    cols = ["memory", "d_dot", "largest_solved_S", "ratio_to_d_dot", "loss_at_largest_S", "n_seeds",
            "n_diverged", "n_failed", "first_failed_S"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    x, keys = sweep_axis(runs)[0], _keys(runs)
    scored = runs.assign(loss=runs["final_loss"].where(runs["status"] == "done").fillna(np.inf))
    rows = []
    for vals, g in scored.groupby(keys, sort=False, dropna=False):
        med = g.groupby(x)["loss"].median()
        solved, unsolved = med.index[med <= threshold], med.index[med > threshold]
        d_dot, largest = g["d_dot"].min(), solved.max() if len(solved) else np.nan
        done = g[(g["status"] == "done") & (g[x] == g[x].max())]
        rows.append({**dict(zip(keys, vals, strict=True)), "d_dot": d_dot, "largest_solved_S": largest,
                     "ratio_to_d_dot": largest / d_dot if d_dot > 0 else np.nan,
                     "loss_at_largest_S": done["final_loss"].median(), "n_seeds": g["seed"].nunique(),
                     "n_diverged": int((g["status"] == "diverged").sum()),
                     "n_failed": int((g["status"] == "failed").sum()),
                     "first_failed_S": unsolved.min() if len(unsolved) else np.nan})
    return _sorted(pd.DataFrame(rows), runs, keys)[keys[:-1] + cols].reset_index(drop=True)


def final_loss_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median final eval loss over finished seeds: rows memory (task, memory with several tasks), columns S.

    Args:
        runs: The ``runs`` table of one experiment.

    Returns:
        The pivot; NaN where every seed diverged or failed. Columns are L in a length sweep.
    """
    return _finished_median(runs, "final_loss")


def accuracy_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median final eval accuracy over finished seeds (the fraction of queries whose largest output is the target):
    rows memory (task, memory with several tasks), columns S; NaN where every seed diverged or failed.

    Unlike the readout margin, it counts only whether the target wins, not by how much: two memories can rank
    one way by margin and the other by accuracy.
    """
    return _finished_median(runs, "final_acc")


def _finished_median(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Median of a ``runs`` column over the finished seeds, per memory and S (empty for no runs)."""
    if runs.empty:
        return pd.DataFrame()
    return _per_memory_and_s(runs[runs["status"] == "done"], column, runs)


def margin_table(runs: pd.DataFrame, diagnostics: pd.DataFrame, metric: str = "margin") -> pd.DataFrame:
    """Median over finished seeds of a whole-sequence diagnostic at each run's last evaluation, by default the readout
    margin: the mean over queries of ŷ[target] − max_{j≠target} ŷ[j], in the units of the read (1: a clean
    one-hot read).

    Args:
        runs: The ``runs`` table of one experiment.
        diagnostics: The ``diagnostics`` table.
        metric: A diagnostic recorded once per evaluation (position NULL): margin, target_rank, accuracy, ...

    Returns:
        Rows memory (task, memory with several tasks), columns S (L in a length sweep); NaN where no run has
        the metric; an empty frame if none of the runs has it.
    """
    done = runs[runs["status"] == "done"]  # a diverged run's last evaluation is not finite: it has no margin
    rows = diagnostics[(diagnostics["metric"] == metric) & diagnostics["position"].isna()]
    rows = rows[rows["run_id"].isin(done["run_id"])]
    if runs.empty or rows.empty:
        return pd.DataFrame()
    last = rows[rows["step"] == rows.groupby("run_id")["step"].transform("max")]
    return _per_memory_and_s(done.merge(last[["run_id", "value"]], on="run_id"), "value", runs)


def solved_table(runs: pd.DataFrame, threshold: float = 1e-3) -> pd.DataFrame:
    """How many seeds solved each memory and S, of the seeds run: "k/n" ("" where nothing ran).

    A seed solved when its final eval loss is <= ``threshold``; a diverged or failed seed did not.

    Args:
        runs: The ``runs`` table of one experiment.
        threshold: The solved loss.

    Returns:
        Rows memory (task, memory with several tasks), columns S (L in a length sweep), string entries.
    """
    if runs.empty:
        return pd.DataFrame()
    marked = runs.assign(solved=((runs["status"] == "done") & (runs["final_loss"] <= threshold)).astype(float),
                         run=1.0)
    k, n = (_per_memory_and_s(marked, col, runs, "sum") for col in ("solved", "run"))
    cells = np.where(n.isna(), "", k.fillna(0).astype(int).astype(str) + "/" + n.fillna(0).astype(int).astype(str))
    return pd.DataFrame(cells, index=n.index, columns=n.columns)


def _per_memory_and_s(df: pd.DataFrame, value: str, runs: pd.DataFrame, how: str = "median") -> pd.DataFrame:
    """``value`` aggregated over seeds (``how``: median, sum, ...), rows memory (task and d_key first when they
    vary), columns the sweep axis; every memory and S of ``runs`` appears, NaN where ``df`` has no row."""
    x, keys = sweep_axis(runs)[0], _keys(runs)
    table = df.pivot_table(index=keys, columns=x, values=value, aggfunc=how)
    index = _sorted(runs[keys].drop_duplicates(), runs, keys).set_index(keys).index
    return table.reindex(index=index, columns=sorted(runs[x].dropna().unique()))
