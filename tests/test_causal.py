"""The all-positions causal forms (memories/causal.py) equal their spec, the rule's step with a read after every
step, in outputs and gradients; the contract check (testing.check_causal) holds for every registered
memory and catches broken forms; plugins without a causal form still work, slowly and with a warning.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from fake_plugin import Fake, FakeMemory  # tests/ is on sys.path (pytest rootdir-relative import)

import retrieval_bench as rb
from retrieval_bench import registry
from retrieval_bench.memories import SoftmaxMemory, causal
from retrieval_bench.memories.causal import (
    SlowCausalFormWarning,
    causal_loop,
    delta_causal,
    prefix_reads,
    softmax_causal,
    softmax_causal_reference,
    sum_causal,
)
from retrieval_bench.memories.normalisations import EPS, l2_norm, sum_norm
from retrieval_bench.memories.rules import DeltaRule, SumRule
from retrieval_bench.testing import check_causal


def test_check_causal(memory_spec):
    """Every registered memory (plugins included): fast form = spec in float64 (outputs and gradients of keys,
    values, queries, betas, gates), the last read = forward's read, causality; T = 37 spans 5 chunks of 8."""
    check_causal(memory_spec)


def assert_rel(fast, ref, rtol, what="", atol=1e-14):
    """max |fast - ref| <= rtol · max |ref| + atol. (With the attention normaliser at T = 1 the read is
    scale-invariant up to eps, so the key gradients are ~1e-8 and pure cancellation: atol covers them.)"""
    err = (fast - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max abs diff {err:.3e} > {rtol:.0e} x {scale:.3e} + {atol:.0e}"


def _features(B, T, Fd, V, dtype, norm):
    """Features as the memories make them: elu+1 of random keys and queries, normalised; leaves with grad."""
    k = norm(torch.nn.functional.elu(torch.randn(B, T, Fd, dtype=dtype)) + 1).detach().requires_grad_()
    q = norm(torch.nn.functional.elu(torch.randn(B, T, Fd, dtype=dtype)) + 1).detach().requires_grad_()
    v = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    beta = torch.sigmoid(torch.randn(B, T, dtype=dtype)).requires_grad_()
    return k, v, q, beta


FORMS = [  # (rule, attn, normalisation of the features)
    pytest.param(SumRule(), False, sum_norm, id="sum"),
    pytest.param(SumRule(), True, lambda x: x, id="sum-attn"),
    pytest.param(SumRule(), True, l2_norm, id="sum-l2-attn"),
    pytest.param(DeltaRule(), False, sum_norm, id="delta"),
    pytest.param(DeltaRule(), True, sum_norm, id="delta-attn"),
    pytest.param(DeltaRule(), False, l2_norm, id="delta-l2"),
]
LENGTHS = [pytest.param(T, C, id=f"T{T}-C{C or 'default'}")
           for T, C in [(1, None), (150, None), (128, None), (13, 4), (9, 1)]]


def _fast(rule, k, v, q, beta, attn, chunk):
    if isinstance(rule, SumRule):
        return sum_causal(k, v, q, EPS if attn else None, chunk)
    return delta_causal(k, v, q, beta, attn, chunk)


@pytest.mark.parametrize("T,chunk", LENGTHS)
@pytest.mark.parametrize("rule,attn,norm", FORMS)
def test_chunked_forms_equal_the_loop_float64(rule, attn, norm, T, chunk):
    """At the default chunks (sum 128, delta 32; T = 150: full chunks and a ragged last one, T = 128: full
    chunks only) and at small ones."""
    k, v, q, beta = _features(2, T, 5, 3, torch.float64, norm)
    gates = {"beta": beta} if isinstance(rule, DeltaRule) else {}
    y = _fast(rule, k, v, q, beta, attn, chunk)
    y_ref = causal_loop(rule, k, v, q, gates, attn)
    assert_rel(y, y_ref, 1e-12, "outputs")
    cot = torch.randn_like(y)
    leaves = [k, v, q, beta]
    fast = torch.autograd.grad(y, leaves, cot, allow_unused=True)
    ref = torch.autograd.grad(y_ref, leaves, cot, allow_unused=True)
    for name, a, b in zip("kvqb", fast, ref, strict=True):
        if b is None:  # the sum rule has no β
            assert a is None or a.abs().max() == 0, name
            continue
        assert_rel(a, b, 1e-12, f"d/d {name}")


@pytest.mark.parametrize("rule,attn,norm", FORMS)
def test_chunked_forms_float32(rule, attn, norm):
    """In float32 at the default chunks, over several: within 1e-5 of the float64 loop (relative to its scale)."""
    k, v, q, beta = _features(2, 300, 8, 4, torch.float64, norm)
    gates = {"beta": beta} if isinstance(rule, DeltaRule) else {}
    y_ref = causal_loop(rule, k, v, q, gates, attn)
    y = _fast(rule, k.float(), v.float(), q.float(), beta.float(), attn, None)
    assert y.dtype == torch.float32
    assert_rel(y.double(), y_ref, 1e-5, "float32 outputs")


def test_softmax_causal_is_sdpa_with_the_memory_scaling():
    keys, values, queries = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, 3), torch.randn(2, 9, 4)
    values, queries = values.double(), queries.double()
    y = softmax_causal(keys, values, queries)
    assert_rel(y, softmax_causal_reference(keys, values, queries), 1e-12)
    # the read at t is forward's read of the first t + 1 writes: the same 1/√K scaling
    mem = SoftmaxMemory()
    for t in (0, 4, 8):
        assert_rel(y[:, t: t + 1], mem(keys[:, : t + 1], values[:, : t + 1], None, queries[:, t: t + 1]), 1e-12)


def test_a_position_reads_its_own_write():
    """Sum rule, one write: y_0 = v_0 (φ_0·q_0), not 0 (a read before the write)."""
    k, v, q = torch.ones(1, 1, 2), torch.full((1, 1, 1), 3.0), torch.ones(1, 1, 2)
    assert sum_causal(k, v, q).item() == pytest.approx(6.0)
    assert delta_causal(k / 2, v, q / 2, torch.ones(1, 1)).item() == pytest.approx(1.5)


# ---- the check catches broken forms ----------------------------------------------------------------------
class _ReadBeforeWrite(rb.FastWeightMemory):
    """y_t = W_{t-1} q_t: reads before its own write (PAPER §4 pitfall 12)."""

    def causal(self, keys, values, queries, betas=None, **gates):
        k, q = self.features(keys, queries)
        state = self.rule.init_state(k.shape[0], values.shape[-1], k.shape[-1], k, self.attn)
        ys = []
        for t in range(k.shape[1]):
            ys.append(self.rule.read(state, q[:, t: t + 1], self.attn))
            state, _ = self.rule.step(state, k[:, t], values[:, t], {}, t, self.attn)
        return torch.cat(ys, dim=1)


class _Unmasked(SoftmaxMemory):
    """Every position attends to every write, future ones included; its spec says the same."""

    def causal(self, keys, values, queries, betas=None, **gates):
        return self.forward(keys, values, None, queries)

    causal_reference = causal


class _DetachedBeta(rb.FastWeightMemory):
    """The right outputs, but no gradient to β."""

    def causal(self, keys, values, queries, betas=None, **gates):
        return super().causal(keys, values, queries, betas.detach(), **gates)


class _OtherScale(SoftmaxMemory):
    """A causal form and spec at 1/K, where forward scales by 1/√K."""

    def causal(self, keys, values, queries, betas=None, **gates):
        return softmax_causal(keys * keys.shape[-1] ** -0.5, values, queries)

    causal_reference = causal


def _fast_weight(cls, spec):
    s = rb.parse_spec(spec)
    return cls(rb.feature_map(s.phi), registry.update_rules.get(s.rule)(), s.norm, s.attn, spec=s)


@pytest.mark.parametrize("broken,check", [
    pytest.param(lambda: _fast_weight(_ReadBeforeWrite, "linear/sum/none"), "causal reference", id="read-first"),
    pytest.param(_Unmasked, "causality", id="unmasked"),
    pytest.param(lambda: _fast_weight(_DetachedBeta, "linear/delta"), "d/d betas", id="detached-beta"),
    pytest.param(_OtherScale, "last position", id="other-scale"),
])
def test_check_causal_catches(broken, check):
    with pytest.raises(AssertionError, match=check):
        check_causal(broken())


# ---- plugins ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(causal, "_warned", set())


def test_plugin_rule_without_causal_form_runs_the_loop_and_warns_once(scoped_registries, fresh_warnings):
    scoped_registries["update_rules"].register("fake", Fake)
    mem = rb.memory("linear/fake", d_key=3)
    keys, values, queries = torch.randn(2, 12, 3), torch.randn(2, 12, 2), torch.randn(2, 12, 3)
    betas, alpha = torch.rand(2, 12), torch.rand(2, 12)
    with pytest.warns(SlowCausalFormWarning, match="'fake' has no all-positions causal form"):
        y = mem.causal(keys, values, queries, betas, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowCausalFormWarning)  # once is enough
        y2 = mem.causal(keys, values, queries, betas, alpha=alpha)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(y, mem.causal_reference(keys, values, queries, betas, alpha=alpha))
    check_causal("linear/fake")


def test_plugin_rule_with_its_own_causal_form_is_used(scoped_registries, fresh_warnings):
    calls = []

    class FakeWithCausal(Fake):
        def causal(self, k, v, q, gates, attn):
            calls.append(k.shape)
            return causal_loop(self, k, v, q, gates, attn)

    scoped_registries["update_rules"].register("fake", FakeWithCausal)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowCausalFormWarning)
        check_causal("dpfp-1/fake")
    assert calls


def test_plugin_memory_without_causal_reads_every_prefix(fresh_warnings):
    mem = FakeMemory()
    keys, values, queries = torch.randn(2, 7, 3), torch.randn(2, 7, 2), torch.randn(2, 7, 3)
    with pytest.warns(SlowCausalFormWarning, match="FakeMemory has no all-positions causal form"):
        y = mem.causal(keys, values, queries)
    for t in range(7):
        torch.testing.assert_close(y[:, t], mem(keys[:, : t + 1], values[:, : t + 1], None, queries[:, t: t + 1])[:, 0])
    check_causal(FakeMemory(), d_key=3)


def test_a_subclass_that_changes_forward_alone_gets_its_prefix_reads(fresh_warnings):
    class Doubled(SoftmaxMemory):
        def forward(self, keys, values, betas=None, queries=None, **gates):
            return 2 * super().forward(keys, values, betas, queries)

    keys, values, queries = torch.randn(1, 5, 4), torch.randn(1, 5, 2), torch.randn(1, 5, 4)
    with pytest.warns(SlowCausalFormWarning):
        y = Doubled().causal(keys, values, queries)
    torch.testing.assert_close(y, 2 * softmax_causal(keys, values, queries))
    torch.testing.assert_close(y, prefix_reads(Doubled().forward, keys, values, queries))


# ---- memory and time -------------------------------------------------------------------------------------
def test_fwm_checkpointed_loop_equals_the_plain_loop():
    """FWM's causal form recomputes segments in its backward: the same gradients as the loop that stores all."""
    mem = rb.memory("dpfp-1/fwm", d_key=3).double()
    keys, values, queries = (torch.randn(2, 30, d, dtype=torch.float64, requires_grad=True) for d in (3, 4, 3))
    betas = torch.rand(2, 30, dtype=torch.float64, requires_grad=True)
    leaves = [keys, values, queries, betas]
    y = mem.causal(keys, values, queries, betas)
    y_ref = mem.causal_reference(keys, values, queries, betas)
    cot = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, cot), torch.autograd.grad(y_ref, leaves, cot), strict=True):
        assert_rel(a, b, 1e-12)
    assert math.isclose(y.sum().item(), y_ref.sum().item(), rel_tol=1e-12)


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["softmax", "linear/delta", "linear/sum"])
@pytest.mark.parametrize("field,bad", [
    pytest.param(field, {field: torch.randn(*shape)}, id=f"{field}{list(shape)}")
    for field, shape in [("queries", (2, 4, 3)), ("values", (2, 3, 2)), ("keys", (2, 4)), ("betas", (2, 3))]
])
def test_bad_shapes_name_the_field(spec, field, bad):
    args = dict(keys=torch.randn(2, 4, 4), values=torch.randn(2, 4, 2), queries=torch.randn(2, 4, 4),
                betas=torch.rand(2, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=f"causal: {field} must be"):
        rb.memory(spec, d_key=4).causal(**args)


@pytest.mark.parametrize("C", [1, 2, 5, 16, 37, 64])
def test_unit_lower_inverse(C):
    """(I + N)⁻¹ by recursive doubling equals the triangular solve, for sizes that are and are not powers of 2,
    with N as the delta rule makes it (β_i φ_i·φ_j below the diagonal, l2-normalised positive features)."""
    phi = l2_norm(torch.nn.functional.elu(torch.randn(3, 2, C, 8, dtype=torch.float64)) + 1)
    N = (torch.rand(3, 2, C, 1, dtype=torch.float64) * (phi @ phi.mT)).tril(-1)
    eye = torch.eye(C, dtype=torch.float64)
    X = causal.unit_lower_inverse(N)
    assert_rel(X, torch.linalg.solve_triangular(N + eye, eye.expand_as(N), upper=False), 1e-13)
    assert_rel(X @ (N + eye), eye.expand_as(N), 1e-13)
