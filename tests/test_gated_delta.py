"""The built-in gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2025): its registration, its step
function against the paper's equation, and its two fast forms against the reference loops in float64, in outputs
and gradients, with decays near 0 and near 1 over sequences of many chunks."""

from __future__ import annotations

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.memories.causal import causal_loop
from retrieval_bench.memories.gated_delta import (
    ALPHA_BIAS,
    GatedDeltaRule,
    gated_delta_causal,
    gated_delta_query_read,
)
from retrieval_bench.memories.reference import reference_loop

F64 = torch.float64

#: decays (α) drawn uniformly from these ranges: forgetting almost everything at every step, almost nothing,
#: and anything between.
DECAYS = {"near0": (0.0, 0.05), "near1": (0.95, 1.0), "any": (0.0, 1.0)}


def _inputs(B, L, F, V, Q, decay, g=None):
    """l2-normalised features, values, β, α in ``DECAYS[decay]``, queries: float64 leaves requiring grad."""
    lo, hi = DECAYS[decay]
    k = torch.nn.functional.normalize(torch.randn(B, L, F, dtype=F64), dim=-1)
    out = (k, torch.randn(B, L, V, dtype=F64), torch.rand(B, L, dtype=F64),
           lo + (hi - lo) * torch.rand(B, L, dtype=F64), torch.randn(B, Q, F, dtype=F64))
    return tuple(t.requires_grad_(True) for t in out)


def _assert_same(y, y_ref, inputs, names, tol=1e-10):
    """Outputs and every input's gradient under one random cotangent equal (an unused input: a zero gradient)."""
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    cot = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, cot, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, inputs, cot, allow_unused=True)
    for name, x, gr, gr_ref in zip(names, inputs, grads, grads_ref, strict=True):
        gr = torch.zeros_like(x) if gr is None else gr
        gr_ref = torch.zeros_like(x) if gr_ref is None else gr_ref
        torch.testing.assert_close(gr, gr_ref, atol=tol, rtol=tol, msg=lambda m, n=name: f"d/d{n}: {m}")


# ---- registration ------------------------------------------------------------------------------------------

def test_gated_delta_is_a_built_in_with_two_gates_l2_and_a_slow_initial_decay():
    assert registry.update_rules.origins()["gated-delta"] == "built-in"
    assert registry.update_rules.get("gated-delta") is GatedDeltaRule
    mem = rb.memory("dpfp-1/gated-delta", d_key=8)
    assert (mem.spec.norm, mem.attn, mem.gates) == ("l2", False, ("beta", "alpha"))
    rb.memory("linear/gated-delta", d_key=8)  # l2 by default: a signed map needs no named normalisation
    model = rb.RetrievalModel(8, "dpfp-1/gated-delta", d_key=8)
    assert model.W_g["alpha"].bias.item() == ALPHA_BIAS
    assert torch.sigmoid(torch.tensor(ALPHA_BIAS)) > 0.9  # α starts near 1: a slow decay


def test_attention_normaliser_is_refused():
    with pytest.raises(rb.RegistryError, match="no attention-normalised form"):
        rb.memory("linear/gated-delta/sum+attn", d_key=4)


def test_a_missing_decay_gate_is_named():
    mem = rb.memory("linear/gated-delta", d_key=4)
    with pytest.raises(ValueError, match="alpha"):
        mem(torch.randn(1, 3, 4), torch.randn(1, 3, 2), torch.rand(1, 3), torch.randn(1, 1, 4))


# ---- the step function is the paper's equation --------------------------------------------------------------

def test_step_is_the_gated_delta_equation():
    """W_t = α_t W_{t-1}(I - β_t φ_t φ_tᵀ) + β_t v_t φ_tᵀ, with explicit matrices."""
    B, F, V = 3, 5, 4
    W = torch.randn(B, V, F, dtype=F64)
    k, v = torch.randn(B, F, dtype=F64), torch.randn(B, V, dtype=F64)
    beta, alpha = torch.rand(B, dtype=F64), torch.rand(B, dtype=F64)
    new, rec = GatedDeltaRule().step({"W": W}, k, v, {"beta": beta, "alpha": alpha}, t=1, attn=False)
    eye = torch.eye(F, dtype=F64)
    for b in range(B):
        expect = alpha[b] * W[b] @ (eye - beta[b] * torch.outer(k[b], k[b])) + beta[b] * torch.outer(v[b], k[b])
        torch.testing.assert_close(new["W"][b], expect, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rec["v_bar"], (W @ k[..., None])[..., 0])


# ---- the fast forms equal the reference loops ---------------------------------------------------------------

@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("L, chunk", [(1, None), (7, None), (40, 16), (300, None), (301, 64), (300, 1)])
def test_training_form_equals_the_reference_loop(L, chunk, decay):
    torch.manual_seed(L)
    inputs = k, v, beta, alpha, q = _inputs(2, L, 6, 3, 2, decay)
    y = gated_delta_query_read(k, v, beta, alpha, q, chunk=chunk)
    y_ref = reference_loop(GatedDeltaRule(), k, v, q, {"beta": beta, "alpha": alpha}, attn=False)[0]
    _assert_same(y, y_ref, inputs, ["k", "v", "beta", "alpha", "q"])


def test_training_form_with_many_queries_equals_the_reference_loop():
    torch.manual_seed(0)
    inputs = k, v, beta, alpha, q = _inputs(2, 90, 5, 3, 20, "any")  # 20 queries: the longer chunk
    y = gated_delta_query_read(k, v, beta, alpha, q)
    y_ref = reference_loop(GatedDeltaRule(), k, v, q, {"beta": beta, "alpha": alpha}, attn=False)[0]
    _assert_same(y, y_ref, inputs, ["k", "v", "beta", "alpha", "q"])


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("T, chunk", [(1, None), (9, 4), (300, None), (301, 64), (300, 1)])
def test_causal_form_equals_the_causal_loop(T, chunk, decay):
    torch.manual_seed(T)
    k, v, beta, alpha, _ = _inputs(2, T, 6, 3, 1, decay)
    q = torch.randn(2, T, 6, dtype=F64, requires_grad=True)
    y = gated_delta_causal(k, v, q, beta, alpha, chunk=chunk)
    y_ref = causal_loop(GatedDeltaRule(), k, v, q, {"beta": beta, "alpha": alpha}, attn=False)
    _assert_same(y, y_ref, (k, v, beta, alpha, q), ["k", "v", "beta", "alpha", "q"])


def test_fast_forms_with_decays_of_exactly_zero_and_one():
    """α = 0 (a sigmoid that underflowed) erases the state; α = 1 keeps it: both exactly as the loops."""
    torch.manual_seed(1)
    k, v, beta, alpha, q = _inputs(2, 50, 4, 3, 2, "any")
    alpha = alpha.detach().clone()
    alpha[:, ::7], alpha[:, 3::5] = 0.0, 1.0
    alpha.requires_grad_(True)
    rule, gates = GatedDeltaRule(), {"beta": beta, "alpha": alpha}
    y = gated_delta_query_read(k, v, beta, alpha, q)
    torch.testing.assert_close(y, reference_loop(rule, k, v, q, gates, attn=False)[0], atol=1e-12, rtol=1e-12)
    qs = torch.randn(2, 50, 4, dtype=F64)
    y = gated_delta_causal(k, v, qs, beta, alpha, chunk=16)
    torch.testing.assert_close(y, causal_loop(rule, k, v, qs, gates, attn=False), atol=1e-12, rtol=1e-12)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(y.sum(), (k, v, beta, alpha)))


def test_float32_forms_stay_close_to_the_float64_loop():
    torch.manual_seed(2)
    k, v, beta, alpha, q = (x.detach() for x in _inputs(2, 200, 16, 4, 1, "any"))
    qs = torch.nn.functional.normalize(torch.randn(2, 200, 16, dtype=F64), dim=-1)
    rule, gates = GatedDeltaRule(), {"beta": beta, "alpha": alpha}
    y_ref = reference_loop(rule, k, v, q, gates, attn=False)[0]
    yc_ref = causal_loop(rule, k, v, qs, gates, attn=False)
    f = (x.float() for x in (k, v, beta, alpha, q, qs))
    k, v, beta, alpha, q, qs = f
    torch.testing.assert_close(gated_delta_query_read(k, v, beta, alpha, q).double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gated_delta_causal(k, v, qs, beta, alpha).double(), yc_ref, atol=1e-4, rtol=1e-4)


def test_gradcheck_of_both_forms():
    torch.manual_seed(3)
    inputs = _inputs(1, 5, 3, 2, 1, "any")
    assert torch.autograd.gradcheck(lambda k, v, b, a, q: gated_delta_query_read(k, v, b, a, q, chunk=2), inputs)
    k, v, b, a, _ = inputs
    qs = torch.randn(1, 5, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, v, b, a, q: gated_delta_causal(k, v, q, b, a, chunk=2),
                                    (k, v, b, a, qs))


# ---- meaning -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["linear/{}/l2", "dpfp-1/{}/sum", "dpfp-1/{}/l2"])
def test_alpha_one_is_the_delta_rule(spec):
    torch.manual_seed(4)
    keys, values, queries = torch.randn(2, 40, 4, dtype=F64), torch.randn(2, 40, 3, dtype=F64), torch.randn(
        2, 2, 4, dtype=F64)
    betas, ones = torch.rand(2, 40, dtype=F64), torch.ones(2, 40, dtype=F64)
    gated, delta = rb.memory(spec.format("gated-delta"), d_key=4), rb.memory(spec.format("delta"), d_key=4)
    torch.testing.assert_close(gated(keys, values, betas, queries, alpha=ones), delta(keys, values, betas, queries),
                               atol=1e-12, rtol=1e-12)
    qs = torch.randn(2, 40, 4, dtype=F64)
    torch.testing.assert_close(gated.causal(keys, values, qs, betas, alpha=ones), delta.causal(keys, values, qs, betas),
                               atol=1e-12, rtol=1e-12)


def test_with_orthonormal_keys_each_value_decays_by_the_later_alphas():
    """β = 1 and orthonormal φ: key j retrieves v_j · Π_{s>j} α_s (the retention the decay trades away)."""
    L, V = 4, 3
    k = torch.eye(L, dtype=F64)[None]  # (1, L, F = L)
    v = torch.randn(1, L, V, dtype=F64)
    alpha = torch.tensor([[0.9, 0.5, 0.8, 0.7]], dtype=F64)
    y = gated_delta_query_read(k, v, torch.ones(1, L, dtype=F64), alpha, k)  # query every key
    for j in range(L):
        torch.testing.assert_close(y[0, j], v[0, j] * alpha[0, j + 1:].prod())


def test_rewriting_a_key_overwrites_it_after_the_decay():
    """β = 1 on a unit key replaces what it stored: earlier writes of that key leave nothing behind."""
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]], dtype=F64)
    v = torch.tensor([[[5.0], [2.0], [3.0]]], dtype=F64)
    alpha = torch.full((1, 3), 0.5, dtype=F64)
    y = gated_delta_causal(k, v, k, torch.ones(1, 3, dtype=F64), alpha)
    torch.testing.assert_close(y[0, :, 0], torch.tensor([5.0, 2.0, 3.0], dtype=F64))
    y = gated_delta_query_read(k, v, torch.ones(1, 3, dtype=F64), alpha, k[:, :2])
    torch.testing.assert_close(y[0, :, 0], torch.tensor([3.0, 2.0 * 0.5], dtype=F64))


def test_the_memory_reads_every_position_through_the_fast_form(monkeypatch):
    """``memory.causal`` reaches the rule's own ``causal``, never the step-by-step loop."""
    from retrieval_bench.memories import causal as causal_module

    torch.manual_seed(5)
    mem = rb.memory("linear/gated-delta", d_key=4)
    keys, values, queries = torch.randn(2, 30, 4, dtype=F64), torch.randn(2, 30, 3, dtype=F64), torch.randn(
        2, 30, 4, dtype=F64)
    betas, alpha = torch.rand(2, 30, dtype=F64), torch.rand(2, 30, dtype=F64)
    y_ref = mem.causal_reference(keys, values, queries, betas, alpha=alpha)

    def no_loop(*args, **kwargs):
        raise AssertionError("the step-by-step loop ran")

    monkeypatch.setattr(causal_module, "causal_loop", no_loop)
    torch.testing.assert_close(mem.causal(keys, values, queries, betas, alpha=alpha), y_ref, atol=1e-12, rtol=1e-12)
