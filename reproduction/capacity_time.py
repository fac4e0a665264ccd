"""How long the whole capacity sweep (tasks/capacity.toml, one seed) takes on this machine, from measured rates.

Usage (on a quiet machine; each step is single-threaded, as a sweep's workers are):
    python reproduction/capacity_time.py measure --out reproduction/capacity_rates.csv
    python reproduction/capacity_time.py estimate reproduction/results.db reproduction/capacity_rates.csv

``measure`` trains every memory of the experiment at S = 100, 300 and 600 for 200 steps with the experiment's
protocol (evaluation and diagnostics every 100 steps included) and writes seconds per training step.
``estimate`` multiplies, for every run of the grid, its number of steps by that rate (linear in S between the
measured sizes): the stored number of steps where the run is in the store, else the median steps of that
memory's three largest stored S (runs that fail stop by patience after a similar number of evaluations; a
memory that still solves there takes longer with S, so this undercounts those, and the script says how many
runs it estimated). The sum is divided by the number of workers: each run is one single-threaded process and
a sweep keeps them all busy until its last runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import time

import numpy as np
import pandas as pd
import torch

from retrieval_bench.bench import tune_malloc
from retrieval_bench.config import load as load_experiment
from retrieval_bench.train import train_run

SIZES = (100, 300, 600)


def measure(experiment: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    tune_malloc()  # as a sweep's workers do
    exp = load_experiment(experiment)
    rows = []
    first = exp.expand()[0]  # a short run first, so that one-time costs (imports, allocator) are not timed
    train_run(dataclasses.replace(first, train=dataclasses.replace(first.train, max_steps=2, diagnostics=False)))
    for rc in exp.expand():
        S = rc.task.kwargs()["num_keys"]
        if S not in SIZES or rc.seed != exp.seeds[0]:
            continue
        # never stops early: no loss is <= -1, and patience outlasts the run
        rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, max_steps=steps, stop_loss=-1.0,
                                                                patience=steps))
        t0 = time.perf_counter()
        res = train_run(rc)
        s_per_step = (time.perf_counter() - t0) / res["row"]["steps"]
        rows.append({"memory": rc.model.memory, "num_keys": S, "s_per_step": s_per_step})
        print(f"{rc.model.memory:>14} S={S:<4} {1e3 * s_per_step:7.1f} ms per step (evaluation included)")
    pd.DataFrame(rows).to_csv(out, index=False, float_format="%.6g")


def estimate(experiment: str, runs_store: str, rates_csv: str, workers: int) -> None:
    exp = load_experiment(experiment)
    grid = [(rc.model.memory, rc.task.kwargs()["num_keys"]) for rc in exp.expand() if rc.seed == exp.seeds[0]]
    with sqlite3.connect(f"file:{runs_store}?mode=ro", uri=True) as db:
        runs = pd.read_sql("select memory, num_keys, steps from runs where experiment = ? and seed = ?", db,
                           params=(exp.name, exp.seeds[0]))
    rates = pd.read_csv(rates_csv)
    stored = runs.set_index(["memory", "num_keys"])["steps"]
    total, n_est, per_memory = 0.0, 0, {}
    for mem, S in grid:
        r = rates[rates["memory"] == mem].sort_values("num_keys")
        if r.empty:
            raise SystemExit(f"no measured rate for {mem}: run `measure` first")
        rate = float(np.interp(S, r["num_keys"], r["s_per_step"]))
        if (mem, S) in stored.index:
            steps = float(stored.loc[(mem, S)])
        else:
            own = runs[runs["memory"] == mem].sort_values("num_keys")
            if own.empty:
                raise SystemExit(f"no stored run of {mem} to take a number of steps from")
            steps, n_est = float(own.tail(3)["steps"].median()), n_est + 1
        total += steps * rate
        per_memory[mem] = per_memory.get(mem, 0.0) + steps * rate
    for mem, s in per_memory.items():
        print(f"{mem:>14}: {s / 3600:5.2f} h of worker time")
    print(f"{len(grid)} runs in the grid, {len(grid) - n_est} with their stored number of steps, {n_est} estimated")
    print(f"whole sweep on {workers} single-threaded workers: {total / workers / 3600:.2f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", default="capacity_rates.csv")
    m.add_argument("--steps", type=int, default=200)
    e = sub.add_parser("estimate")
    e.add_argument("runs_store")
    e.add_argument("rates_csv")
    e.add_argument("--workers", type=int, default=2)
    for p in (m, e):
        p.add_argument("--experiment", default="capacity")
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args.experiment, args.out, args.steps)
    else:
        estimate(args.experiment, args.runs_store, args.rates_csv, args.workers)


if __name__ == "__main__":
    main()
