"""The contract (DESIGN §3) over every registered name, plugins included, via ``retrieval_bench.testing``: the
project runs the very checks a plugin's tests run, and each check is shown to catch what it is there for.

The cases come from the registries when the tests are collected: every registered memory, every update rule
(under several feature maps and every normalisation), every feature map (under every rule). An installed
plugin (``pip install ./examples/longhorn``) is covered without writing a test; one that fails to import
fails only its own cases, naming its distribution.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench.memories import FastWeightMemory, SoftmaxMemory
from retrieval_bench.memories.chunked import QUERY_CHUNK, chunk_length, delta_chunkwise
from retrieval_bench.memories.rules import DeltaRule, SumRule, UpdateRule
from retrieval_bench.testing import (
    EVAL_SEQUENCE,
    check_feature_map,
    check_memory,
    check_update_rule,
    default_shapes,
)

D_KEY = 4


@pytest.mark.parametrize("name", rb.names("memories"))
def test_memory_contract(name):
    check_memory(name, d_key=D_KEY)


@pytest.mark.parametrize("rule", rb.names("update_rules"))
def test_update_rule_contract(rule):
    """The rule's class attributes, then the rule under linear, dpfp-1, favor-4, identity/l2, tanh/l2 and
    every normalisation on linear, each memory through every check and inside the model."""
    check_update_rule(rule, d_key=D_KEY)


@pytest.mark.parametrize("name", rb.names("feature_maps"))
def test_feature_map_contract(name):
    """dim() against the output, the sign it declares, rows mapped alone, gradcheck; then under every rule."""
    check_feature_map(name, d_key=D_KEY)


@pytest.mark.parametrize("name", ["dpfp-2", "dpfp-3", "favor-8"])
def test_parametrised_feature_map_contract(name):
    """Other parameters of the parametrised maps, on their own (test_fast_forms composes them with rules)."""
    check_feature_map(name, d_key=D_KEY, rules=())


def test_the_cases_reach_every_path_of_the_fast_forms():
    """The long default case spans several chunks of the training form with a padded last one, and the
    evaluation check several chunks of the chunkwise form that evaluation takes."""
    lengths = [L for _, L, _, _, _ in default_shapes(D_KEY)]
    assert 1 in lengths
    long = max(lengths)
    C = chunk_length(long, QUERY_CHUNK)
    assert long > 2 * C and long % C != 0
    assert EVAL_SEQUENCE > inspect.signature(delta_chunkwise).parameters["chunk"].default


# ---- each check catches what it is there for ---------------------------------------------------------------

def _composed(cls, spec: str) -> FastWeightMemory:
    s = rb.parse_spec(spec)
    mem = cls(rb.feature_map(s.phi), rb.update_rule(s.rule), s.norm, s.attn, spec=s)
    mem.spec_name = spec
    return mem


class _PeeksAtTheBatch(SoftmaxMemory):
    """Reads with keys averaged over the batch: sequences are not independent."""

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return super().forward(keys + keys.mean(0, keepdim=True), values, betas, queries)

    reference = forward

    def trace(self, *args, **gates):
        return None


class _TraceSeesTheFuture(FastWeightMemory):
    """Records, at every step, the mean of all the values: per-step records that depend on later writes."""

    @torch.no_grad()
    def trace(self, keys, values, betas=None, queries=None, **gates):
        rec = super().trace(keys, values, betas, queries, **gates)
        rec["v_bar"] = values.mean(1, keepdim=True).expand_as(values)
        return rec


class _EvaluationOff(FastWeightMemory):
    """Takes another, wrong, path without autograd when queries outnumber values."""

    def forward(self, keys, values, betas=None, queries=None, **gates):
        y = super().forward(keys, values, betas, queries, **gates)
        return y + 1e-3 if not torch.is_grad_enabled() and queries.shape[1] > values.shape[-1] else y


class _SmallState(FastWeightMemory):
    def state_size(self, d_key, d_value, seq_len):
        return 1


class _DefaultsAlpha(FastWeightMemory):
    """Declares a decay gate α but reads it as 1 when it is left out, instead of saying so."""

    def _gates(self, keys, betas, gates):
        return super()._gates(keys, betas, {"alpha": keys.new_ones(keys.shape[:2]), **gates})


class _IgnoresBeta(DeltaRule):
    """Declares β, then writes at rate 1 whatever β says."""

    def step(self, state, k, v, g, t, attn):
        return super().step(state, k, v, {"beta": torch.ones_like(g["beta"])}, t, attn)

    def forward(self, k, v, q, gates, attn):
        return super().forward(k, v, q, {"beta": torch.ones_like(gates["beta"])}, attn)


class _AlwaysWrites(SumRule):
    """A β-gated sum rule that writes v even at β = 0: no write is a no-op."""

    gates = ("beta",)

    def step(self, state, k, v, g, t, attn):
        return super().step(state, k, (0.5 + g["beta"][:, None]) * v, g, t, attn)

    def forward(self, k, v, q, gates, attn):
        return super().forward(k, (0.5 + gates["beta"][..., None]) * v, q, gates, attn)


@pytest.mark.parametrize("broken,check", [
    pytest.param(_PeeksAtTheBatch, "independence", id="batch-mixing"),
    pytest.param(lambda: _composed(_TraceSeesTheFuture, "linear/delta"), "not causal", id="acausal-trace"),
    pytest.param(lambda: _composed(_EvaluationOff, "linear/delta"), "evaluation", id="evaluation-path"),
    pytest.param(lambda: _composed(_SmallState, "linear/sum"), "state_size", id="state-too-small"),
    pytest.param(lambda: FastWeightMemory(rb.feature_map("linear"), _IgnoresBeta()), "gradient on betas is zero",
                 id="beta-unused"),
    pytest.param(lambda: FastWeightMemory(rb.feature_map("linear"), _AlwaysWrites()), "no-op write",
                 id="no-op-writes"),
])
def test_check_memory_catches(broken, check):
    with pytest.raises(AssertionError, match=check):
        check_memory(broken(), d_key=D_KEY, check_model=False)


class _Decaying(SumRule):
    """W_t = α_t W_{t-1} + v_t ⊗ φ_t, through the reference loop: a rule with a gate other than β."""

    gates = ("alpha",)
    default_attn = False
    forward = UpdateRule.forward

    def step(self, state, k, v, g, t, attn):
        return super().step({"W": g["alpha"][:, None, None] * state["W"]}, k, v, g, t, attn)


def test_check_memory_catches_a_silent_default_for_a_declared_gate():
    check_memory(FastWeightMemory(rb.feature_map("linear"), _Decaying()), d_key=D_KEY)  # says so: passes
    with pytest.raises(AssertionError, match="gates: leaving out the declared gate 'alpha'"):
        check_memory(_DefaultsAlpha(rb.feature_map("linear"), _Decaying()), d_key=D_KEY)
