"""The training loop: both stop rules, max_steps, divergence as a recorded status, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval_bench import Memory
from retrieval_bench.registry import memories
from retrieval_bench.train import train_run


@pytest.fixture
def run_cfg(tiny_experiment):
    """``run_cfg(memory=..., **train)``: the one run of a tiny experiment (seed 3, S = 4), 60 steps, an
    evaluation every 5, no diagnostics unless asked."""

    def make(memory: str = "linear/sum", **train):
        train = {"eval_every": 5, "max_steps": 60, "diagnostics": False, **train}
        return tiny_experiment.load(seeds=[3], model={"memory": memory}, train=train).expand()[0]

    return make


def eval_losses(result):
    return [v for (_, split, metric, v) in result["curves"] if split == "eval" and metric == "loss"]


def test_stop_when_solved(run_cfg):
    out = train_run(run_cfg(stop_loss=10.0))  # any loss is below 10: stops at the first evaluation
    assert out["row"]["stop_reason"] == "solved" and out["row"]["steps"] == 5
    assert out["row"]["status"] == "done"


def test_stop_after_patience_without_a_new_best(run_cfg):
    out = train_run(run_cfg(lr=1e-12, stop_loss=0.0, patience=2, max_steps=1000))
    row = out["row"]
    assert row["stop_reason"] == "patience"
    losses = eval_losses(out)
    # first evaluation sets the best; two more without improvement stop the run
    assert len(losses) == 3 and row["steps"] == 15
    assert row["best_loss"] == pytest.approx(min(losses)) and row["final_loss"] == losses[-1]


def test_stop_at_max_steps_records_the_curve(run_cfg):
    out = train_run(run_cfg(stop_loss=0.0, patience=100, max_steps=23))
    row = out["row"]
    assert row["stop_reason"] == "max_steps" and row["steps"] == 23
    steps = [s for (s, split, metric, _) in out["curves"] if split == "eval" and metric == "loss"]
    assert steps == [5, 10, 15, 20, 23]
    assert 0.0 <= row["final_acc"] <= 1.0 and row["wall_s"] > 0


def test_same_seed_same_numbers_and_no_global_rng_touched(run_cfg):
    state = torch.get_rng_state()
    a, b = train_run(run_cfg(max_steps=20)), train_run(run_cfg(max_steps=20))
    assert torch.equal(state, torch.get_rng_state())
    assert a["row"]["final_loss"] == b["row"]["final_loss"] and eval_losses(a) == eval_losses(b)


class Exploding(Memory):
    """Reads NaN from its fourth call on: a stand-in for a memory whose training blows up."""

    calls = 0

    def forward(self, keys, values, betas=None, queries=None, **gates):
        Exploding.calls += 1
        y = (queries @ keys.transpose(1, 2)) @ values
        return y * math.nan if Exploding.calls > 3 else y


def test_non_finite_loss_ends_the_run_as_diverged(run_cfg):
    with memories.scoped():
        memories.register("exploding", Exploding)
        Exploding.calls = 0
        out = train_run(run_cfg(memory="exploding", eval_every=2, stop_loss=0.0))
    row = out["row"]
    assert row["status"] == "diverged" and "non-finite" in row["stop_reason"]
    assert row["steps"] < 60
    # what it had recorded before diverging is kept
    assert eval_losses(out) and row["final_loss"] == eval_losses(out)[-1]


def test_diagnostics_are_recorded_when_on(run_cfg):
    out = train_run(run_cfg(memory="dpfp-1/delta", max_steps=10, diagnostics=True))
    metrics = {m for (_, _, m, _) in out["diagnostics"]}
    assert {"state_norm", "contrast_cos", "margin", "grad_norm"} <= metrics
