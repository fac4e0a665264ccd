"""The one training loop: the paper's protocol (PAPER §2.3-2.4) for every model family, task and memory.

A fresh batch every step, evaluation every ``eval_every`` steps; stop when the run is solved (the family says:
the retrieval model's eval loss reaches ``stop_loss``, the language model's eval accuracy reaches ``stop_acc``),
after ``patience`` evaluations in a row without a new best eval loss, or at ``max_steps``. The family
(families/) builds the model, makes its optimizer, and gives the training loss and the evaluation; the loop
knows nothing else.

Where the suite's protocol departs from the official code, ``TrainConfig``'s protocol options choose
(``protocol = "official"`` takes the official value of each; README, "Protocol: the suite against the official
code"). The suite's defaults:

- ``eval_set = "fixed"``: one evaluation set per run (the official code: a fresh one at every evaluation);
- ``eval_mean = "query"``: the eval loss is the plain mean of ½‖ŷ − onehot(target)‖² over every real query (the
  official code: the mean of per-chunk means, chunks of ``batch_size`` queries of one sequence, which weighs the
  queries of a short last chunk more);
- ``eval_omega = "eval"``: one model call per evaluation, so one FAVOR+ Ω (the official code: one call, so one
  Ω, per chunk);
- ``nonfinite = "stop"``: a non-finite loss, gradient or parameter ends the run as ``diverged`` with what it had
  recorded (the official code trains on and logs NaN; with ``"continue"`` so does this loop, the run ends by its
  stop rule and is stored as ``diverged`` all the same).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch

from .config import RunConfig
from .families import family, to_device
from .families.retrieval import _EVAL, _INIT, _PHI, _TRAIN, _gen, build_model, chunk_weights, evaluate
from .runtime import device_name, resolve_device

__all__ = ["train_run", "failed_result", "build_model", "evaluate", "chunk_weights", "_gen", "_INIT", "_TRAIN",
           "_EVAL", "_PHI"]

log = logging.getLogger(__name__)


def _finite_params(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float((p.grad * p.grad).sum()) for p in model.parameters() if p.grad is not None))


def train_run(cfg: RunConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one run. Returns ``{"row": runs-table row, "curves": [...], "diagnostics": [...]}``.

    ``progress`` is called after every evaluation with ``{"run_id", "step", "eval_loss"}`` (the live view).
    """
    t0 = time.perf_counter()
    run = _Run(cfg, progress)
    run.train_from(1)
    return run.result(t0)


class _Run:
    """One run in training: the family's model, optimizer and task, and what the loop carries between steps."""

    def __init__(self, cfg: RunConfig, progress: Callable[[dict[str, Any]], None] | None):
        self.cfg, self.progress = cfg, progress
        tc = cfg.train
        self.fam = fam = family(cfg.model.kind)
        # The protocol options in force (each raises ConfigError, naming the field, on an unknown value).
        self.fresh_sets, self.train_on = tc.option("eval_set") == "fresh", tc.option("nonfinite") == "continue"
        self.device = resolve_device(tc.device, "train.device")
        self.task = cfg.task.build()
        self.model = fam.build(cfg, self.task).to(self.device)
        self.opt, self.schedule = fam.optimizer(cfg, self.model)
        self.train_gen, self.eval_gen = _gen(cfg.seed, _TRAIN), _gen(cfg.seed, _EVAL)
        # the run's evaluation set ("fixed"), or the first of a series ("fresh"); drawn on the host, moved once
        self.eval_set = to_device(self.task.eval_set(self.eval_gen), self.device)
        self.tracker = fam.tracker(cfg)
        self.curves: list[tuple] = []
        self.diags: list[tuple] = []
        self.best, self.strike, self.final_loss, self.final_acc = math.inf, 0, None, None
        self.status, self.reason, self.step, self.train_sum, self.grad_norm = "done", "max_steps", 0, 0.0, 0.0
        self.first_bad, self.n_evals = None, 0  # the first step with a non-finite value (nonfinite = "continue")
        self.clock = 0.0  # seconds of work that are this run's (group.py: its share of each group step)
        self.group = 1  # how many runs it trained with (group.py), stored as the config's train.group

    def train_from(self, start: int, batch: Any = None) -> None:
        """Train from step ``start`` (its batch ``batch`` where it is drawn already) until a stop rule ends the
        run or ``max_steps`` is reached, evaluating when due."""
        for step in range(start, self.cfg.train.max_steps + 1):
            if not self.train_step(step, batch if step == start else None):
                return
            if self.eval_due(step) and not self.evaluate(step):
                return

    def eval_due(self, step: int) -> bool:
        """Whether an evaluation follows training step ``step``: every ``eval_every`` steps, and at the last."""
        tc = self.cfg.train
        return step % tc.eval_every == 0 or step == tc.max_steps

    def batch(self) -> Any:
        """The run's next training batch, drawn from its own generator on the host."""
        return self.task.sample(self.cfg.train.batch_size, self.train_gen)

    def train_step(self, step: int, batch: Any = None) -> bool:
        """One optimizer step on a fresh batch (or ``batch``, already drawn); False where a non-finite loss ends
        the run."""
        batch = self.batch() if batch is None else batch
        loss = self.fam.train_loss(self.model, to_device(batch, self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return self.apply(step, loss.item())

    def apply(self, step: int, lv: float) -> bool:
        """The rest of a training step once the gradients of the loss ``lv`` are in: the non-finite rule,
        clipping, the optimizer and the schedule. False where a non-finite loss ends the run (the parameters
        then stay as they were)."""
        self.step = step
        fam, model = self.fam, self.model
        if not math.isfinite(lv):
            if not self.train_on:
                self.status, self.reason = "diverged", f"non-finite training loss at step {step}"
                if self.tracker is not None:
                    self.diags += [(step, *r) for r in self.tracker.update(step, [], loss=lv)]
                return False
            self.first_bad = self.first_bad or step
            if self.tracker is not None:
                self.tracker.observe(step, loss=lv)  # reported with the next evaluation's rows
        self.train_sum += lv
        fam.clip(self.cfg, model)
        self.opt.step()  # with NaN gradients (nonfinite = "continue") Adam makes the parameters NaN, as officially
        if self.schedule is not None:
            self.schedule.step()
        return True

    def evaluate(self, step: int) -> bool:
        """Evaluate, record, and apply the stop rules; False where the run ends here."""
        model, tc = self.model, self.cfg.train
        self.grad_norm = _grad_norm(model)
        if self.fresh_sets and self.n_evals:
            self.eval_set = to_device(self.task.eval_set(self.eval_gen), self.device)
        self.n_evals += 1
        ev = self.fam.evaluate(model, self.eval_set, self.cfg)
        n_train = step % tc.eval_every or tc.eval_every
        self.curves += [(step, "eval", "loss", ev.loss), (step, "eval", "acc", ev.acc),
                        (step, "train", "loss", self.train_sum / n_train)] + [(step, *c) for c in ev.curves]
        self.train_sum = 0.0
        self.diags += [(step, *d) for d in ev.diagnostics]
        if self.tracker is not None:
            self.diags += [(step, *r) for r in self.tracker.collect(model, self.eval_set, step=step, y=ev.state,
                                                                    grad_norm=self.grad_norm, loss=ev.loss)]
        if not (math.isfinite(ev.loss) and math.isfinite(self.grad_norm) and _finite_params(model)):
            if not self.train_on:
                self.status, self.reason = "diverged", f"non-finite eval loss, gradient or parameter at step {step}"
                return False
            self.first_bad = self.first_bad or step
        # the reported value is the last evaluation's (None where it is not finite)
        self.final_loss, self.final_acc = (ev.loss, ev.acc) if math.isfinite(ev.loss) else (None, None)
        if self.progress is not None:
            self.progress({"run_id": self.cfg.run_id, "step": step, "eval_loss": ev.loss})
        # a NaN eval loss is never a new best nor solved: strikes count on, as in the official code
        improved, self.best = ev.loss < self.best, min(self.best, ev.loss)
        if math.isfinite(ev.loss) and self.fam.solved(ev, tc):
            self.reason = "solved"
            return False
        self.strike = 0 if improved else self.strike + 1
        if self.strike >= tc.patience:
            self.reason = "patience"
            return False
        return True

    def result(self, t0: float) -> dict[str, Any]:
        """The run's record: its row (wall time from ``t0``), curves and diagnostics."""
        cfg, model, step = self.cfg, self.model, self.step
        if self.first_bad is not None:  # trained on through non-finite values: stored as diverged
            self.status, self.reason = "diverged", f"{self.reason} (non-finite from step {self.first_bad})"
        if self.status == "diverged":
            log.warning("run %s diverged: %s", cfg.run_id, self.reason)
        elif _finite_params(model):
            self.diags += [(step, *d) for d in self.fam.final(model, self.task, cfg, self.eval_gen)]
        row = run_row(cfg, status=self.status, stop_reason=self.reason, steps=step, final_loss=self.final_loss,
                      best_loss=self.best if math.isfinite(self.best) else None, final_acc=self.final_acc,
                      wall_s=time.perf_counter() - t0, device=f"{self.device} ({device_name(self.device)})",
                      **self.fam.row(model, cfg, self.task))
        row["config"]["train"]["group"] = self.group  # where it ran (no part of its identity), as the device
        return {"row": row, "curves": self.curves, "diagnostics": self.diags}


def run_row(cfg: RunConfig, **fields: Any) -> dict[str, Any]:
    """A runs-table row: what every row holds (the config, the axes the config gives, the version, the time),
    then ``fields`` (the outcome, and what only the trained model knows: d_dot, the state size, ...)."""
    from . import __version__

    kw = cfg.task.kwargs()
    row = {"run_id": cfg.run_id, "experiment": cfg.experiment, "task": cfg.task.name, "memory": cfg.model.memory,
           "num_keys": kw.get("num_keys", kw.get("num_kv_pairs")), "seq_len": kw.get("seq_len"),
           "d_key": cfg.model.d_key, "seed": cfg.seed, "family": cfg.model.kind, "lr": cfg.train.lr,
           "d_model": cfg.model.d_model if cfg.model.kind == "lm" else None, "error": None,
           "config": cfg.to_dict(), "version": __version__,
           "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    return {**row, **fields}


def failed_result(cfg: RunConfig, error: str, wall_s: float = 0.0) -> dict[str, Any]:
    """The record of a run that raised or whose worker was lost: stored as ``failed``, retried on resume."""
    row = run_row(cfg, status="failed", stop_reason="error", error=error[-2000:], wall_s=wall_s)
    return {"row": row, "curves": [], "diagnostics": []}
