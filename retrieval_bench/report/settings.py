"""Which runs of an experiment may share a report: those whose settings differ only in the report's axes
(memory, task, S, L, d_key; for the language model also pairs, width and learning rate, whose best the report
takes per point) and the seed. And where an experiment's report goes: a folder named after it that
never leaves the output folder, whatever the name holds.

A store may hold runs of one experiment made with other settings (``run tiny --set train.max_steps=100`` after
the 400-step runs); pooling them would count and take medians over both. ``setting_groups`` finds the settings
that differ within a report cell and splits the runs by them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd

CELL = ["memory", "task", "num_keys", "seq_len", "d_key"]  # what the figures and tables index by
_AXIS_KEYS = {"experiment", "seed", "task.name", "task.num_keys", "task.seq_len", "model.memory", "model.d_key"}
# the language model's report also plots by width and pairs, and takes each point's best learning rate
_LM_AXIS_KEYS = {"task.num_kv_pairs", "model.d_model", "train.lr"}
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,199}")  # a group folder adds "--key=value"


def _flat(text: object) -> dict[str, object]:
    """A stored config (JSON) as {"section.key": value}; {} where it cannot be read."""
    try:
        d = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    out = {}
    for sec, val in d.items():
        if isinstance(val, dict):
            out.update({f"{sec}.{k}": json.dumps(v, sort_keys=True) for k, v in val.items()})
        else:
            out[sec] = json.dumps(val, sort_keys=True)
    return out


def differing_settings(runs: pd.DataFrame) -> list[str]:
    """The settings (``section.key``) whose values differ between runs of one report cell, seeds aside.

    Compared on the run's identity (its settings that differ from their defaults, written by this version and
    by the migration of older stores); on the full config where a row has none."""
    key = runs["identity"] if "identity" in runs else pd.Series(None, index=runs.index)
    flat = key.where(key.notna(), runs["config"]).map(_flat)
    differ: set[str] = set()
    family = runs["family"] if "family" in runs else pd.Series(None, index=runs.index)
    for _, idx in runs.groupby([runs[c].astype(str) for c in CELL], dropna=False).groups.items():
        cell = [flat[i] for i in idx]
        axes = _AXIS_KEYS | (_LM_AXIS_KEYS if (family[idx] == "lm").all() else set())
        keys = set().union(*cell) - axes
        differ |= {k for k in keys if len({c.get(k) for c in cell}) > 1}
    return sorted(differ)


def setting_groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs split by the settings that differ within a cell: [(label, runs)], the group holding the most
    recently finished run first; one group with label "" where nothing differs."""
    fields = differing_settings(runs) if len(runs) else []
    if not fields:
        return [("", runs)]
    full = runs["config"].map(_flat)
    labels = full.map(lambda f: ", ".join(f"{k}={json.loads(f[k]) if k in f else 'default'}" for k in fields))
    groups = [(label, runs[labels == label]) for label in labels.unique()]
    latest = runs["finished_at"].fillna("")
    groups.sort(key=lambda g: latest[g[1].index].max(), reverse=True)
    return groups


def safe_name(name: str) -> str:
    """A folder name for an experiment or a group: the name itself where it is a plain name, else a slug of it
    and a short hash (so that two odd names never share a folder)."""
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name).strip("._")[:60] or "experiment"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def report_dir(out_dir: str | Path, name: str, label: str = "") -> Path:
    """``out_dir/<name>`` (``out_dir/<name>--<label>`` for a group of other settings), inside ``out_dir``."""
    folder = safe_name(name) if not label else safe_name(f"{name}--{label.replace(', ', '--')}")
    out = Path(out_dir) / folder
    if not out.resolve().is_relative_to(Path(out_dir).resolve()):  # cannot happen with a safe name; a guard
        raise ValueError(f"experiment name {name!r} would leave the output folder")
    return out
