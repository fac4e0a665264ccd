"""Task generators (PAPER §2.1, §2.5): seeds, the meaning of every target, the eval sets, and bad sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_sampling_leaves_global_rng  # tests/ is on sys.path

import retrieval_bench as rb


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def last_value_by_loop(keys: list[int], values: list[int], query: int) -> int | None:
    """The value at the most recent occurrence of ``query`` (the one Setting 2 asks for); None if absent."""
    found = None
    for k, v in zip(keys, values, strict=True):
        if k == query:
            found = v
    return found


TASK_CASES = [
    ("capacity", dict(num_keys=6)),
    ("capacity", dict(num_keys=8, num_values=11, seq_len=5)),
    ("overwrite", dict(num_keys=5)),
    ("overwrite", dict(num_keys=4, num_values=7, length_factor=3)),
]
TASK_IDS = ["capacity-S6", "capacity-S8-V11-L5", "overwrite-S5", "overwrite-S4-V7-x3"]


@pytest.fixture(params=TASK_CASES, ids=TASK_IDS)
def task(request):
    name, params = request.param
    return rb.task(name, **params)


def test_every_registered_task_builds_samples_and_eval_sets():
    from retrieval_bench import registry

    for name in rb.names("tasks"):
        if not issubclass(registry.tasks.get(name), rb.Task):  # token-stream tasks: tests/test_stream_tasks.py
            continue
        t = rb.task(name, num_keys=5)
        assert isinstance(t, rb.Task)
        s = t.sample(3, gen(0))
        assert s.keys.shape == s.values.shape == (3, t.seq_len)
        assert s.query.shape == s.target.shape == (3,)
        e = t.eval_set(gen(0))
        assert e.keys.shape == (t.eval_sequences, t.eval_seq_len)


# ------------------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------------------


def test_same_seed_same_batch_different_seed_different_batch(task):
    a, b, c = task.sample(8, gen(3)), task.sample(8, gen(3)), task.sample(8, gen(4))
    for field in ("keys", "values", "query", "target"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    same = torch.equal(a.keys, c.keys) and torch.equal(a.values, c.values) and torch.equal(a.query, c.query)
    assert not same
    ea, eb, ec = task.eval_set(gen(3)), task.eval_set(gen(3)), task.eval_set(gen(4))
    for field in ("keys", "values", "queries", "targets", "mask"):
        assert torch.equal(getattr(ea, field), getattr(eb, field)), field
    assert not torch.equal(ea.keys, ec.keys)


def test_sampling_leaves_the_global_rng_alone(task):
    assert_sampling_leaves_global_rng(task)


# ------------------------------------------------------------------------------------------------------------
# Training batches
# ------------------------------------------------------------------------------------------------------------


def test_sample_ids_in_range_and_targets_right_by_a_plain_loop(task):
    s = task.sample(32, gen(0))
    assert s.keys.dtype == s.values.dtype == s.query.dtype == s.target.dtype == torch.int64
    assert s.keys.shape == (32, task.seq_len)
    assert 0 <= s.keys.min() and s.keys.max() < task.num_keys
    assert 0 <= s.values.min() and s.values.max() < task.num_values
    for keys, values, query, target in zip(s.keys.tolist(), s.values.tolist(), s.query.tolist(),
                                           s.target.tolist(), strict=True):
        assert query in keys, "every query asks for a key that was written"
        assert target == last_value_by_loop(keys, values, query)


def test_capacity_sequences_hold_each_key_and_value_once():
    t = rb.task("capacity", num_keys=7, num_values=9, seq_len=6)
    s = t.sample(64, gen(0))
    for keys, values in zip(s.keys.tolist(), s.values.tolist(), strict=True):
        assert len(set(keys)) == len(keys) == 6
        assert len(set(values)) == len(values) == 6
    # L = S by default: every key is written exactly once, a permutation
    full = rb.task("capacity", num_keys=5).sample(16, gen(1))
    assert torch.equal(full.keys.sort(dim=1).values, torch.arange(5).expand(16, 5))
    assert torch.equal(full.values.sort(dim=1).values, torch.arange(5).expand(16, 5))


def test_capacity_pairs_keys_and_values_independently():
    s = rb.task("capacity", num_keys=6).sample(200, gen(0))
    assert not torch.equal(s.keys, s.values)
    # the value bound to key 0 varies across sequences
    bound = s.values[s.keys == 0]
    assert len(set(bound.tolist())) > 1


def test_overwrite_repeats_keys_and_queries_the_most_recent_value():
    t = rb.task("overwrite", num_keys=4)
    assert t.seq_len == 8  # L = 2S by default
    s = t.sample(256, gen(0))
    repeats = 0
    for keys, values, query, target in zip(s.keys.tolist(), s.values.tolist(), s.query.tolist(),
                                           s.target.tolist(), strict=True):
        assert target == last_value_by_loop(keys, values, query)
        hits = [v for k, v in zip(keys, values, strict=True) if k == query]
        if len(set(hits)) > 1:
            repeats += 1
            assert target == hits[-1]
    assert repeats > 0, "with L = 2S some queried keys must have been re-written with a different value"


def test_overwrite_queries_every_position_uniformly_enough():
    s = rb.task("overwrite", num_keys=3).sample(3000, gen(0))
    counts = torch.bincount(s.query, minlength=3).float()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.05


# ------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ------------------------------------------------------------------------------------------------------------


def _check_eval_set(t, e):
    assert e.keys.shape == e.values.shape == (t.eval_sequences, t.eval_seq_len)
    assert e.queries.shape == e.targets.shape == e.mask.shape
    assert e.mask.dtype == torch.bool
    for n in range(t.eval_sequences):
        keys, values = e.keys[n].tolist(), e.values[n].tolist()
        expected_q = sorted(set(keys))[: t.max_eval_queries]  # every distinct key, lowest ids first, capped
        real = e.mask[n].tolist()
        assert sum(real) == len(expected_q)
        padding = len(real) - len(expected_q)
        assert real == [True] * len(expected_q) + [False] * padding, "padding at the end"
        assert e.queries[n, : len(expected_q)].tolist() == expected_q
        for q, target in zip(expected_q, e.targets[n].tolist(), strict=False):
            assert target == last_value_by_loop(keys, values, q)
        # padded slots hold 0
        assert (e.queries[n][~e.mask[n]] == 0).all() and (e.targets[n][~e.mask[n]] == 0).all()
    assert e.num_queries == int(e.mask.sum())
    assert e.queries.shape[1] == min(max(len(set(r)) for r in e.keys.tolist()), t.max_eval_queries)


def test_eval_set_queries_every_distinct_key_with_loop_targets(task):
    _check_eval_set(task, task.eval_set(gen(0)))


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_eval_set_caps_queries_at_lowest_key_ids(cap):
    for name in ("capacity", "overwrite"):
        t = rb.task(name, num_keys=6, max_eval_queries=cap, eval_sequences=5)
        e = t.eval_set(gen(cap))
        assert e.queries.shape == (5, cap)
        _check_eval_set(t, e)


def test_capacity_eval_set_has_no_padding():
    t = rb.task("capacity", num_keys=6, eval_sequences=4)
    e = t.eval_set(gen(0))
    assert e.mask.all() and e.num_queries == 4 * 6
    assert torch.equal(e.queries, torch.arange(6).expand(4, 6))


def test_overwrite_eval_sequences_have_length_s_unless_told():
    t = rb.task("overwrite", num_keys=5)
    assert (t.seq_len, t.eval_seq_len) == (10, 5)
    assert t.eval_set(gen(0)).keys.shape == (20, 5)  # 20 fresh sequences (PAPER §2.4)
    t7 = rb.task("overwrite", num_keys=5, eval_seq_len=7, eval_sequences=3)
    e = t7.eval_set(gen(0))
    assert e.keys.shape == (3, 7)
    _check_eval_set(t7, e)
    # capacity eval sequences follow seq_len
    assert rb.task("capacity", num_keys=6, seq_len=4).eval_seq_len == 4


def test_overwrite_eval_set_has_padding_and_respects_it():
    # short sequences over many keys hold different numbers of distinct keys, so some slots are padding
    t = rb.task("overwrite", num_keys=6, eval_seq_len=4, eval_sequences=30)
    e = t.eval_set(gen(0))
    assert not e.mask.all()
    _check_eval_set(t, e)


# ------------------------------------------------------------------------------------------------------------
# Bad sizes
# ------------------------------------------------------------------------------------------------------------


BAD_SIZES = [
    ("capacity", dict(num_keys=0), "num_keys"),
    ("overwrite", dict(num_keys=0), "num_keys"),
    ("overwrite", dict(num_keys=4, length_factor=0.5), "length_factor"),
    ("capacity", dict(num_keys=4, max_eval_queries=0), "max_eval_queries"),
    ("overwrite", dict(num_keys=4, max_eval_queries=0), "max_eval_queries"),
    ("capacity", dict(num_keys=4, seq_len=5), "seq_len"),
    ("capacity", dict(num_keys=6, num_values=4), "seq_len"),
    ("capacity", dict(num_keys=4, eval_seq_len=5), "eval_seq_len"),
    ("capacity", dict(num_keys=4, num_values=0), "num_values"),
    ("overwrite", dict(num_keys=4, num_values=0), "num_values"),
    ("overwrite", dict(num_keys=4, eval_sequences=0), "eval_sequences"),
    ("overwrite", dict(num_keys=4, seq_len=0), "seq_len"),
    ("overwrite", dict(num_keys=2.5), "num_keys"),
]


@pytest.mark.parametrize(
    "name,params,field",
    BAD_SIZES,
    ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in p.items()) for n, p, _ in BAD_SIZES],
)
def test_impossible_sizes_raise_naming_the_parameter(name, params, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        rb.task(name, **params)


def test_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        rb.task("capacity", num_keys=4).sample(0, gen(0))


def test_unknown_task_is_a_registry_error():
    with pytest.raises(rb.RegistryError, match="did you mean 'overwrite'"):
        rb.task("overwrit", num_keys=4)


def test_eval_at_the_training_length():
    t = rb.task("overwrite", num_keys=5, seq_len=30, eval_seq_len="train")
    ev = t.eval_set(torch.Generator().manual_seed(0))
    assert t.eval_seq_len == 30 and ev.keys.shape[1] == 30
