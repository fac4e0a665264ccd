"""Figures and tables of the ``lm`` family (token-stream recall): the field's headline figure, accuracy against the
size of the recurrent state, and accuracy against the number of pairs, against the evaluation length
(extrapolation), and the memories' diagnostics per layer.

Every point is the best learning rate of its (memory, d_model, S, L): the median over seeds is taken per
learning rate, then the best of those (Zoology's practice: single-rate comparisons of recurrent memories mislead,
PAPER §7); ``best_lr_table`` says which rate each point took.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .figures import _facets, _Panels, _require, _styled, _sweep_ticks
from .frames import fmt, memory_order

POINT = ["memory", "d_model", "num_keys", "seq_len"]  # a point of the headline figure; lr is chosen per point


def is_lm(runs: pd.DataFrame) -> bool:
    return bool(len(runs)) and bool((runs["family"] == "lm").all())


def best_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """Per point (memory, d_model, S, L): the learning rate with the best median final accuracy over finished
    seeds, with that median (``acc``), its seeds' min and max, the state size and the seeds run. A point whose
    every run diverged or failed has accuracy 0 (the chance level of no answer) and lr NaN."""
    done = runs.assign(acc=runs["final_acc"].where(runs["status"] == "done"))
    per_lr = done.groupby(POINT + ["lr"], dropna=False).agg(
        acc=("acc", "median"), acc_min=("acc", "min"), acc_max=("acc", "max"), seeds=("seed", "nunique"),
        state_size=("state_size", "max")).reset_index()
    rows = []
    for key, g in per_lr.groupby(POINT, dropna=False):
        finite = g[g["acc"].notna()]
        best = finite.loc[finite["acc"].idxmax()] if len(finite) else g.iloc[0].assign(acc=0.0, lr=np.nan)
        rows.append({**dict(zip(POINT, key, strict=True)), "lr": best["lr"], "acc": best["acc"],
                     "acc_min": best["acc_min"], "acc_max": best["acc_max"], "state_size": g["state_size"].max(),
                     "lrs_tried": int(g["lr"].nunique()), "seeds": int(g["seeds"].max())})
    return pd.DataFrame(rows, columns=POINT + ["lr", "acc", "acc_min", "acc_max", "state_size", "lrs_tried",
                                               "seeds"])


@_styled
def state_size_figure(runs: pd.DataFrame) -> Figure:
    """Accuracy against state size (floats over layers and heads, log axis): one point per (memory, d_model) and
    number of pairs, lines joining a memory's widths; one panel per (sequence length, pairs)."""
    best = _require(best_lr(_require(runs, "runs")), "runs")
    facets = _facets(best.assign(task=runs["task"].iloc[0]), ("seq_len", "num_keys"))
    p = _Panels(len(facets), memory_order(runs), height=2.5)
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        for mem in p.memories:
            g = sub[sub["memory"] == mem].sort_values("state_size")
            if len(g) and g["state_size"].notna().any():
                ax.plot(g["state_size"], g["acc"], color=p.colors[mem], marker="o", ms=3.5, lw=1.2)
                ax.vlines(g["state_size"], g["acc_min"], g["acc_max"], color=p.colors[mem], lw=0.8, alpha=0.6)
                p.drawn.add(mem)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the decades only: minor ones collide
        ax.set(ylim=(-0.03, 1.03), xlabel="state size (floats, all layers and heads)",
               ylabel="query accuracy (best lr)", title=title.replace("num_keys", "pairs").replace("seq_len", "T"))
    return p.finish([])


@_styled
def pairs_figure(runs: pd.DataFrame) -> Figure:
    """Accuracy against the number of key-value pairs, per memory; one panel per (d_model, sequence length)."""
    best = _require(best_lr(_require(runs, "runs")), "runs").assign(task=runs["task"].iloc[0])
    facets = _facets(best, ("d_model", "seq_len"))
    p = _Panels(len(facets), memory_order(runs), height=2.4)
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        for mem in p.memories:
            g = sub[sub["memory"] == mem].sort_values("num_keys")
            if len(g):
                ax.plot(g["num_keys"], g["acc"], color=p.colors[mem], marker="o", ms=3.5, lw=1.2)
                ax.fill_between(g["num_keys"], g["acc_min"], g["acc_max"], color=p.colors[mem], alpha=0.15, lw=0)
                p.drawn.add(mem)
        _sweep_ticks(ax, sub["num_keys"])
        ax.set(ylim=(-0.03, 1.03), xlabel="key-value pairs", ylabel="query accuracy (best lr)",
               title=title.replace("seq_len", "T"))
    return p.finish([])


def _chosen_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs at each point's best learning rate."""
    best = best_lr(runs)[POINT + ["lr"]].rename(columns={"lr": "best"})
    merged = runs.merge(best, on=POINT, how="inner")
    return merged[np.isclose(merged["lr"], merged["best"]) | (merged["lr"].isna() & merged["best"].isna())]


@_styled
def extrapolation_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> Figure:
    """Accuracy against the evaluation length (the training length and its doublings up to ``eval_seq_len``),
    at each point's best learning rate; one panel per (d_model, pairs, training length)."""
    chosen = _chosen_runs(_require(runs, "runs"))
    d = _require(diagnostics[diagnostics["metric"] == "acc_by_length"], "acc_by_length diagnostics")
    at_train = chosen.assign(position=chosen["seq_len"], value=chosen["final_acc"])[["run_id", "position", "value"]]
    rows = pd.concat([at_train, d[d["run_id"].isin(chosen["run_id"])][["run_id", "position", "value"]]])
    rows = rows.merge(chosen[["run_id", "memory", "d_model", "num_keys", "seq_len", "task"]], on="run_id")
    facets = _facets(rows, ("d_model", "num_keys", "seq_len"))
    p = _Panels(len(facets), memory_order(runs), height=2.4)
    for ax, (title, sub) in zip(p.axes, facets, strict=True):
        p.lines(ax, sub, "position", "value", marker="o", ms=3)
        _sweep_ticks(ax, sub["position"])
        ax.set(ylim=(-0.03, 1.03), xlabel="evaluation length $T$", ylabel="query accuracy",
               title=title.replace("num_keys", "pairs").replace("seq_len", "trained at T"))
    return p.finish([])


@_styled
def layers_figure(runs: pd.DataFrame, diagnostics: pd.DataFrame) -> Figure:
    """Per layer: the state norm ‖W_t‖ along the sequence and cos(v̄_t, v_t) (what a write's key read just before
    the write, against what it writes), averaged over heads and traced sequences, at each point's best learning
    rate and the largest d_model; one column per layer."""
    chosen = _chosen_runs(_require(runs, "runs"))
    chosen = chosen[chosen["d_model"] == chosen["d_model"].max()]
    d = diagnostics[diagnostics["run_id"].isin(chosen["run_id"]) & diagnostics["position"].notna()]
    d = d[d["metric"].str.match(r"^L\d+H\d+\.(state_norm|contrast_cos)$", na=False)]
    d = _require(d, "per-layer diagnostics")
    parts = d["metric"].str.extract(r"^L(\d+)H\d+\.(.+)$")
    d = d.assign(layer=parts[0].astype(int), what=parts[1]).merge(chosen[["run_id", "memory"]], on="run_id")
    d = d.groupby(["memory", "run_id", "layer", "what", "position"], as_index=False)["value"].mean()
    layers = sorted(d["layer"].unique())
    panels = [(lay, what) for what in ("state_norm", "contrast_cos") for lay in layers]
    p = _Panels(len(panels), memory_order(runs), height=2.2, ncols=len(layers))
    for ax, (lay, what) in zip(p.axes, panels, strict=True):
        p.lines(ax, d[(d["layer"] == lay) & (d["what"] == what)], "position", "value")
        ax.set(xlabel="position $t$", title=f"layer {lay}",
               ylabel=r"$\|W_t\|$" if what == "state_norm" else r"$\cos(\bar v_t, v_t)$")
        if what == "state_norm" and (d.loc[d["what"] == what, "value"] > 0).all():
            ax.set_yscale("log")
    return p.finish([])


def accuracy_by_state_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The headline numbers: per memory and d_model (rows), the best-lr accuracy per (T, pairs) (columns, by
    length then pairs), with the state size in floats; where it depends on the length (softmax's KV cache), the
    range over the columns, as text."""
    best = best_lr(runs)
    if best.empty:
        return best
    best["point"] = [f"T={fmt(t)}, pairs={fmt(k)}" for t, k in zip(best["seq_len"], best["num_keys"], strict=True)]
    table = best.pivot_table(index=["memory", "d_model"], columns="point", values="acc", aggfunc="first")
    points = best.sort_values(["seq_len", "num_keys"], na_position="last")["point"].drop_duplicates()
    table = table[[p for p in points if p in table.columns]]
    table.columns.name = None
    sizes = best.groupby(["memory", "d_model"])["state_size"].agg(["min", "max"])
    state = [fmt(lo) if lo == hi or pd.isna(lo) else f"{fmt(lo)}-{fmt(hi)}"
             for lo, hi in zip(sizes["min"], sizes["max"], strict=True)]
    table.insert(0, "state_size", pd.Series(state, index=sizes.index).reindex(table.index))
    order = {m: i for i, m in enumerate(memory_order(runs))}
    return table.reset_index().sort_values(["memory", "d_model"], key=lambda s: s.map(order)
                                           if s.name == "memory" else s).reset_index(drop=True)


def best_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Which learning rate each point took, of how many tried."""
    best = best_lr(runs)
    order = {m: i for i, m in enumerate(memory_order(runs))}
    return best[POINT + ["lr", "lrs_tried", "seeds", "acc"]].sort_values(
        POINT, key=lambda s: s.map(order) if s.name == "memory" else s)
