"""Key-value recall task generators (PAPER §2.1).

A task makes batches of integer tensors: ``keys`` and ``values`` (B, L) with ids in [0, S) and [0, V), one
``query`` key per sequence (B,) and its ``target`` value (B,). Randomness comes only from the
``torch.Generator`` passed in; nothing touches a global RNG.

The evaluation set (PAPER §2.1, §2.4) holds ``eval_sequences`` fresh sequences, each queried at every distinct
key it holds (the lowest ``max_eval_queries`` key ids): ``queries``/``targets`` (N, Q) with a ``mask`` (N, Q)
marking the real queries, since sequences hold different numbers of distinct keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import tasks


@dataclass(frozen=True)
class Sample:
    keys: torch.Tensor  # (B, L) int64
    values: torch.Tensor  # (B, L) int64
    query: torch.Tensor  # (B,) int64
    target: torch.Tensor  # (B,) int64


@dataclass(frozen=True)
class EvalSet:
    keys: torch.Tensor  # (N, L)
    values: torch.Tensor  # (N, L)
    queries: torch.Tensor  # (N, Q), padded with 0 where mask is False
    targets: torch.Tensor  # (N, Q)
    mask: torch.Tensor  # (N, Q) bool

    @property
    def num_queries(self) -> int:
        return int(self.mask.sum())


def _check(name: str, value, low, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{what}, got {value!r}")


def last_occurrence_values(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Value at the most recent position where ``keys == query``. keys/values (B, L), query (B, Q) -> (B, Q)."""
    hit = keys[:, None, :] == query[:, :, None]  # (B, Q, L)
    pos = torch.arange(keys.shape[1], device=keys.device)
    last = torch.where(hit, pos, -1).amax(-1)  # (B, Q); -1 only if the key never occurs
    return torch.gather(values, 1, last.clamp_min(0))


class Task:
    """Base class: subclasses implement ``sequences`` (the written pairs) and may override ``query_positions``."""

    name = ""

    def __init__(self, num_keys: int, num_values: int | None = None, seq_len: int | None = None,
                 eval_sequences: int = 20, max_eval_queries: int = 200, eval_seq_len: int | str | None = None):
        _check("num_keys", num_keys, 1)
        num_values = num_keys if num_values is None else num_values
        _check("num_values", num_values, 1)
        _check("eval_sequences", eval_sequences, 1)
        _check("max_eval_queries", max_eval_queries, 1)
        self.num_keys, self.num_values = num_keys, num_values
        self.seq_len = self.default_seq_len() if seq_len is None else seq_len
        _check("seq_len", self.seq_len, 1)
        if eval_seq_len == "train":  # evaluate at the training length (e.g. when sweeping the length)
            eval_seq_len = self.seq_len
        self.eval_seq_len = self.default_eval_seq_len() if eval_seq_len is None else eval_seq_len
        _check("eval_seq_len", self.eval_seq_len, 1)
        self.eval_sequences, self.max_eval_queries = eval_sequences, max_eval_queries

    def default_seq_len(self) -> int:
        return self.num_keys

    def default_eval_seq_len(self) -> int:
        return self.seq_len

    def sequences(self, batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> Sample:
        """A fresh training batch: one query per sequence, at a uniformly chosen position's key."""
        _check("batch_size", batch_size, 1)
        keys, values = self.sequences(batch_size, self.seq_len, generator)
        pos = torch.randint(0, self.seq_len, (batch_size, 1), generator=generator)
        query = torch.gather(keys, 1, pos)
        target = last_occurrence_values(keys, values, query)
        return Sample(keys, values, query[:, 0], target[:, 0])

    def eval_set(self, generator: torch.Generator) -> EvalSet:
        """The fixed evaluation set: every distinct key of each sequence, lowest ids first, capped."""
        keys, values = self.sequences(self.eval_sequences, self.eval_seq_len, generator)
        present = torch.zeros(self.eval_sequences, self.num_keys, dtype=torch.bool)
        present.scatter_(1, keys, True)
        q = min(int(present.sum(1).max()), self.max_eval_queries)
        # sort key ids so that present ones come first, in increasing id order
        ids = torch.arange(self.num_keys).expand(self.eval_sequences, -1)
        order = torch.where(present, ids, ids + self.num_keys).argsort(dim=1)[:, :q]
        queries = torch.gather(ids, 1, order)
        mask = torch.gather(present, 1, order)
        targets = last_occurrence_values(keys, values, queries)
        return EvalSet(keys, values, torch.where(mask, queries, 0), torch.where(mask, targets, 0), mask)


@tasks.register("capacity")
class Capacity(Task):
    """PAPER Setting 1: keys without replacement (a random permutation), values an independent permutation.

    L = S by default; L <= S and L <= V are required, since no key or value repeats.
    """

    name = "capacity"

    def __init__(self, num_keys: int, num_values: int | None = None, seq_len: int | None = None, **kw):
        super().__init__(num_keys, num_values, seq_len, **kw)
        for field, length in (("seq_len", self.seq_len), ("eval_seq_len", self.eval_seq_len)):
            if length > min(self.num_keys, self.num_values):
                raise ValueError(
                    f"{field} ({length}) must be <= num_keys ({self.num_keys}) and num_values "
                    f"({self.num_values}): capacity writes each key and value at most once"
                )

    def sequences(self, batch, length, g):
        keys = torch.rand(batch, self.num_keys, generator=g).argsort(dim=1)[:, :length]
        values = torch.rand(batch, self.num_values, generator=g).argsort(dim=1)[:, :length]
        return keys, values


@tasks.register("overwrite")
class Overwrite(Task):
    """PAPER Setting 2: keys and values drawn with replacement; the most recent value of a key wins.

    L = ``length_factor``·S (2 by default). The evaluation sequences have length S as in the official code
    (``eval_seq_len`` changes that; ``eval_seq_len = "train"`` evaluates at the training length).
    """

    name = "overwrite"

    def __init__(self, num_keys: int, num_values: int | None = None, seq_len: int | None = None,
                 length_factor: float = 2, **kw):
        if not isinstance(length_factor, int | float) or length_factor < 1:
            raise ValueError(f"length_factor must be a number >= 1, got {length_factor!r}")
        self.length_factor = length_factor
        super().__init__(num_keys, num_values, seq_len, **kw)

    def default_seq_len(self) -> int:
        return int(round(self.length_factor * self.num_keys))

    def default_eval_seq_len(self) -> int:
        return self.num_keys

    def sequences(self, batch, length, g):
        keys = torch.randint(0, self.num_keys, (batch, length), generator=g)
        values = torch.randint(0, self.num_values, (batch, length), generator=g)
        return keys, values


def task(name: str, **params) -> Task:
    """Build a registered task, e.g. ``task("overwrite", num_keys=20)``."""
    return tasks.get(name)(**params)

from . import stream  # noqa: E402,F401  (registers mqar, mqar-reassign, noisy-recall)
