"""Many runs per step (DESIGN §9, "a group is a bigger batch"): G runs of one shape train as one stacked model.

In the paper's model the memory holds nothing of a run's own; only the front end (embedding, key, gate and query
projections) belongs to a run. Runs that share every shape (the memory, the task and its sizes, d_key, the batch
size, the device) and differ in seed, learning rate or other scalars of the protocol can therefore share one
memory call over G·B sequences, while each run's front end is applied to its own batch as batched matmuls. The
loss is the sum of the runs' own mean losses, so no gradient mixes; each run keeps its own parameters, its own
optimizer, data streams, evaluation, stop rule, diagnostics and record (``train._Run``). A run that ends leaves
the group and is handed back at once, at its own stop step; its wall time is its share of each step it took
part in (the shared forward and backward split evenly) plus its own evaluations.

A run's record does not depend on its group: the same curves, losses, steps and status as alone, within float
tolerance (batched matmuls round differently; tests/test_group.py checks it). A family groups its runs where it
has a ``group_loss``: the retrieval model, and the language model (its embedding, norms, convolution,
projections and MLP stacked, each layer's memory read for G·B sequences, its head and loss per run). Memories
with parameters, buffers or random features of their own (``group_blocker``) train one after another in their
group's worker.

``train.group`` (``run --group N``) sets the group size; ``"auto"`` is ``GROUP_AUTO`` on a GPU and, on the CPU,
``CPU_GROUP_AUTO`` for small steps only, where ``bench --group`` measured a gain (``group_size``).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .config import RunConfig

log = logging.getLogger(__name__)

#: runs per group where ``train.group = "auto"`` and the runs train on a GPU
GROUP_AUTO = 16
#: on the CPU, ``"auto"`` groups this many runs where a training step holds at most CPU_GROUP_MAX_TOKENS
#: written pairs (batch_size · seq_len): there a step is bound by per-op overhead, and a group of 4 took
#: 2.2-3.4x one run's step (S = 20-32, B = 32, one thread); at S = 64 it took 2.8-4.2x, no gain (README)
CPU_GROUP_AUTO = 8
CPU_GROUP_MAX_TOKENS = 1024
#: families that can train a group in one memory call (those with a ``group_loss``)
GROUPED_FAMILIES = ("retrieval", "lm")


def group_size(cfg: RunConfig, device: str | None = None) -> int:
    """How many runs ``cfg``'s group may hold: its ``train.group``, or for ``"auto"``: ``GROUP_AUTO`` on a GPU
    (the device is resolved here, on the driver: ``auto`` is a GPU where this machine has one); on the CPU
    ``CPU_GROUP_AUTO`` where a step is small (batch_size · seq_len ≤ ``CPU_GROUP_MAX_TOKENS``), else 1."""
    setting = cfg.train.group
    if setting != "auto":
        return int(setting)
    setting = str(cfg.train.device).strip().lower()
    if setting == "auto":
        if device is None:
            from .runtime import resolve_device

            setting = resolve_device("auto").type
        else:
            setting = str(device)
    if setting.startswith("cuda"):
        return GROUP_AUTO
    if cfg.model.kind not in GROUPED_FAMILIES:
        return 1
    return CPU_GROUP_AUTO if cfg.train.batch_size * _seq_len(cfg.task) <= CPU_GROUP_MAX_TOKENS else 1


@functools.lru_cache(maxsize=256)
def _seq_len(task) -> int:
    return int(task.build().seq_len)


def shape_key(cfg: RunConfig) -> tuple | None:
    """What runs of one group share (everything but the seed and the protocol's scalars), or None where the
    run's family cannot be grouped."""
    if cfg.model.kind not in GROUPED_FAMILIES:
        return None
    t = cfg.train
    return (cfg.task, cfg.model, t.batch_size, str(t.device).strip().lower(), t.group)


def form_groups(runs: Sequence[RunConfig], workers: int = 1, device: str | None = None
                ) -> list[RunConfig | list[RunConfig]]:
    """The work items of a sweep: each run alone, or a list of up to ``group_size`` runs of one shape.

    Order is kept as far as it can be: a group stands where its first run stood. Where there would be fewer
    items than ``workers``, groups are split (``spread``). ``device`` is where the runs will train when it is
    known better than their setting says (a Ray task given GPUs: ``"cuda"``); it decides ``"auto"``. A group of
    one is a run."""
    return spread(_fill_groups(runs, device), workers)


def spread(items: list, workers: int) -> list:
    """``items`` with groups split evenly until there are ``workers`` items (or every run is alone): each split
    goes to the group whose parts are largest, so 8 runs for 3 workers become 3, 3 and 2."""
    parts = [1] * len(items)
    sizes = [len(it) if isinstance(it, list) else 1 for it in items]
    while sum(parts) < workers:
        best = max(range(len(items)), key=lambda i: sizes[i] / parts[i], default=None)
        if best is None or sizes[best] <= parts[best]:
            break
        parts[best] += 1
    out: list[Any] = []
    for item, k in zip(items, parts, strict=True):
        out += _split_evenly(item, k) if isinstance(item, list) else [item]
    return [it[0] if isinstance(it, list) and len(it) == 1 else it for it in out]


def _split_evenly(runs: list, k: int) -> list[list]:
    """``runs`` in ``k`` consecutive parts whose sizes differ by at most one, the larger first."""
    size, extra = divmod(len(runs), k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [runs[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _fill_groups(runs: Sequence[RunConfig], device: str | None = None) -> list:
    """Runs of one shape in groups of at most their size, as even as can be (7 runs in groups of 4: 4 and 3)."""
    slots: list[Any] = []  # a run alone, or the key of a shape (its groups go where its first run stood)
    by_key: dict[tuple, list[RunConfig]] = {}
    for cfg in runs:
        key = shape_key(cfg)
        if key is None or group_size(cfg, device) <= 1:
            slots.append(cfg)
            continue
        if key not in by_key:
            by_key[key] = []
            slots.append(key)
        by_key[key].append(cfg)
    items: list[Any] = []
    for slot in slots:
        if not isinstance(slot, tuple):
            items.append(slot)
            continue
        group = by_key[slot]
        items += _split_evenly(group, -(-len(group) // group_size(group[0], device)))  # as few groups as fit
    return items


def train_group(cfgs: Sequence[RunConfig], progress: Callable[[dict[str, Any]], None] | None = None
                ) -> Iterator[dict[str, Any]]:
    """Train ``cfgs`` (runs of one shape) together; yield each run's record as the run ends.

    A run that raises ends as ``failed`` with the traceback, and the others go on; where the group step itself
    raises, every run still in it goes on alone (``_together``)."""
    from .train import _Run, failed_result

    runs: list[_Run] = []
    for cfg in cfgs:
        t0 = time.perf_counter()
        try:
            runs.append(_Run(cfg, progress))
        except Exception:
            yield failed_result(cfg, traceback.format_exc(), time.perf_counter() - t0)
        else:
            runs[-1].clock = time.perf_counter() - t0
    if not runs:
        return
    blocker = _blocker(runs)
    if blocker is not None:
        log.info("%d runs train one after another, not as a group: %s", len(runs), blocker)
        for run in runs:
            yield from _alone(run)
        return
    yield from _together(runs)


def _blocker(runs: list) -> str | None:
    fam = runs[0].fam
    if not hasattr(fam, "group_loss"):
        return f"the {fam.name} family has no group_loss"
    if len({r.device for r in runs}) > 1:
        return "its runs are on different devices"
    why = fam.group_blocker(runs[0].model)
    return None if why is None else f"{runs[0].cfg.model.memory}: {why}"


def _alone(run, start: int = 1, batch: Any = None) -> Iterator[dict[str, Any]]:
    """One run of a group trained on by itself from step ``start`` (its first batch ``batch`` where it was
    drawn already), as ``train_run`` would."""
    from .train import failed_result

    t0 = time.perf_counter() - run.clock
    try:
        run.train_from(start, batch)
        yield run.result(t0)
    except Exception:
        yield failed_result(run.cfg, traceback.format_exc(), time.perf_counter() - t0)


def _together(runs: list) -> Iterator[dict[str, Any]]:
    """The group's loop: one stacked forward and backward per step for every run still in it, then each run's
    own optimizer step, evaluation and stop rule, exactly as ``train_run`` applies them. Where a group step
    fails (out of memory, say), each run still in the group goes on alone from that step, with the batch it had
    drawn for it, so that its record is what it would have been."""
    from .families import to_device
    from .train import failed_result

    fam, device = runs[0].fam, runs[0].device
    for r in runs:
        r.group = len(runs)
    active, step = list(runs), 0
    while active:
        step += 1
        t = time.perf_counter()
        batches: list[Any] = []
        try:
            for r in active:
                batches.append(r.batch())
                fam.check_batch(r.model, batches[-1])
            for r in active:
                r.opt.zero_grad(set_to_none=True)
            losses = fam.group_loss([r.model for r in active], [to_device(b, device) for b in batches])
            losses.sum().backward()
            values = losses.tolist()
        except Exception as e:
            log.warning("a step of a group of %d runs failed (%s: %s); each goes on alone", len(active),
                        type(e).__name__, e)
            share = (time.perf_counter() - t) / len(active)
            batches += [None] * (len(active) - len(batches))
            for r, b in zip(active, batches, strict=True):
                r.clock += share
                r.opt.zero_grad(set_to_none=True)
                yield from _alone(r, step, b)
            return
        share = (time.perf_counter() - t) / len(active)
        still = []
        for r, lv in zip(active, values, strict=True):
            t_own = time.perf_counter()
            r.clock += share
            try:
                go = r.apply(step, lv)
                if go and r.eval_due(step):
                    go = r.evaluate(step)
                go = go and step < r.cfg.train.max_steps
                record = None if go else r.result(t_own - r.clock)  # its wall time: its clock and this
            except Exception:
                yield failed_result(r.cfg, traceback.format_exc(), r.clock + time.perf_counter() - t_own)
                continue
            r.clock += time.perf_counter() - t_own
            if go:
                still.append(r)
            else:
                yield record
        active = still


def stacked_step(fam, members: list, batches: list) -> Any:
    """One optimizer step of ``members`` ([(model, optimizer)], runs of one shape) on their ``batches`` as one
    stacked model: every run's gradients zeroed, one forward and backward of the sum of their losses, each
    run's optimizer step. Returns the losses (G,). What ``bench --group`` times; ``_together`` adds each run's
    own rules (non-finite losses, clipping, schedules) between the backward and the step."""
    for _, opt in members:
        opt.zero_grad(set_to_none=True)
    losses = fam.group_loss([m for m, _ in members], batches)
    losses.sum().backward()
    for _, opt in members:
        opt.step()
    return losses
