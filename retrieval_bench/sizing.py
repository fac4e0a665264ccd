"""A run's peak memory, estimated from its shapes before it starts (DESIGN §7: an impossible size is an error
at the edge, never a run that fails or a driver that hangs allocating).

The estimate follows what one run holds at once (model.py, train.py, memories/, tasks/), in float32:

* **parameters**: the key embedding (S, E) with E = ⌊embed_factor·S⌋, W_k (K, V+E), W_q (K, E) and one
  (1, V+E) row per gate, each with its gradient and Adam's two moments (4 copies);
* **training step** (B sequences of L writes, one query each): the one-hot values (B, L, V), the projections
  (B, L, K+G), the features φ(k) before and after normalisation with their gradients (4·B·L·F), the batch's
  sampling (capacity draws a permutation of S keys and of V values per sequence), and the rule's state where
  its training form keeps one: FWM's checkpointed states (B, V, F) each, a rule trained by its reference
  loop every W_t (L of them);
* **evaluation** (N eval sequences of L_e writes, Q <= min(S, L_e, max_eval_queries) queries each, no
  gradients): one-hot values and projections of every sequence, features of keys and queries, the scores
  (N, L_e, Q), the final state (N, V, F) where the rule builds it, softmax's attention (N, Q, L_e), and the
  diagnostics' trace of the first 4 sequences (their state and per-step records);
* a fixed allowance for the worker process itself (Python and torch).

Training and evaluation never hold their tensors at the same time, so the peak is parameters + the larger of
the two + the process. The estimate is meant as an upper bound within a small factor, not a measurement: it
only has to refuse what cannot fit (``bench`` measures real peaks). Measured against the resident-set peak of a
training step and of an evaluation with diagnostics (one thread, glibc tuned as the workers are): dpfp-3/sum,
favor-512/sum and softmax at S = L = 600, dpfp-2/delta/sum+attn at S = 400, dpfp-3/delta at S = 1000 with
B = 128, dpfp-1/delta/sum at L = 2560, tanh/fwm at S = 200 with B = 128: the estimate was 1.0-3x the measured
peak of each part (1.01x on the closest, dpfp-2/delta/sum+attn's evaluation), before the fixed allowance for the
process. The largest shipped run (capacity, favor-512/sum, S = 600) comes to about 0.75 GiB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

FLOAT, INDEX = 4, 8  # bytes of a float32 and of an int64 id
#: the worker process before its run allocates anything (Python, torch and their libraries)
PROCESS_BYTES = 400 * 2**20
#: sequences the diagnostics trace at each evaluation (``diagnostics.collect``'s ``max_sequences``)
TRACED_SEQUENCES = 4
#: activations x this: what the parts above leave out (an op's temporaries, the allocator's fragmentation)
SLACK = 1.25

#: which fields each part of the estimate grows with (the error message names them)
FIELDS = {
    "parameters": ("task.num_keys", "model.embed_factor", "model.d_key"),
    "training step": ("train.batch_size", "task.seq_len (or task.length_factor)", "task.num_keys", "model.d_key"),
    "evaluation": ("task.eval_sequences", "task.eval_seq_len", "task.max_eval_queries", "task.num_keys",
                   "model.d_key"),
    "process": (),
}


@dataclass(frozen=True)
class Estimate:
    """Bytes by part (``FIELDS``'s keys); ``total`` is the peak."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        p = self.parts
        return p["parameters"] + max(p["training step"], p["evaluation"]) + p["process"]

    @property
    def largest(self) -> str:
        return max((k for k in self.parts if k != "process"), key=self.parts.__getitem__)


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def parameter_bytes(num_keys: int, num_values: int, d_key: int, embed_factor: float, gates: int = 1) -> int:
    """Parameters with their gradients and Adam's two moments (bytes), from the sizes alone: computable
    before the task or the memory is built."""
    S, V, K = num_keys, num_values, d_key
    E = max(1, int(embed_factor * S))
    params = S * E + (V + E) * K + K + E * K + K + gates * (V + E + 1)
    tables = (V + S) * (K + gates)  # the model's gathered projection tables (model._project), and gradients
    return FLOAT * (4 * params + 2 * tables)


def _rule_kind(memory) -> str:
    """"loop", "fwm", "delta", "parallel", "softmax" or "other": how a built memory trains and evaluates."""
    from .memories import FastWeightMemory, SoftmaxMemory
    from .memories.rules import DeltaRule, FWMRule, UpdateRule

    if isinstance(memory, SoftmaxMemory):
        return "softmax"
    if not isinstance(memory, FastWeightMemory):
        return "other"
    rule = type(memory.rule)
    forward = next(c for c in rule.__mro__ if "forward" in vars(c))
    if forward is UpdateRule:  # no training form of its own: the reference loop keeps every W_t in autograd
        return "loop"
    if issubclass(rule, FWMRule):
        return "fwm"
    return "delta" if issubclass(rule, DeltaRule) else "parallel"


def estimate(num_keys: int, num_values: int, seq_len: int, eval_seq_len: int, eval_sequences: int,
             max_eval_queries: int, d_key: int, embed_factor: float, batch_size: int, memory,
             diagnostics: bool = True) -> Estimate:
    """A run's peak memory by part, from its sizes and its built memory (which knows F, its gates and its
    rule). Sizes: S ``num_keys``, V ``num_values``, L ``seq_len``, L_e ``eval_seq_len``, N
    ``eval_sequences``, K ``d_key``, B ``batch_size``."""
    from .memories.checkpointed import FWM_STATE_BUDGET

    S, V, L, Le, N, K, B = num_keys, num_values, seq_len, eval_seq_len, eval_sequences, d_key, batch_size
    kind = _rule_kind(memory)
    d_dot = memory.d_dot(K) if hasattr(memory, "d_dot") else None
    F = d_dot if isinstance(d_dot, int) and d_dot > 0 else K
    # the gates' total width: 1 per scalar gate, F per gate of one value per feature (``Memory.gate_dim``)
    from .memories.causal import gate_width

    G = sum(gate_width(memory, g, K) for g in getattr(memory, "gates", ()) or ())
    Q = max(1, min(S, Le, max_eval_queries))

    def fwm_states(batch: int, length: int) -> int:
        # checkpointed.fwm_peak_states in closed form (its search takes √L steps, too many for absurd L):
        # about √(2L) states with one level of checkpoints, (6L)^⅓ with two, plus a step's working states
        one = math.isqrt(2 * length) + 2
        if batch * V * F * FLOAT * one <= FWM_STATE_BUDGET:
            return one + 4
        return round((6 * length) ** (1 / 3)) + 6

    # training: one-hot values, projections (and gradients), the sampled ids, and the features: φ(k) and its
    # normalised form with their gradients (sum rule); the delta rule's chunked form keeps about as much again,
    # and the attention normaliser's running sums z (B, L, F) more; FAVOR+'s kernel read keeps only (B, L, m).
    per_feature = {"delta": 8, "loop": 4, "fwm": 4, "parallel": 4}.get(kind, 0)
    if kind == "delta" and getattr(memory, "attn", False):
        per_feature += 4
    if getattr(memory, "_scores_read", False):
        per_feature = 1
    train = FLOAT * B * L * (V + 2 * (K + G) + per_feature * F) + B * (S + V) * (FLOAT + 2 * INDEX) + 2 * B * L * INDEX
    if kind == "fwm":
        train += FLOAT * B * V * F * fwm_states(B, L)
    elif kind == "loop":
        train += FLOAT * B * V * F * 2 * (L + 1)
    elif kind in ("softmax", "other"):
        train += FLOAT * B * L * 2 * (K + V)

    # evaluation: every sequence's inputs and features, the queries, the read, and the rule's working set
    feats = F if kind not in ("softmax", "other") else 0  # attention reads the keys themselves
    evals = (FLOAT * N * Le * (V + K + G + 2 * feats) + FLOAT * N * Q * (K + feats + 3 * V)
             + N * S * (1 + 2 * INDEX) + 2 * N * Le * INDEX)
    if kind in ("parallel", "delta"):
        evals += FLOAT * N * Le * Q * (4 if kind == "delta" else 2)  # every write's score for every query
        if kind == "delta":
            evals += FLOAT * N * V * F * 2  # W built once for many queries
    elif kind in ("fwm", "loop"):
        evals += FLOAT * N * V * F * 4
    else:  # attention-like: every query against every write
        evals += FLOAT * N * Q * Le * 2 + FLOAT * N * Le * (K + V)
    if diagnostics:  # collect(): the inputs again, the trace of the first sequences (state, per-step records)
        # and, on tasks with rewrites, diagnostics.previous_write_values' (n, L_e, L_e) position table
        n = min(N, TRACED_SEQUENCES)
        evals += (FLOAT * N * Le * (V + K + G) + FLOAT * n * (3 * V * F + 5 * Le * V + Q * Le)
                  + n * Le * Le * (INDEX + 2))
    # allocator slack and the temporaries of single ops (the parts above alone came to 0.4-2.6x the measured
    # peaks before the slack and the delta rule's and the diagnostics' terms were added)
    train, evals = int(SLACK * train), int(SLACK * evals)

    return Estimate({"parameters": parameter_bytes(S, V, K, embed_factor, G), "training step": train,
                     "evaluation": evals, "process": PROCESS_BYTES})


def gib(n: float) -> str:
    """Bytes as GiB for messages (two significant figures; large values in powers of ten)."""
    g = n / 2**30
    return f"{g:.2g} GiB" if g < 1e5 else f"{g:.1e} GiB"


def too_large(est: Estimate, limit: int | None = None) -> str | None:
    """Why a run with this estimate cannot fit in ``limit`` bytes (default: this machine's memory), else
    None. The message starts with the fields that drive the largest part."""
    limit = physical_memory() if limit is None else limit
    if limit is None or est.total <= limit:
        return None
    part = est.largest
    detail = ", ".join(f"{k} {gib(v)}" for k, v in est.parts.items() if v)
    return (f"{', '.join(FIELDS[part])}: this run would need about {gib(est.total)} of memory ({detail}), more "
            f"than this machine's {gib(limit)}; its largest part, the {part}, grows with these settings: make them "
            "smaller")
