"""Feature maps φ: what each map means (PAPER §1.6), not only its shape."""

from __future__ import annotations

import math

import pytest
import torch

import retrieval_bench as rb
from retrieval_bench.feature_maps import orthogonal_random_matrix
from retrieval_bench.memories.normalisations import sum_norm


def _all_feature_maps() -> list[str]:
    """Every registered map by its bare name (parametrised maps take their default parameter)."""
    return rb.names("feature_maps") + ["dpfp-2", "dpfp-3", "favor-8"]


# ------------------------------------------------------------------------------------------------------------
# Contracts over every registered feature map
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _all_feature_maps())
@pytest.mark.parametrize("d_key", [4, 7], ids=["K4", "K7"])
def test_shape_matches_dim_and_sign_matches_declaration(name, d_key):
    fm = rb.feature_map(name)
    assert isinstance(fm, rb.FeatureMap)
    x = 2 * torch.randn(3, 5, d_key)
    fm.begin_call(d_key)
    phi = fm(x)
    assert phi.shape == (3, 5, fm.dim(d_key))
    assert torch.isfinite(phi).all()
    if fm.non_negative:
        assert (phi >= 0).all(), f"{name} declares non-negative features"
    else:
        assert (phi < 0).any(), f"{name} declares signed features but gave none"


@pytest.mark.parametrize("name", _all_feature_maps())
def test_parameter_free_maps_are_deterministic_and_elementwise_over_batch(name):
    fm = rb.feature_map(name, **({"redraw": "fixed"} if name.startswith("favor") else {}))
    x = torch.randn(4, 5)
    fm.begin_call(5)
    full = fm(x)
    torch.testing.assert_close(fm(x[2:3]), full[2:3], atol=1e-6, rtol=1e-6)  # rows are mapped independently
    torch.testing.assert_close(fm(x), full, atol=0, rtol=0)


@pytest.mark.parametrize("name", _all_feature_maps())
def test_gradcheck_every_feature_map(name):
    """Maps may carry hand-written backwards; the memories' parity tests push both forms through the same φ,
    so φ's own gradient is checked here."""
    fm = rb.feature_map(name, **({"redraw": "fixed"} if name.startswith("favor") else {}))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_()  # away from relu's kink at 0
    fm.begin_call(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(fm, (x,))


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
