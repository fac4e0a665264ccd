"""The softmax-imitating feature maps: Based's Taylor map (its kernel identity and cheaper kernel read) and
Hedgehog's learned map (its parameters wherever maps go: memory, retrieval model, language model, optimizer,
seeds, the contract checks). K stays small: taylor's F grows as K²."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import retrieval_bench as rb
from retrieval_bench.cli import main
from retrieval_bench.lm import lm, lm_loss
from retrieval_bench.memories import FastWeightMemory
from retrieval_bench.memories.rules import SumRule
from retrieval_bench.testing import check_feature_map, check_memory

D_KEY = 4


def _grads(y, inputs, cotangent):
    return torch.autograd.grad(y, inputs, cotangent, allow_unused=True)


# ---- taylor ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 3, 8])
def test_taylor_features_give_the_second_order_expansion_of_exp(K):
    """φ(q)·φ(k) = 1 + s + s²/2 with s = q·k/√K (Arora et al. 2024), F = 1 + K + K², in float64."""
    fm = rb.feature_map("taylor-2")
    q, k = torch.randn(5, K, dtype=torch.float64), 3 * torch.randn(5, K, dtype=torch.float64)
    fq, fk = fm(q), fm(k)
    assert fq.shape == (5, fm.dim(K)) and fm.dim(K) == 1 + K + K * K
    s = (q * k).sum(-1) / math.sqrt(K)
    torch.testing.assert_close((fq * fk).sum(-1), 1 + s + s * s / 2, atol=1e-12, rtol=1e-12)
    # the first feature is the constant 1 and the next K are x/K^{1/4}: the layout the docstring states
    torch.testing.assert_close(fq[:, 0], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(fq[:, 1:K + 1], q / K ** 0.25)


def test_taylor_is_signed_but_its_kernel_is_at_least_a_half():
    fm = rb.feature_map("taylor")
    x = torch.randn(200, 6, dtype=torch.float64)
    assert (fm(x) < 0).any() and not fm.non_negative and fm.positive_kernel
    s = torch.linspace(-6, 6, 1201, dtype=torch.float64)  # the minimum of 1 + s + s²/2 is ½ at s = -1
    scores = fm.kernel(s[None, :, None], torch.ones(1, 1, 1, dtype=torch.float64))
    assert scores.min().item() == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("Q", [1, 3])
def test_taylor_kernel_equals_the_dot_of_its_features_in_outputs_and_gradients(Q):
    fm = rb.feature_map("taylor-2")
    keys = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(2, Q, 5, dtype=torch.float64, requires_grad=True)
    fast = fm.kernel(keys, queries)
    slow = fm(keys) @ fm(queries).transpose(1, 2)  # (B, L, Q)
    assert fast.shape == (2, 7, Q)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=1e-12)
    cot = torch.randn(fast.shape, dtype=torch.float64)
    for a, b in zip(_grads(fast, (keys, queries), cot), _grads(slow, (keys, queries), cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.autograd.gradcheck(fm.kernel, (keys[:1, :3], queries[:1]))


@pytest.mark.parametrize("spec", ["taylor-2/sum", "taylor-2/sum/none"])
def test_taylor_sum_memory_reads_through_the_kernel_and_equals_the_reference(spec, make_inputs):
    mem = rb.memory(spec, d_key=5)
    assert mem._scores_read
    keys, values, betas, queries = make_inputs(b=2, l=9, k=5, v=3, q=1)
    y, y_ref = mem(keys, values, betas, queries), mem.reference(keys, values, betas, queries)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn(y.shape, dtype=torch.float64)
    leaves = (keys, values, queries)
    for a, b in zip(_grads(y, leaves, cot), _grads(y_ref, leaves, cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_taylor_names_and_the_normalisations_it_accepts():
    assert type(rb.feature_map("taylor")) is type(rb.feature_map("taylor-2"))
    for n in (1, 3):
        with pytest.raises(ValueError, match=rf"only the second-order map.*taylor-{n}"):
            rb.feature_map(f"taylor-{n}")
    assert rb.parse_spec("taylor-2/sum").attn  # the attention normaliser: its kernel is >= 1/2
    with pytest.raises(rb.RegistryError, match=r"signed features.*taylor-2/delta/l2"):
        rb.parse_spec("taylor-2/delta")  # sum normalisation: φ/Σφ is unbounded for a signed map
    with pytest.raises(rb.RegistryError, match="signed features"):
        rb.parse_spec("tanh/sum")  # the guard still holds for signed maps without a positive kernel
    assert rb.parse_spec("taylor-2/delta/l2").norm == "l2"


# ---- hedgehog ----------------------------------------------------------------------------------------------

def test_hedgehog_halves_are_softmaxes_of_z_and_minus_z():
    fm = rb.feature_map("hedgehog", d_key=6).double()
    with torch.no_grad():
        fm.weight.copy_(torch.randn(6, 6))
        fm.bias.copy_(torch.randn(6))
    x = 3 * torch.randn(4, 5, 6, dtype=torch.float64)
    phi = fm(x)
    assert phi.shape == (4, 5, 12) and fm.dim(6) == 12
    assert (phi > 0).all()
    torch.testing.assert_close(phi[..., :6].sum(-1), torch.ones(4, 5, dtype=torch.float64))
    torch.testing.assert_close(phi[..., 6:].sum(-1), torch.ones(4, 5, dtype=torch.float64))
    z = x @ fm.weight.T + fm.bias
    torch.testing.assert_close(phi, torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1))


def test_hedgehog_starts_at_the_identity_and_every_seed_starts_alike():
    a = rb.memory("hedgehog/sum", d_key=5).phi
    torch.testing.assert_close(a.weight, torch.eye(5))
    torch.testing.assert_close(a.bias, torch.zeros(5))
    x = torch.randn(3, 5)
    torch.testing.assert_close(a(x), torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1))
    m0, m1 = (lm("hedgehog/sum", vocab_size=11, d_model=8, n_heads=2, seed=s) for s in (0, 0))
    for (n, p), (_, p1) in zip(m0.named_parameters(), m1.named_parameters(), strict=True):
        torch.testing.assert_close(p, p1, atol=0, rtol=0, msg=n)


def test_hedgehog_gradients_reach_w_and_b():
    mem = rb.memory("hedgehog/delta", d_key=4)
    y = mem(torch.randn(2, 6, 4), torch.randn(2, 6, 3), torch.rand(2, 6), torch.randn(2, 2, 4))
    y.square().sum().backward()
    for p in (mem.phi.weight, mem.phi.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_hedgehog_parameters_follow_a_float64_copy_and_a_float32_map_reads_float64():
    fm = rb.feature_map("hedgehog", d_key=3)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert fm(x).dtype == torch.float64 and fm.double()(x).dtype == torch.float64


@pytest.mark.parametrize("make,match", [
    (lambda: rb.feature_map("hedgehog"), "needs K at construction"),
    (lambda: rb.feature_map("hedgehog", d_key=0), "positive int"),
    (lambda: rb.feature_map("hedgehog", d_key=True), "positive int"),
    (lambda: rb.feature_map("hedgehog-4"), "unknown feature map 'hedgehog-4'"),
    (lambda: rb.memory("hedgehog/sum", d_key=4).phi.dim(5), r"built for K = 4.*used with K = 5"),
    (lambda: rb.memory("hedgehog/sum", d_key=4)(torch.randn(1, 2, 5), torch.randn(1, 2, 2), None,
                                                torch.randn(1, 1, 5)), r"built for K = 4.*used with K = 5"),
])
def test_hedgehog_bad_sizes_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_retrieval_model_trains_hedgehog_from_the_first_step():
    torch.manual_seed(0)
    model = rb.RetrievalModel(8, "hedgehog/sum", d_key=8)
    w = model.memory.phi.weight
    assert any(p is w for p in model.parameters())  # the optimizer below sees W from the start
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    task, g = rb.task("capacity", num_keys=8), torch.Generator().manual_seed(0)
    w0 = w.detach().clone()
    for _ in range(4):
        s = task.sample(16, g)
        loss = rb.retrieval_loss(model(s.keys, s.values, s.query[:, None])[:, 0], s.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and (w - w0).abs().max() > 1e-4


def test_a_language_model_trains_each_layers_own_hedgehog():
    model = lm("hedgehog/sum", vocab_size=13, d_model=16, n_layers=2, n_heads=2, mlp_ratio=0, seed=1)
    maps = [m.phi for m in model.memories]
    assert maps[0] is not maps[1] and maps[0].weight.shape == (8, 8)  # K = d_model / n_heads
    before = [fm.weight.detach().clone() for fm in maps]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 13, (4, 10), generator=g)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    for fm, w0 in zip(maps, before, strict=True):
        assert (fm.weight - w0).abs().max() > 1e-4


def test_list_shows_both_maps():
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0, res.output
    assert "taylor" in res.output and "hedgehog" in res.output


class _Unused(rb.FeatureMap):
    """elu + 1 with a parameter that never enters the features."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.nn.functional.elu(x) + 1.0


def test_the_contract_catches_a_map_parameter_that_gets_no_gradient(scoped_registries):
    with pytest.raises(AssertionError, match=r"gradient on parameter 'phi.scale' is zero"):
        check_memory(FastWeightMemory(_Unused(), SumRule()), d_key=D_KEY, check_model=False)
    scoped_registries["feature_maps"].register("unused-param", _Unused)
    with pytest.raises(AssertionError, match=r"the map's parameter 'scale' gets no gradient"):
        check_feature_map("unused-param", d_key=D_KEY, rules=())


class _ClaimsAPositiveKernel(rb.FeatureMap):
    """tanh features, whose dot products can be negative, claiming positive_kernel."""

    non_negative = False
    positive_kernel = True

    def forward(self, x):
        return torch.tanh(x)


def test_the_contract_catches_a_false_positive_kernel_claim(scoped_registries):
    scoped_registries["feature_maps"].register("false-claim", _ClaimsAPositiveKernel)
    with pytest.raises(AssertionError, match="positive_kernel: the map says"):
        check_feature_map("false-claim", d_key=D_KEY, rules=())
