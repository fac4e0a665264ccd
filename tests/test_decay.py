"""The decay rule (memories/decay.py), W_t = α_t W_{t-1} + β_t v_t ⊗ φ(k_t): its training form and its
all-positions form equal the step-by-step loops in outputs and gradients (keys, values, queries, α, β), with
gates near 0 and near 1 and over sequences long enough for the products of the gates to underflow; α ≡ β ≡ 1 is
the sum rule; the decay acts on earlier writes only; the model trains through it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import composed_specs  # tests/ is on sys.path (pytest rootdir-relative import)

import retrieval_bench as rb
from retrieval_bench.memories.causal import causal_loop, sum_causal
from retrieval_bench.memories.chunked import mark_one_hot
from retrieval_bench.memories.decay import DecayRule, decay_causal, segment_sums, suffix_log_decay
from retrieval_bench.memories.normalisations import EPS
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.memories.rules import SumRule

GATES = ("mid", "near0", "near1")


def _alpha(regime: str, shape, dtype) -> torch.Tensor:
    """Decay gates in (0, 1): spread around ½, within 1e-3 of 0, or within 1e-3 of 1."""
    u = torch.sigmoid(torch.randn(shape, dtype=dtype))
    return {"mid": u, "near0": 1e-3 * u, "near1": 1 - 1e-3 * u}[regime]


def _inputs(B, L, Q, Fd, V, regime, dtype=torch.float64):
    """Non-negative features (as after DPFP or elu+1), values, queries and gates, as leaves with grad."""
    k = torch.rand(B, L, Fd, dtype=dtype).requires_grad_()
    v = torch.randn(B, L, V, dtype=dtype).requires_grad_()
    q = torch.rand(B, Q, Fd, dtype=dtype).requires_grad_()
    gates = {"alpha": _alpha(regime, (B, L), dtype).requires_grad_(),
             "beta": torch.sigmoid(torch.randn(B, L, dtype=dtype)).requires_grad_()}
    return k, v, q, gates


def assert_rel(fast, ref, rtol, what, atol=1e-14):
    """max |fast - ref| <= rtol · max |ref| + atol. (With the attention normaliser at L = 1 the read is
    scale-invariant up to eps, so the key gradients are ~1e-6 and pure cancellation: atol covers them.)"""
    err = (fast - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max abs diff {err:.3e} > {rtol:.0e} x {scale:.3e} + {atol:.0e}"


def _compare(y, y_ref, leaves: dict, rtol: float) -> None:
    assert_rel(y, y_ref, rtol, "outputs")
    cot = torch.randn_like(y)
    fast = torch.autograd.grad(y, list(leaves.values()), cot)
    ref = torch.autograd.grad(y_ref, list(leaves.values()), cot)
    for name, a, b in zip(leaves, fast, ref, strict=True):
        assert b.abs().max() > 0, f"d/d {name} is zero: the case does not test it"
        assert_rel(a, b, rtol, f"d/d {name}")


@pytest.mark.parametrize("L", [1, 37, 300])
@pytest.mark.parametrize("regime", GATES)
@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_training_form_equals_the_reference_loop(attn, regime, L):
    k, v, q, gates = _inputs(2, L, 3, 6, 4, regime)
    if regime == "near0" and L == 300:  # the products of the gates underflow in float64: the case that matters
        assert torch.cumprod(gates["alpha"].detach(), dim=1)[:, -1].max() == 0
    rule = DecayRule()
    y = rule.forward(k, v, q, gates, attn)
    y_ref = reference_loop(rule, k, v, q, gates, attn)[0]
    leaves = {"keys": k, "values": v, "queries": q, "alpha": gates["alpha"], "beta": gates["beta"]}
    if L == 1:  # a decay before the first write acts on the empty state
        leaves.pop("alpha")
    _compare(y, y_ref, leaves, 1e-11)


@pytest.mark.parametrize("Q", [1, 4])
@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_training_form_with_the_models_one_hot_values(attn, Q):
    """Values marked one-hot (as the model makes them) are read by gather and scatter: the same numbers."""
    B, L, V = 2, 50, 7
    k, _, q, gates = _inputs(B, L, Q, 6, V, "mid")
    ids = torch.randint(0, V, (B, L))
    v = mark_one_hot(torch.nn.functional.one_hot(ids, V).to(k.dtype), ids)
    rule = DecayRule()
    y = rule.forward(k, v, q, gates, attn)
    y_ref = reference_loop(rule, k, v, q, gates, attn)[0]
    _compare(y, y_ref, {"keys": k, "queries": q, "alpha": gates["alpha"], "beta": gates["beta"]}, 1e-11)


CAUSAL = [(1, None), (13, 4), (37, 8), (300, None), (300, 16), (300, 1)]


@pytest.mark.parametrize("T,chunk", CAUSAL, ids=[f"T{T}-C{C or 'default'}" for T, C in CAUSAL])
@pytest.mark.parametrize("regime", GATES)
@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_causal_form_equals_the_loop(attn, regime, T, chunk):
    """Ragged last chunks (T = 13 in chunks of 4; T = 300 in the default 32: ten chunks), T = 37 in chunks of 8,
    and chunks of one step."""
    k, v, q, gates = _inputs(2, T, T, 5, 3, regime)
    rule = DecayRule()
    y = rule.causal(k, v, q, gates, attn, chunk=chunk)
    y_ref = causal_loop(rule, k, v, q, gates, attn)
    leaves = {"keys": k, "values": v, "queries": q, "alpha": gates["alpha"], "beta": gates["beta"]}
    if T == 1:
        leaves.pop("alpha")
    _compare(y, y_ref, leaves, 1e-11)


@pytest.mark.parametrize("regime", GATES)
@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_float32_forms_stay_close_to_the_float64_loops(attn, regime):
    """At L = 300 in float32 (where products of near-0 gates underflow after ~13 steps) both fast forms are
    finite and within 1e-5 of the float64 loops, relative to the output's scale, and so are their gradients."""
    k, v, q, gates = _inputs(2, 300, 300, 8, 4, regime)
    rule = DecayRule()
    y_ref = causal_loop(rule, k, v, q, gates, attn)
    last_ref = reference_loop(rule, k, v, q[:, -1:], gates, attn)[0]
    leaves32 = [x.detach().float().requires_grad_() for x in (k, v, q, gates["alpha"], gates["beta"])]
    k32, v32, q32, a32, b32 = leaves32
    gates32 = {"alpha": a32, "beta": b32}
    y = rule.causal(k32, v32, q32, gates32, attn)
    last = rule.forward(k32, v32, q32[:, -1:], gates32, attn)
    assert y.dtype == last.dtype == torch.float32
    assert_rel(y.double(), y_ref, 1e-5, "causal outputs")
    assert_rel(last.double(), last_ref, 1e-5, "training-form outputs")
    cot = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, [k, v, q, gates["alpha"], gates["beta"]], cot)
    fast = torch.autograd.grad(y, leaves32, cot.float())
    for name, a, b in zip(["keys", "values", "queries", "alpha", "beta"], fast, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert_rel(a.double(), b, 1e-4, f"float32 d/d {name}")


@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn"])
def test_all_ones_is_the_sum_rule(attn):
    """α ≡ β ≡ 1: the same reads as the sum rule, by its own forms and by its step function."""
    k, v, q, _ = _inputs(2, 40, 40, 5, 3, "mid")
    ones = {"alpha": torch.ones(2, 40, dtype=k.dtype), "beta": torch.ones(2, 40, dtype=k.dtype)}
    rule, sum_rule = DecayRule(), SumRule()
    qn = q[:, -3:]
    assert_rel(rule.forward(k, v, qn, ones, attn), sum_rule.forward(k, v, qn, {}, attn), 1e-13, "training form")
    assert_rel(reference_loop(rule, k, v, qn, ones, attn)[0], reference_loop(sum_rule, k, v, qn, {}, attn)[0],
               1e-13, "reference loops")
    assert_rel(rule.causal(k, v, q, ones, attn, chunk=8), sum_causal(k, v, q, EPS if attn else None, 8), 1e-13,
               "causal form")


def test_a_decay_scales_earlier_writes_only():
    """α_t = ½ at one step t0 (1 elsewhere), β ≡ 1: the writes before t0 count half, t0's own write fully."""
    B, L, t0 = 2, 12, 5
    k, v, q, _ = _inputs(B, L, 2, 4, 3, "mid")
    alpha = torch.ones(B, L, dtype=k.dtype)
    alpha[:, t0] = 0.5
    gates = {"alpha": alpha, "beta": torch.ones(B, L, dtype=k.dtype)}
    scale = torch.ones(B, L, 1, dtype=k.dtype)
    scale[:, :t0] = 0.5
    expected = SumRule().forward(k, v * scale, q, {}, False)
    assert_rel(DecayRule().forward(k, v, q, gates, False), expected, 1e-13, "training form")
    assert_rel(reference_loop(DecayRule(), k, v, q, gates, False)[0], expected, 1e-13, "reference loop")


def test_decays_are_sums_of_logs_between_the_steps():
    la = torch.log(torch.tensor([[0.5, 0.25, 0.1, 0.8]], dtype=torch.float64))
    assert torch.allclose(suffix_log_decay(la).exp(), torch.tensor([[0.25 * 0.1 * 0.8, 0.1 * 0.8, 0.8, 1.0]],
                                                                     dtype=torch.float64))
    D = segment_sums(la[0]).exp()
    assert torch.allclose(D[3, 1], torch.tensor(0.1 * 0.8, dtype=torch.float64))
    assert torch.equal(D.diagonal(), torch.ones(4, dtype=torch.float64)) and torch.equal(D.triu(1), torch.zeros(4, 4))
    # far from 0 in log space the entries near the diagonal keep their precision (no difference of prefix sums)
    big = torch.full((200,), -50.0, dtype=torch.float32)
    big[-1] = -1e-3
    assert segment_sums(big)[-1, -2].item() == pytest.approx(-1e-3, rel=1e-6)


def test_a_gate_that_underflowed_to_0_gives_finite_reads_and_gradients():
    k, v, q, gates = _inputs(2, 20, 20, 4, 3, "mid")
    alpha = gates["alpha"].detach().clone()
    alpha[:, 7] = 0.0
    alpha.requires_grad_()
    gates = {"alpha": alpha, "beta": gates["beta"]}
    rule = DecayRule()
    for y in (rule.forward(k, v, q, gates, True), rule.causal(k, v, q, gates, True, chunk=8)):
        grads = torch.autograd.grad(y.sum(), [k, v, q, alpha, gates["beta"]])
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert_rel(rule.forward(k, v, q[:, -1:], gates, False), reference_loop(rule, k, v, q[:, -1:], gates, False)[0],
               1e-12, "reads after the gate")


def test_the_chunked_core_with_several_value_columns():
    """decay_causal itself (values already scaled): equal to its definition, y_t = Σ_{j≤t} Π_{j<r≤t} α_r u_j k_j·q_t."""
    B, T, Fd, V = 1, 9, 3, 2
    k, u, q = torch.rand(B, T, Fd, dtype=torch.float64), torch.randn(B, T, V, dtype=torch.float64), \
        torch.rand(B, T, Fd, dtype=torch.float64)
    alpha = torch.rand(B, T, dtype=torch.float64)
    y = decay_causal(k, u, q, alpha.log(), chunk=4)
    for t in range(T):
        want = sum(torch.prod(alpha[:, j + 1: t + 1], dim=1)[:, None] * u[:, j] * (k[:, j] * q[:, t]).sum(-1)[:, None]
                   for j in range(t + 1))
        assert_rel(y[:, t], want, 1e-13, f"position {t}")


def test_registered_with_the_papers_defaults():
    """Registered, so the contract tests (test_contract.py: every registered rule; test_causal.py: every composed
    spec) cover it; gates β and α, α's projection biased to σ(3) ≈ 0.95; neither normalisation by default."""
    assert "decay" in rb.names("update_rules")
    assert {"linear/decay", "linear/decay/none+attn"} <= set(composed_specs())
    spec = rb.parse_spec("dpfp-1/decay")
    assert (spec.norm, spec.attn) == ("none", False)
    rule = rb.update_rule("decay")
    assert rule.gates == ("beta", "alpha") and dict(rule.gate_bias) == {"alpha": 3.0}
    model = rb.RetrievalModel(5, "dpfp-1/decay", d_key=8)
    assert model.W_g["alpha"].bias.item() == 3.0


def test_missing_or_misshapen_gates_raise():
    mem = rb.memory("linear/decay", d_key=4)
    keys, values, queries = torch.randn(2, 6, 4), torch.randn(2, 6, 3), torch.randn(2, 1, 4)
    with pytest.raises(ValueError, match="alpha"):
        mem(keys, values, torch.rand(2, 6), queries)
    k, v, q, gates = _inputs(2, 6, 1, 4, 3, "mid")
    with pytest.raises(ValueError, match="'beta' must be"):
        DecayRule().forward(k, v, q, {"alpha": gates["alpha"], "beta": gates["beta"][:, :5]}, False)
    with pytest.raises(ValueError, match="'alpha' is missing"):
        DecayRule().causal(k, v, k, {"beta": gates["beta"]}, False)


@pytest.mark.parametrize("spec", ["dpfp-1/decay", "linear/decay/sum+attn"])
def test_a_tiny_retrieval_model_trains(spec):
    """Adam on one fixed batch of the capacity task (S = 5): the loss falls by half within 60 steps."""
    torch.manual_seed(0)
    S = 5
    model = rb.RetrievalModel(S, spec, d_key=16)
    g = torch.Generator().manual_seed(0)
    keys = torch.stack([torch.randperm(S, generator=g) for _ in range(8)])
    values = torch.randint(0, S, (8, S), generator=g)
    queries = keys[:, :2]
    targets = values[:, :2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = rb.retrieval_loss(model(keys, values, queries), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
