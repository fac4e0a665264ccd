"""The retrieval layer around a memory (PAPER §2.2) and its loss (PAPER §2.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retrieval_bench as rb

S, KEY = 5, 8  # keys/values in the vocabulary, d_key


def _ids(b=2, l=6, q=3, s=S, v=None):
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, s, (b, l), generator=g)
    values = torch.randint(0, v or s, (b, l), generator=g)
    queries = torch.randint(0, s, (b, q), generator=g)
    return keys, values, queries


def _model(spec, **kw):
    model = rb.RetrievalModel(S, spec, d_key=KEY, **kw)
    phi = getattr(model.memory, "phi", None)
    if phi is not None and hasattr(phi, "policy"):
        phi.policy = "fixed"  # FAVOR+: compare two calls under one Ω
    return model


# The model around every memory (one gate projection per declared gate, a finite gradient on every parameter)
# is part of the memory contract: tests/test_contract.py.


@pytest.mark.parametrize("spec", ["softmax", "linear/sum", "linear/delta", "tanh/fwm"])
def test_inputs_hold_betas_in_0_1_exactly_where_the_memory_declares_beta(spec):
    model = _model(spec)
    k, v, betas, q, other = model.inputs(*_ids())
    assert (betas is None) == ("beta" not in model.memory.gates)
    if betas is not None:
        assert betas.shape == (2, 6) and ((betas > 0) & (betas < 1)).all()
    assert other == {}


def test_num_values_sets_d_v():
    model = rb.RetrievalModel(S, "linear/delta", d_key=KEY, num_values=7)
    keys, values, queries = _ids(v=7)
    assert model(keys, values, queries).shape == (2, 3, 7)


def test_zero_num_values_raises():
    with pytest.raises(ValueError, match="num_values"):
        rb.RetrievalModel(S, "linear/delta", d_key=KEY, num_values=0)


def test_embedding_width_and_init():
    model = _model("linear/delta")
    assert model.embedding.shape == (S, int(2.2 * S))
    assert rb.RetrievalModel(20, "linear/delta", d_key=KEY).embedding.shape == (20, 44)
    with pytest.raises(ValueError, match="embed_factor"):
        rb.RetrievalModel(S, "linear/delta", d_key=KEY, embed_factor=0.1)


def _explicit_inputs(model, keys, values, queries):
    """The GEMM the gather replaces: W_k [onehot(v); e(k)], σ(W_g [onehot(v); e(k)]), W_q e(q)."""
    x = torch.cat([F.one_hot(values, model.num_values).float(), model.embedding[keys]], dim=-1)  # (B, L, V+E)
    k = x @ model.W_k.weight.T + model.W_k.bias
    gates = {g: torch.sigmoid(x @ lin.weight.T + lin.bias)[..., 0] for g, lin in model.W_g.items()}
    q = model.embedding[queries] @ model.W_q.weight.T + model.W_q.bias
    return k, F.one_hot(values, model.num_values).float(), gates, q


@pytest.mark.parametrize("spec", ["linear/delta", "softmax", "dpfp-1/sum"])
def test_gather_front_end_equals_explicit_gemm(spec):
    model = _model(spec, num_values=7)
    keys, values, queries = _ids(v=7)
    k, v, betas, q, _ = model.inputs(keys, values, queries)
    k_ref, v_ref, gates_ref, q_ref = _explicit_inputs(model, keys, values, queries)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    if betas is not None:
        torch.testing.assert_close(betas, gates_ref["beta"], atol=1e-6, rtol=1e-6)
    y_ref = model.memory(k_ref, v_ref, gates_ref.get("beta"), q_ref)
    torch.testing.assert_close(model(keys, values, queries), y_ref, atol=1e-5, rtol=1e-5)

    # and the gradients of the two front ends agree
    target = torch.randint(0, 7, (2, 3))
    loss = rb.retrieval_loss(model(keys, values, queries), target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    k_ref, v_ref, gates_ref, q_ref = _explicit_inputs(model, keys, values, queries)
    loss_ref = rb.retrieval_loss(model.memory(k_ref, v_ref, gates_ref.get("beta"), q_ref), target)
    grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    for (name, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("spec", ["linear/sum", "dpfp-2/delta", "tanh/fwm", "favor-8/sum"])
def test_fast_weight_projection_init_bounds(spec):
    model = rb.RetrievalModel(40, spec, d_key=16)
    bound = 1 / math.sqrt(16)
    for lin in (model.W_k, model.W_q):
        w = lin.weight
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init
    assert model.embedding.std().item() == pytest.approx(1.0, abs=0.1)  # N(0, 1), PAPER §2.2


def test_softmax_uses_xavier_init():
    model = rb.RetrievalModel(40, "softmax", d_key=16)
    w = model.W_k.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert bound < 1 / math.sqrt(16)  # a different, narrower range than the fast-weight models'


# ------------------------------------------------------------------------------------------------------------
# Loss reference levels (PAPER §2.3)
# ------------------------------------------------------------------------------------------------------------


def test_loss_reference_levels():
    target = torch.tensor([[0, 3, 1]])
    assert rb.retrieval_loss(torch.zeros(1, 3, S), target).item() == pytest.approx(0.5)
    exact = F.one_hot(target, S).float()
    assert rb.retrieval_loss(exact, target).item() == pytest.approx(0.0)
    wrong = F.one_hot((target + 1) % S, S).float()
    assert rb.retrieval_loss(wrong, target).item() == pytest.approx(1.0)
    uniform = torch.full((1, 3, S), 1 / S)
    assert rb.retrieval_loss(uniform, target).item() == pytest.approx(0.5 * (1 - 1 / S))


def test_loss_is_half_squared_error_averaged_over_queries():
    y = torch.randn(2, 3, S)
    target = torch.randint(0, S, (2, 3))
    by_hand = sum(
        0.5 * sum((y[b, i, j].item() - float(j == target[b, i].item())) ** 2 for j in range(S))
        for b in range(2) for i in range(3)
    ) / 6
    assert rb.retrieval_loss(y, target).item() == pytest.approx(by_hand, rel=1e-5)


def test_masked_loss_ignores_padded_queries():
    target = torch.tensor([[1, 2, 0], [4, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    y = F.one_hot(target, S).float()
    y[0, 0] = 0.0  # one real query at 0.5
    y[1, 0] = F.one_hot(torch.tensor(0), S).float()  # one real query confidently wrong: 1.0
    y[0, 2] = 100.0  # padding: garbage that must not count
    y[1, 1:] = -50.0
    assert rb.retrieval_loss(y, target, mask).item() == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # an all-False mask gives 0, not NaN
    assert rb.retrieval_loss(y, target, torch.zeros_like(mask)).item() == 0.0
    # the unmasked mean would count the garbage
    assert rb.retrieval_loss(y, target).item() > 100


def test_model_trains_a_tiny_capacity_task_below_chance():
    """A smoke test that the layer learns: 100 Adam steps on S = 4 (d_dot = 16 >= S) go far below the uniform
    guess, ½(1 - 1/S) = 0.375."""
    task = rb.task("capacity", num_keys=4)
    model = rb.RetrievalModel(4, "dpfp-1/sum", d_key=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        s = task.sample(32, g)
        loss = rb.retrieval_loss(model(s.keys, s.values, s.query[:, None])[:, 0], s.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    e = task.eval_set(torch.Generator().manual_seed(1))
    with torch.no_grad():
        eval_loss = rb.retrieval_loss(model(e.keys, e.values, e.queries), e.targets, e.mask).item()
    assert eval_loss < 0.05
