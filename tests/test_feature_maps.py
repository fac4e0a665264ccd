"""Feature maps φ: what each map means (PAPER §1.6), not only its shape; FAVOR+'s redraws and its kernel read."""

from __future__ import annotations

import math

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench.feature_maps import orthogonal_random_matrix
from retrieval_bench.memories.normalisations import sum_norm
from retrieval_bench.memories.rules import SumRule

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _grads(y, inputs, cotangent):
    """Gradients of <y, cotangent> w.r.t. each input (None where the input does not enter)."""
    return torch.autograd.grad(y, inputs, cotangent, allow_unused=True)


# Shape against dim(), the declared sign, rows mapped alone and gradcheck hold for every registered map: the
# contract, tests/test_contract.py. Here: what each map means.


def test_elu_plus_one_is_positive_and_tanh_can_be_negative():
    x = torch.linspace(-8, 8, 101)
    assert (rb.feature_map("linear")(x) > 0).all()
    torch.testing.assert_close(rb.feature_map("linear")(torch.tensor([2.0, 0.0, -1.0])),
                               torch.tensor([3.0, 1.0, math.exp(-1.0)]))
    tanh = rb.feature_map("tanh")
    assert not tanh.non_negative
    assert tanh(torch.tensor([-1.0])).item() == pytest.approx(-math.tanh(1.0))


# ------------------------------------------------------------------------------------------------------------
# DPFP
# ------------------------------------------------------------------------------------------------------------


def _dpfp_by_hand(x: torch.Tensor, nu: int) -> torch.Tensor:
    """PAPER §1.6 written out: φ_{(j-1)·2K + i} = u_i · u_{(i-j) mod 2K}, u = [r(x); r(-x)]."""
    u = [max(a, 0.0) for a in x.tolist()] + [max(-a, 0.0) for a in x.tolist()]
    n = len(u)
    return torch.tensor([u[i] * u[(i - j) % n] for j in range(1, nu + 1) for i in range(n)])


@pytest.mark.parametrize("nu,d_key", [(1, 2), (1, 5), (2, 3), (3, 4), (4, 8)], ids=lambda p: str(p))
def test_dpfp_matches_the_formula_and_is_non_negative_of_dim_2_k_nu(nu, d_key):
    fm = rb.feature_map(f"dpfp-{nu}")
    assert fm.dim(d_key) == 2 * d_key * nu
    x = torch.randn(6, d_key, dtype=torch.float64)
    phi = fm(x)
    assert phi.shape == (6, 2 * d_key * nu)
    assert (phi >= 0).all()
    for row, out in zip(x, phi, strict=True):
        torch.testing.assert_close(out, _dpfp_by_hand(row, nu).to(out.dtype))


def test_dpfp_2d_quadrants_are_orthogonal():
    fm = rb.feature_map("dpfp-1")
    assert fm.dim(2) == 4
    signs = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    x = signs * (torch.rand(4, 2) + 0.1)  # one random point per quadrant
    phi = fm(x)
    gram = phi @ phi.T
    off_diag = gram - torch.diag(torch.diag(gram))
    assert (off_diag == 0).all(), "points in different quadrants must have orthogonal DPFP features"
    assert (torch.diag(gram) > 0).all()
    # each quadrant lights up exactly one of the four features
    assert ((phi > 0).sum(-1) == 1).all()
    # and two points of the same quadrant are not orthogonal
    y = signs * (torch.rand(4, 2) + 0.1)
    assert ((fm(y) * phi).sum(-1) > 0).all()


@pytest.mark.parametrize("nu,d_key", [(3, 3), (4, 3), (2, 2), (1, 1)], ids=lambda p: str(p))
def test_dpfp_nu_not_below_d_key_raises(nu, d_key):
    with pytest.raises(ValueError, match="nu"):
        rb.feature_map(f"dpfp-{nu}").dim(d_key)
    with pytest.raises(ValueError):
        rb.memory(f"dpfp-{nu}/delta", d_key=d_key)


def test_dpfp_nu_zero_raises():
    with pytest.raises(ValueError, match="nu"):
        rb.feature_map("dpfp-0")


def test_dpfp_all_zero_feature_stays_finite_after_sum_normalisation():
    # ν = 1, odd K, alternating signs: u = [a,0,b,0,c,0] cyclically, so every neighbour product is 0
    x = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.5, -0.5]], requires_grad=True)
    phi = rb.feature_map("dpfp-1")(x)
    assert (phi == 0).all()
    normed = sum_norm(phi)
    assert torch.isfinite(normed).all()
    assert (normed == 0).all()
    (grad,) = torch.autograd.grad(normed.sum(), x)
    assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------------------
# FAVOR+
# ------------------------------------------------------------------------------------------------------------


def test_favor_features_positive_and_of_dim_2m():
    fm = rb.feature_map("favor-16")
    assert fm.dim(5) == 32
    fm.seed(0)
    fm.begin_call(5)
    phi = fm(3 * torch.randn(10, 5))
    assert phi.shape == (10, 32)
    assert (phi > 0).all()


def test_favor_kernel_estimate_approaches_exp_dot():
    """E[φ(x)·φ(y)] = exp(x·y) (PAPER Eqs. 31-32), averaged over many draws of Ω."""
    d, draws = 4, 200
    fm = rb.feature_map("favor-64")
    fm.seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, d, generator=gen, dtype=torch.float64)
    y = torch.randn(6, d, generator=gen, dtype=torch.float64)
    x = 0.5 * x / x.norm(dim=-1, keepdim=True)  # small norms keep the estimator's variance small
    y = 0.5 * y / y.norm(dim=-1, keepdim=True)
    est = torch.zeros(6, dtype=torch.float64)
    omegas = []
    for _ in range(draws):
        fm.redraw(d)
        omegas.append(fm.omega.clone())
        est += (fm(x) * fm(y)).sum(-1)
    est /= draws
    exact = torch.exp((x * y).sum(-1))
    rel = ((est - exact).abs() / exact).max().item()
    assert rel < 0.05, f"relative error {rel:.3f}"
    assert not torch.equal(omegas[0], omegas[1]), "the average must be over different draws"


def test_favor_kernel_variance_shrinks_with_more_features():
    d = 4
    x = torch.full((1, d), 0.3, dtype=torch.float64)
    y = torch.tensor([[0.3, -0.2, 0.1, 0.4]], dtype=torch.float64)
    exact = torch.exp((x * y).sum()).item()

    def spread(m):
        fm = rb.feature_map(f"favor-{m}")
        fm.seed(0)
        errs = []
        for _ in range(40):
            fm.redraw(d)
            errs.append((fm(x) * fm(y)).sum().item() - exact)
        return float(torch.tensor(errs).pow(2).mean().sqrt())

    assert spread(256) < spread(4)


def test_favor_seed_reproduces_omega_and_policies():
    fm = rb.feature_map("favor-8")
    fm.seed(0)
    fm.begin_call(4)
    first = fm.omega.clone()
    fm.seed(0)
    fm.begin_call(4)
    torch.testing.assert_close(fm.omega, first, atol=0, rtol=0)  # same seed, same Ω
    fm.begin_call(4)
    assert not torch.equal(fm.omega, first)  # "call": a new Ω on every call

    fixed = rb.feature_map("favor-8", redraw="fixed")
    fixed.begin_call(4)
    omega = fixed.omega.clone()
    for _ in range(3):
        fixed.begin_call(4)
    torch.testing.assert_close(fixed.omega, omega, atol=0, rtol=0)


def test_favor_int_policy_redraws_every_n_training_calls_and_not_in_eval():
    fm = rb.feature_map("favor-8", redraw=2)
    fm.train()
    seen = []
    for _ in range(5):
        fm.begin_call(4)
        seen.append(fm.omega.clone())
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert torch.equal(seen[2], seen[3]) and not torch.equal(seen[3], seen[4])
    fm.eval()
    for _ in range(3):
        fm.begin_call(4)
    assert torch.equal(fm.omega, seen[4])


def test_favor_redraw_before_any_draw_needs_d_key():
    with pytest.raises(ValueError, match="d_key"):
        rb.feature_map("favor-8").redraw()


@pytest.mark.parametrize("bad", [0, -1, "sometimes"])
def test_favor_bad_redraw_policy_raises(bad):
    with pytest.raises(ValueError, match="redraw"):
        rb.feature_map("favor-8", redraw=bad)


def test_orthogonal_random_matrix_blocks_are_orthogonal_with_chi_norms():
    d, m = 4, 10
    omega = orthogonal_random_matrix(d, m, torch.Generator().manual_seed(0))
    assert omega.shape == (d, m)
    for start in range(0, m, d):
        block = omega[:, start : start + d]
        gram = block.T @ block
        off_diag = gram - torch.diag(torch.diag(gram))
        assert off_diag.abs().max() < 1e-4, "columns within one block must be orthogonal"
    # the column norms are chi_d-distributed, not all 1 (so not merely an orthonormal basis)
    norms = omega.norm(dim=0)
    assert norms.std() > 0.05


# ------------------------------------------------------------------------------------------------------------
# FAVOR+ in a memory: redraws, and the kernel read of the sum rule
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
