"""The causal language model (retrieval_bench/lm.py): shapes, causality of the whole model for every built-in
memory family with and without the convolution, gradients to every parameter, seeding, state size measured from
the memories, the per-layer mixer inputs, clear errors, and a tiny model that learns a copy task.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import retrieval_bench as rb
from retrieval_bench.lm import IGNORE_INDEX, CausalLM, lm_loss, query_accuracy

FAMILIES = ["softmax", "linear/sum", "dpfp-1/sum", "linear/delta", "linear/delta/l2+attn", "tanh/fwm"]
CONVS = [pytest.param(0, id="conv0"), pytest.param(3, id="conv3")]
VOCAB = 11


def tiny(spec, conv=0, seed=0, **kw):
    kw = {"vocab_size": VOCAB, "d_model": 8, "n_layers": 2, "n_heads": 2, "conv": conv, "seed": seed, **kw}
    return rb.lm(spec, **kw)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("spec", FAMILIES)
def test_logits_shape_and_causality(spec, conv):
    """Tokens after t never change the logits at or before t; a token at t changes the logits at t."""
    model = tiny(spec, conv).double()
    tokens = torch.randint(0, VOCAB, (3, 21))
    logits = model(tokens)
    assert logits.shape == (3, 21, VOCAB) and logits.dtype == torch.float64
    for t in (0, 9, 19):
        changed = tokens.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(0, VOCAB - 1, changed[:, t + 1:].shape)) % VOCAB
        other = model(changed)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=1e-12, rtol=1e-12)
        assert not torch.allclose(other[:, t + 1], logits[:, t + 1])


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("spec", FAMILIES)
def test_gradients_reach_every_parameter(spec, conv):
    model = tiny(spec, conv)
    tokens = torch.randint(0, VOCAB, (2, 9))
    targets = torch.randint(0, VOCAB, (2, 9))
    lm_loss(model(tokens), targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    gates = [n for n, _ in model.named_parameters() if ".gate." in n]
    assert bool(gates) == bool(model.memories[0].gates)  # a gate projection exactly where the memory has gates


def test_seed_decides_the_initialisation_and_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = tiny("favor-4/sum", seed=1), tiny("favor-4/sum", seed=1), tiny("favor-4/sum", seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    tokens = torch.randint(0, VOCAB, (2, 7))
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    torch.testing.assert_close(a(tokens), b(tokens))  # FAVOR+'s Ω drawn from the seed too


def test_state_size_is_measured_from_the_memories():
    """Fast weights: layers × heads × d_dot × d_v (PAPER §5, Zoology), + d_dot for the attention normaliser's z;
    softmax: the KV cache, (K + V) per head per position."""
    d_model, H, L, T = 16, 2, 3, 50
    d = d_model // H
    kw = {"vocab_size": VOCAB, "d_model": d_model, "n_layers": L, "n_heads": H}
    assert rb.lm("dpfp-2/delta", **kw).state_size(T) == L * H * (2 * d * 2) * d
    assert rb.lm("linear/sum", **kw).per_layer_state_size(T) == [H * (d * d + d)] * L  # sum: attn-normalised
    softmax = rb.lm("softmax", **kw)
    assert softmax.per_layer_state_size(T) == [T * 2 * d_model] * L
    assert softmax.state_size(2 * T) == 2 * softmax.state_size(T)


def test_mixer_inputs_fold_heads_into_the_batch_and_trace_per_layer():
    model = tiny("linear/delta", conv=0)
    tokens = torch.randint(0, VOCAB, (3, 6))
    inputs = model.mixer_inputs(tokens)
    assert len(inputs) == 2 and inputs[0].n_heads == 2
    x = inputs[0]
    assert x.keys.shape == (6, 6, 4) and x.betas.shape == (6, 6) and x.gates == {}
    # row b·H + h is sequence b, head h: the key projection's head h applied to the first block's input
    h = model.blocks[0].norm1(model.embed(tokens))
    k = model.blocks[0].mixer.qkv(h)[..., 8:16]  # (B, T, d_model): the keys of both heads
    torch.testing.assert_close(x.keys[1 * 2 + 1], k[1, :, 4:8])
    beta_w = model.blocks[0].mixer.gate
    torch.testing.assert_close(x.betas[1 * 2 + 0], torch.sigmoid(beta_w(h))[1, :, 0])
    # the layer's read from these inputs is what the model used (causal, then the output projection)
    mem = model.memories[0]
    y = mem.causal(x.keys, x.values, x.queries, x.betas).reshape(3, 2, 6, 4).transpose(1, 2).reshape(3, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].mixer.out(y), model.blocks[0].mixer(h))
    traces = model.trace(tokens)
    assert [tr["state_norm"].shape for tr in traces] == [(6, 6), (6, 6)]


def test_gates_and_gate_bias_are_honoured():
    mem = rb.memory("linear/delta", d_key=4)
    mem.gate_bias = {"beta": 2.5}
    model = CausalLM(mem, VOCAB, d_model=8, n_heads=2)
    assert torch.equal(model.blocks[1].mixer.gate.bias, torch.full((2,), 2.5))
    mem.gate_bias = {"alpha": 1.0}
    with pytest.raises(ValueError, match=r"gate_bias names \['alpha'\]"):
        CausalLM(mem, VOCAB, d_model=8, n_heads=2)


@pytest.mark.parametrize("kwargs,match", [
    pytest.param({"d_model": 10, "n_heads": 3}, "d_model .10. must be a multiple of n_heads", id="heads"),
    pytest.param({"conv": -1}, "conv must be an int >= 0", id="conv"),
    pytest.param({"n_layers": 0}, "n_layers must be a positive int", id="layers"),
    pytest.param({"vocab_size": 2.5}, "vocab_size must be a positive int", id="vocab"),
])
def test_bad_sizes_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rb.lm("softmax", **{"vocab_size": VOCAB, "d_model": 8, **kwargs})


@pytest.mark.parametrize("tokens,match", [
    pytest.param(torch.full((2, 3), VOCAB), r"\[0, vocab_size = 11\)", id="range"),
    pytest.param(torch.zeros(2, 3), "integer tensor", id="float"),
    pytest.param(torch.zeros(6, dtype=torch.long), r"\(B, T\) integer tensor", id="1d"),
])
def test_bad_tokens_name_the_field(tokens, match):
    with pytest.raises(ValueError, match=f"lm: tokens must .*{match}"):
        tiny("softmax")(tokens)


def test_loss_and_accuracy_count_query_positions_only():
    logits = torch.randn(2, 5, VOCAB)
    targets = torch.full((2, 5), IGNORE_INDEX)
    targets[0, 1], targets[1, 4] = 3, logits[1, 4].argmax()
    want = (F.cross_entropy(logits[0, 1], torch.tensor(3)) + F.cross_entropy(logits[1, 4], targets[1, 4])) / 2
    torch.testing.assert_close(lm_loss(logits, targets), want)
    assert query_accuracy(logits, targets) == (0.5 if logits[0, 1].argmax() != 3 else 1.0)


def _first_token_batch(g, B=32, T=12, n_content=8, n_filler=8):
    """A content token at position 0, filler after it; every later position's target is the content token, so
    only a mixer that carries position 0 forward beats chance (1/8)."""
    tokens = torch.randint(n_content, n_content + n_filler, (B, T), generator=g)
    content = torch.randint(0, n_content, (B,), generator=g)
    tokens[:, 0] = content
    targets = content[:, None].expand(B, T).clone()
    targets[:, 0] = IGNORE_INDEX
    return tokens, targets


def _train_copy(model, steps=60):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens, targets = _first_token_batch(g)
        loss = lm_loss(model(tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, targets = _first_token_batch(torch.Generator().manual_seed(99), B=256)  # held out
    with torch.no_grad():
        return query_accuracy(model(tokens), targets)


@pytest.mark.parametrize("spec", ["softmax", "linear/sum", "linear/delta"])
def test_a_tiny_model_learns_to_copy_the_first_token(spec):
    model = rb.lm(spec, vocab_size=16, d_model=32, n_layers=1, n_heads=2, seed=0)
    assert _train_copy(model) > 0.9


def test_the_copy_task_needs_the_mixer(monkeypatch):
    """Control: with the memory's read zeroed, the same training stays near chance."""
    model = rb.lm("linear/sum", vocab_size=16, d_model=32, n_layers=1, n_heads=2, seed=0)
    mem = model.memories[0]
    monkeypatch.setattr(mem, "causal", lambda keys, values, queries, betas=None, **g: torch.zeros_like(values))
    assert _train_copy(model) < 0.3


def test_rb_lm_stays_the_function_once_its_module_is_imported():
    """``rb.lm`` is a function in the submodule ``retrieval_bench.lm``; the package imports names lazily, and
    importing the submodule must not rebind ``rb.lm`` to the module."""
    import importlib
    import types

    import retrieval_bench as rb

    module = importlib.import_module("retrieval_bench.lm")
    assert not isinstance(rb.lm, types.ModuleType) and rb.lm is module.lm
    assert rb.CausalLM is module.CausalLM
