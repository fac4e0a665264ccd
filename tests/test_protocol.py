"""The protocol options (issue 17, point 6): each one's meaning, ``protocol = "official"``, and defaults that
change nothing.

``fixtures/protocol_defaults_record.json`` holds the records of ``DEFAULT_CASES`` as the loop wrote them before
the options existed (made with that version by running ``train_run`` on each case below and keeping every
field of the result but the run id, config, version and times): with default settings a run's record must
not move.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from retrieval_bench import Memory
from retrieval_bench.config import (
    PROTOCOL_OPTIONS,
    ConfigError,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    from_dict,
)
from retrieval_bench.feature_maps import FavorPlus
from retrieval_bench.model import retrieval_loss
from retrieval_bench.registry import memories
from retrieval_bench.tasks import Capacity, task
from retrieval_bench.train import _EVAL, _gen, build_model, chunk_weights, evaluate, train_run

FIXTURE = Path(__file__).parent / "fixtures" / "protocol_defaults_record.json"


def run_cfg(memory="dpfp-1/sum", num_keys=6, seed=3, **train):
    raw = {"name": "t", "seeds": [seed], "task": {"name": "capacity", "num_keys": num_keys, "eval_sequences": 3},
           "model": {"memory": memory, "d_key": 8},
           "train": {"eval_every": 5, "max_steps": 20, "batch_size": 4, "diagnostics": False, **train}}
    return from_dict(raw).expand()[0]


def evals(result, metric="loss"):
    return [v for (_, split, m, v) in result["curves"] if split == "eval" and m == metric]


def tiny_model(memory="dpfp-1/sum", num_keys=8, seed=5):
    cfg = RunConfig("t", TaskConfig("capacity", (("num_keys", num_keys),)), ModelConfig(memory=memory, d_key=8),
                    TrainConfig(), seed)
    return build_model(cfg, num_keys)


# --- (b) the mean of per-chunk means --------------------------------------------------------------------------

def test_chunk_mean_by_hand_with_short_last_chunks():
    # row 0: 5 real queries in chunks of 2 -> (1, 3), (5, 7), (9); row 1: 3 real -> (2, 4), (6); padding after
    losses = torch.tensor([[1.0, 3, 5, 7, 9], [2, 4, 6, 100, 100]])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    w = chunk_weights(mask, 2)
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 0.0, 0.0]]))
    chunk_mean = float((w * losses).sum() / w.sum())
    assert chunk_mean == pytest.approx((2 + 6 + 9 + 3 + 6) / 5)  # 5.2: the chunk means' mean
    plain = float((losses * mask).sum() / mask.sum())
    assert plain == pytest.approx(37 / 8) and plain != pytest.approx(chunk_mean)


def test_chunk_weights_follow_real_queries_wherever_they_sit():
    mask = torch.tensor([[False, True, True, False, True]])  # a task may pad anywhere
    assert torch.equal(chunk_weights(mask, 2), torch.tensor([[0.0, 0.5, 0.5, 0.0, 1.0]]))
    assert torch.equal(chunk_weights(mask, 8), torch.tensor([[0.0, 1 / 3, 1 / 3, 0.0, 1 / 3]]))


def official_eval(model, ev, chunk):
    """The official evaluation, loop for loop (PAPER §2.4): each sequence replicated once per query, split into
    chunks of ``chunk``, one model call and one mean loss per chunk; the mean of the chunk losses."""
    losses = []
    model.eval()
    with torch.no_grad():
        for n in range(ev.keys.shape[0]):
            real = ev.mask[n].nonzero()[:, 0]
            for idx in real.split(chunk):
                c = len(idx)
                y = model(ev.keys[n].expand(c, -1), ev.values[n].expand(c, -1), ev.queries[n, idx][:, None])
                losses.append(retrieval_loss(y[:, 0], ev.targets[n, idx]).item())
    model.train()
    return sum(losses) / len(losses), len(losses)


@pytest.mark.parametrize("memory", ["dpfp-1/sum", "softmax", "linear/delta"])
def test_official_evaluation_equals_the_official_loop(memory):
    model = tiny_model(memory)
    ev = task("capacity", num_keys=8, eval_sequences=3).eval_set(torch.Generator().manual_seed(0))
    ref, n_chunks = official_eval(model, ev, chunk=3)
    assert n_chunks == 3 * 3  # 8 queries per sequence: chunks of 3, 3, 2
    for calls in (False, True):  # a deterministic memory reads the same in one call or one per chunk
        loss, acc, y = evaluate(model, ev, chunk=3, chunk_mean=True, chunk_calls=calls)
        assert loss == pytest.approx(ref, rel=1e-5)
    plain, _, y_plain = evaluate(model, ev)
    assert torch.allclose(y, y_plain, atol=1e-6)
    assert plain == pytest.approx(retrieval_loss(y_plain, ev.targets, ev.mask).item())
    assert plain != pytest.approx(ref, rel=1e-6)  # the two means weigh queries differently


# --- (c) one FAVOR+ Ω per evaluation chunk ---------------------------------------------------------------------

def test_official_favor_draws_one_omega_per_chunk(monkeypatch):
    draws = []
    real_redraw = FavorPlus.redraw
    monkeypatch.setattr(FavorPlus, "redraw", lambda self, d=None: (draws.append(1), real_redraw(self, d))[1])
    model = tiny_model("favor-4/sum")
    ev = task("capacity", num_keys=8, eval_sequences=2).eval_set(torch.Generator().manual_seed(0))
    evaluate(model, ev, chunk=3)
    assert len(draws) == 1  # the suite: one call, one Ω for the whole evaluation
    draws.clear()
    model.memory.phi.seed(7)
    loss, _, _ = evaluate(model, ev, chunk=3, chunk_mean=True, chunk_calls=True)
    assert len(draws) == 2 * 3  # 2 sequences x chunks of 3, 3, 2
    # the same Ω sequence gives the official loop's number
    model.memory.phi.seed(7)
    ref, _ = official_eval(model, ev, chunk=3)
    assert loss == pytest.approx(ref, rel=1e-5)


# --- (a) a fresh evaluation set at every evaluation ------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Every evaluation set drawn and every training batch sampled by a capacity task."""
    seen = {"eval": [], "train": []}
    real_eval, real_sample = Capacity.eval_set, Capacity.sample

    def eval_set(self, g):
        seen["eval"].append(real_eval(self, g))
        return seen["eval"][-1]

    def sample(self, batch_size, g):
        seen["train"].append(real_sample(self, batch_size, g))
        return seen["train"][-1]

    monkeypatch.setattr(Capacity, "eval_set", eval_set)
    monkeypatch.setattr(Capacity, "sample", sample)
    return seen


def test_fresh_eval_sets_differ_leave_training_batches_alone_and_follow_the_seed(spy):
    fixed = train_run(run_cfg())
    fixed_sets, fixed_batches = list(spy["eval"]), list(spy["train"])
    spy["eval"].clear(), spy["train"].clear()
    fresh = train_run(run_cfg(eval_set="fresh"))
    assert len(fixed_sets) == 1 and len(spy["eval"]) == len(evals(fresh)) == 4
    assert all(not torch.equal(a.keys, b.keys) for a, b in zip(spy["eval"], spy["eval"][1:], strict=False))
    assert torch.equal(spy["eval"][0].keys, fixed_sets[0].keys)  # the series starts with the suite's set
    # the evaluation sets come from their own stream: the training batches, and so the model, are unchanged
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.query, b.query)
               for a, b in zip(fixed_batches, spy["train"], strict=True))
    assert evals(fresh)[0] == evals(fixed)[0] and evals(fresh)[1:] != evals(fixed)[1:]
    # reproducible by seed, and another seed draws other sets
    first = [s.keys for s in spy["eval"]]
    spy["eval"].clear()
    assert evals(train_run(run_cfg(eval_set="fresh"))) == evals(fresh)
    assert all(torch.equal(a, b) for a, b in zip(first, (s.keys for s in spy["eval"]), strict=True))
    spy["eval"].clear()
    train_run(run_cfg(eval_set="fresh", seed=4))
    assert not any(torch.equal(a, b.keys) for a, b in zip(first, spy["eval"], strict=True))


def test_official_run_evaluates_in_chunks_of_the_batch_size():
    # lr so small that one step leaves the weights as they were: the first evaluation is of the initial model
    cfg = run_cfg(protocol="official", lr=1e-12, max_steps=1, batch_size=4)  # chunks of 4 and 2
    out = train_run(cfg)
    model = build_model(cfg, 6)
    ev = cfg.task.build().eval_set(_gen(cfg.seed, _EVAL))
    official, _ = official_eval(model, ev, chunk=4)
    assert evals(out)[0] == pytest.approx(official, rel=1e-5)
    assert evals(out)[0] != pytest.approx(evaluate(model, ev)[0], rel=1e-6)


# --- (d) training on through non-finite values -----------------------------------------------------------------

class GoesNaN(Memory):
    """A linear read that turns NaN, in training and evaluation alike, from its fourth training call on."""

    train_calls = 0

    def forward(self, keys, values, betas=None, queries=None, **gates):
        GoesNaN.train_calls += self.training
        y = (queries @ keys.transpose(1, 2)) @ values
        return y * math.nan if GoesNaN.train_calls > 3 else y


def nan_run(**train):
    with memories.scoped():
        memories.register("goes-nan", GoesNaN)
        GoesNaN.train_calls = 0
        return train_run(run_cfg(memory="goes-nan", eval_every=1, stop_loss=0.0, max_steps=40, **train))


def test_official_nonfinite_trains_on_records_nan_and_ends_by_the_stop_rule():
    stopped = nan_run()
    assert stopped["row"]["status"] == "diverged" and stopped["row"]["steps"] == 4
    out = nan_run(nonfinite="continue", diagnostics=True)
    row, losses = out["row"], evals(out)
    assert losses[:3] == evals(stopped)  # the same record up to the divergence
    assert all(math.isfinite(v) for v in losses[:3]) and all(math.isnan(v) for v in losses[3:])
    train_losses = [v for (_, split, m, v) in out["curves"] if split == "train"]
    assert all(math.isnan(v) for v in train_losses[3:])
    # NaN is never a new best: strikes count on from where the finite evaluations left them, to patience (11)
    strike, best = 0, math.inf
    for v in losses[:3]:
        strike, best = (0, v) if v < best else (strike + 1, best)
    assert row["steps"] == 3 + 11 - strike and len(losses) == row["steps"]
    assert row["status"] == "diverged" and row["stop_reason"] == "patience (non-finite from step 4)"
    assert row["final_loss"] is None and row["best_loss"] == min(losses[:3])
    assert (None, "first_nonfinite_step", 4.0) in [d[1:] for d in out["diagnostics"]]
    capped = nan_run(protocol="official", patience=100)
    assert capped["row"]["steps"] == 40 and capped["row"]["stop_reason"] == "max_steps (non-finite from step 4)"


def test_default_patience_is_the_official_rule():
    # no new best at all: the first evaluation sets it, 11 more without one end the run (strike > 10)
    out = train_run(run_cfg(lr=1e-12, stop_loss=0.0, max_steps=1000))
    assert out["row"]["stop_reason"] == "patience" and len(evals(out)) == 1 + 11


# --- protocol = "official", explicit settings, validation ------------------------------------------------------

def test_official_protocol_sets_every_option_and_an_explicit_setting_wins():
    suite, official = TrainConfig(), TrainConfig(protocol="official")
    for name, (suite_value, official_value) in PROTOCOL_OPTIONS.items():
        assert suite.option(name) == suite_value and official.option(name) == official_value
    mixed = TrainConfig(protocol="official", eval_mean="query")
    assert mixed.option("eval_mean") == "query" and mixed.option("eval_set") == "fresh"
    assert TrainConfig(eval_set="fresh").option("eval_set") == "fresh"
    # spelling out what the protocol implies is the same config, so the same run id
    assert TrainConfig(eval_set="fixed", nonfinite="stop") == suite
    assert TrainConfig(protocol="official", eval_omega="chunk") == official
    assert run_cfg(eval_mean="query").run_id == run_cfg().run_id
    assert run_cfg(protocol="official", nonfinite="continue").run_id == run_cfg(protocol="official").run_id
    assert run_cfg(protocol="official").run_id != run_cfg().run_id
    r = run_cfg(protocol="official", eval_mean="query")
    assert RunConfig.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("train, field", [
    ({"protocol": "paper"}, "train.protocol"),
    ({"eval_set": "once"}, "train.eval_set"),
    ({"eval_mean": 5}, "train.eval_mean"),
    ({"eval_omega": ["eval", "call"]}, "train.eval_omega"),
    ({"protocol": 1}, "train.protocol"),
], ids=["protocol", "eval_set", "eval_mean-type", "eval_omega-grid", "protocol-type"])
def test_unknown_values_name_the_field(train, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_cfg(**train)


def test_unknown_value_in_an_override_names_it():
    raw = {"name": "t", "task": {"num_keys": 4}, "model": {"memory": ["softmax", "linear/sum"], "d_key": 8},
           "override": [{"memory": "softmax", "train": {"nonfinite": "ignore"}}]}
    with pytest.raises(ConfigError, match=r"override\[0\]\.train\.nonfinite: must be one of 'stop', 'continue'"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=r"train\.eval_mean"):  # built by hand, caught before training
        train_run(RunConfig("t", TaskConfig("capacity", (("num_keys", 4),)), ModelConfig(d_key=8),
                            TrainConfig(eval_mean="median"), 1))


# --- the defaults change nothing -------------------------------------------------------------------------------

def record_of(case):
    task_name, params, memory, train = case
    tc = TrainConfig(**{"batch_size": 4, "eval_every": 10, "max_steps": 60, "patience": 3, **train})
    cfg = RunConfig("protocol-fixture", TaskConfig(task_name, tuple(sorted(params.items()))),
                    ModelConfig(memory=memory, d_key=8), tc, 3)
    out = train_run(cfg)
    row = {k: v for k, v in out["row"].items() if k not in ("wall_s", "finished_at", "version", "run_id", "config")}
    # through JSON, as the fixture was written (tuples become lists)
    return json.loads(json.dumps({"row": row, "curves": out["curves"], "diagnostics": out["diagnostics"]}))


DEFAULT_CASES = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("before", DEFAULT_CASES, ids=[f"{c['case'][0]}-{c['case'][2]}" for c in DEFAULT_CASES])
def test_default_settings_leave_the_record_as_it_was(before):
    now = record_of(before["case"])
    discrete = ("status", "stop_reason", "steps", "seq_len", "d_dot", "state_size")
    assert {k: now["row"][k] for k in discrete} == {k: before["row"][k] for k in discrete}
    # float32 numbers: equal here; the tolerance leaves room for another CPU's rounding
    for part in ("curves", "diagnostics"):
        assert [r[:-1] for r in now[part]] == [r[:-1] for r in before[part]]
        assert [r[-1] for r in now[part]] == pytest.approx([r[-1] for r in before[part]], rel=1e-4, abs=1e-6,
                                                          nan_ok=True)
    for key in ("final_loss", "best_loss", "final_acc"):
        was = before["row"][key]
        assert now["row"][key] is None if was is None else now["row"][key] == pytest.approx(was, rel=1e-4)
