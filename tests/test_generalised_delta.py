"""RWKV-7's generalised delta rule (memories/generalised.py) and gates of width F.

Both fast forms (the training form's query travelling backwards, the chunked all-positions form) equal their spec,
the rule's step function in the reference loop, in outputs and in the gradients of keys, values, queries and both
gates, in float64, over chunk sizes that leave a ragged last chunk, with the decays factorised and pairwise; special
cases reproduce the delta rule (w ≡ 1, a ≡ β, unit keys) and gated linear attention (a ≡ 0); the models make F-wide
gate projections for it and train, and models of scalar-gate rules keep every parameter they had.
"""

from __future__ import annotations

import math

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench.diagnostics import collect
from retrieval_bench.lm import lm, lm_loss
from retrieval_bench.memories import causal
from retrieval_bench.memories.causal import causal_loop
from retrieval_bench.memories.generalised import (
    GeneralisedDeltaRule,
    _chunk_terms,
    gd_causal,
    gd_query_read,
)
from retrieval_bench.memories.reference import reference_loop
from retrieval_bench.model import RetrievalModel, retrieval_loss
from retrieval_bench.tasks import EvalSet

RULE = "generalised-delta"
TOL = 1e-10


def _inputs(B, L, Q, Fd, V, *, w_low=0.0, scalar_gates=False, seed=0):
    """Leaves in float64: raw (unnormalised) keys, so that κ = k/‖k‖ differs from k; gates in (0, 1), the decay
    in (w_low, 1); (B, L, F) gates, or (B, L) with ``scalar_gates``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    gate_shape = (B, L) if scalar_gates else (B, L, Fd)
    k = torch.randn(B, L, Fd, generator=g, dtype=dt)
    v = torch.randn(B, L, V, generator=g, dtype=dt)
    q = torch.randn(B, Q, Fd, generator=g, dtype=dt)
    w = w_low + (1 - w_low) * torch.rand(gate_shape, generator=g, dtype=dt)
    a = torch.rand(gate_shape, generator=g, dtype=dt)
    return [x.requires_grad_() for x in (k, v, q, w, a)]


def _assert_same(fast, ref, leaves, names, g=None, nonzero=True):
    """Outputs, and the gradients of every leaf under one random cotangent, to TOL relative to the scale;
    ``nonzero``: every gradient must be non-zero (not so for the gates at L = 1: they act on the empty state)."""
    err = (fast - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), f"outputs differ by {err:.3e}"
    cot = torch.randn(ref.shape, generator=g or torch.Generator().manual_seed(1), dtype=ref.dtype)
    for name, gf, gr in zip(names, torch.autograd.grad(fast, leaves, cot), torch.autograd.grad(ref, leaves, cot),
                            strict=True):
        err = (gf - gr).abs().max().item()
        assert err <= TOL * max(1.0, gr.abs().max().item()), f"d/d {name} differs by {err:.3e}"
        assert not nonzero or gr.abs().max() > 0, f"d/d {name} is zero: the test would not see a wrong gradient"


NAMES = ("k", "v", "q", "w", "a")
# (L, chunk): one step; shorter than a chunk; ragged last chunk; chunk of 1; several full chunks; the default
CASES = [(1, 4), (5, 16), (37, 8), (13, 1), (48, 16), (61, None)]


@pytest.mark.parametrize("L,chunk", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("factorised", [True, False], ids=["factorised", "pairwise"])
def test_training_form_equals_the_reference_loop(L, chunk, factorised):
    k, v, q, w, a = leaves = _inputs(2, L, 3, 5, 4)
    y = gd_query_read(k, v, q, w, a, chunk=chunk, factorised=factorised)
    y_ref = reference_loop(GeneralisedDeltaRule(), k, v, q, {"w": w, "a": a}, False)[0]
    _assert_same(y, y_ref, leaves, NAMES, nonzero=L > 1)


@pytest.mark.parametrize("L,chunk", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("factorised", [True, False], ids=["factorised", "pairwise"])
def test_causal_form_equals_the_causal_loop(L, chunk, factorised):
    k, v, q, w, a = leaves = _inputs(2, L, L, 5, 4)
    y = gd_causal(k, v, q, w, a, chunk=chunk, factorised=factorised)
    y_ref = causal_loop(GeneralisedDeltaRule(), k, v, q, {"w": w, "a": a}, False)
    _assert_same(y, y_ref, leaves, NAMES, nonzero=L > 1)


def test_strong_decays_take_the_pairwise_path_and_stay_exact():
    """Decays near 0 in some chunks put their total log-decay far below what e^{-l} can hold (float64: -354):
    those chunks alone take the pairwise decays, the others stay factorised, and both forms still equal the loops.
    The decay is σ(z), as the models make it, and the gradient compared is the one training uses, d/dz: the forms
    work in log w, so d/dw itself carries an absolute error of ~1e-16 x (the read's scale) / w, which at
    w = 1e-30 is no longer small."""
    B, L, Fd = 2, 40, 5
    k, v, q, _, a = _inputs(B, L, L, Fd, 4, seed=3)
    z = torch.randn(B, L, Fd, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z[0, 16:32] -= 69.0  # σ(z) ≈ 1e-30 over sequence 0's second chunk of 16: log w ≈ -1100 there
    z.requires_grad_()
    unsafe = _chunk_terms(k, torch.sigmoid(z), a, 16)["unsafe"]
    assert unsafe.tolist() == [1]  # of the B·n = 6 chunks, only (sequence 0, chunk 1)
    leaves, names = [k, v, q, z, a], ("k", "v", "q", "z", "a")
    with torch.no_grad():  # what the check prevents: factorised there, e^{1100} overflows
        assert not torch.isfinite(gd_causal(k, v, q, torch.sigmoid(z), a, chunk=16, factorised=True)).all()
    y = gd_causal(k, v, q, torch.sigmoid(z), a, chunk=16)
    assert torch.isfinite(y).all()
    y_ref = causal_loop(GeneralisedDeltaRule(), k, v, q, {"w": torch.sigmoid(z), "a": a}, False)
    _assert_same(y, y_ref, leaves, names)
    y = gd_query_read(k, v, q[:, :3], torch.sigmoid(z), a, chunk=16)
    y_ref = reference_loop(GeneralisedDeltaRule(), k, v, q[:, :3], {"w": torch.sigmoid(z), "a": a}, False)[0]
    _assert_same(y, y_ref, leaves, names)


def test_scalar_gates_broadcast_over_the_features():
    """A (B, L) gate (a width-F gate of F = 1, or a caller's scalar) means the same value for every feature."""
    k, v, q, w, a = _inputs(2, 20, 3, 5, 4, scalar_gates=True)
    wide = {"w": w[..., None].expand(-1, -1, 5), "a": a[..., None].expand(-1, -1, 5)}
    y = gd_query_read(k, v, q, w, a)
    torch.testing.assert_close(y, gd_query_read(k, v, q, wide["w"], wide["a"]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, reference_loop(GeneralisedDeltaRule(), k, v, q, {"w": w, "a": a}, False)[0],
                               atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="generalised-delta: a gate must be"):
        gd_query_read(k, v, q, w[..., None, None], a)


def test_with_w_1_and_a_beta_it_is_the_delta_rule_on_unit_keys():
    """w ≡ 1, a ≡ β, ‖k‖ = 1 and values β v: W_t = W_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, the paper's delta rule
    (Eqs. 20-25) on l2-normalised keys. Through the memories, both forms, outputs and key/value/query gradients."""
    B, L, K, V = 2, 37, 6, 3
    g = torch.Generator().manual_seed(5)
    keys, queries = torch.randn(B, L, K, generator=g, dtype=torch.float64), torch.randn(B, L, K, generator=g,
                                                                                      dtype=torch.float64)
    values = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(B, L, generator=g, dtype=torch.float64))
    leaves = [x.requires_grad_() for x in (keys, values, queries)]
    gd, delta = rb.memory(f"linear/{RULE}/l2", d_key=K), rb.memory("linear/delta/l2", d_key=K)
    F = gd.d_dot(K)
    gates = {"w": torch.ones(B, L, F, dtype=torch.float64), "a": beta[..., None].expand(B, L, F)}
    y = gd(keys, beta[..., None] * values, None, queries[:, -2:], **gates)
    _assert_same(y, delta(keys, values, beta, queries[:, -2:]), leaves, NAMES[:3])
    y = gd.causal(keys, beta[..., None] * values, queries, **gates)
    _assert_same(y, delta.causal(keys, values, queries, beta), leaves, NAMES[:3])


def test_with_a_0_it_is_gated_linear_attention():
    """a ≡ 0 removes nothing: W_L q = Σ_t v_t (k_t ⊙ Π_{m>t} w_m)·q, a decayed sum written out directly."""
    k, v, q, w, _ = _inputs(2, 30, 3, 5, 4)
    decay_after = torch.exp(torch.log(w).flip(1).cumsum(1).flip(1) - torch.log(w))  # Π_{m>t} w_m (B, L, F)
    expected = torch.einsum("blf,bqf,blv->bqv", k * decay_after, q, v)
    torch.testing.assert_close(gd_query_read(k, v, q, w, torch.zeros_like(w)), expected, atol=1e-12, rtol=1e-12)


def test_the_rule_declares_width_f_gates_and_a_slow_decay():
    rule = GeneralisedDeltaRule
    assert rule.gates == ("w", "a") and dict(rule.gate_widths) == {"w": "F", "a": "F"}
    assert 0.99 < 1 / (1 + math.exp(-rule.gate_bias["w"])) < 1
    mem = rb.memory(f"dpfp-1/{RULE}", d_key=4)
    assert mem.norm_name == "l2" and not mem.attn
    assert (mem.gate_dim("w", 4), mem.gate_dim("a", 4)) == (8, 8)
    assert rb.memory("dpfp-1/delta", d_key=4).gate_dim("beta", 4) == 1
    with pytest.raises(rb.RegistryError, match="no attention-normalised form"):
        rb.memory(f"linear/{RULE}/l2+attn")


def test_check_inputs_wants_width_f_gates_at_width_f():
    mem = rb.memory(f"linear/{RULE}", d_key=4)
    keys = torch.randn(2, 5, 4)
    ok = {"w": torch.rand(2, 5, 4), "a": torch.rand(2, 5, 4)}
    assert mem.causal(keys, keys, keys, **ok).shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"gate 'a' must be \(2, 5, 4\)"):
        mem.causal(keys, keys, keys, w=ok["w"], a=torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"gate 'beta' must be \(2, 5\)"):
        causal.check_inputs(keys, keys, keys, None, {"beta": torch.rand(2, 5, 4)})


def _batch(S, B, L, g):
    keys = torch.stack([torch.randperm(S, generator=g)[:L] for _ in range(B)])
    values = torch.randint(0, S, (B, L), generator=g)
    return keys, values


def test_the_retrieval_model_makes_f_wide_gates_and_trains():
    torch.manual_seed(0)
    S, B, L, K = 8, 4, 8, 4
    model = RetrievalModel(S, f"dpfp-1/{RULE}", d_key=K)
    F = model.memory.d_dot(K)
    E = int(2.2 * S)
    assert model.W_g["w"].weight.shape == (F, S + E) and model.W_g["a"].weight.shape == (F, S + E)
    assert torch.equal(model.W_g["w"].bias, torch.full((F,), 5.0))
    g = torch.Generator().manual_seed(0)
    keys, values = _batch(S, B, L, g)
    queries = keys[:, :3]
    k, v, betas, q, gates = model.inputs(keys, values, queries)
    assert betas is None and gates["w"].shape == gates["a"].shape == (B, L, F)
    assert gates["w"].min() > 0.9  # the decay starts near 1
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = retrieval_loss(model(keys, values, queries), values[:, :3])
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.W_g["w"].weight.grad.abs().sum() > 0 and model.W_g["a"].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the diagnostics read the trace of the reference loop, (B, L, F) gates included
    keys, values = _batch(S, 3, L, g)
    rows = collect(model, EvalSet(keys=keys, values=values, queries=keys, targets=values,
                                  mask=torch.ones_like(keys, dtype=torch.bool)))
    names = {name for _, name, _ in rows}
    assert {"accuracy", "contrast_cos", "state_norm"} <= names and all(math.isfinite(v) for _, _, v in rows)


def test_the_language_model_makes_f_wide_gates_per_head_and_trains():
    H, D, V = 2, 16, 11
    model = lm(f"dpfp-1/{RULE}", vocab_size=V, d_model=D, n_layers=1, n_heads=H, seed=0)
    mixer = model.blocks[0].mixer
    F = mixer.memory.d_dot(D // H)
    assert mixer.gate_widths == {"w": F, "a": F} and mixer.gate.weight.shape == (2 * F * H, D)
    assert torch.equal(mixer.gate.bias[: F * H], torch.full((F * H,), 5.0))  # w's block, every head
    assert not torch.equal(mixer.gate.bias[F * H:], torch.full((F * H,), 5.0))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (3, 12), generator=g)
    (x,) = model.mixer_inputs(tokens)
    assert x.betas is None and x.gates["w"].shape == x.gates["a"].shape == (3 * H, 12, F)
    assert len(model.trace(tokens)) == 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


# Parameters of models of a scalar-gate rule as built before gates could be F wide (recorded then): names, shapes
# and sums. A change in the order or size of any projection would move every later random draw.
RETRIEVAL_BEFORE = [("embedding", (7, 15), 3.87018), ("W_k.weight", (8, 22), -0.381582), ("W_k.bias", (8,), -0.22738),
                    ("W_q.weight", (8, 15), 0.218514), ("W_q.bias", (8,), -0.359424),
                    ("W_g.beta.weight", (1, 22), -0.479535), ("W_g.beta.bias", (1,), 0.177934)]
LM_BEFORE = [("embed.weight", (11, 16), 12.212684), ("blocks.0.norm1.weight", (16,), 16.0),
             ("blocks.0.norm1.bias", (16,), 0.0), ("blocks.0.mixer.qkv.weight", (48, 16), 3.290513),
             ("blocks.0.mixer.gate.weight", (2, 16), 0.357343), ("blocks.0.mixer.gate.bias", (2,), 0.048201),
             ("blocks.0.mixer.out.weight", (16, 16), -1.055013), ("blocks.0.mixer.out.bias", (16,), -0.997386),
             ("blocks.0.norm2.weight", (16,), 16.0), ("blocks.0.norm2.bias", (16,), 0.0),
             ("blocks.0.mlp.0.weight", (64, 16), 0.027839), ("blocks.0.mlp.0.bias", (64,), 1.97618),
             ("blocks.0.mlp.2.weight", (16, 64), -1.502997), ("blocks.0.mlp.2.bias", (16,), 0.223687),
             ("norm.weight", (16,), 16.0), ("norm.bias", (16,), 0.0), ("head.weight", (11, 16), 0.972047)]


def _assert_parameters(model, before):
    got = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    assert got == [(name, shape) for name, shape, _ in before]
    sums = [p.double().sum().item() for p in model.state_dict().values()]
    assert sums == pytest.approx([s for _, _, s in before], abs=2e-6)


def test_scalar_gate_models_keep_their_parameters():
    torch.manual_seed(0)
    _assert_parameters(RetrievalModel(7, "dpfp-1/delta", d_key=8), RETRIEVAL_BEFORE)
    model = lm("dpfp-1/delta", vocab_size=11, d_model=16, n_layers=1, n_heads=2, seed=3)
    _assert_parameters(model, LM_BEFORE)
    assert model.blocks[0].mixer.gate_widths == {"beta": 1}
