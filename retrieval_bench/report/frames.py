"""The store read into pandas frames, and what the figures, tables and report.md share about them: the sweep
axis, the order of memories, the normalisation a memory name spells, and how a value is printed."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from .. import spec

FAILED = ("diverged", "failed")
LOG_FLOOR = 1e-8  # a loss of exactly 0 has no place on a log axis: it is drawn at this floor
SCHEMA = {  # the columns every loaded frame has, whatever the store holds
    "runs": "run_id experiment task memory num_keys seq_len d_key d_dot seed status steps final_loss "
    "best_loss final_acc wall_s state_size config version finished_at identity family d_model lr eval_seq_len",
    "curves": "run_id step split metric value",
    "diagnostics": "run_id step position metric value",
    "bench": "memory num_keys seq_len form threads ms_step ms_eval peak_mb max_diff status",
}
NUMERIC = set("num_keys seq_len d_key d_dot seed steps final_loss best_loss final_acc wall_s state_size d_model lr "
              "eval_seq_len step position "
              "value threads ms_step ms_eval peak_mb max_diff".split())

class NoDataError(ValueError):
    """A figure has no rows to draw; ``write_report`` skips it and says so in report.md."""


def load_frames(store_path: str | Path) -> dict[str, pd.DataFrame]:
    """Read the store's tables (runs, curves, diagnostics, bench), read-only.

    Args:
        store_path: The SQLite results store.

    Returns:
        Table name -> DataFrame, with every ``SCHEMA`` column (a missing table is an empty frame, a missing
        column NaN); numeric columns are numbers (NULL -> NaN).

    Raises:
        FileNotFoundError: If the store does not exist (sqlite would quietly create an empty one).
    """
    path = Path(store_path)
    if not path.is_file():
        raise FileNotFoundError(f"no results store at {path}")
    # Read-only: a report may run while the driver writes, and must never create or change the store.
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        frames = {}
        for name, cols in SCHEMA.items():
            df = pd.read_sql_query(f"SELECT * FROM {name}", con) if name in tables else pd.DataFrame()
            for col in cols.split():
                if col not in df.columns:
                    df[col] = pd.Series(dtype=float if col in NUMERIC else object)
            for col in NUMERIC & set(df.columns):
                df[col] = pd.to_numeric(df[col], errors="coerce")
            frames[name] = df
    finally:
        con.close()
    return frames


def sweep_axis(df: pd.DataFrame) -> tuple[str, str, str]:
    """The swept column, its axis label and symbol: S, or L when S is fixed and the run length varies."""
    # L is the axis where it varies within a task while S does not (two tasks at one S differ in L by design)
    lengths = df.groupby("task")["seq_len"].nunique().max() if "task" in df.columns else df["seq_len"].nunique()
    if df["num_keys"].nunique() <= 1 and lengths > 1:
        return "seq_len", "number of writes $L$", "L"
    return "num_keys", "number of keys $S$", "S"


def memory_order(runs: pd.DataFrame) -> list[str]:
    """Memories by d_dot (capacity order; softmax, unbounded, last), then name: legends read like Fig. 2."""
    d = runs.groupby("memory")["d_dot"].min()
    return sorted(d.index, key=lambda m: (math.isnan(d[m]), 0 if math.isnan(d[m]) else d[m], m))


def split_spec(memory: object) -> tuple[str, str, str] | None:
    """(φ, rule, normalisation label) of a ``PHI/RULE[/NORM[+attn]]`` memory name, as ``parse_spec`` reads it
    (the grammar of ``retrieval_bench.spec``).

    The label is the normalisation plus "+attn" with the attention normaliser ("sum", "sum+attn", "none+attn"
    for ``.../attn``). Without NORM a built-in rule's default applies. None for a registered memory
    (``softmax``), a malformed name, or a plugin rule without NORM, whose default the report cannot know.
    """
    try:
        s = spec.read(memory)
    except spec.SpecError:
        return None
    return s.phi, s.rule, s.norm_label


def normalisation_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of each (task, d_key, φ, rule) that is run under two or more normalisations, with columns phi,
    rule and norm (the label); ``memory`` becomes the label, so ``_Panels`` draws one line per normalisation."""
    runs = runs.reset_index(drop=True)  # a concatenation of frames may repeat labels
    split = runs["memory"].map(split_spec).dropna()
    parts = pd.DataFrame(split.tolist(), index=split.index, columns=["phi", "rule", "norm"])
    df = runs.loc[split.index].join(parts).assign(memory=parts["norm"])
    varies = df.groupby(["task", "d_key", "phi", "rule"], dropna=False)["norm"].transform("nunique") > 1
    return df[varies]


def fmt(v: object) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float | np.floating):
        return "∞" if math.isinf(v) else str(int(v)) if float(v).is_integer() else f"{v:.3g}"
    return str(v)
