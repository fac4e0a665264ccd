"""Token-stream recall tasks: multi-query associative recall (MQAR, Arora et al. 2023) and two variants.

A task makes batches of token streams for a causal language model: ``tokens`` (B, T) int64 and ``targets``
(B, T) int64, where every position that is not a query holds -100 (PyTorch's ``ignore_index``).

Prediction convention: the logits at position t predict ``targets[t]``. A query is a key token at position t,
and its target is stored AT t (as Zoology labels the query key's position with the value), so a causal model
answers a query at the position where it reads the key, never after it.

Vocabulary layout (V = ``vocab_size``, F = ``num_filler_tokens``, N = ``noise_vocab_size``, 0 unless noisy)::

    [0, F)          filler tokens: every position that is neither a binding, a query nor noise
    [F, F + N)      noise tokens (``noisy-recall`` only)
    [F + N, V // 2) key tokens
    [V // 2, V)     value tokens

Sequence layout, as two-token slots after the bindings::

    k0 v0 k1 v1 ... k(n-1) v(n-1) | q . | f f | r w | q . | f f | ... (a trailing f when T - prefix is odd)

    k v  the initial bindings: distinct keys, distinct values (noisy-recall interleaves noise tokens here)
    q .  a query slot: a key, then a filler (its target sits at the key's position)
    r w  a rebinding slot (mqar-reassign): a key, then a fresh value
    f f  filler slot

The executable spec (the tests' plain scan): a key token immediately followed by a value token binds the key;
any other key token is a query whose target is the value most recently bound to it. Fillers and noise never
come from the key or value ranges, so they never look like a binding or a query (PAPER §7).

Where this differs from Zoology's ``multiquery_ar`` (zoology/data/multiquery_ar.py), and why:

- Fillers come from their own range (one token 0 by default, as Zoology's Figure-2 configuration) instead of
  random draws from the whole vocabulary: a random filler can equal a key, and in a task with rebindings a filler
  key followed by a value token would be a binding nobody meant (PAPER §7).
- Randomness is the ``torch.Generator`` passed in; Zoology seeds numpy's global RNG. Draws without replacement use
  the Gumbel-top-k trick, which has the distribution of numpy's sequential ``choice(replace=False, p=...)``
  (draw order included) but not its numbers.
- ``seq_len`` may be odd (a trailing filler) and need not be below ``vocab_size``; JRT's ``num_passes`` is absent.
- As in Zoology, the power law p(g) ∝ (g + 1)^(a − 1) is over the query's slot g in the query region (counted
  without rebinding slots), not over the distance from the binding, and the i-th bound key takes the i-th draw
  (so earlier keys tend to be queried earlier). The evaluation set records the actual distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import tasks

IGNORE_INDEX = -100
FILL = -1  # gaps/positions where there is no query


@dataclass(frozen=True)
class StreamSample:
    tokens: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no query


@dataclass(frozen=True)
class StreamEvalSet:
    """The evaluation batch, with what slicing accuracy needs.

    tokens/targets (N, T) as in a sample; ``gaps`` (N, T): at a query, its position minus the position of the key
    token of the key's most recent binding (>= 2), FILL elsewhere; ``positions`` (N, T): t at a query at t, FILL
    elsewhere.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    gaps: torch.Tensor
    positions: torch.Tensor

    @property
    def query_mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX  # (N, T) bool

    @property
    def num_queries(self) -> int:
        return int(self.query_mask.sum())


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value, low: float, high: float, high_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def _gumbel_top_k(log_weights: torch.Tensor, k: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """k draws without replacement per row, in draw order. log_weights (S,) -> indices (batch, k)."""
    u = torch.rand(batch, log_weights.shape[0], generator=g).clamp_min(1e-20)
    return (log_weights - torch.log(-torch.log(u))).topk(k, dim=1).indices


def _distinct(batch: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """k distinct ids in [0, n) per row, in random order: (batch, k)."""
    return torch.rand(batch, n, generator=g).topk(k, dim=1).indices


@tasks.register("mqar")
class MQAR:
    """Multi-query associative recall (Zoology): ``num_kv_pairs`` bindings, then one query of each key.

    Args:
        vocab_size: V; keys take [F, V // 2) and values [V // 2, V) (see the module docstring).
        seq_len: T of the training sequences.
        num_kv_pairs: bindings (and queries) per training sequence.
        power_a: a of the query-slot power law p(g) ∝ (g + 1)^(a − 1); 1 is uniform, small favours early slots.
        eval_seq_len, eval_num_kv_pairs: T and pairs of the evaluation set (default: the training ones), for
            length extrapolation.
        eval_sequences: N, sequences in the evaluation set.
        num_filler_tokens: F, the size of the filler range (1: a single filler token 0).
    """

    name = "mqar"

    def __init__(self, vocab_size: int = 8192, seq_len: int = 64, num_kv_pairs: int = 4, power_a: float = 0.01,
                 eval_seq_len: int | str | None = None, eval_num_kv_pairs: int | None = None,
                 eval_sequences: int = 256, num_filler_tokens: int = 1):
        _check_int("vocab_size", vocab_size, 4)
        _check_int("seq_len", seq_len, 1)
        _check_int("num_kv_pairs", num_kv_pairs, 1)
        if not (isinstance(power_a, int | float) and not isinstance(power_a, bool) and 0 < power_a < math.inf):
            raise ValueError(f"power_a must be a finite number > 0, got {power_a!r}")
        eval_seq_len = seq_len if eval_seq_len in (None, "train") else eval_seq_len
        _check_int("eval_seq_len", eval_seq_len, 1)
        eval_num_kv_pairs = num_kv_pairs if eval_num_kv_pairs is None else eval_num_kv_pairs
        _check_int("eval_num_kv_pairs", eval_num_kv_pairs, 1)
        _check_int("eval_sequences", eval_sequences, 1)
        _check_int("num_filler_tokens", num_filler_tokens, 1)
        self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a = vocab_size, seq_len, num_kv_pairs, power_a
        self.eval_seq_len, self.eval_num_kv_pairs = eval_seq_len, eval_num_kv_pairs
        self.eval_sequences, self.num_filler_tokens = eval_sequences, num_filler_tokens
        self._check_layout(seq_len, num_kv_pairs, "seq_len", "num_kv_pairs")
        self._check_layout(eval_seq_len, eval_num_kv_pairs, "eval_seq_len", "eval_num_kv_pairs")

    # ---- what the variants change ----------------------------------------------------------------
    def _noise_vocab(self) -> int:
        return 0

    def _num_noise(self, pairs: int) -> int:
        """Noise tokens interleaved with ``pairs`` bindings."""
        return 0

    def _num_updates(self, pairs: int) -> int:
        """Rebindings in a sequence of ``pairs`` bindings."""
        return 0

    # ---- vocabulary ------------------------------------------------------------------------------
    @property
    def filler_range(self) -> tuple[int, int]:
        return 0, self.num_filler_tokens

    @property
    def noise_range(self) -> tuple[int, int]:
        return self.num_filler_tokens, self.num_filler_tokens + self._noise_vocab()

    @property
    def key_range(self) -> tuple[int, int]:
        return self.noise_range[1], self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    def min_seq_len(self, pairs: int) -> int:
        """The shortest stream that holds ``pairs`` bindings, their noise, rebindings and one query per key."""
        return 2 * pairs + self._num_noise(pairs) + 2 * (pairs + self._num_updates(pairs))

    def _check_layout(self, length: int, pairs: int, length_name: str, pairs_name: str) -> None:
        (k_lo, k_hi), (v_lo, v_hi) = self.key_range, self.value_range
        if k_hi - k_lo < pairs:
            below = f"num_filler_tokens={self.num_filler_tokens}"
            below += f" and noise_vocab_size={self._noise_vocab()}" if self._noise_vocab() else ""
            raise ValueError(
                f"{pairs_name} ({pairs}) exceeds the {max(k_hi - k_lo, 0)} key tokens of vocab_size="
                f"{self.vocab_size} (keys are its lower half above {below}); keys are distinct within a sequence")
        updates = self._num_updates(pairs)
        what = f"{pairs_name} ({pairs})" + (f" + num_updates ({updates})" if updates else "")
        if v_hi - v_lo < pairs + updates:
            raise ValueError(
                f"{what} exceed the {v_hi - v_lo} value tokens of vocab_size={self.vocab_size} (its upper half); "
                f"values are distinct within a sequence")
        need = self.min_seq_len(pairs)
        if length < need:
            noise = f", {self._num_noise(pairs)} noise tokens" if self._num_noise(pairs) else ""
            raise ValueError(
                f"{length_name} ({length}) is too short for {what}: the bindings{noise}, the rebindings and one "
                f"query slot per key need at least {need} tokens")

    # ---- generation ------------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: torch.Generator) -> StreamSample:
        """A fresh training batch: tokens/targets (batch_size, seq_len)."""
        _check_int("batch_size", batch_size, 1)
        tokens, targets, _ = self._generate(batch_size, self.seq_len, self.num_kv_pairs, generator)
        return StreamSample(tokens, targets)

    def eval_set(self, generator: torch.Generator, seq_len: int | None = None,
                 num_kv_pairs: int | None = None) -> StreamEvalSet:
        """The evaluation batch: ``eval_sequences`` streams of ``eval_seq_len`` with ``eval_num_kv_pairs``.

        ``seq_len``/``num_kv_pairs`` override those (e.g. one evaluation set per length of an extrapolation curve).
        Returns tokens/targets/gaps/positions (N, T).
        """
        length = self.eval_seq_len if seq_len is None else seq_len
        pairs = self.eval_num_kv_pairs if num_kv_pairs is None else num_kv_pairs
        if seq_len is not None or num_kv_pairs is not None:
            _check_int("seq_len", length, 1)
            _check_int("num_kv_pairs", pairs, 1)
            self._check_layout(length, pairs, "seq_len", "num_kv_pairs")
        tokens, targets, gaps = self._generate(self.eval_sequences, length, pairs, generator)
        query = targets != IGNORE_INDEX
        positions = torch.where(query, torch.arange(length).expand_as(tokens), FILL)
        return StreamEvalSet(tokens, targets, gaps, positions)

    def _generate(self, batch: int, length: int, pairs: int, g: torch.Generator):
        """tokens, targets, gaps (batch, length) int64; see the module docstring for the layout."""
        B, T, n = batch, length, pairs
        n_noise, n_upd = self._num_noise(n), self._num_updates(n)
        (f_lo, f_hi), (z_lo, z_hi), (k_lo, k_hi), (v_lo, v_hi) = (
            self.filler_range, self.noise_range, self.key_range, self.value_range)
        keys = _distinct(B, k_hi - k_lo, n, g) + k_lo  # (B, n)
        values = _distinct(B, v_hi - v_lo, n + n_upd, g) + v_lo  # (B, n + U): initial values, then rebindings'
        if f_hi - f_lo == 1:
            tokens = torch.full((B, T), f_lo, dtype=torch.long)
        else:
            tokens = torch.randint(f_lo, f_hi, (B, T), generator=g)

        # Prefix: n two-token pair units and n_noise one-token noise units in a random interleaving, so noise
        # never splits a key from its value.
        units = n + n_noise
        if n_noise:
            is_pair = torch.zeros(B, units, dtype=torch.bool)
            is_pair.scatter_(1, _distinct(B, units, n, g), True)
        else:
            is_pair = torch.ones(B, units, dtype=torch.bool)
        lengths = 1 + is_pair.long()
        starts = lengths.cumsum(1) - lengths  # (B, units)
        pair_pos = starts[is_pair].view(B, n)  # row-major masked select keeps each row's order
        tokens.scatter_(1, pair_pos, keys)
        tokens.scatter_(1, pair_pos + 1, values[:, :n])
        if n_noise:
            noise_pos = starts[~is_pair].view(B, n_noise)
            tokens.scatter_(1, noise_pos, torch.randint(z_lo, z_hi, (B, n_noise), generator=g))
        prefix = 2 * n + n_noise

        # Query region: S0 base slots (queries and filler slots) plus U rebinding slots inserted among them.
        s0 = (T - prefix) // 2 - n_upd
        log_w = (self.power_a - 1) * torch.log(torch.arange(1, s0 + 1, dtype=torch.float64))
        q_base = _gumbel_top_k(log_w, n, B, g)  # (B, n): key i is queried at base slot q_base[:, i]
        rb_key = torch.randint(0, n, (B, n_upd), generator=g)  # (B, U) which key each rebinding rebinds
        # a rebinding goes just before a uniform base slot in [0, q] where q is its key's query slot, so it is
        # always read by that query
        q_of = torch.gather(q_base, 1, rb_key)
        rb_at = (torch.rand(B, n_upd, generator=g, dtype=torch.float64) * (q_of + 1)).long().minimum(q_of)
        # order events: base slot s sorts at 2s + 1, a rebinding before slot t at 2t (stable: ties keep j order)
        order_key = torch.cat([(2 * torch.arange(s0) + 1).expand(B, -1), 2 * rb_at], dim=1)  # (B, S0 + U)
        order = order_key.argsort(dim=1, stable=True)
        slot = torch.empty_like(order).scatter_(1, order, torch.arange(s0 + n_upd).expand(B, -1))
        q_pos = prefix + 2 * torch.gather(slot[:, :s0], 1, q_base)  # (B, n)
        rb_pos = prefix + 2 * slot[:, s0:]  # (B, U)
        tokens.scatter_(1, rb_pos, torch.gather(keys, 1, rb_key))
        tokens.scatter_(1, rb_pos + 1, values[:, n:])
        tokens.scatter_(1, q_pos, keys)

        # the most recent binding of each key: every rebinding comes after the prefix, so amax picks it
        last = pair_pos.scatter_reduce(1, rb_key, rb_pos, reduce="amax", include_self=True)  # (B, n)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        targets.scatter_(1, q_pos, torch.gather(tokens, 1, last + 1))
        gaps = torch.full((B, T), FILL, dtype=torch.long).scatter_(1, q_pos, q_pos - last)
        return tokens, targets, gaps


@tasks.register("mqar-reassign")
class MQARReassign(MQAR):
    """MQAR with rebindings: ``num_updates`` later bindings of keys already bound, each with a fresh value.

    The token-stream form of the overwrite task (PAPER Setting 2): the target of a query is the value most
    recently bound to its key before it. Each rebinding sits at a uniform slot between the initial bindings and
    the query of its key (keys drawn with replacement), so every rebinding changes a target.

    Args:
        num_updates: rebindings per sequence; None (default) rebinds as many times as the sequence has pairs
            (``num_kv_pairs`` in training, ``eval_num_kv_pairs`` in evaluation).
        **kw: the knobs of ``mqar``.
    """

    name = "mqar-reassign"

    def __init__(self, num_updates: int | None = None, **kw):
        if num_updates is not None:
            _check_int("num_updates", num_updates, 0)
        self.num_updates = num_updates
        super().__init__(**kw)

    def _num_updates(self, pairs: int) -> int:
        return pairs if self.num_updates is None else self.num_updates


@tasks.register("noisy-recall")
class NoisyRecall(MQAR):
    """MQAR whose bindings are interleaved with noise tokens from their own vocabulary (MAD's noisy recall).

    Noise tokens make up ``noise_frac`` of the binding prefix (round(2n·f / (1 − f)) tokens for n pairs), placed
    between pairs, never between a key and its value; the query region is that of ``mqar``.

    Args:
        noise_frac: f in [0, 1), the share of noise tokens among the prefix's tokens.
        noise_vocab_size: N, the size of the noise range [F, F + N).
        **kw: the knobs of ``mqar``.
    """

    name = "noisy-recall"

    def __init__(self, noise_frac: float = 0.4, noise_vocab_size: int = 16, **kw):
        _check_number("noise_frac", noise_frac, 0, 1, True)
        _check_int("noise_vocab_size", noise_vocab_size, 1)
        self.noise_frac, self.noise_vocab_size = noise_frac, noise_vocab_size
        super().__init__(**kw)

    def _noise_vocab(self) -> int:
        return self.noise_vocab_size

    def _num_noise(self, pairs: int) -> int:
        return round(2 * pairs * self.noise_frac / (1 - self.noise_frac))
