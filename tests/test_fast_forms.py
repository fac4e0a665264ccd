"""The fast forms (memories/chunked.py and checkpointed.py, the rules' training forms, the feature maps' custom
backwards) equal their specs: the reference loop of reference.py, the rules' step functions, and the plain feature
formulas.

Outputs and gradients wrt keys, values, betas and queries agree to 1e-5 relative in float32 and 1e-12 in
float64 (max-norm relative: max |fast - ref| / max |ref|), at L <= 120. Where a gradient is itself the small
difference of large terms, no float32 form meets a relative bound, so the float32 tolerance also admits a few
times the reference loop's own float32 error, measured against the same loop in float64. (At L = 1 the
attention normaliser makes the read scale-invariant up to eps, so the key gradients are nothing but such
cancellation, in float64 too: the memory-level comparison starts at L = 2; the rules' forms are checked at
L = 1 below.) Forms with hand-written backwards also pass ``gradcheck`` in float64.

Every registered memory also meets the contract (float64 forward == reference at L up to 37, and more):
test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import retrieval_bench as rb
from retrieval_bench.feature_maps import DPFP, FavorPlus
from retrieval_bench.memories import checkpointed
from retrieval_bench.memories.checkpointed import fwm_peak_states, fwm_segments, fwm_state
from retrieval_bench.memories.chunked import (
    chunk_length,
    delta_chunkwise,
    delta_query_read,
    mark_one_hot,
    one_hot_ids,
    sum_read,
    unit_triangular_inverse,
)
from retrieval_bench.memories.normalisations import (
    EPS,
    l2_norm,
    l2_norm_reference,
    sum_norm,
    sum_norm_reference,
)
from retrieval_bench.memories.rules import DeltaRule, FWMRule, delta_query_read_stepwise

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def assert_rel(fast: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "", ref_error: float = 0.0):
    """max |fast - ref| <= rtol · max |ref| + 4 · ref_error (a floor of 1e-6 on the scale, for tensors that
    are ~0 everywhere); ``ref_error`` is the reference's own rounding error where it is known."""
    assert fast.shape == ref.shape, what
    err = (fast - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-6)
    assert err <= rtol * scale + 4 * ref_error, (
        f"{what}: max abs diff {err:.3e} > {rtol:.0e} x {scale:.3e} + 4 x {ref_error:.1e}")


def grads(y: torch.Tensor, leaves: list[torch.Tensor], cot: torch.Tensor) -> tuple:
    return torch.autograd.grad(y, leaves, cot, allow_unused=True)


def inputs(b, l, k, v, q, dtype, key_scale=1.0):
    g = torch.Generator().manual_seed(l * 1000 + k)
    keys = (key_scale * torch.randn(b, l, k, generator=g, dtype=dtype)).requires_grad_()
    values = torch.randn(b, l, v, generator=g, dtype=dtype).requires_grad_()
    betas = torch.sigmoid(torch.randn(b, l, generator=g, dtype=dtype)).requires_grad_()
    queries = (key_scale * torch.randn(b, q, k, generator=g, dtype=dtype)).requires_grad_()
    return keys, values, betas, queries


# Memories whose training form is a fast form here, with keys scaled so the reference itself is well
# conditioned: unnormalised features with |φ|² β > 2 make the delta recursion expand exponentially, and
# then both forms are only as exact as the float format allows.
SPECS = [
    ("softmax", 1.0), ("dpfp-1/sum", 1.0), ("dpfp-3/sum", 1.0), ("linear/sum/sum", 1.0),
    ("linear/sum/none", 1.0), ("favor-8/sum", 0.5), ("dpfp-1/delta", 1.0), ("dpfp-2/delta", 1.0),
    ("linear/delta", 1.0), ("linear/sum", 1.0), ("linear/delta/sum+attn", 1.0), ("dpfp-1/delta/l2", 1.0),
    ("dpfp-2/delta/sum+attn", 1.0), ("linear/delta/attn", 1.0), ("linear/delta/l2", 1.0),
    ("identity/delta/none", 0.15), ("favor-8/delta", 0.5), ("tanh/fwm", 1.0), ("dpfp-1/fwm", 1.0),
]


@pytest.mark.parametrize("spec,key_scale", SPECS, ids=[s for s, _ in SPECS])
@pytest.mark.parametrize("l", [2, 7, 37, 120], ids=lambda l: f"L{l}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_form_equals_reference_loop(spec, key_scale, l, dtype):
    mem = rb.memory(spec, d_key=6)
    leaves = list(inputs(2, l, 6, 5, 2, dtype, key_scale))

    def run(form, xs):
        if isinstance(mem, rb.FastWeightMemory):
            mem.phi.seed(3)  # FAVOR+ redraws Ω every call: the same draw for both forms
        y = form(*xs)
        return [y, *grads(y, xs, cot.to(y.dtype))]

    cot = torch.randn(2, 2, 5, dtype=torch.float64)
    fast, ref = run(mem.forward, leaves), run(mem.reference, leaves)
    names = ("output", "keys", "values", "betas", "queries")
    ref_err = [0.0] * len(ref)
    if dtype == torch.float32:  # the reference's own float32 error, for the ill-conditioned cases
        ref64 = run(mem.reference, [x.detach().double().requires_grad_() for x in leaves])
        ref_err = [0.0 if r is None else (r.double() - r64).abs().max().item()
                   for r, r64 in zip(ref, ref64, strict=True)]
        for name, f, r64, e in zip(names, fast, ref64, ref_err, strict=True):
            if f is not None:  # and the fast form is no less accurate than the reference loop
                assert_rel(f.double(), r64, RTOL[dtype], f"{name} vs float64", e / 2)
    for name, f, r, e in zip(names, fast, ref, ref_err, strict=True):
        assert (f is None) == (r is None), name
        if f is not None:
            assert_rel(f, r, RTOL[dtype], name, e)


EVAL_SPECS = ["linear/delta", "dpfp-1/delta", "linear/delta/sum+attn", "linear/delta/l2", "dpfp-2/delta/l2",
              "identity/delta/l2", "tanh/fwm"]


@pytest.mark.parametrize("spec", EVAL_SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluation_form_equals_reference_loop(spec, dtype):
    """Under no_grad with more queries than values the delta rule builds W chunkwise instead (two chunks of
    64 here); and each query read alone (the training form's path) agrees too."""
    mem = rb.memory(spec, d_key=8)
    keys, values, betas, queries = (x.detach() for x in inputs(3, 100, 8, 4, 9, dtype))
    with torch.no_grad():
        y = mem(keys, values, betas, queries)
        y_ref = mem.reference(keys, values, betas, queries)
        y_one = torch.cat([mem(keys, values, betas, queries[:, i : i + 1]) for i in range(9)], 1)
    assert_rel(y, y_ref, RTOL[dtype], "all queries at once")
    assert_rel(y_one, y_ref, RTOL[dtype], "one query at a time")


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



# ---------------------------------------------------------------------------------------------------- delta
def _features(b, l, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return sum_norm(torch.rand(b, l, f, generator=g, dtype=dtype) + 0.05)


@pytest.mark.parametrize("l,chunk", [(1, 16), (5, 16), (37, 8), (48, 16), (61, 24), (120, 32), (40, 1)],
                         ids=lambda p: str(p))
@pytest.mark.parametrize("read_scale", [False, True], ids=["plain", "rho"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_query_read_equals_the_plain_backward_loop(l, chunk, read_scale, dtype):
    """Chunked, hand-differentiated query read == the per-step loop with autograd (a different exact form)."""
    a = _features(2, l, 10, dtype, l).requires_grad_()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, l, 4, generator=g, dtype=dtype).requires_grad_()
    beta = torch.rand(2, l, generator=g, dtype=dtype).requires_grad_()
    q = _features(2, 3, 10, dtype, 99).requires_grad_()
    rho = (0.5 + torch.rand(2, l, generator=g, dtype=dtype)).requires_grad_() if read_scale else None
    leaves = [a, v, beta, q] + ([rho] if read_scale else [])
    y = delta_query_read(a, v, beta, q, rho, chunk=chunk)
    y_ref = delta_query_read_stepwise(a, a * rho[..., None] if read_scale else a, v, beta, q)
    assert_rel(y, y_ref, RTOL[dtype])
    cot = torch.randn_like(y)
    for x, g_fast, g_ref in zip(leaves, grads(y, leaves, cot), grads(y_ref, leaves, cot), strict=True):
        assert_rel(g_fast, torch.zeros_like(x) if g_ref is None else g_ref, RTOL[dtype])  # None: unused


def test_delta_query_read_gradcheck():
    a = _features(1, 5, 3, torch.float64, 0).requires_grad_()
    v = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(1, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    rho = (torch.rand(1, 5, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: delta_query_read(*x, chunk=2), (a, v, beta, q, rho))


def _step_reads(rule, k, v, beta, q_all, attn=False):
    """Reads y_t = W_t q_t at every position by the rule's own step function (the spec)."""
    B, L, F = k.shape
    state = rule.init_state(B, v.shape[-1], F, k, attn)
    ys = []
    for t in range(L):
        state, _ = rule.step(state, k[:, t], v[:, t], {"beta": beta[:, t]}, t, attn)
        ys.append((state["W"] * q_all[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("l,chunk", [(1, 64), (30, 64), (64, 64), (100, 64), (77, 16), (50, 7)],
                         ids=lambda p: str(p))
@pytest.mark.parametrize("attn", [False, True], ids=["plain", "attn-key"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_chunkwise_equals_step_recurrence(l, chunk, attn, dtype):
    """Every position's read, the final state and the gradients of the WY/UT chunkwise form (Yang et al.
    2024) equal the step-by-step recurrence; with ``attn`` the read key is k_t / c_t (PAPER §1.5)."""
    rule = DeltaRule()
    k = _features(2, l, 12, dtype, l).requires_grad_()
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, l, 5, generator=g, dtype=dtype).requires_grad_()
    beta = torch.rand(2, l, generator=g, dtype=dtype).requires_grad_()
    q = _features(2, l, 12, dtype, 7).requires_grad_()
    y_ref, state = _step_reads(rule, k, v, beta, q, attn)
    if attn:
        from retrieval_bench.memories.rules import attn_key_denominators

        y, W = delta_chunkwise(k, v, beta, q, chunk=chunk, read_k=k / attn_key_denominators(k)[..., None])
    else:
        y, W = delta_chunkwise(k, v, beta, q, chunk=chunk)
    rtol = RTOL[dtype]
    assert_rel(y, y_ref, rtol, "reads")
    assert_rel(W, state["W"], rtol, "final state")
    cot = torch.randn_like(y)
    for g_fast, g_ref in zip(grads(y, [k, v, beta, q], cot), grads(y_ref, [k, v, beta, q], cot), strict=True):
        assert_rel(g_fast, g_ref, rtol, "grad")


def test_delta_chunkwise_continues_from_an_initial_state():
    k, q = _features(2, 40, 8, torch.float64, 0), _features(2, 40, 8, torch.float64, 1)
    v, beta = torch.randn(2, 40, 3, dtype=torch.float64), torch.rand(2, 40, dtype=torch.float64)
    y_all, W_all = delta_chunkwise(k, v, beta, q, chunk=16)
    _, W_half = delta_chunkwise(k[:, :25], v[:, :25], beta[:, :25], None, chunk=16)
    y_rest, W_rest = delta_chunkwise(k[:, 25:], v[:, 25:], beta[:, 25:], q[:, 25:], chunk=16,
                                     initial_state=W_half)
    assert_rel(y_rest, y_all[:, 25:], 1e-12)
    assert_rel(W_rest, W_all, 1e-12)


def test_delta_chunkwise_is_accurate_with_large_correlated_keys():
    """l2-normalised positive keys with β near 1 make the UT system's powers explode; the inverse must not."""
    k = F.normalize(torch.rand(2, 64, 8) + 2.0, dim=-1)
    v, beta = torch.randn(2, 64, 3), 0.5 + 0.5 * torch.rand(2, 64)
    y, W = delta_chunkwise(k, v, beta, k, chunk=64)
    y_ref, state = _step_reads(DeltaRule(), k.double(), v.double(), beta.double(), k.double())
    assert_rel(y.double(), y_ref, 1e-5)
    assert_rel(W.double(), state["W"], 1e-5)


@pytest.mark.parametrize("upper", [False, True])
def test_unit_triangular_inverse(upper):
    N = torch.randn(5, 9, 9, dtype=torch.float64)
    N = N.triu(1) if upper else N.tril(-1)
    T = unit_triangular_inverse(N, upper)
    torch.testing.assert_close(T @ (torch.eye(9, dtype=torch.float64) + N), torch.eye(9, dtype=torch.float64)
                               .expand(5, 9, 9), atol=1e-12, rtol=0)


def test_chunk_length_prefers_divisors_that_are_multiples_of_8():
    assert chunk_length(600, 16) == 8  # 16 does not divide 600; 8 does
    assert chunk_length(600, 32) == 24
    assert chunk_length(400, 16) == 16
    assert chunk_length(37, 16) == 16  # no divisor in range: pad
    assert chunk_length(5, 16) == 5
    assert chunk_length(1, 8) == 1


# ---------------------------------------------------------------------------------------------------- sum
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_sum_read_equals_explicit_state(q, eps):
    a = torch.rand(2, 30, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 30, 4, dtype=torch.float64, requires_grad=True)
    qq = torch.rand(2, q, 7, dtype=torch.float64, requires_grad=True)
    W = torch.einsum("blv,blf->bvf", v, a)
    y_ref = qq @ W.transpose(1, 2)
    if eps is not None:
        y_ref = y_ref / ((qq * a.sum(1)[:, None]).sum(-1, keepdim=True) + eps)
    y = sum_read(a, v, qq, eps)
    assert_rel(y, y_ref, 1e-12)
    cot = torch.randn_like(y)
    for g, g_ref in zip(grads(y, [a, v, qq], cot), grads(y_ref, [a, v, qq], cot), strict=True):
        assert_rel(g, g_ref, 1e-12)


# ---------------------------------------------------------------------------------------------------- FWM
def test_fwm_segments_cover_the_sequence_and_bound_the_live_states():
    for L in (1, 2, 3, 7, 120, 600, 1000):
        for levels in (1, 2):
            sizes = fwm_segments(L, levels)
            assert sum(sizes) == L and all(s >= 1 for s in sizes)
            assert sizes == sorted(sizes, reverse=True)
        # live states while the backward does segment i: checkpoints 0..i plus the segment's working states
        one = fwm_segments(L)
        assert max(i + 1 + s for i, s in enumerate(one)) <= fwm_peak_states(L) <= math.sqrt(2 * L) + 2
        two = fwm_segments(L, 2)
        assert max(i + fwm_peak_states(s) for i, s in enumerate(two)) <= fwm_peak_states(L, 2)
    assert fwm_peak_states(600, 2) <= 16 < fwm_peak_states(600) <= 36


@pytest.mark.parametrize("l", [1, 2, 40, 120])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [1, 2])
def test_fwm_state_equals_the_loop_and_allows_a_second_backward(l, dtype, levels, monkeypatch):
    if levels == 2:  # a zero budget makes every state "large": two levels of checkpoints
        monkeypatch.setattr(checkpointed, "FWM_STATE_BUDGET", 0)
    rule = FWMRule()
    a = torch.tanh(2 * torch.randn(2, l, 6, dtype=dtype)).requires_grad_()
    v = torch.randn(2, l, 5, dtype=dtype, requires_grad=True)
    beta = torch.rand(2, l, dtype=dtype, requires_grad=True)
    state = rule.init_state(2, 5, 6, a, False)
    for t in range(l):
        state, _ = rule.step(state, a[:, t], v[:, t], {"beta": beta[:, t]}, t, False)
    W = fwm_state(a, v, beta)
    assert_rel(W, state["W"], RTOL[dtype])
    cot = torch.randn_like(W)
    g_ref = grads(state["W"], [a, v, beta], cot)
    g1 = torch.autograd.grad(W, [a, v, beta], cot, retain_graph=True)
    g2 = torch.autograd.grad(W, [a, v, beta], cot)  # recomputes the checkpoints it released
    for x, y, z in zip(g1, g2, g_ref, strict=True):
        assert_rel(x, z, RTOL[dtype])
        assert torch.equal(x, y)
    with torch.no_grad():
        assert torch.equal(fwm_state(a, v, beta), W.detach())


def test_fwm_gradcheck():
    a = torch.tanh(torch.randn(1, 5, 3, dtype=torch.float64)).requires_grad_()
    v = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fwm_state, (a, v, beta))


# ---------------------------------------------------------------------------------------------------- key norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm, reference, signed", [(sum_norm, sum_norm_reference, False),
                                                     (l2_norm, l2_norm_reference, False),
                                                     (l2_norm, l2_norm_reference, True)],
                         ids=["sum", "l2", "l2-signed"])
def test_key_normalisation_equals_its_formula(norm, reference, signed, dtype):
    """Outputs and gradients, with the rows the eps guards: an all-zero φ (DPFP, PAPER §1.6) and, for l2, a row
    whose norm is below eps (the clamp holds the divisor constant there)."""
    g = torch.Generator().manual_seed(7)
    phi = torch.rand(3, 9, 11, generator=g, dtype=dtype) + 0.01
    phi = phi * torch.randn(3, 9, 11, generator=g, dtype=dtype).sign() if signed else phi
    phi[0, 2] = 0.0
    phi[1, 4] *= 0.5 * EPS / phi[1, 4].norm()  # ‖φ‖ = eps / 2: the clamp holds, and φ / eps is far from 0
    phi.requires_grad_()
    cot = torch.randn(3, 9, 11, generator=g, dtype=dtype)
    y, y_ref = norm(phi), reference(phi)
    (d_phi,), (d_ref,) = grads(y, [phi], cot), grads(y_ref, [phi], cot)
    # the guarded rows' gradients (about g / eps) are compared on their own, so their size sets no tolerance
    # for the ordinary rows
    guarded = torch.zeros(3, 9, dtype=torch.bool)
    guarded[0, 2] = guarded[1, 4] = True
    for rows, what in ((~guarded, "ordinary rows"), (guarded, "guarded rows")):
        assert_rel(y[rows], y_ref[rows], RTOL[dtype], f"output, {what}")
        assert_rel(d_phi[rows], d_ref[rows], RTOL[dtype], f"∂φ, {what}")
    assert (y[0, 2] == 0).all() and (d_phi[0, 2] != 0).all()  # a zero row reads g / eps: guarded, not lost


@pytest.mark.parametrize("norm", [sum_norm, l2_norm], ids=["sum", "l2"])
def test_key_normalisation_gradcheck_and_no_silent_second_derivative(norm):
    phi = (torch.rand(2, 3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(norm, (phi,))
    (g,) = torch.autograd.grad(norm(phi).pow(2).sum(), phi, create_graph=True)
    with pytest.raises(RuntimeError):  # the hand-written backward is once differentiable: it says so
        g.sum().backward()


def test_l2_normalisation_passes_the_gradient_where_the_norm_equals_eps():
    """At ‖φ‖ = eps exactly the clamp is inactive for torch's clamp_min: the plain formula's gradient, not g/eps."""
    phi = torch.zeros(1, 4, dtype=torch.float64)
    phi[0, 0] = EPS
    phi.requires_grad_()
    cot = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    (d_phi,), (d_ref,) = grads(l2_norm(phi), [phi], cot), grads(l2_norm_reference(phi), [phi], cot)
    torch.testing.assert_close(d_phi, d_ref, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------------------------------- φ
def _dpfp_formula(x, n):
    u = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, n + 1)], dim=-1)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dpfp_custom_backward_equals_the_formula(n, dtype):
    x = torch.randn(2, 9, 8, dtype=dtype)
    x[0, 0, :3] = 0.0  # relu's kink: both give gradient 0 there
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = DPFP(n)(x1), _dpfp_formula(x2, n)
    assert torch.equal(y, y_ref)  # the same products in the same order
    cot = torch.randn_like(y)
    assert_rel(torch.autograd.grad(y, x1, cot)[0], torch.autograd.grad(y_ref, x2, cot)[0], RTOL[dtype])


def _favor_formula(fm, x):
    proj = x @ fm.omega.to(x.dtype)
    half_sq = 0.5 * (x * x).sum(-1, keepdim=True)
    scale = 1.0 / math.sqrt(2 * fm.m)
    return scale * torch.cat([torch.exp(proj - half_sq), torch.exp(-proj - half_sq)], -1)


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0], ids=["small", "large", "underflow"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_favor_custom_function_equals_the_formula(scale, dtype):
    """Including inputs so large that exp underflows (the fast path skips exp there, exactly)."""
    fm = FavorPlus(16, redraw="fixed")
    fm.begin_call(8, dtype=dtype)
    x = scale * torch.randn(3, 20, 8, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = fm(x1), _favor_formula(fm, x2)
    assert torch.equal(y, y_ref)
    cot = torch.randn_like(y)
    assert_rel(torch.autograd.grad(y, x1, cot)[0], torch.autograd.grad(y_ref, x2, cot)[0], RTOL[dtype])


def test_exp_is_exactly_zero_where_favor_skips_it():
    z = torch.linspace(-140.0, -100.0, 400_001)
    assert (torch.exp(z[z <= -104.0]) == 0).all()


# ---------------------------------------------------------------------------------------------------- one-hot values
@pytest.mark.parametrize("rule", ["sum", "sum+attn", "delta", "delta+attn"])
@pytest.mark.parametrize("repeats", [False, True], ids=["permutation", "repeats"])
def test_one_hot_values_read_by_id_equal_the_dense_read(rule, repeats):
    """The model marks its one-hot values with their ids; the fast forms then gather/scatter by id."""
    B, L, V, F_ = 3, 37, 40, 9
    g = torch.Generator().manual_seed(5)
    ids = (torch.randint(0, 5, (B, L), generator=g) if repeats
           else torch.stack([torch.randperm(V, generator=g)[:L] for _ in range(B)]))
    a = _features(B, L, F_, torch.float64, 3).requires_grad_()
    beta = torch.rand(B, L, generator=g, dtype=torch.float64).requires_grad_()
    q = _features(B, 1, F_, torch.float64, 4).requires_grad_()
    name, _, attn = rule.partition("+")
    mem_rule = rb.update_rule(name)

    def read(v):
        gates = {"beta": beta} if name == "delta" else {}
        return mem_rule.forward(a, v, q, gates, attn == "attn")

    dense = F.one_hot(ids, V).double()
    marked = mark_one_hot(dense.clone(), ids)
    assert one_hot_ids(marked) is ids and one_hot_ids(dense) is None
    y, y_ref = read(marked), read(dense)
    leaves = [a, q] + ([beta] if name == "delta" else [])
    cot = torch.randn_like(y)
    assert_rel(y, y_ref, 1e-12)
    for g_fast, g_ref in zip(grads(y, leaves, cot), grads(y_ref, leaves, cot), strict=True):
        assert_rel(g_fast, g_ref, 1e-12)


def test_one_hot_mark_is_dropped_by_an_in_place_change():
    ids = torch.tensor([[0, 2, 1]])
    v = mark_one_hot(F.one_hot(ids, 3).float(), ids)
    v.mul_(2.0)
    assert one_hot_ids(v) is None
    a, q = torch.rand(1, 3, 4), torch.rand(1, 1, 4)
    torch.testing.assert_close(sum_read(a, v, q), (q @ a.transpose(1, 2)) @ v)


def test_model_marks_its_one_hot_values():
    model = rb.RetrievalModel(6, "dpfp-1/delta", d_key=4)
    keys, values = torch.stack([torch.randperm(6) for _ in range(2)]), torch.stack([torch.randperm(6)
                                                                                     for _ in range(2)])
    _, v, _, _, _ = model.inputs(keys, values, keys[:, :1])
    assert torch.equal(one_hot_ids(v), values)
    assert torch.equal(v, F.one_hot(values, 6).float())
