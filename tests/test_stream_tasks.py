"""Token-stream recall tasks (tasks/stream.py): a plain Python scan of the tokens is the executable spec."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_sampling_leaves_global_rng  # tests/ is on sys.path

import retrieval_bench as rb
from retrieval_bench.tasks.stream import FILL, IGNORE_INDEX


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name, knobs: tiny sizes; the second mqar case has random fillers and an odd length
CASES = [
    ("mqar", dict(vocab_size=32, seq_len=24, num_kv_pairs=3)),
    ("mqar", dict(vocab_size=40, seq_len=31, num_kv_pairs=4, num_filler_tokens=3, power_a=1.0)),
    ("mqar-reassign", dict(vocab_size=32, seq_len=30, num_kv_pairs=3)),
    ("mqar-reassign", dict(vocab_size=40, seq_len=40, num_kv_pairs=2, num_updates=5)),
    ("noisy-recall", dict(vocab_size=48, seq_len=30, num_kv_pairs=3, noise_vocab_size=4)),
    ("noisy-recall", dict(vocab_size=64, seq_len=40, num_kv_pairs=4, noise_frac=0.6, num_filler_tokens=2)),
]
IDS = ["mqar", "mqar-fill3-odd", "reassign", "reassign-U5", "noisy", "noisy-f0.6"]


@pytest.fixture(params=CASES, ids=IDS)
def task(request):
    name, knobs = request.param
    return rb.task(name, **knobs)


def scan(task, row: list[int]) -> dict:
    """The spec: a key followed by a value binds it; any other key is a query of its most recent value."""
    (k_lo, k_hi), (v_lo, v_hi) = task.key_range, task.value_range
    is_key = [k_lo <= t < k_hi for t in row]
    is_value = [v_lo <= t < v_hi for t in row]
    bound: dict[int, tuple[int, int]] = {}  # key -> (value, position of the binding's key)
    out = dict(targets=[IGNORE_INDEX] * len(row), gaps=[FILL] * len(row), bindings=[], queries=[])
    for t, tok in enumerate(row):
        if is_key[t] and t + 1 < len(row) and is_value[t + 1]:
            bound[tok] = (row[t + 1], t)
            out["bindings"].append((t, tok, row[t + 1]))
        elif is_key[t]:
            assert tok in bound, f"query of the unbound key {tok} at {t}"
            out["targets"][t], out["gaps"][t] = bound[tok][0], t - bound[tok][1]
            out["queries"].append((t, tok))
        elif is_value[t]:
            assert t > 0 and is_key[t - 1], f"value token {tok} at {t} not right after a key"
    return out


def pairs_and_updates(task, eval_set: bool = False) -> tuple[int, int]:
    pairs = task.eval_num_kv_pairs if eval_set else task.num_kv_pairs
    updates = getattr(task, "num_updates", 0)
    return pairs, (pairs if updates is None else updates)


# ------------------------------------------------------------------------------------------------------------
# The stream's meaning
# ------------------------------------------------------------------------------------------------------------


def test_targets_are_the_scans_most_recent_values_and_ignore_index_elsewhere(task):
    s = task.sample(16, gen(0))
    assert s.tokens.shape == s.targets.shape == (16, task.seq_len)
    assert s.tokens.dtype == s.targets.dtype == torch.int64
    for row, targets in zip(s.tokens.tolist(), s.targets.tolist(), strict=True):
        assert targets == scan(task, row)["targets"]


def test_bindings_and_queries_are_exactly_the_intended_ones(task):
    """No filler or noise reads as a binding: the scan finds num_kv_pairs + num_updates bindings, the first
    num_kv_pairs with distinct keys and distinct values, and one query of each key."""
    pairs, updates = pairs_and_updates(task)
    for row in task.sample(16, gen(1)).tokens.tolist():
        out = scan(task, row)
        assert len(out["bindings"]) == pairs + updates
        initial = out["bindings"][:pairs]
        assert len({k for _, k, _ in initial}) == pairs  # keys distinct within the initial bindings
        assert len({v for _, _, v in out["bindings"]}) == pairs + updates  # every binding a fresh value
        assert sorted(k for _, k in out["queries"]) == sorted(k for _, k, _ in initial)
        assert all(q > initial[-1][0] for q, _ in out["queries"])  # queries come after the initial bindings


def test_vocabulary_ranges_partition_the_vocabulary_and_tokens_stay_in_their_roles(task):
    ranges = [task.filler_range, task.noise_range, task.key_range, task.value_range]
    assert ranges[0][0] == 0 and ranges[-1][1] == task.vocab_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, so disjoint
    assert all(lo < hi for lo, hi in ranges[:1] + ranges[2:])
    assert task.value_range[0] == task.vocab_size // 2  # keys and values are the two halves (after fillers)
    tokens = task.sample(16, gen(2)).tokens
    k_lo = task.key_range[0]
    other = tokens[tokens < k_lo]  # neither key nor value: filler or noise only
    assert ((other >= 0) & (other < task.noise_range[1])).all()
    noise = (tokens >= task.noise_range[0]) & (tokens < task.noise_range[1])
    assert int(noise.sum()) == 16 * task._num_noise(task.num_kv_pairs)
    if task.num_filler_tokens > 1:  # a filler range is drawn from, not a constant
        fillers = tokens[tokens < task.num_filler_tokens]
        assert len(fillers.unique()) == task.num_filler_tokens


def test_rebindings_change_the_targets_of_their_keys():
    """Each rebinding sits before its key's query: a rebound key's target is not its initial value."""
    task = rb.task("mqar-reassign", vocab_size=64, seq_len=48, num_kv_pairs=4, num_updates=3)
    changed = 0
    for row in task.sample(32, gen(3)).tokens.tolist():
        out = scan(task, row)
        initial = {k: v for _, k, v in out["bindings"][:4]}
        rebound = {k for _, k, _ in out["bindings"][4:]}
        for t, k in out["queries"]:
            assert (out["targets"][t] != initial[k]) == (k in rebound)
        changed += len(rebound)
    assert changed > 32  # 3 rebindings of 4 keys: most sequences rebind two or three keys


def test_noise_is_the_requested_share_of_the_prefix_and_never_splits_a_pair():
    task = rb.task("noisy-recall", vocab_size=64, seq_len=64, num_kv_pairs=6, noise_frac=0.25)
    n_noise = task._num_noise(6)
    assert n_noise == round(12 * 0.25 / 0.75)
    tokens = task.sample(16, gen(4)).tokens
    prefix = tokens[:, : 12 + n_noise]
    lo, hi = task.noise_range
    assert (((prefix >= lo) & (prefix < hi)).sum(1) == n_noise).all()
    positions = set()
    for row in tokens.tolist():
        out = scan(task, row)
        assert [t for t, _, _ in out["bindings"]][-1] < 12 + n_noise
        positions.add(tuple(t for t, _, _ in out["bindings"]))
    assert len(positions) > 1  # the interleaving is random, not a fixed pattern


# ------------------------------------------------------------------------------------------------------------
# Evaluation set, lengths, power law
# ------------------------------------------------------------------------------------------------------------


def test_eval_set_gaps_and_positions_match_the_scan(task):
    e = task.eval_set(gen(5))
    assert e.tokens.shape == (task.eval_sequences, task.eval_seq_len)
    assert e.num_queries == task.eval_sequences * task.eval_num_kv_pairs
    for row, targets, gaps, pos in zip(e.tokens[:16].tolist(), e.targets.tolist(), e.gaps.tolist(),
                                       e.positions.tolist(), strict=False):
        out = scan(task, row)
        assert targets == out["targets"] and gaps == out["gaps"]
        assert pos == [t if g != FILL else FILL for t, g in enumerate(out["gaps"])]


@pytest.mark.parametrize("name", ["mqar", "mqar-reassign", "noisy-recall"])
def test_eval_set_at_a_longer_length_and_more_pairs(name):
    knobs = dict(vocab_size=64, seq_len=32, num_kv_pairs=2, eval_seq_len=128, eval_num_kv_pairs=8,
                 eval_sequences=8)
    task = rb.task(name, **knobs)
    assert (task.seq_len, task.eval_seq_len, task.num_kv_pairs, task.eval_num_kv_pairs) == (32, 128, 2, 8)
    assert task.sample(4, gen(0)).tokens.shape == (4, 32)
    e = task.eval_set(gen(0))
    assert e.tokens.shape == (8, 128)
    pairs, updates = pairs_and_updates(task, eval_set=True)
    for row in e.tokens.tolist():
        out = scan(task, row)
        assert len(out["queries"]) == 8 and len(out["bindings"]) == pairs + updates
    longer = task.eval_set(gen(0), seq_len=256)  # one set per length of an extrapolation curve
    assert longer.tokens.shape == (8, 256) and longer.num_queries == 8 * 8
    assert rb.task(name, vocab_size=64, seq_len=32, num_kv_pairs=2).eval_set(gen(0)).tokens.shape[1] == 32


def _first_query_slots(power_a: float, n: int = 4000) -> torch.Tensor:
    """mqar: the query-region slot of the first bound key (which takes the power law's first draw)."""
    task = rb.task("mqar", vocab_size=64, seq_len=128, num_kv_pairs=4, power_a=power_a, eval_sequences=n)
    e = task.eval_set(gen(6))
    first_key = e.tokens[:, :1]
    pos = ((e.tokens == first_key) & e.query_mask).float().argmax(1)  # (n,) the query of that key
    return (pos - 8) // 2  # 8 prefix tokens, then two-token slots


def test_first_query_slot_follows_zoologys_power_law():
    slots = _first_query_slots(0.01)
    weights = torch.arange(1, 61, dtype=torch.float64) ** (0.01 - 1)  # 60 slots after the 8 prefix tokens
    p = weights / weights.sum()
    for g in (0, 1, 5):
        freq = float((slots == g).float().mean())
        assert abs(freq - float(p[g])) < 5 * math.sqrt(float(p[g]) * (1 - float(p[g])) / len(slots)), g
    uniform = _first_query_slots(1.0)
    assert abs(float((uniform < 30).float().mean()) - 0.5) < 0.05  # power_a = 1: a flat law


@pytest.mark.parametrize("name", ["mqar", "mqar-reassign", "noisy-recall"])
def test_small_gaps_are_more_frequent_than_large_ones(name):
    def gaps(power_a):
        task = rb.task(name, vocab_size=64, seq_len=128, num_kv_pairs=4, power_a=power_a, eval_sequences=1000)
        e = task.eval_set(gen(7))
        return e.gaps[e.query_mask].float()

    law, flat = gaps(0.01), gaps(1.0)
    quarter = 128 / 4
    assert (law < quarter).float().mean() > 3 * (law >= 3 * quarter).float().mean()
    assert (law < quarter).float().mean() > (flat < quarter).float().mean() + 0.15


# ------------------------------------------------------------------------------------------------------------
# Seeds, registry
# ------------------------------------------------------------------------------------------------------------


def test_same_seed_same_batch_other_seed_other_batch(task):
    a, b, c = task.sample(8, gen(3)), task.sample(8, gen(3)), task.sample(8, gen(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)
    ea, eb, ec = task.eval_set(gen(3)), task.eval_set(gen(3)), task.eval_set(gen(4))
    for field in ("tokens", "targets", "gaps", "positions"):
        assert torch.equal(getattr(ea, field), getattr(eb, field)), field
    assert not torch.equal(ea.tokens, ec.tokens)


def test_sampling_leaves_the_global_rng_alone(task):
    assert_sampling_leaves_global_rng(task)


def test_registered_with_the_attributes_the_harness_reads():
    assert {"mqar", "mqar-reassign", "noisy-recall"} <= set(rb.names("tasks"))
    for name in ("mqar", "mqar-reassign", "noisy-recall"):
        task = rb.task(name)
        assert task.name == name
        assert (task.eval_seq_len, task.eval_num_kv_pairs) == (task.seq_len, task.num_kv_pairs)
        assert task.vocab_size > 0 and task.eval_sequences > 0


# ------------------------------------------------------------------------------------------------------------
# Bad knobs: one ValueError naming the knob
# ------------------------------------------------------------------------------------------------------------

BAD = [
    ("mqar", dict(vocab_size=10, num_kv_pairs=5), "num_kv_pairs"),  # 4 key tokens
    ("mqar", dict(vocab_size=10, num_kv_pairs=2, eval_num_kv_pairs=5), "eval_num_kv_pairs"),
    ("mqar", dict(seq_len=15, num_kv_pairs=4), "seq_len"),  # 8 + 2·4 = 16 needed
    ("mqar", dict(seq_len=64, num_kv_pairs=4, eval_seq_len=10), "eval_seq_len"),
    ("mqar", dict(power_a=-0.1), "power_a"),
    ("mqar", dict(power_a=0), "power_a"),
    ("mqar", dict(power_a="x"), "power_a"),
    ("mqar", dict(num_kv_pairs=2.5), "num_kv_pairs"),
    ("mqar", dict(num_kv_pairs=True), "num_kv_pairs"),
    ("mqar", dict(vocab_size=100.0), "vocab_size"),
    ("mqar", dict(seq_len=0), "seq_len"),
    ("mqar", dict(eval_sequences=0), "eval_sequences"),
    ("mqar", dict(num_filler_tokens=0), "num_filler_tokens"),
    ("mqar", dict(vocab_size=16, num_filler_tokens=6, num_kv_pairs=4), "num_filler_tokens"),
    ("mqar-reassign", dict(num_updates=-1), "num_updates"),
    ("mqar-reassign", dict(num_updates=1.5), "num_updates"),
    ("mqar-reassign", dict(vocab_size=16, num_kv_pairs=4, num_updates=5), "num_updates"),  # 8 value tokens
    ("mqar-reassign", dict(seq_len=17, num_kv_pairs=4, num_updates=1), "seq_len"),  # 8 + 2·(4 + 1)
    ("noisy-recall", dict(noise_frac=-0.1), "noise_frac"),
    ("noisy-recall", dict(noise_frac=1.0), "noise_frac"),
    ("noisy-recall", dict(noise_vocab_size=0), "noise_vocab_size"),
    ("noisy-recall", dict(vocab_size=32, noise_vocab_size=14, num_kv_pairs=4), "noise_vocab_size"),
    ("noisy-recall", dict(seq_len=16, num_kv_pairs=4, noise_frac=0.5), "seq_len"),  # 8 noise tokens
]


@pytest.mark.parametrize("name,knobs,field", BAD, ids=[f"{n}-{f}-{i}" for i, (n, _, f) in enumerate(BAD)])
def test_bad_knob_raises_naming_it(name, knobs, field):
    with pytest.raises(ValueError, match=field):
        rb.task(name, **knobs)


def test_bad_batch_size_and_eval_length_name_them():
    task = rb.task("mqar", vocab_size=32, seq_len=24, num_kv_pairs=3)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            task.sample(bad, gen(0))
    with pytest.raises(ValueError, match="seq_len"):
        task.eval_set(gen(0), seq_len=10)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        task.eval_set(gen(0), num_kv_pairs=20)
