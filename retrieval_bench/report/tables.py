"""Tables: the capacity per memory (largest S solved, its ratio to d_dot, the first S failed) and the final loss
per memory and S."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .frames import FAILED, memory_order, sweep_axis


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
        finished seeds at the largest S swept), n_seeds, n_diverged, and first_failed_S (the paper's cliff);
        task and d_key come first when they vary. S reads L in a length sweep.
    """
    cols = ["memory", "d_dot", "largest_solved_S", "ratio_to_d_dot", "loss_at_largest_S", "n_seeds",
            "n_diverged", "first_failed_S"]
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
                     "n_diverged": int(g["status"].isin(FAILED).sum()),
                     "first_failed_S": unsolved.min() if len(unsolved) else np.nan})
    return _sorted(pd.DataFrame(rows), runs, keys)[keys[:-1] + cols].reset_index(drop=True)


def final_loss_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Median final eval loss over finished seeds: rows memory (task, memory with several tasks), columns S.

    Args:
        runs: The ``runs`` table of one experiment.

    Returns:
        The pivot; NaN where every seed diverged or failed. Columns are L in a length sweep.
    """
    if runs.empty:
        return pd.DataFrame()
    x, keys = sweep_axis(runs)[0], _keys(runs)
    table = runs[runs["status"] == "done"].pivot_table(index=keys, columns=x, values="final_loss",
                                                       aggfunc="median")
    index = _sorted(runs[keys].drop_duplicates(), runs, keys).set_index(keys).index
    return table.reindex(index=index, columns=sorted(runs[x].dropna().unique()))
