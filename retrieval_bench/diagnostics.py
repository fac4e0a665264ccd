"""Diagnostics: what each write retrieves, how the state and the normaliser grow, and the readout margin.

The paper argues, without measuring it (PAPER §1.5), that the attention normaliser cannot balance what the
delta rule removes against what it writes, and that sums of positive features grow without bound. This module
turns both into stored numbers for every memory, from its ``trace`` (the reference loop under no_grad) on the
evaluation set. Every figure is a row ``(position, metric, value)``; ``position`` is the 0-based write
position t, or None for a whole-sequence figure.

Per position (at most ``max_positions`` evenly spaced positions, always the last; means over the traced
sequences, the first ``max_sequences`` of the N):
    contrast_cos, contrast_err: cos(v̄_t, v_t) and ‖v_t − v̄_t‖/‖v_t‖, v̄_t being what k_t retrieved just
        before v_t was written (a zero v̄ has cosine 0).
    contrast_{cos,err}_{first,rewrite}: the same over the sequences where t is the first write of its key,
        or a rewrite of a key written earlier (only where the data hold rewrites, e.g. the overwrite task).
    interference: ‖v̄_t‖ at first writes, what a never-written key already retrieves (crosstalk).
    state_norm (‖W_t‖_F), normaliser (z_t·φ(k_t)), normaliser_l1 (‖z_t‖_1), beta: where the trace has them.
Whole sequence (position None):
    margin (ŷ[target] − max_{j≠target} ŷ[j]), target_rank (0 = top; ties count half), accuracy (argmax), means
    over real queries; max_state_norm and max_normaliser over all t and traced sequences; attn_entropy.
    A memory without a trace (no method, None, or NotImplementedError) gets the readout rows only.

Use from a training loop (one ``StabilityTracker`` per run; ``grad_norm`` is the last step's gradient norm)::

    tracker = StabilityTracker(max_positions=64)                                        # before the loop
    rows = tracker.collect(model, eval_set, step=step, y=y_eval, grad_norm=grad_norm, loss=eval_loss)
    diags += [(step, *row) for row in rows]                                             # at every evaluation

Where a run stops between evaluations (a non-finite training loss), ``tracker.update(step, [], loss=loss)``
still yields its ``first_nonfinite_step`` row; ``tracker.observe(step, loss=...)`` at every step (plain
floats) makes that row name the exact step rather than the next evaluation. ``collect`` leaves the model as
it found it (train/eval mode, the random state of FAVOR+ maps), so a run's numbers do not depend on whether
diagnostics are on; a map that redraws on every call is traced with a fresh draw of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .memories import Memory
from .model import RetrievalModel
from .tasks import EvalSet

Row = tuple[int | None, str, float]

# Keeps cosine and relative error finite where a retrieved or written vector is exactly zero.
_TINY = 1e-12


def sample_positions(length: int, max_positions: int) -> torch.Tensor:
    """At most ``max_positions`` write positions (P,) in [0, length), evenly spaced, first and last in."""
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if max_positions == 1:
        return torch.tensor([length - 1])
    # spacing (L-1)/(P-1) >= 1, so rounding never merges two positions
    return torch.linspace(0, length - 1, min(length, max_positions)).round().long()


def first_writes(key_ids: torch.Tensor) -> torch.Tensor:
    """(N, L) key ids -> (N, L) bool, True where the key is written for the first time in its sequence."""
    N, L = key_ids.shape
    pos = torch.arange(L, device=key_ids.device).expand(N, L)
    first = torch.full((N, int(key_ids.max()) + 1), L, device=key_ids.device, dtype=pos.dtype)
    first.scatter_reduce_(1, key_ids, pos, reduce="amin")  # first[n, s]: earliest position of key s
    return torch.gather(first, 1, key_ids) == pos


def safe_trace(memory: nn.Module, k, v, betas, q, gates) -> dict[str, torch.Tensor] | None:
    """The memory's per-step record, or None where it offers none (a plugin need not implement ``trace``)."""
    trace = getattr(memory, "trace", None)
    if trace is None:
        return None
    try:
        return trace(k, v, betas, q, **gates)
    except NotImplementedError:
        return None


@contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore the mode, every random generator and every buffer afterwards.

    FAVOR+ redraws Ω from its own generator on each call; without this, turning diagnostics on would shift
    every later draw of the training run.
    """
    was_training = module.training
    gens = [(g, g.get_state()) for m in module.modules() for g in vars(m).values()
            if isinstance(g, torch.Generator)]
    bufs = [(m, name, b) for m in module.modules() for name, b in m._buffers.items()]
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        for g, state in gens:
            g.set_state(state)
        for m, name, b in bufs:
            setattr(m, name, b)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (same shape); NaN in x propagates, masked-out NaN does not."""
    return torch.where(mask, x, 0).sum() / mask.sum().clamp_min(1)


def readout_rows(y: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> list[Row]:
    """margin, target_rank and accuracy of the read ŷ. y (N, Q, V), targets (N, Q), mask (N, Q) bool."""
    y = y.float()
    tgt = torch.gather(y, -1, targets[..., None])  # (N, Q, 1)
    rest = y.scatter(-1, targets[..., None], -math.inf)
    margin = tgt[..., 0] - rest.amax(-1)
    # ties count half, so an all-equal read ranks the target in the middle, not on top
    rank = (rest > tgt).sum(-1) + 0.5 * (rest == tgt).sum(-1)
    correct = (y.argmax(-1) == targets).float()
    out = torch.stack([_masked_mean(m, mask) for m in (margin, rank.float(), correct)]).tolist()
    return [(None, name, val) for name, val in zip(("margin", "target_rank", "accuracy"), out, strict=True)]


def previous_write_values(key_ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The value last written under each step's key before that step (zeros at first writes).

    key_ids (N, L), v (N, L, V) -> (N, L, V).
    """
    L = key_ids.shape[1]
    same = key_ids[:, :, None] == key_ids[:, None, :]  # (N, t, j)
    earlier = torch.ones(L, L, dtype=torch.bool, device=key_ids.device).tril(-1)
    j = torch.arange(L, device=key_ids.device)
    last = torch.where(same & earlier, j, -1).amax(-1)  # (N, L)
    prev = torch.gather(v, 1, last.clamp_min(0)[..., None].expand(-1, -1, v.shape[-1]))
    return torch.where((last >= 0)[..., None], prev, 0)


def trace_rows(trace: dict[str, torch.Tensor], key_ids: torch.Tensor, mask: torch.Tensor, *,
               max_positions: int = 64, overwrite: bool | None = None) -> list[Row]:
    """Rows from a memory's trace.

    Args:
        trace: per-step tensors (N, L) or (N, L, V) named as in ``reference_loop(record=True)`` plus ``v`` and
            ``beta``; ``attn_entropy`` (N, Q). Figures the trace lacks are simply not reported.
        key_ids: (N, L) the written key symbols, to tell first writes from rewrites.
        mask: (N, Q) bool, the real queries (for attn_entropy).
        max_positions: cap on the positions reported per metric.
        overwrite: split contrast into first writes and rewrites: None where the data hold a rewrite, True
            always, False never.
    """
    rows: list[Row] = []
    per_pos: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # (metric, values (N, L), which (N, L))
    if "v_bar" in trace and "v" in trace:
        v_bar, v = trace["v_bar"].float(), trace["v"].float()
        bar_norm, v_norm = v_bar.norm(dim=-1), v.norm(dim=-1)  # (N, L)
        cos = (v_bar * v).sum(-1) / (bar_norm * v_norm).clamp_min(_TINY)
        err = (v - v_bar).norm(dim=-1) / v_norm.clamp_min(_TINY)
        first = first_writes(key_ids)
        per_pos += [("contrast_cos", cos, None), ("contrast_err", err, None)]
        if overwrite or (overwrite is None and not bool(first.all())):
            for part, which in (("first", first), ("rewrite", ~first)):
                per_pos += [(f"contrast_cos_{part}", cos, which), (f"contrast_err_{part}", err, which)]
        per_pos.append(("interference", bar_norm, first))
        if not bool(first.all()):
            # at a rewrite, does the memory return what was written under this key before? (delta: yes, exactly;
            # sum: a mix of every value the key ever had)
            prev = previous_write_values(key_ids, v)  # (N, L, V)
            recall = (v_bar * prev).sum(-1) / (bar_norm * prev.norm(dim=-1)).clamp_min(_TINY)
            per_pos.append(("recall_cos_rewrite", recall, ~first))
    per_pos += [(name, trace[name].float(), None)
                for name in ("state_norm", "normaliser", "normaliser_l1", "beta") if name in trace]

    if per_pos:
        pos = sample_positions(per_pos[0][1].shape[1], max_positions).to(per_pos[0][1].device)
        means, counts = [], []
        for _, x, which in per_pos:
            x = x[:, pos]  # (N, P)
            which = torch.ones_like(x, dtype=torch.bool) if which is None else which[:, pos]
            means.append(torch.where(which, x, 0).sum(0) / which.sum(0).clamp_min(1))
            counts.append(which.sum(0))
        # one transfer for every per-position figure (a device sync per value would dominate on a GPU)
        means_l, counts_l, pos_l = torch.stack(means).tolist(), torch.stack(counts).tolist(), pos.tolist()
        for (name, _, _), m, c in zip(per_pos, means_l, counts_l, strict=True):
            rows += [(t, name, val) for t, val, n in zip(pos_l, m, c, strict=True) if n > 0]

    for name, src in (("max_state_norm", "state_norm"), ("max_normaliser", "normaliser")):
        if src in trace:
            rows.append((None, name, trace[src].float().amax().item()))
    if "attn_entropy" in trace:
        rows.append((None, "attn_entropy", _masked_mean(trace["attn_entropy"].float(), mask).item()))
    return rows


@torch.no_grad()
def collect_memory(memory: Memory, k: torch.Tensor, v: torch.Tensor, betas: torch.Tensor | None,
                   q: torch.Tensor, gates: dict[str, torch.Tensor], *, key_ids: torch.Tensor,
                   targets: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None = None,
                   max_positions: int = 64, overwrite: bool | None = None,
                   max_sequences: int | None = 4) -> list[Row]:
    """Diagnostic rows of a memory on given inputs: the core of ``collect``, usable without a model.

    Args:
        memory: any memory; a trace is used where it has one.
        k: (N, L, K) keys. v: (N, L, V) values. betas: (N, L) or None. q: (N, Q, K) queries.
        gates: the rule's other gates {name: (N, L)}.
        key_ids: (N, L) key symbols (rewrites are decided from these). targets: (N, Q). mask: (N, Q) bool.
        y: (N, Q, V) the read, if already computed; else the memory's forward.
        max_positions, overwrite: as in ``trace_rows``.
        max_sequences: trace only the first this many sequences (None: all); the readout uses all N.
    """
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1 or None, got {max_sequences}")
    # The trace runs the reference loop over an (n, V, F) state, by far the dearest part. At S = L = 600
    # (dpfp-3/sum, one thread) tracing 20 sequences costs 35% of 100 training steps, 8 cost 10%, 4 cost 5%.
    n = slice(None, max_sequences)
    with _untouched(memory):
        if y is None:
            y = memory(k, v, betas, q, **gates)
        rows = readout_rows(y, targets, mask)
        trace = safe_trace(memory, k[n], v[n], None if betas is None else betas[n], q[n],
                           {name: g[n] for name, g in gates.items()})
    if trace is not None:
        trace = {"v": v[n], **trace}  # a plugin's trace may leave out the written values
        rows += trace_rows(trace, key_ids[n], mask[n], max_positions=max_positions, overwrite=overwrite)
    return rows


@torch.no_grad()
def collect(model: RetrievalModel, eval_set: EvalSet, *, y: torch.Tensor | None = None,
            max_positions: int = 64, overwrite: bool | None = None,
            max_sequences: int | None = 4) -> list[Row]:
    """Diagnostic rows of a model on its evaluation set (N sequences), as ``(position, metric, value)``.

    Args:
        model: anything with ``inputs(keys, values, queries)`` and ``.memory``, like ``RetrievalModel``.
        eval_set: keys/values (N, L), queries/targets/mask (N, Q), on the model's device.
        y: (N, Q, V) the eval read the caller already computed; if None, ``model(keys, values, queries)``.
        max_positions: cap on the write positions reported per metric (evenly spaced, the last included).
        overwrite: None decides from the data whether to split contrast into first writes and rewrites.
        max_sequences: the per-step figures trace only the first this many sequences (None: all N).
    """
    with _untouched(model):
        if y is None:
            y = model(eval_set.keys, eval_set.values, eval_set.queries)
        k, v, betas, q, gates = model.inputs(eval_set.keys, eval_set.values, eval_set.queries)
        return collect_memory(model.memory, k, v, betas, q, gates, key_ids=eval_set.keys,
                              targets=eval_set.targets, mask=eval_set.mask, y=y, max_positions=max_positions,
                              overwrite=overwrite, max_sequences=max_sequences)


class StabilityTracker:
    """Per run: ``collect`` at every evaluation, plus ``grad_norm`` and, once, ``first_nonfinite_step``.

    The first step at which the loss, the gradient norm, ``max_state_norm`` or ``max_normaliser`` is not
    finite is reported once per run, in the rows of the first ``update``/``collect`` call after it was seen.

    Args:
        max_positions, overwrite, max_sequences: passed to ``collect``.
    """

    _WATCHED = ("max_state_norm", "max_normaliser")

    def __init__(self, max_positions: int = 64, overwrite: bool | None = None,
                 max_sequences: int | None = 4) -> None:
        self.max_positions, self.overwrite, self.max_sequences = max_positions, overwrite, max_sequences
        self.first_nonfinite_step: int | None = None
        self._reported = False

    def observe(self, step: int, *, loss: float | None = None, grad_norm: float | None = None) -> None:
        """Note a training step's loss and gradient norm (cheap; may be called at every step)."""
        if self.first_nonfinite_step is None and any(x is not None and not math.isfinite(float(x))
                                                     for x in (loss, grad_norm)):
            self.first_nonfinite_step = step

    def update(self, step: int, rows: list[Row], *, grad_norm: float | None = None,
               loss: float | None = None) -> list[Row]:
        """``rows`` (from ``collect``) plus ``grad_norm`` and, the first time, ``first_nonfinite_step``."""
        self.observe(step, loss=loss, grad_norm=grad_norm)
        if self.first_nonfinite_step is None and any(
                pos is None and name in self._WATCHED and not math.isfinite(val) for pos, name, val in rows):
            self.first_nonfinite_step = step
        out = list(rows)
        if grad_norm is not None:
            out.append((None, "grad_norm", float(grad_norm)))
        if self.first_nonfinite_step is not None and not self._reported:
            self._reported = True
            out.append((None, "first_nonfinite_step", float(self.first_nonfinite_step)))
        return out

    def collect(self, model: RetrievalModel, eval_set: EvalSet, *, step: int, y: torch.Tensor | None = None,
                grad_norm: float | None = None, loss: float | None = None) -> list[Row]:
        """``update(step, collect(model, eval_set, y=y), grad_norm=grad_norm, loss=loss)``."""
        rows = collect(model, eval_set, y=y, max_positions=self.max_positions, overwrite=self.overwrite,
                       max_sequences=self.max_sequences)
        return self.update(step, rows, grad_norm=grad_norm, loss=loss)
