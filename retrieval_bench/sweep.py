"""The sweep driver: skip what the store holds, execute the rest, store each run as it finishes.

Only this process writes the store, one transaction per finished run, so a sweep stopped by Ctrl-C or SIGKILL
keeps every finished run and the same command completes the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .config import Experiment, RunConfig
from .executors import Executor
from .group import form_groups
from .store import Store


@dataclass
class SweepState:
    """What the live view shows: counts, the runs in flight and an ETA."""

    total: int
    skipped: int
    started_at: float = field(default_factory=time.perf_counter)
    done: int = 0
    diverged: int = 0
    failed: int = 0
    running: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    workers: int = 1

    @property
    def finished(self) -> int:
        return self.done + self.diverged + self.failed

    def eta_s(self) -> float | None:
        if not self.finished:
            return None
        rate = (time.perf_counter() - self.started_at) / self.finished
        return rate * (self.total - self.finished)

    def render(self) -> Group:
        eta = self.eta_s()
        head = Text(
            f"runs {self.finished}/{self.total} (skipped {self.skipped} already stored) · done {self.done} · "
            f"diverged {self.diverged} · failed {self.failed} · running {len(self.running)} · "
            f"ETA {_fmt_s(eta) if eta is not None else '?'}")
        table = Table(box=None, pad_edge=False, show_header=bool(self.running))
        for col in ("run", "step", "eval loss"):
            table.add_column(col)
        for rid, info in list(self.running.items())[:12]:
            loss = info.get("eval_loss")
            # labels hold user strings (memory names): Text, so that brackets print instead of being markup
            table.add_row(Text(self.labels.get(rid, rid)), str(info.get("step", 0)),
                          f"{loss:.4g}" if loss is not None else "-")
        return Group(head, table)


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def label(cfg: RunConfig) -> str:
    kw = cfg.task.kwargs()
    extra = f" L={kw['seq_len']}" if "seq_len" in kw else ""
    if cfg.model.kind == "lm":  # a token-stream run: its pairs, length, width and learning rate
        return (f"{cfg.model.memory} pairs={kw.get('num_kv_pairs')}{extra} d={cfg.model.d_model} "
                f"lr={cfg.train.lr:g} seed={cfg.seed}")
    return f"{cfg.model.memory} S={kw.get('num_keys')}{extra} seed={cfg.seed}"


def plan(exp: Experiment, store: Store, rerun: bool = False) -> tuple[list[RunConfig], list[RunConfig]]:
    """(runs to execute, runs already stored) for an experiment; duplicates in the grid collapse."""
    runs = list({r.run_id: r for r in exp.expand()}.values())
    finished = set() if rerun else store.finished_ids(r.run_id for r in runs)
    return [r for r in runs if r.run_id not in finished], [r for r in runs if r.run_id in finished]


def run_sweep(exp: Experiment, store: Store, executor: Executor, rerun: bool = False,
              console: Console | None = None, live: bool = True) -> SweepState:
    """Execute an experiment's pending runs and store each as it finishes; returns the final counts."""
    todo, stored = plan(exp, store, rerun)
    state = SweepState(total=len(todo), skipped=len(stored), workers=getattr(executor, "workers", 1))
    state.labels = {r.run_id: label(r) for r in todo}
    console = console or Console(stderr=True)
    use_live = live and console.is_terminal

    def on_start(ev):
        state.running[ev["run_id"]] = {"step": 0}

    def on_progress(ev):
        if ev["run_id"] in state.running:
            state.running[ev["run_id"]].update(step=ev["step"], eval_loss=ev["eval_loss"])

    view = Live(get_renderable=state.render, console=console, refresh_per_second=4, transient=True)
    items = form_groups(todo, workers=state.workers, device=getattr(executor, "device_hint", None))
    with view if use_live else _Null() as lv:
        for result in executor.run(items, on_start, on_progress):
            row = result["row"]
            store.write_run(row, result["curves"], result["diagnostics"])
            state.running.pop(row["run_id"], None)
            status = row["status"]
            setattr(state, status, getattr(state, status) + 1)
            if not use_live:
                loss = row.get("final_loss")
                name = escape(state.labels.get(row["run_id"], row["run_id"]))
                acc = row.get("final_acc") if row.get("family") == "lm" else None  # a language model: accuracy
                console.print(f"[{state.finished}/{state.total}] {name}: {status}"
                              + (f", final eval loss {loss:.4g}" if loss is not None else "")
                              + (f", query accuracy {acc:.3f}" if acc is not None else ""), highlight=False)
            if lv is not None:
                lv.refresh()
    return state


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
