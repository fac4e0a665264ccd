"""The one training loop: the paper's protocol (PAPER §2.3-2.4) for any task and memory.

Adam, a fresh batch every step, evaluation every ``eval_every`` steps on the run's fixed evaluation set; stop
when the eval loss reaches ``stop_loss``, after ``patience`` evaluations in a row without a new best, or at
``max_steps``. A non-finite loss, gradient or parameter ends the run as ``diverged`` with what it had recorded.

The eval loss is the plain mean of ½‖ŷ − onehot(target)‖² over every real query of the evaluation set (the
official code takes a mean of per-chunk means, which weighs the last, smaller chunk more).
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
from .model import RetrievalModel, retrieval_loss

log = logging.getLogger(__name__)

# Streams of randomness of one run, derived from its seed so that none overlaps another.
_INIT, _TRAIN, _EVAL, _PHI = 0, 1, 2, 3


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + stream)


def build_model(cfg: RunConfig, num_values: int) -> RetrievalModel:
    """The run's model, initialised from its seed without touching the caller's global RNG."""
    kwargs = {"redraw": cfg.model.redraw} if cfg.model.memory.startswith("favor") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + _INIT)  # nn.Linear draws its init from the global RNG
        model = RetrievalModel(cfg.task.kwargs()["num_keys"], cfg.model.memory, d_key=cfg.model.d_key,
                               num_values=num_values, embed_factor=cfg.model.embed_factor, **kwargs)
    phi = getattr(model.memory, "phi", None)
    if phi is not None:
        phi.seed(cfg.seed * 1000 + _PHI)
    return model


@torch.no_grad()
def evaluate(model: RetrievalModel, ev) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, ŷ) on an EvalSet; every sequence's memory is built once and read at all its queries."""
    model.eval()
    y = model(ev.keys, ev.values, ev.queries)  # (N, Q, V)
    loss = retrieval_loss(y, ev.targets, ev.mask).item()
    acc = ((y.argmax(-1) == ev.targets) & ev.mask).sum().item() / max(int(ev.mask.sum()), 1)
    model.train()
    return loss, acc, y


def _finite_params(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def train_run(cfg: RunConfig, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one run. Returns ``{"row": runs-table row, "curves": [...], "diagnostics": [...]}``.

    ``progress`` is called after every evaluation with ``{"run_id", "step", "eval_loss"}`` (the live view).
    """
    from . import __version__

    t0 = time.perf_counter()
    tc = cfg.train
    task = cfg.task.build()
    model = build_model(cfg, task.num_values)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    train_gen, eval_set = _gen(cfg.seed, _TRAIN), task.eval_set(_gen(cfg.seed, _EVAL))
    tracker = None
    if tc.diagnostics:
        from .diagnostics import StabilityTracker

        tracker = StabilityTracker(max_positions=tc.diag_positions)

    curves: list[tuple] = []
    diags: list[tuple] = []
    best, strike, final_loss, final_acc = math.inf, 0, None, None
    status, reason, step, train_sum, grad_norm = "done", "max_steps", 0, 0.0, 0.0
    for step in range(1, tc.max_steps + 1):
        batch = task.sample(tc.batch_size, train_gen)
        y = model(batch.keys, batch.values, batch.query[:, None])[:, 0]  # (B, V)
        loss = retrieval_loss(y, batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lv = loss.item()
        if not math.isfinite(lv):
            status, reason = "diverged", f"non-finite training loss at step {step}"
            if tracker is not None:
                diags += [(step, *r) for r in tracker.update(step, [], loss=lv)]
            break
        train_sum += lv
        opt.step()
        if step % tc.eval_every and step != tc.max_steps:
            continue
        grad_norm = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in model.parameters()
                                  if p.grad is not None))
        eval_loss, eval_acc, y_eval = evaluate(model, eval_set)
        n_train = step % tc.eval_every or tc.eval_every
        curves += [(step, "eval", "loss", eval_loss), (step, "eval", "acc", eval_acc),
                   (step, "train", "loss", train_sum / n_train)]
        train_sum = 0.0
        if tracker is not None:
            diags += [(step, *r) for r in tracker.collect(model, eval_set, step=step, y=y_eval,
                                                           grad_norm=grad_norm, loss=eval_loss)]
        if not (math.isfinite(eval_loss) and math.isfinite(grad_norm) and _finite_params(model)):
            status, reason = "diverged", f"non-finite eval loss, gradient or parameter at step {step}"
            break
        final_loss, final_acc = eval_loss, eval_acc
        if progress is not None:
            progress({"run_id": cfg.run_id, "step": step, "eval_loss": eval_loss})
        improved, best = eval_loss < best, min(best, eval_loss)
        if eval_loss <= tc.stop_loss:
            reason = "solved"
            break
        strike = 0 if improved else strike + 1
        if strike >= tc.patience:
            reason = "patience"
            break
    if status == "diverged":
        log.warning("run %s diverged: %s", cfg.run_id, reason)
    task_kw = cfg.task.kwargs()
    row = {
        "run_id": cfg.run_id, "experiment": cfg.experiment, "task": cfg.task.name, "memory": cfg.model.memory,
        "num_keys": task_kw["num_keys"], "seq_len": task.seq_len, "d_key": cfg.model.d_key,
        "d_dot": model.memory.d_dot(cfg.model.d_key), "seed": cfg.seed, "status": status, "stop_reason": reason,
        "steps": step, "final_loss": final_loss, "best_loss": best if math.isfinite(best) else None,
        "final_acc": final_acc, "wall_s": time.perf_counter() - t0,
        "state_size": _state_size(model, cfg, task), "error": None, "config": cfg.to_dict(),
        "version": __version__, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return {"row": row, "curves": curves, "diagnostics": diags}


def _state_size(model: RetrievalModel, cfg: RunConfig, task) -> int | None:
    try:
        return int(model.memory.state_size(cfg.model.d_key, task.num_values, task.seq_len))
    except NotImplementedError:
        return None


def failed_result(cfg: RunConfig, error: str, wall_s: float = 0.0) -> dict[str, Any]:
    """The record of a run that raised or whose worker was lost: stored as ``failed``, retried on resume."""
    from . import __version__

    kw = cfg.task.kwargs()
    row = {"run_id": cfg.run_id, "experiment": cfg.experiment, "task": cfg.task.name,
           "memory": cfg.model.memory, "num_keys": kw.get("num_keys"), "seq_len": kw.get("seq_len"),
           "d_key": cfg.model.d_key, "seed": cfg.seed, "status": "failed", "stop_reason": "error",
           "error": error[-2000:], "wall_s": wall_s, "config": cfg.to_dict(), "version": __version__,
           "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    return {"row": row, "curves": [], "diagnostics": []}
