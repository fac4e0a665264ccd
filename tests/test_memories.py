"""Memories: fast forms against reference loops, contracts over every memory, and PAPER §6's identities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_bench as rb
from retrieval_bench.memories.normalisations import EPS, sum_norm
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.memories.rules import DeltaRule, SumRule

# ------------------------------------------------------------------------------------------------------------
# Fast form == reference loop, in outputs and in gradients
# ------------------------------------------------------------------------------------------------------------

PARITY_SPECS = [
    "softmax", "linear/sum", "linear/sum/none", "dpfp-1/sum", "dpfp-2/delta", "linear/delta",
    "linear/delta/sum+attn", "linear/delta/attn", "dpfp-1/delta/l2", "tanh/fwm", "dpfp-1/fwm", "favor-8/sum",
]

# (B, L, K, V, Q): L = 1, K != V both ways, Q > 1, and sequences longer than one chunk of the chunked
# training forms (16 steps; 37 is prime, so its last chunk is padded; 24 splits into two chunks of 12).
SHAPES = [(2, 1, 3, 5, 1), (2, 7, 4, 3, 3), (1, 16, 8, 8, 4), (3, 5, 5, 2, 2), (2, 37, 4, 3, 3),
          (1, 24, 5, 4, 2)]
SHAPE_IDS = [f"B{b}-L{l}-K{k}-V{v}-Q{q}" for b, l, k, v, q in SHAPES]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _grads(y, inputs, cotangent):
    """Gradients of <y, cotangent> w.r.t. each input (None where the input does not enter)."""
    return torch.autograd.grad(y, inputs, cotangent, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("spec", PARITY_SPECS)
def test_training_form_matches_reference(spec, shape, dtype, build_memory, make_inputs):
    b, l, k, v, q = shape
    mem = build_memory(spec, d_key=k)
    inputs = make_inputs(b, l, k, v, q, dtype=dtype)
    y = mem(*inputs)
    y_ref = mem.reference(*inputs)
    assert y.shape == (b, q, v) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])

    cot = torch.randn_like(y)
    grads, grads_ref = _grads(y, inputs, cot), _grads(y_ref, inputs, cot)
    for name, g, g_ref in zip(("keys", "values", "betas", "queries"), grads, grads_ref, strict=True):
        if name == "betas" and "beta" not in mem.gates:
            assert g is None and g_ref is None, "a memory without a beta gate must ignore betas"
            continue
        assert g is not None and g_ref is not None, f"no gradient w.r.t. {name}"
        torch.testing.assert_close(g, g_ref, **TOL[dtype], msg=lambda m, n=name: f"d/d{n}: {m}")


@pytest.mark.parametrize(
    "spec,l",
    [("linear/delta", 5), ("linear/delta/sum+attn", 5), ("dpfp-1/delta/l2", 5), ("linear/sum", 5),
     ("linear/delta", 19), ("linear/delta/attn", 19)],
    ids=lambda p: f"L{p}" if isinstance(p, int) else p,
)
def test_gradcheck_fast_form(spec, l, make_inputs):
    mem = rb.memory(spec, d_key=3)
    inputs = make_inputs(1, l, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: mem(*x), inputs, eps=1e-6, atol=1e-6)


def test_fwm_fast_form_allows_a_second_backward(make_inputs):
    mem = rb.memory("tanh/fwm", d_key=3)
    keys, values, betas, queries = make_inputs(1, 5, 3, 2, 2)
    y = mem(keys, values, betas, queries)
    (g0,) = torch.autograd.grad(y[0, 0, 0], keys, retain_graph=True)
    (g1,) = torch.autograd.grad(y[0, 1, 0], keys)
    y_ref = mem.reference(keys, values, betas, queries)
    torch.testing.assert_close(g1, torch.autograd.grad(y_ref[0, 1, 0], keys)[0], atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda *x: mem(*x), (keys, values, betas, queries))


@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_gradcheck_delta_rule_on_features(attn):
    # The rule's own training form on given (positive, sum-normalised) features, without φ in between.
    k = sum_norm(torch.rand(1, 5, 3, dtype=torch.float64) + 0.1).requires_grad_()
    v = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(1, 5, dtype=torch.float64).requires_grad_()
    q = sum_norm(torch.rand(1, 2, 3, dtype=torch.float64) + 0.1).requires_grad_()
    rule = DeltaRule()

    def fast(k, v, b, q):
        return rule.forward(k, v, q, {"beta": b}, attn)

    assert torch.autograd.gradcheck(fast, (k, v, beta, q))


# ------------------------------------------------------------------------------------------------------------
# FAVOR+ redraws
# ------------------------------------------------------------------------------------------------------------


def test_favor_fixed_policy_gives_equal_results(make_inputs):
    mem = rb.memory("favor-8/sum", d_key=4, redraw="fixed")
    inputs = make_inputs(2, 5, 4, 3, 2)
    y1 = mem(*inputs)
    omega = mem.phi.omega.clone()
    y2, y_ref = mem(*inputs), mem.reference(*inputs)
    torch.testing.assert_close(mem.phi.omega, omega, atol=0, rtol=0)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    torch.testing.assert_close(y1, y_ref, atol=1e-10, rtol=1e-10)


def test_favor_call_policy_draws_new_omega_every_call(make_inputs):
    mem = rb.memory("favor-8/sum", d_key=4)
    assert mem.phi.policy == "call"
    inputs = make_inputs(2, 5, 4, 3, 2)
    y1 = mem(*inputs)
    omega1 = mem.phi.omega.clone()
    y2 = mem(*inputs)
    omega2 = mem.phi.omega.clone()
    assert omega1.shape == omega2.shape == (4, 8)
    assert not torch.allclose(omega1, omega2)
    assert not torch.allclose(y1, y2)
    # and the reference loop, run after one more redraw, agrees with forward under that same Ω
    mem.phi.policy = "fixed"
    torch.testing.assert_close(mem(*inputs), mem.reference(*inputs), atol=1e-10, rtol=1e-10)


def _assert_close_relative(a, b, dtype, what=""):
    """a == b to TOL, relative to b's largest entry: outputs and gradients far below 1 are compared too."""
    unit = b.abs().max().clamp_min(torch.finfo(dtype).tiny)
    torch.testing.assert_close(a / unit, b / unit, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# FAVOR+ with the sum rule and no key normalisation reads one query through its kernel φ(k)·φ(q), without
# features. Larger keys and queries move the exponents down (float64 only at scale 6, where float32 features
# underflow and its reference is 0), as at large S in training.
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.float32, 2.5), (torch.float64, 1.0),
                                         (torch.float64, 2.5), (torch.float64, 6.0)],
                         ids=["f32-x1", "f32-x2.5", "f64-x1", "f64-x2.5", "f64-x6"])
@pytest.mark.parametrize("spec", ["favor-16/sum", "favor-16/sum/none"])
@pytest.mark.parametrize("block", [None, 80], ids=["one-block", "blocks-of-5-rows"])  # 5 does not divide 3·41
def test_favor_kernel_read_matches_reference(spec, scale, block, dtype, build_memory, make_inputs, monkeypatch):
    if block is not None:
        monkeypatch.setattr(rb.feature_maps, "KERNEL_BLOCK", block)
    calls = []
    kernel = rb.feature_maps._FavorKernel.apply
    monkeypatch.setattr(rb.feature_maps._FavorKernel, "apply", lambda *a: calls.append(1) or kernel(*a))
    mem = build_memory(spec, d_key=8)
    keys, values, betas, queries = make_inputs(3, 41, 8, 5, 1, dtype=dtype, requires_grad=False)
    inputs = tuple(t.requires_grad_() for t in (scale * keys, values, betas, scale * queries))
    y = mem(*inputs)
    assert len(calls) == 1, "one query per sequence must take the kernel path"
    y_ref = mem.reference(*inputs)
    assert len(calls) == 1 and y_ref.abs().max() > 0
    _assert_close_relative(y, y_ref, dtype, "y")
    cot = torch.randn_like(y)
    for name, g, g_ref in zip(("keys", "values", "queries"), _grads(y, inputs[:2] + inputs[3:], cot),
                              _grads(y_ref, inputs[:2] + inputs[3:], cot), strict=True):
        _assert_close_relative(g, g_ref, dtype, f"d/d{name}")


def test_favor_kernel_gradcheck(build_memory, make_inputs):
    mem = build_memory("favor-4/sum", d_key=3)
    keys, values, betas, queries = make_inputs(2, 6, 3, 2, 1)
    assert torch.autograd.gradcheck(lambda k, v, q: mem(k, v, None, q), (keys, values, queries))


def test_kernel_read_only_where_the_rule_reads_scores(build_memory):
    assert not build_memory("favor-8/sum/sum")._scores_read  # a key normalisation needs the features
    assert not build_memory("favor-8/delta")._scores_read

    class Redefined(SumRule):  # a plugin rule that changes the read must not be bypassed by the kernel
        def forward(self, k, v, q, gates, attn):
            return 2 * super().forward(k, v, q, gates, attn)

    mem = rb.memories.FastWeightMemory(rb.feature_map("favor-4"), Redefined(), "none", True)
    assert not mem._scores_read

    class Halved(rb.feature_maps.FavorPlus):  # nor a plugin map that changes the features
        def forward(self, x):
            return super().forward(x / 2)

    assert not rb.memories.FastWeightMemory(Halved(4), SumRule(), "none", True)._scores_read
    assert rb.memories.FastWeightMemory(rb.feature_map("favor-4"), SumRule(), "none", True)._scores_read


# ------------------------------------------------------------------------------------------------------------
# Contracts over every registered memory and every composed spec (conftest.ALL_MEMORY_SPECS)
# ------------------------------------------------------------------------------------------------------------

B, L, K, V, Q = 2, 6, 4, 3, 5  # Q != L, so per-step records are told apart from per-query ones


def other_gates(mem, b=B, l=L, dtype=torch.float64, requires_grad=False) -> dict[str, torch.Tensor]:
    """Every gate the memory declares besides β (e.g. a plugin's decay α), as (B, L) values in (0, 1)."""
    return {g: torch.sigmoid(torch.randn(b, l, dtype=dtype)).requires_grad_(requires_grad)
            for g in mem.gates if g != "beta"}


def test_contract_forward_matches_reference(memory_spec, build_memory, make_inputs):
    """Every memory with a reference loop equals it in outputs and gradients (float64), plugins included."""
    mem = build_memory(memory_spec, d_key=K)
    if not hasattr(mem, "reference"):
        pytest.skip(f"{memory_spec} has no reference loop")
    inputs = make_inputs(B, L, K, V, Q)
    gates = other_gates(mem, requires_grad=True)
    y, y_ref = mem(*inputs, **gates), mem.reference(*inputs, **gates)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    leaves = [*inputs, *gates.values()]
    cot = torch.randn_like(y)
    for g, g_ref in zip(_grads(y, leaves, cot), _grads(y_ref, leaves, cot), strict=True):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10)


def test_contract_evaluation_form_matches_reference(memory_spec, build_memory, make_inputs, request):
    """Without autograd and with many queries (Q > V, as in evaluation) a memory may take another exact path
    (the delta rule builds W chunk by chunk): it must still equal the reference loop, over several chunks.

    Small β keep even the unnormalised and signed-feature memories from blowing up over 70 steps, and the
    tolerance is relative to the output's scale, since a few of those still grow large."""
    mem = build_memory(memory_spec, d_key=K)
    l, q = 70, 7
    keys, values, betas, queries = make_inputs(B, l, K, V, q, requires_grad=False)
    gates = other_gates(mem, l=l)
    with torch.no_grad():
        y = mem(keys, values, 0.2 * betas, queries, **gates)
        y_ref = mem.reference(keys, values, 0.2 * betas, queries, **gates)
    scale = max(1.0, y_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, atol=1e-9 * scale, rtol=1e-9)



@pytest.mark.parametrize(
    "spec",
    ["linear/delta", "dpfp-1/delta", "linear/delta/sum+attn", "dpfp-2/delta/l2",
     "identity/delta/l2", "linear/delta/l2"],
)
def test_evaluation_form_is_accurate_in_float32(spec):
    """The evaluation read (no autograd, Q > V, one chunk of 64 writes) in the precision that runs use."""
    mem = rb.memory(spec, d_key=8)
    b, l, v, q = 2, 64, 3, 6
    keys, values = torch.randn(b, l, 8), torch.randn(b, l, v)
    betas, queries = torch.sigmoid(torch.randn(b, l)), torch.randn(b, q, 8)
    with torch.no_grad():
        y = mem(keys, values, betas, queries)
        y_ref = mem.reference(keys, values, betas, queries)
        y_train_form = torch.cat([mem(keys, values, betas, queries[:, i : i + 1]) for i in range(q)], 1)
    torch.testing.assert_close(y_train_form, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_contract_shape_and_finite_grads(memory_spec, build_memory, make_inputs):
    mem = build_memory(memory_spec, d_key=K)
    inputs = make_inputs(B, L, K, V, Q, dtype=torch.float32)
    gates = other_gates(mem, dtype=torch.float32, requires_grad=True)
    y = mem(*inputs, **gates)
    assert y.shape == (B, Q, V)
    assert torch.isfinite(y).all()
    names = ("keys", "values", "betas", "queries", *gates)
    grads = _grads(y, [*inputs, *gates.values()], torch.randn_like(y))
    for name, g in zip(names, grads, strict=True):
        if name == "betas" and "beta" not in mem.gates:
            continue
        assert g is not None, f"{memory_spec}: no gradient reaches {name}"
        assert torch.isfinite(g).all(), f"{memory_spec}: non-finite gradient w.r.t. {name}"
        assert g.abs().sum() > 0, f"{memory_spec}: the gradient w.r.t. {name} is identically zero"
    for name in gates:  # β defaults to 1, but leaving out any other declared gate is a clear error
        with pytest.raises(ValueError, match=name):
            mem(*inputs, **{n: g for n, g in gates.items() if n != name})


def test_contract_state_size_positive(memory_spec):
    mem = rb.memory(memory_spec, d_key=K)
    size = mem.state_size(K, V, L)
    assert isinstance(size, int) and size > 0
    if mem.d_dot(K) is not None:  # a fixed-size state holds at least one V × d_dot matrix
        assert size >= V * mem.d_dot(K)


def test_contract_trace_matches_forward(memory_spec, build_memory, make_inputs):
    mem = build_memory(memory_spec, d_key=K)
    inputs = make_inputs(B, L, K, V, Q, dtype=torch.float64, requires_grad=False)
    gates = other_gates(mem)
    rec = mem.trace(*inputs, **gates)
    if rec is None:
        return
    assert isinstance(rec, dict)
    torch.testing.assert_close(rec["y"], mem(*inputs, **gates), atol=1e-10, rtol=1e-10)


def test_contract_batch_and_query_independence(memory_spec, build_memory, make_inputs):
    mem = build_memory(memory_spec, d_key=K)
    keys, values, betas, queries = make_inputs(B, L, K, V, Q, requires_grad=False)
    gates = other_gates(mem)
    y = mem(keys, values, betas, queries, **gates)
    # changing sequence 1 leaves sequence 0's reads unchanged
    keys2, values2 = keys.clone(), values.clone()
    keys2[1], values2[1] = torch.randn(L, K, dtype=keys.dtype), torch.randn(L, V, dtype=keys.dtype)
    y2 = mem(keys2, values2, betas, queries, **gates)
    torch.testing.assert_close(y2[0], y[0], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(y2[1], y[1])
    # each query is read on its own: a subset of the queries reads the same values
    torch.testing.assert_close(mem(keys, values, betas, queries[:, 1:3], **gates), y[:, 1:3],
                               atol=1e-10, rtol=1e-10)


def test_contract_trace_is_causal(memory_spec, build_memory, make_inputs):
    """Per-step records up to step t do not depend on the writes after t."""
    mem = build_memory(memory_spec, d_key=K)
    keys, values, betas, queries = make_inputs(B, L, K, V, Q, requires_grad=False)
    gates = other_gates(mem)
    rec = mem.trace(keys, values, betas, queries, **gates)
    if rec is None:
        return
    t = 3
    keys2, values2, betas2 = keys.clone(), values.clone(), betas.clone()
    keys2[:, t:] = torch.randn_like(keys2[:, t:])
    values2[:, t:] = torch.randn_like(values2[:, t:])
    betas2[:, t:] = torch.rand_like(betas2[:, t:])
    gates2 = {n: torch.cat([g[:, :t], torch.rand_like(g[:, t:])], 1) for n, g in gates.items()}
    rec2 = mem.trace(keys2, values2, betas2, queries, **gates2)
    per_step = [n for n, r in rec.items() if r.dim() >= 2 and r.shape[:2] == (B, L)]
    for name in per_step:
        torch.testing.assert_close(rec2[name][:, :t], rec[name][:, :t], atol=1e-10, rtol=1e-10,
                                   msg=lambda m, n=name: f"{memory_spec}: record {n!r} is not causal: {m}")


def test_contract_no_op_write_leaves_output_unchanged(no_op_write_spec, build_memory, make_inputs):
    """Without the attention normaliser, a write with β = 0 (gated rules) or v = 0 (sum) changes nothing."""
    mem = build_memory(no_op_write_spec, d_key=K)
    keys, values, betas, queries = make_inputs(B, L, K, V, Q, requires_grad=False)
    y = mem(keys, values, betas, queries)
    keys2 = torch.cat([keys, torch.randn(B, 1, K, dtype=keys.dtype)], 1)
    new_v = torch.randn(B, 1, V, dtype=keys.dtype)
    if "beta" not in mem.gates:
        new_v.zero_()
    values2 = torch.cat([values, new_v], 1)
    betas2 = torch.cat([betas, torch.zeros(B, 1, dtype=keys.dtype)], 1)
    torch.testing.assert_close(mem(keys2, values2, betas2, queries), y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(mem.reference(keys2, values2, betas2, queries), y, atol=1e-10, rtol=1e-10)


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
