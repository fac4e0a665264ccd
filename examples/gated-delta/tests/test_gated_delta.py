"""The gated-delta plugin: discovered through its entry point, the retrieval-bench contract, and its meaning.

Run after installing the package (``pip install ./examples/gated-delta``): ``python -m pytest
examples/gated-delta/tests -q``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from rb_gated_delta import GatedDeltaRule, gated_delta_query_backward

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.testing import check_memory, check_update_rule

DIST = "retrieval-bench-gated-delta"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _features(b, l, f, q=2, dtype=torch.float64):
    """Sum-normalised non-negative features, values, gates in (0, 1), queries; leaves requiring grad."""
    k = torch.rand(b, l, f, dtype=dtype)
    k = k / k.sum(-1, keepdim=True)
    out = (k, torch.randn(b, l, 3, dtype=dtype), torch.rand(b, l, dtype=dtype), torch.rand(b, l, dtype=dtype),
           torch.rand(b, q, f, dtype=dtype))
    return tuple(t.requires_grad_(True) for t in out)


# ---- discovery ---------------------------------------------------------------------------------------------

def test_entry_point_is_declared_and_listed_with_the_distribution():
    eps = [ep for ep in entry_points(group="retrieval_bench.update_rules") if ep.name == "gated-delta"]
    assert [ep.value for ep in eps] == ["rb_gated_delta:GatedDeltaRule"]
    assert "gated-delta" in rb.names("update_rules")
    assert registry.update_rules.origins()["gated-delta"] == DIST
    assert registry.update_rules.get("gated-delta") is GatedDeltaRule


def test_spec_uses_sum_normalisation_and_two_gates():
    mem = rb.memory("dpfp-1/gated-delta", d_key=8)
    assert mem.spec.norm == "sum" and not mem.attn
    assert mem.gates == ("beta", "alpha")
    model = rb.RetrievalModel(8, "dpfp-1/gated-delta", d_key=8)
    assert set(model.W_g) == {"beta", "alpha"}


def test_attention_normaliser_is_refused():
    with pytest.raises(rb.RegistryError, match="no attention-normalised form"):
        rb.memory("linear/gated-delta/sum+attn", d_key=4)


# ---- the retrieval-bench contract --------------------------------------------------------------------------

def test_contract_of_the_rule_with_several_feature_maps_and_normalisations():
    check_update_rule("gated-delta")


@pytest.mark.parametrize("spec", ["dpfp-1/gated-delta", "linear/gated-delta", "favor-4/gated-delta"])
def test_contract_of_composed_memories(spec):
    check_memory(spec, d_key=4)


# ---- meaning -----------------------------------------------------------------------------------------------

def test_step_is_the_gated_delta_equation():
    """W_t = α_t W_{t-1}(I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ, with explicit matrices (PAPER §5)."""
    B, F, V = 3, 5, 4
    W = torch.randn(B, V, F, dtype=torch.float64)
    k, v = torch.randn(B, F, dtype=torch.float64), torch.randn(B, V, dtype=torch.float64)
    beta, alpha = torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    new, rec = GatedDeltaRule().step({"W": W}, k, v, {"beta": beta, "alpha": alpha}, t=1, attn=False)
    eye = torch.eye(F, dtype=torch.float64)
    for b in range(B):
        expect = (alpha[b] * W[b] @ (eye - beta[b] * torch.outer(k[b], k[b]))
                  + beta[b] * torch.outer(v[b], k[b]))
        torch.testing.assert_close(new["W"][b], expect, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rec["v_bar"], (W @ k[..., None])[..., 0])


@pytest.mark.parametrize("L", [1, 2, 7, 40])
def test_query_backward_equals_reference_loop_in_outputs_and_gradients(L):
    k, v, beta, alpha, q = _features(2, L, 6)
    gates = {"beta": beta, "alpha": alpha}
    y = gated_delta_query_backward(k, v, beta, alpha, q)
    y_ref = reference_loop(GatedDeltaRule(), k, v, q, gates, attn=False)[0]
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    cot = torch.randn_like(y)
    inputs = (k, v, beta, alpha, q)
    grads = torch.autograd.grad(y, inputs, cot, allow_unused=True)  # α_1 acts on W_0 = 0: unused at L = 1
    grads_ref = torch.autograd.grad(y_ref, inputs, cot)
    for name, x, g, g_ref in zip("k v beta alpha q".split(), inputs, grads, grads_ref, strict=True):
        g = torch.zeros_like(x) if g is None else g
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"d/d{n}: {m}")
    assert (grads_ref[3][:, 0] == 0).all()  # the first decay never matters


def test_gradcheck_of_the_training_form():
    inputs = _features(1, 4, 3)
    assert torch.autograd.gradcheck(lambda k, v, b, a, q: gated_delta_query_backward(k, v, b, a, q), inputs)


def test_alpha_one_is_the_delta_rule():
    keys, values, betas, queries = (torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, 3,
                                    dtype=torch.float64), torch.rand(2, 9, dtype=torch.float64),
                                    torch.randn(2, 2, 4, dtype=torch.float64))
    ones = torch.ones_like(betas)
    for phi in ("dpfp-1", "linear"):
        gated = rb.memory(f"{phi}/gated-delta", d_key=4)(keys, values, betas, queries, alpha=ones)
        delta = rb.memory(f"{phi}/delta", d_key=4)(keys, values, betas, queries)
        torch.testing.assert_close(gated, delta, atol=1e-12, rtol=1e-12)


def test_with_orthonormal_keys_each_value_decays_by_the_later_alphas():
    """β = 1 and orthonormal φ: key j retrieves v_j · Π_{s>j} α_s (the retention the decay trades away)."""
    L, V = 4, 3
    k = torch.eye(L, dtype=torch.float64)[None]  # (1, L, F=L)
    v = torch.randn(1, L, V, dtype=torch.float64)
    alpha = torch.tensor([[0.9, 0.5, 0.8, 0.7]], dtype=torch.float64)
    y = gated_delta_query_backward(k, v, torch.ones(1, L, dtype=torch.float64), alpha, k)  # query every key
    for j in range(L):
        torch.testing.assert_close(y[0, j], v[0, j] * alpha[0, j + 1:].prod())


def test_rewriting_a_key_overwrites_it_after_the_decay():
    """β = 1 on a unit key replaces what it stored: earlier writes of that key leave nothing behind."""
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    v = torch.tensor([[[5.0], [2.0], [3.0]]], dtype=torch.float64)
    alpha = torch.full((1, 3), 0.5, dtype=torch.float64)
    y = gated_delta_query_backward(k, v, torch.ones(1, 3, dtype=torch.float64), alpha, k[:, :2])
    torch.testing.assert_close(y[0, :, 0], torch.tensor([3.0, 2.0 * 0.5], dtype=torch.float64))
