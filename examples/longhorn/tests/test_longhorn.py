"""The longhorn plugin: discovered through its entry point, the retrieval-bench contract, and its meaning.

Run after installing the package (``pip install ./examples/longhorn``): ``python -m pytest
examples/longhorn/tests -q``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from rb_longhorn import LonghornRule, step_sizes

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.memories.causal import causal_loop
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.testing import check_causal, check_memory, check_update_rule

DIST = "retrieval-bench-longhorn"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(b, l, f, q=2, scale=1.0):
    """Features of norm about ``scale`` (unnormalised: the rule's default), values, β, queries; float64 leaves."""
    k = scale * torch.randn(b, l, f, dtype=F64) / f ** 0.5
    out = (k, torch.randn(b, l, 3, dtype=F64), torch.rand(b, l, dtype=F64), torch.randn(b, q, f, dtype=F64))
    return tuple(t.requires_grad_(True) for t in out)


def _assert_same(y, y_ref, inputs, names):
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, cot)
    grads_ref = torch.autograd.grad(y_ref, inputs, cot)
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"d/d{n}: {m}")


# ---- discovery ---------------------------------------------------------------------------------------------

def test_entry_point_is_declared_and_listed_with_the_distribution():
    eps = [ep for ep in entry_points(group="retrieval_bench.update_rules") if ep.name == "longhorn"]
    assert [ep.value for ep in eps] == ["rb_longhorn:LonghornRule"]
    assert "longhorn" in rb.names("update_rules")
    assert registry.update_rules.origins()["longhorn"] == DIST
    assert registry.update_rules.get("longhorn") is LonghornRule


def test_spec_uses_no_normalisation_and_the_beta_gate():
    mem = rb.memory("dpfp-1/longhorn", d_key=8)
    assert mem.spec.norm == "none" and not mem.attn
    assert mem.gates == ("beta",)


def test_attention_normaliser_is_refused():
    with pytest.raises(rb.RegistryError, match="no attention-normalised form"):
        rb.memory("linear/longhorn/sum+attn", d_key=4)


# ---- the retrieval-bench contract --------------------------------------------------------------------------

def test_contract_of_the_rule_with_several_feature_maps_and_normalisations():
    check_update_rule("longhorn")


@pytest.mark.parametrize("spec", ["dpfp-1/longhorn", "linear/longhorn", "favor-4/longhorn", "linear/longhorn/l2"])
def test_contract_of_composed_memories(spec):
    check_memory(spec, d_key=4)
    check_causal(spec, d_key=4)


# ---- the fast forms equal the step function ---------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.3, 1.0, 10.0])
@pytest.mark.parametrize("L", [1, 7, 40, 130])
def test_training_form_equals_reference_loop_in_outputs_and_gradients(L, scale):
    inputs = k, v, beta, q = _inputs(2, L, 6, scale=scale)
    y = LonghornRule().forward(k, v, q, {"beta": beta}, attn=False)
    y_ref = reference_loop(LonghornRule(), k, v, q, {"beta": beta}, attn=False)[0]
    _assert_same(y, y_ref, inputs, ["k", "v", "beta", "q"])


@pytest.mark.parametrize("L", [1, 9, 130])
def test_causal_form_equals_the_causal_loop(L):
    k, v, beta, _ = _inputs(2, L, 6, scale=3.0)
    q = torch.randn(2, L, 6, dtype=F64, requires_grad=True)
    y = LonghornRule().causal(k, v, q, {"beta": beta}, attn=False)
    y_ref = causal_loop(LonghornRule(), k, v, q, {"beta": beta}, attn=False)
    _assert_same(y, y_ref, (k, v, beta, q), ["k", "v", "beta", "q"])


# ---- meaning -----------------------------------------------------------------------------------------------

def test_step_is_the_longhorn_equation():
    """W_t = W_{t-1}(I - ε φ φᵀ) + ε v φᵀ with ε = β / (1 + β φᵀφ), with explicit matrices."""
    B, F, V = 3, 5, 4
    W = torch.randn(B, V, F, dtype=F64)
    k, v, beta = torch.randn(B, F, dtype=F64), torch.randn(B, V, dtype=F64), torch.rand(B, dtype=F64)
    new, rec = LonghornRule().step({"W": W}, k, v, {"beta": beta}, t=1, attn=False)
    eye = torch.eye(F, dtype=F64)
    for b in range(B):
        eps = beta[b] / (1 + beta[b] * k[b] @ k[b])
        expect = W[b] @ (eye - eps * torch.outer(k[b], k[b])) + eps * torch.outer(v[b], k[b])
        torch.testing.assert_close(new["W"][b], expect, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rec["v_bar"], (W @ k[..., None])[..., 0])


def test_each_write_solves_the_online_regression_problem():
    """W_t minimises ‖W - W_{t-1}‖² + β ‖W φ - v‖²: the objective's gradient vanishes there, and a small move
    away from W_t in any direction increases it."""
    B, F, V = 2, 6, 3
    W0 = torch.randn(B, V, F, dtype=F64)
    k, v, beta = 2 * torch.randn(B, F, dtype=F64), torch.randn(B, V, dtype=F64), torch.rand(B, dtype=F64)
    W1 = LonghornRule().step({"W": W0}, k, v, {"beta": beta}, t=1, attn=False)[0]["W"].requires_grad_(True)

    def objective(W):
        return ((W - W0) ** 2).sum() + (beta * ((W @ k[..., None])[..., 0] - v).pow(2).sum(-1)).sum()

    (grad,) = torch.autograd.grad(objective(W1), W1)
    assert grad.abs().max() < 1e-12
    for _ in range(5):
        assert objective(W1 + 1e-3 * torch.randn_like(W1)) > objective(W1)


def test_large_keys_never_overshoot():
    """After a write, the memory's read at φ is the convex combination (v̄ + β‖φ‖² v) / (1 + β‖φ‖²) of what it
    held and the new value, whatever the key's norm: a key of norm 100 does not blow up as the delta rule's
    step W + β (v - W φ) φᵀ would (its read moves by β‖φ‖² = 10⁴ times the error)."""
    B, F, V = 2, 4, 3
    W = torch.randn(B, V, F, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, F, dtype=F64), dim=-1) * 100.0
    v, beta = torch.randn(B, V, dtype=F64), torch.rand(B, dtype=F64)
    new, rec = LonghornRule().step({"W": W}, k, v, {"beta": beta}, t=1, attn=False)
    r = (beta * (k * k).sum(-1))[:, None]  # β‖φ‖²
    read = (new["W"] @ k[..., None])[..., 0]
    torch.testing.assert_close(read, (rec["v_bar"] + r * v) / (1 + r), atol=1e-9, rtol=1e-9)
    assert (step_sizes(k, beta) * (k * k).sum(-1) < 1).all()  # ε‖φ‖² < 1: no overshoot
