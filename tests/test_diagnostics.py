"""Diagnostics: hand-computed cases on one-hot keys, readout figures, positions and the stability rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retrieval_bench as rb
from retrieval_bench.diagnostics import (
    StabilityTracker,
    collect,
    collect_memory,
    first_writes,
    readout_rows,
    safe_trace,
    sample_positions,
)

READOUT = {"margin", "target_rank", "accuracy"}


def by_metric(rows):
    """{metric: {position: value}}."""
    out: dict[str, dict] = {}
    for pos, name, val in rows:
        out.setdefault(name, {})[pos] = val
    return out


def run(spec, key_ids, values, betas=None, keys=None, max_positions=64, overwrite=None, d=None,
        max_sequences=None):
    """collect_memory on one-hot keys (the key symbol's row of the identity) unless ``keys`` is given.

    key_ids (N, L), values (N, L, V); one query per sequence at its first key, target 0.
    """
    d = d or int(key_ids.max()) + 1
    k = F.one_hot(key_ids, d).double() if keys is None else keys
    mem = rb.memory(spec, d_key=d)
    q = k[:, :1]
    N = key_ids.shape[0]
    targets, mask = torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1, dtype=torch.bool)
    return collect_memory(mem, k, values, betas, q, {}, key_ids=key_ids, targets=targets, mask=mask,
                          max_positions=max_positions, overwrite=overwrite, max_sequences=max_sequences)


@pytest.mark.parametrize("spec", ["identity/sum/none", "identity/delta/none"])
def test_orthonormal_keys_give_zero_interference(spec):
    key_ids = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2]])
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    m = by_metric(run(spec, key_ids, values, betas=torch.ones(2, 4, dtype=torch.float64)))
    assert m["interference"] == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    # nothing was retrieved, so nothing resembles the written value: cosine 0 (not NaN), error 1
    assert m["contrast_cos"] == {t: 0.0 for t in range(4)}
    assert m["contrast_err"] == pytest.approx({t: 1.0 for t in range(4)})
    assert not any(name.endswith(("_first", "_rewrite")) for name in m)  # no key repeats: no split


def test_delta_rewrite_retrieves_the_old_value_and_keeps_the_norm():
    # keys 0, 1, 0 with values e0, e1, e2; β = 1: the rewrite at t = 2 reads e0 and swaps it for e2
    key_ids = torch.tensor([[0, 1, 0]])
    values = torch.eye(3, dtype=torch.float64)[None]
    betas = torch.ones(1, 3, dtype=torch.float64)
    mem = rb.memory("identity/delta/none", d_key=2)
    k = F.one_hot(key_ids, 2).double()
    trace = safe_trace(mem, k, values, betas, k[:, :1], {})
    assert torch.equal(trace["v_bar"][0, 2], values[0, 0])  # exactly the old value

    m = by_metric(run("identity/delta/none", key_ids, values, betas))
    assert m["state_norm"] == pytest.approx({0: 1.0, 1: math.sqrt(2), 2: math.sqrt(2)})
    assert m["contrast_cos_rewrite"] == {2: 0.0}  # old e0 vs new e2
    assert m["contrast_err_rewrite"] == pytest.approx({2: math.sqrt(2)})
    assert set(m["contrast_cos_first"]) == {0, 1} and set(m["interference"]) == {0, 1}
    assert m["max_state_norm"] == {None: pytest.approx(math.sqrt(2))}

    # rewriting the same value: the memory already holds it
    same = values[:, [0, 1, 0]]
    m = by_metric(run("identity/delta/none", key_ids, same, betas))
    assert m["contrast_cos_rewrite"] == pytest.approx({2: 1.0})
    assert m["contrast_err_rewrite"] == pytest.approx({2: 0.0})
    # the sum rule accumulates instead: W = (e0 + e2) ⊗ k0 + e1 ⊗ k1
    m = by_metric(run("identity/sum/none", key_ids, values))
    assert m["state_norm"][2] == pytest.approx(math.sqrt(3))


def test_overwrite_flag_forces_or_suppresses_the_split():
    key_ids = torch.tensor([[0, 1, 0]])
    values = torch.eye(3, dtype=torch.float64)[None]
    assert "contrast_cos_rewrite" not in by_metric(run("identity/sum/none", key_ids, values, overwrite=False))
    fresh = torch.tensor([[0, 1, 2]])
    m = by_metric(run("identity/sum/none", fresh, values, overwrite=True))
    assert set(m["contrast_cos_first"]) == {0, 1, 2} and "contrast_cos_rewrite" not in m


def test_attention_normaliser_grows_linearly_under_the_sum_rule():
    L, c = 7, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    keys = c.expand(1, L, 3)  # a constant φ(k) (identity φ)
    values = torch.randn(1, L, 2, dtype=torch.float64)
    m = by_metric(run("identity/sum/attn", torch.zeros(1, L, dtype=torch.long), values, keys=keys, d=3))
    sq = float(c @ c)
    assert m["normaliser"] == pytest.approx({t: (t + 1) * sq for t in range(L)})  # z_t·φ = t·‖φ‖², t from 1
    assert m["normaliser_l1"] == pytest.approx({t: (t + 1) * 3.5 for t in range(L)})
    assert m["max_normaliser"] == {None: pytest.approx(L * sq)}


def test_softmax_reports_entropy_and_no_state():
    L = 5
    keys = torch.ones(2, L, 4)  # equal keys: uniform attention, entropy log L
    values = F.one_hot(torch.arange(L), L).float().expand(2, L, L)
    rows = collect_memory(rb.memory("softmax"), keys, values, None, torch.randn(2, 3, 4), {},
                          key_ids=torch.arange(L).expand(2, L), targets=torch.zeros(2, 3, dtype=torch.long),
                          mask=torch.ones(2, 3, dtype=torch.bool))
    m = by_metric(rows)
    assert set(m) == READOUT | {"attn_entropy"}
    assert m["attn_entropy"][None] == pytest.approx(math.log(L))


class NoneTrace(rb.Memory):
    def forward(self, keys, values, betas=None, queries=None, **gates):
        return queries @ keys.transpose(1, 2) @ values


class RaisingTrace(NoneTrace):
    def trace(self, *args, **kwargs):
        raise NotImplementedError


class NoTraceMethod(nn.Module):
    gates = ()

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return queries @ keys.transpose(1, 2) @ values


class FakeModel(nn.Module):
    """The two things ``collect`` needs of a model: ``inputs`` and ``memory`` (and a forward)."""

    def __init__(self, mem):
        super().__init__()
        self.memory = mem

    def inputs(self, keys, values, queries):
        k, v, q = (F.one_hot(x, 4).float() for x in (keys, values, queries))
        return k, v, None, q, {}

    def forward(self, keys, values, queries):
        k, v, betas, q, gates = self.inputs(keys, values, queries)
        return self.memory(k, v, betas, q, **gates)


@pytest.mark.parametrize("mem", [NoneTrace(), RaisingTrace(), NoTraceMethod()],
                         ids=["returns-none", "raises", "absent"])
def test_memory_without_trace_gets_readout_rows_only(mem):
    keys = torch.tensor([[0, 1, 2], [2, 0, 1]])
    ev = rb.EvalSet(keys, keys, keys, keys, torch.ones(2, 3, dtype=torch.bool))
    m = by_metric(collect(FakeModel(mem), ev))
    assert set(m) == READOUT
    assert m["accuracy"][None] == 1.0 and m["target_rank"][None] == 0.0  # orthonormal keys: exact recall


def test_positions_are_capped_and_include_the_last():
    pos = sample_positions(100, 64)
    assert len(pos) == 64 and pos[0] == 0 and pos[-1] == 99 and bool((pos.diff() > 0).all())
    assert sample_positions(10, 64).tolist() == list(range(10))
    assert sample_positions(10, 1).tolist() == [9]
    with pytest.raises(ValueError):
        sample_positions(10, 0)
    L = 10
    key_ids = torch.arange(L)[None]
    rows = run("identity/delta/none", key_ids, torch.randn(1, L, 2, dtype=torch.float64),
               betas=torch.ones(1, L, dtype=torch.float64), max_positions=3)
    per_pos = by_metric([r for r in rows if r[0] is not None])
    # linspace(0, 9, 3) = 0, 4.5, 9 and round(4.5) = 4 (half to even)
    assert {name: set(v) for name, v in per_pos.items()} == {name: {0, 4, 9} for name in per_pos}


def test_only_the_first_sequences_are_traced():
    key_ids = torch.arange(3).expand(2, 3)
    values = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)[:, None, None]
    # orthonormal keys: ‖W_t‖ = sqrt(t + 1) in the first sequence, twice that in the second
    first = by_metric(run("identity/sum/none", key_ids, values, max_sequences=1))
    both = by_metric(run("identity/sum/none", key_ids, values))
    assert first["state_norm"] == pytest.approx({t: math.sqrt(t + 1) for t in range(3)})
    assert both["state_norm"] == pytest.approx({t: 1.5 * math.sqrt(t + 1) for t in range(3)})
    assert first["max_state_norm"][None] == pytest.approx(math.sqrt(3))
    with pytest.raises(ValueError):
        run("identity/sum/none", key_ids, values, max_sequences=0)


def test_readout_figures_by_hand():
    y = torch.tensor([[[0.9, 0.1, 0.0], [0.6, 0.2, 0.4], [9.0, -9.0, 9.0]]])
    targets = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[True, True, False]])  # the third query is padding
    m = by_metric(readout_rows(y, targets, mask))
    # margins 0.8 and 0.2 - 0.6; ranks 0 and 2; correct 1 and 0
    assert m["margin"][None] == pytest.approx((0.8 - 0.4) / 2)
    assert m["target_rank"][None] == pytest.approx(1.0)
    assert m["accuracy"][None] == pytest.approx(0.5)
    flat = by_metric(readout_rows(torch.zeros(1, 1, 5), torch.tensor([[3]]), torch.tensor([[True]])))
    assert flat["target_rank"][None] == 2.0 and flat["margin"][None] == 0.0  # ties count half


def test_first_writes():
    assert first_writes(torch.tensor([[3, 1, 3, 3, 0]])).tolist() == [[True, True, False, False, True]]


@pytest.mark.parametrize("task", ["capacity", "overwrite"])
def test_collect_on_a_model_splits_rewrites_only_where_they_exist(task):
    g = torch.Generator().manual_seed(0)
    t = rb.task(task, num_keys=8)
    ev = t.eval_set(g)
    model = rb.RetrievalModel(num_keys=8, memory_spec="dpfp-1/delta", d_key=4)
    rows = collect(model, ev, max_positions=4)
    m = by_metric(rows)
    assert {"contrast_cos", "contrast_err", "interference", "state_norm", "beta", "max_state_norm"} <= set(m)
    assert ("contrast_cos_rewrite" in m) == (task == "overwrite")
    assert all(math.isfinite(v) for _, _, v in rows)
    y = model(ev.keys, ev.values, ev.queries)
    given = collect(model, ev, y=y, max_positions=4)
    assert [r[:2] for r in given] == [r[:2] for r in rows]
    assert [r[2] for r in given] == pytest.approx([r[2] for r in rows], rel=1e-5)


def test_collect_leaves_mode_and_random_features_untouched():
    g = torch.Generator().manual_seed(0)
    ev = rb.task("capacity", num_keys=6).eval_set(g)
    model = rb.RetrievalModel(num_keys=6, memory_spec="favor-4/sum", d_key=4)
    model(ev.keys, ev.values, ev.queries)  # draws Ω
    phi = model.memory.phi
    state, omega = phi.generator.get_state(), phi.omega.clone()
    collect(model, ev)
    assert model.training
    assert torch.equal(phi.generator.get_state(), state) and torch.equal(phi.omega, omega)


def test_collect_runs_on_every_memory(memory_spec):
    g = torch.Generator().manual_seed(0)
    ev = rb.task("overwrite", num_keys=5).eval_set(g)
    model = rb.RetrievalModel(num_keys=5, memory_spec=memory_spec, d_key=4)
    rows = collect(model, ev, max_positions=3)
    m = by_metric(rows)
    assert READOUT <= set(m) and all(math.isfinite(v) for _, _, v in rows)
    assert ("state_norm" in m) == isinstance(model.memory, rb.FastWeightMemory)


def test_stability_tracker_reports_the_first_nonfinite_step_once():
    tracker = StabilityTracker()
    ok = [(None, "max_state_norm", 3.0), (0, "state_norm", 1.0)]
    out = tracker.update(100, ok, grad_norm=0.5, loss=0.1)
    assert out == ok + [(None, "grad_norm", 0.5)]
    out = tracker.update(200, [(None, "max_state_norm", math.inf)], grad_norm=0.5, loss=0.1)
    assert (None, "first_nonfinite_step", 200.0) in out
    out = tracker.update(300, ok, grad_norm=math.nan, loss=math.nan)
    assert not any(name == "first_nonfinite_step" for _, name, _ in out)

    early = StabilityTracker()
    early.observe(150, loss=math.nan)  # between evaluations
    assert early.update(160, [])[-1] == (None, "first_nonfinite_step", 150.0)


def test_stability_tracker_collects():
    g = torch.Generator().manual_seed(0)
    ev = rb.task("capacity", num_keys=6).eval_set(g)
    model = rb.RetrievalModel(num_keys=6, memory_spec="linear/sum", d_key=4)
    rows = StabilityTracker(max_positions=2).collect(model, ev, step=10, grad_norm=1.5, loss=0.4)
    m = by_metric(rows)
    assert m["grad_norm"] == {None: 1.5} and set(m["state_norm"]) == {0, 5}


def test_recall_at_rewrites_is_exact_under_delta_and_a_mix_under_sum():
    """Key 0 written three times: at t = 2 delta (β = 1) returns exactly the value of t = 1; sum returns
    v_0 + v_1, whose cosine with v_1 is 1/√2."""
    import math

    import retrieval_bench as rb
    from retrieval_bench.diagnostics import previous_write_values, trace_rows

    key_ids = torch.tensor([[0, 0, 0]])
    k = torch.eye(3)[[0, 0, 0]][None].double()
    v = torch.eye(4)[[1, 2, 3]][None].double()
    prev = previous_write_values(key_ids, v)
    assert torch.equal(prev[0, 2], v[0, 1]) and torch.equal(prev[0, 1], v[0, 0]) and prev[0, 0].abs().sum() == 0
    mask = torch.ones(1, 1, dtype=torch.bool)
    for spec, expected in (("identity/delta/none", 1.0), ("identity/sum/none", 1 / math.sqrt(2))):
        mem = rb.memory(spec, d_key=3)
        tr = mem.trace(k, v, torch.ones(1, 3, dtype=torch.float64), k[:, :1])
        rows = {(p, m): val for p, m, val in trace_rows(tr, key_ids, mask)}
        assert rows[(2, "recall_cos_rewrite")] == pytest.approx(expected)
