"""What the memories mean: the trace's records, PAPER §6's identities, and the composed memories against the
paper's formulas written out by hand.

The contract every memory meets (shapes, gradients, fast form == reference loop, causal traces, independent
sequences and queries, ...) is checked over every registered name in test_contract.py; the fast forms against
their references, op by op, in test_fast_forms.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_bench as rb
from retrieval_bench.memories.normalisations import EPS, sum_norm
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.memories.rules import DeltaRule, SumRule

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
B, L, K, V, Q = 2, 6, 4, 3, 5

# ------------------------------------------------------------------------------------------------------------
# The trace
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["linear/delta", "linear/delta/none", "dpfp-1/delta/l2", "linear/sum/none"])
def test_trace_v_bar_is_the_read_before_the_write(spec, make_inputs):
    """trace's v̄_t is what forward reads at k_t from the first t writes (no attention normaliser)."""
    mem = rb.memory(spec, d_key=K)
    keys, values, betas, queries = make_inputs(B, L, K, V, Q, requires_grad=False)
    rec = mem.trace(keys, values, betas, queries)
    assert rec["v_bar"].shape == (B, L, V)
    torch.testing.assert_close(rec["v_bar"][:, 0], torch.zeros(B, V, dtype=keys.dtype))
    for t in range(1, L):
        read = mem(keys[:, :t], values[:, :t], betas[:, :t], keys[:, t : t + 1])[:, 0]
        torch.testing.assert_close(rec["v_bar"][:, t], read, atol=1e-10, rtol=1e-10)


def test_memory_without_beta_ignores_betas_and_delta_defaults_to_one(make_inputs):
    keys, values, betas, queries = make_inputs(B, L, K, V, Q, requires_grad=False)
    summ = rb.memory("linear/sum", d_key=K)
    torch.testing.assert_close(summ(keys, values, betas, queries), summ(keys, values, None, queries))
    delta = rb.memory("linear/delta", d_key=K)
    torch.testing.assert_close(delta(keys, values, None, queries),
                               delta(keys, values, torch.ones_like(betas), queries))

# ------------------------------------------------------------------------------------------------------------
# PAPER §6 identities
# ------------------------------------------------------------------------------------------------------------


def _random_step_inputs(b=3, v=4, f=6, dtype=torch.float64):
    W = torch.randn(b, v, f, dtype=dtype)
    k = sum_norm(torch.rand(b, f, dtype=dtype))  # φ(k) as the delta rule sees it: non-negative, sums to 1
    val = torch.randn(b, v, dtype=dtype)
    beta = torch.rand(b, dtype=dtype)
    return W, k, val, beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_eq23_equals_eq24_equals_delta_step(dtype):
    W, phi, v, beta = _random_step_inputs(dtype=dtype)
    b = beta[:, None]
    v_bar = torch.einsum("bvf,bf->bv", W, phi)  # Eq. 20
    v_new = b * v + (1 - b) * v_bar  # Eq. 22
    eq23 = W - torch.einsum("bv,bf->bvf", v_bar, phi) + torch.einsum("bv,bf->bvf", v_new, phi)
    eq24 = W + torch.einsum("bv,bf->bvf", b * (v - v_bar), phi)
    # the transition view: W (I - β φ φᵀ) + β v φᵀ
    eye = torch.eye(phi.shape[-1], dtype=dtype)
    transition = W @ (eye - b[:, :, None] * phi[:, :, None] * phi[:, None, :]) + b[:, :, None] * torch.einsum(
        "bv,bf->bvf", v, phi)
    tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eq23, eq24, **tol)
    torch.testing.assert_close(transition, eq24, **tol)
    new, rec = DeltaRule().step({"W": W}, phi, v, {"beta": beta}, t=2, attn=False)
    torch.testing.assert_close(new["W"], eq24, **tol)
    torch.testing.assert_close(rec["v_bar"], v_bar, **tol)
    torch.testing.assert_close(rec["v_new"], v_new, **tol)


def test_delta_step_is_one_sgd_step_on_the_squared_read_error():
    W, phi, v, beta = _random_step_inputs()
    W_leaf = W.clone().requires_grad_()
    loss = 0.5 * ((torch.einsum("bvf,bf->bv", W_leaf, phi) - v) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, W_leaf)
    sgd = W - beta[:, None, None] * grad
    new, _ = DeltaRule().step({"W": W}, phi, v, {"beta": beta}, t=1, attn=False)
    torch.testing.assert_close(new["W"], sgd, atol=1e-12, rtol=1e-12)


def test_delta_with_v_bar_cancelled_and_beta_one_is_the_sum_step():
    """Sum rule = delta rule with v̄ ≡ 0, β ≡ 1: feed delta the target v + v̄ (so v - v̄ = v) with β = 1."""
    W, phi, v, _ = _random_step_inputs()
    v_bar = torch.einsum("bvf,bf->bv", W, phi)
    ones = torch.ones(W.shape[0], dtype=W.dtype)
    delta, _ = DeltaRule().step({"W": W}, phi, v + v_bar, {"beta": ones}, t=1, attn=False)
    summ, rec = SumRule().step({"W": W}, phi, v, {}, t=1, attn=False)
    torch.testing.assert_close(delta["W"], summ["W"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(summ["W"], W + torch.einsum("bv,bf->bvf", v, phi), atol=1e-12, rtol=1e-12)


def test_delta_equals_unnormalised_sum_when_keys_are_orthonormal():
    """With distinct one-hot keys, v̄_t = W_{t-1}φ(k_t) = 0 at every step, so delta (β = 1) is the sum rule."""
    b, l, k, v, q = 2, 5, 7, 3, 4
    keys = torch.stack([F.one_hot(torch.randperm(k)[:l], k) for _ in range(b)]).double()
    values = torch.randn(b, l, v, dtype=torch.float64)
    queries = torch.randn(b, q, k, dtype=torch.float64)
    ones = torch.ones(b, l, dtype=torch.float64)
    delta = rb.memory("identity/delta/none", d_key=k)
    summ = rb.memory("identity/sum/none", d_key=k)
    rec = delta.trace(keys, values, ones, queries)
    torch.testing.assert_close(rec["v_bar"], torch.zeros_like(values), atol=0, rtol=0)
    torch.testing.assert_close(delta(keys, values, ones, queries), summ(keys, values, None, queries),
                               atol=1e-12, rtol=1e-12)
    # and both are the plain W q with W = Σ v_t ⊗ k_t
    W = torch.einsum("blv,blk->bvk", values, keys)
    torch.testing.assert_close(summ(keys, values, None, queries), torch.einsum("bvk,bqk->bqv", W, queries))


def _attn_delta_by_hand(k, v, beta, q):
    """PAPER §1.5 as written: v̄_t = W_{t-1}φ_t / (z_{t-1}·φ_t) (1 at t = 1), W += β(v - v̄)⊗φ,
    y = Wφ_q / (z·φ_q + ε)."""
    b, l, f = k.shape
    W = k.new_zeros(b, v.shape[-1], f)
    z = k.new_zeros(b, f)
    for t in range(l):
        c = torch.ones(b, dtype=k.dtype) if t == 0 else (z * k[:, t]).sum(-1)
        v_bar = torch.einsum("bvf,bf->bv", W, k[:, t]) / c[:, None]
        W = W + torch.einsum("bv,bf->bvf", beta[:, t, None] * (v[:, t] - v_bar), k[:, t])
        z = z + k[:, t]
    return torch.einsum("bvf,bqf->bqv", W, q) / (torch.einsum("bf,bqf->bq", z, q)[..., None] + EPS)


def _attn_delta_by_key_rescaling(k, v, beta, q):
    """The code's trick: the plain delta rule on keys k_t / c_t with rates β_t c_t; the z-normalised read."""
    b, l, f = k.shape
    W = k.new_zeros(b, v.shape[-1], f)
    z = k.new_zeros(b, f)
    for t in range(l):
        c = torch.ones(b, dtype=k.dtype) if t == 0 else (z * k[:, t]).sum(-1)
        key, rate = k[:, t] / c[:, None], beta[:, t] * c
        v_bar = torch.einsum("bvf,bf->bv", W, key)
        W = W + torch.einsum("bv,bf->bvf", rate[:, None] * (v[:, t] - v_bar), key)
        z = z + k[:, t]
    return torch.einsum("bvf,bqf->bqv", W, q) / (torch.einsum("bf,bqf->bq", z, q)[..., None] + EPS)


@pytest.mark.parametrize("norm", ["sum", "none"])
def test_attention_normalised_delta_equals_key_rescaling_trick(norm):
    b, l, f, v, q = 2, 7, 5, 3, 4
    feats = F.elu(torch.randn(b, l + q, f, dtype=torch.float64)) + 1  # positive: every c_t > 0
    feats = sum_norm(feats) if norm == "sum" else feats
    k, qf = feats[:, :l], feats[:, l:]
    values = torch.randn(b, l, v, dtype=torch.float64)
    beta = torch.rand(b, l, dtype=torch.float64)
    paper = _attn_delta_by_hand(k, values, beta, qf)
    trick = _attn_delta_by_key_rescaling(k, values, beta, qf)
    torch.testing.assert_close(paper, trick, atol=1e-12, rtol=1e-12)
    rule = DeltaRule()
    fast = rule.forward(k, values, qf, {"beta": beta}, True)
    torch.testing.assert_close(fast, paper, atol=1e-12, rtol=1e-12)
    y_ref, _ = reference_loop(rule, k, values, qf, {"beta": beta}, True)
    torch.testing.assert_close(y_ref, paper, atol=1e-12, rtol=1e-12)
    # the attention normaliser makes a difference here (the test is not vacuous)
    assert not torch.allclose(rule.forward(k, values, qf, {"beta": beta}, False), paper)


def _write_key_twice(spec, beta=1.0):
    """Key 0 written with v1, key 1 with v3, key 0 again with v2; read keys 0 and 1 (identity features)."""
    k = 4
    keys = F.one_hot(torch.tensor([[0, 1, 0]]), k).double()
    scale = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)[:, None]
    v1, v3, v2 = torch.eye(3, dtype=torch.float64) * scale
    values = torch.stack([v1, v3, v2])[None]
    betas = torch.tensor([[1.0, 1.0, beta]], dtype=torch.float64)
    queries = F.one_hot(torch.tensor([[0, 1]]), k).double()
    y = rb.memory(spec, d_key=k)(keys, values, betas, queries)[0]
    return y, v1, v2, v3


def test_delta_rewrite_overwrites_and_sum_accumulates():
    y, v1, v2, v3 = _write_key_twice("identity/delta/none")
    torch.testing.assert_close(y[0], v2, atol=1e-12, rtol=0)  # only the second value survives
    torch.testing.assert_close(y[1], v3, atol=1e-12, rtol=0)  # the other key is untouched
    y, v1, v2, v3 = _write_key_twice("identity/sum/none")
    torch.testing.assert_close(y[0], v1 + v2, atol=1e-12, rtol=0)
    torch.testing.assert_close(y[1], v3, atol=1e-12, rtol=0)
    # the attention-normalised sum rule (the paper's "sum") reads back the 50/50 mix (PAPER §3, Setting 2)
    y, v1, v2, v3 = _write_key_twice("identity/sum/attn")
    torch.testing.assert_close(y[0], (v1 + v2) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_delta_rewrite_with_partial_rate_interpolates(beta):
    y, v1, v2, _ = _write_key_twice("identity/delta/none", beta=beta)
    torch.testing.assert_close(y[0], beta * v2 + (1 - beta) * v1, atol=1e-12, rtol=0)  # Eq. 22 with v̄ = v1


def test_sum_normalised_delta_transition_is_contractive():
    """With sum-normalised non-negative φ, ‖φ‖² ∈ [1/F, 1], so 1 - β‖φ‖² ∈ [0, 1) (PAPER §1.4)."""
    f = 6
    phi = sum_norm(torch.rand(200, f, dtype=torch.float64))
    sq = (phi * phi).sum(-1)
    assert (sq >= 1 / f - 1e-12).all() and (sq <= 1 + 1e-12).all()
    # so, with β in (0, 1], repeating one write converges to the target value instead of blowing up
    W = torch.randn(1, 2, f, dtype=torch.float64)
    v = torch.randn(1, 2, dtype=torch.float64)
    rule, state = DeltaRule(), {"W": W}
    for t in range(400):
        state, _ = rule.step(state, phi[:1], v, {"beta": torch.ones(1, dtype=torch.float64)}, t, False)
    torch.testing.assert_close(torch.einsum("bvf,bf->bv", state["W"], phi[:1]), v, atol=1e-8, rtol=0)


def test_all_zero_dpfp_key_stays_finite_under_sum_normalisation():
    # ν = 1 and alternating signs on an odd d_key: every neighbour product r(a)·r(b) vanishes, φ(k) = 0.
    k = torch.tensor([[[1.0, -2.0, 3.0], [0.5, 0.2, -1.0]]], requires_grad=True)
    assert (rb.feature_map("dpfp-1")(k[0, 0]) == 0).all()
    v = torch.randn(1, 2, 2, requires_grad=True)
    q = torch.tensor([[[1.0, -2.0, 3.0], [0.3, 0.3, 0.3]]], requires_grad=True)
    for spec in ("dpfp-1/delta", "dpfp-1/sum/sum", "dpfp-1/delta/sum+attn"):
        mem = rb.memory(spec, d_key=3)
        y = mem(k, v, torch.full((1, 2), 0.5), q)
        assert torch.isfinite(y).all(), spec
        grads = torch.autograd.grad(y.sum(), (k, v, q))
        assert all(torch.isfinite(g).all() for g in grads), spec
        torch.testing.assert_close(y, mem.reference(k, v, torch.full((1, 2), 0.5), q), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The composed memories against the paper's formulas, written out by hand
# ------------------------------------------------------------------------------------------------------------


def test_attention_normalised_sum_is_kernelised_attention(make_inputs):
    """PAPER E3: y = Σ_j v_j (φ(k_j)·φ(q)) / Σ_j φ(k_j)·φ(q), φ = elu + 1, no sum normalisation."""
    keys, values, _, queries = make_inputs(2, 5, 4, 3, 2, requires_grad=False)
    phi_k, phi_q = F.elu(keys) + 1, F.elu(queries) + 1
    scores = torch.einsum("blf,bqf->bql", phi_k, phi_q)
    expected = torch.einsum("bql,blv->bqv", scores, values) / (scores.sum(-1, keepdim=True) + EPS)
    mem = rb.memory("linear/sum", d_key=4)
    torch.testing.assert_close(mem(keys, values, None, queries), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mem.reference(keys, values, None, queries), expected, atol=1e-12, rtol=1e-12)


def test_softmax_is_scaled_dot_product_attention(make_inputs):
    """PAPER E1: y = Σ_j softmax_j(k_j·q / √K) v_j over all written pairs."""
    keys, values, _, queries = make_inputs(2, 5, 4, 3, 2, requires_grad=False)
    weights = torch.softmax(torch.einsum("blk,bqk->bql", keys, queries) / 2.0, dim=-1)  # √K = 2
    expected = torch.einsum("bql,blv->bqv", weights, values)
    mem = rb.memory("softmax")
    torch.testing.assert_close(mem(keys, values, None, queries), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mem.reference(keys, values, None, queries), expected, atol=1e-12, rtol=1e-12)
    entropy = -(weights * weights.log()).sum(-1)
    torch.testing.assert_close(mem.trace(keys, values, None, queries)["attn_entropy"], entropy)


@pytest.mark.parametrize(
    "spec,norm",
    [("dpfp-1/delta", lambda p: p / (p.sum(-1, keepdim=True) + 1e-6)),
     ("dpfp-2/delta/l2", lambda p: p / p.norm(dim=-1, keepdim=True)),
     ("linear/delta/none", lambda p: p)],
    ids=["dpfp-1-delta-sum", "dpfp-2-delta-l2", "linear-delta-none"],
)
def test_memory_is_phi_then_normalisation_then_rule(spec, norm, make_inputs):
    keys, values, betas, queries = make_inputs(2, 6, 4, 3, 2, requires_grad=False)
    phi = rb.feature_map(spec.split("/")[0])
    expected = DeltaRule().forward(norm(phi(keys)), values, norm(phi(queries)), {"beta": betas}, False)
    torch.testing.assert_close(rb.memory(spec, d_key=4)(keys, values, betas, queries), expected,
                               atol=1e-12, rtol=1e-12)


def _fwm_by_hand(k, v, beta, q):
    """PAPER §1.8: W_1 = β_1 v_1⊗φ_1; then v̄ = Wφ_t, W += (β v + (1-β)v̄ - v̄)⊗φ_t, W /= max(1, ‖W‖_F);
    read LayerNorm(Wφ(q)) without affine parameters, eps 1e-5."""
    b, l, f = k.shape
    W = torch.einsum("bv,bf->bvf", beta[:, 0, None] * v[:, 0], k[:, 0])
    norms = [torch.linalg.vector_norm(W, dim=(1, 2))]
    for t in range(1, l):
        v_bar = torch.einsum("bvf,bf->bv", W, k[:, t])
        v_new = beta[:, t, None] * v[:, t] + (1 - beta[:, t, None]) * v_bar
        W = W - torch.einsum("bv,bf->bvf", v_bar, k[:, t]) + torch.einsum("bv,bf->bvf", v_new, k[:, t])
        W = W / torch.linalg.vector_norm(W, dim=(1, 2)).clamp_min(1.0)[:, None, None]
        norms.append(torch.linalg.vector_norm(W, dim=(1, 2)))
    y = torch.einsum("bvf,bqf->bqv", W, q)
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mu) / torch.sqrt(var + 1e-5), torch.stack(norms, 1)


@pytest.mark.parametrize("phi", ["tanh", "dpfp-1"])
def test_fwm_matches_the_paper_loop(phi, make_inputs):
    keys, values, betas, queries = make_inputs(2, 6, 4, 5, 3, requires_grad=False)
    values = 3 * values  # large writes, so that the first W has norm > 1 and clipping matters afterwards
    fm = rb.feature_map(phi)
    expected, norms = _fwm_by_hand(fm(keys), values, betas, fm(queries))
    mem = rb.memory(f"{phi}/fwm", d_key=4)
    torch.testing.assert_close(mem(keys, values, betas, queries), expected, atol=1e-10, rtol=1e-10)
    rec = mem.trace(keys, values, betas, queries)
    torch.testing.assert_close(rec["state_norm"], norms, atol=1e-10, rtol=1e-10)
    assert (norms[:, 0] > 1).any(), "the first write is not clipped (PAPER §1.8)"
    assert (norms[:, 1:] <= 1 + 1e-12).all()
    # LayerNorm output: zero mean, unit variance over the value dimension
    torch.testing.assert_close(expected.mean(-1), torch.zeros(2, 3, dtype=expected.dtype), atol=1e-10, rtol=0)
