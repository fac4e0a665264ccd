"""The contract of a memory's all-positions causal form, to call from a plugin's own tests (DESIGN §9).

    memory.causal(keys (B, T, K), values (B, T, V), queries (B, T, K), betas (B, T), **gates (B, T)) -> (B, T, V)

Position t writes (k_t, v_t) and is then read with q_t. Usage, in any test runner::

    from retrieval_bench.testing import check_causal

    def test_my_memory_causal():
        check_causal("dpfp-1/my-rule")        # or a registered memory's name, or a Memory instance

Every failure is an ``AssertionError`` naming the memory, the check and the case, e.g.
``dpfp-1/my-rule: causal reference [B1-T37-K4-V3, float64]: d/d keys differ ...``. Nothing here imports pytest.
Random feature maps (FAVOR+) are reseeded before every call, so the calls of one check share one draw; the global
torch RNG is left as it was found. A memory or rule with no fast form of its own passes (its slow form is its
spec), with its ``SlowCausalFormWarning`` silenced here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..memories import Memory, memory
from ..memories.causal import SlowCausalFormWarning
from ._base import gate_shape
from ._base import reseed as _reseed

CausalShape = tuple[int, int, int, int]  # (B, T, K, V)


def default_causal_shapes(d_key: int) -> list[CausalShape]:
    """(B, T, K, V) cases: T = 1, K ≠ V both ways, another K, and T = 37 with K = V (as in a model), several
    chunks of the check's chunk length 8 with a ragged last one."""
    return [(2, 1, d_key, d_key + 1), (2, 6, d_key, 2), (3, 11, d_key + 2, 3), (1, 37, d_key, d_key)]


def _sid(shape: CausalShape) -> str:
    return "B{}-T{}-K{}-V{}".format(*shape)


class _Fail:
    def __init__(self, label: str):
        self.label = label

    def __call__(self, check: str, detail: str) -> AssertionError:
        return AssertionError(f"{self.label}: {check}: {detail}")

    def close(self, check: str, actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float,
              rtol: float) -> None:
        """max |actual - expected| <= atol + rtol · max |expected|: relative to the tensor's scale, since a
        memory whose state grows (identity features, no normalisation) has entries of very different sizes."""
        if actual.shape != expected.shape:
            raise self(check, f"{what}: shapes differ, {tuple(actual.shape)} against {tuple(expected.shape)}")
        if actual.numel() == 0:
            return
        err = (actual - expected).abs().max().item()
        scale = expected.abs().max().item()
        if not err <= atol + rtol * scale:  # also catches NaN
            raise self(check, f"{what} differ: max abs diff {err:.3e} > {atol:.0e} + {rtol:.0e} x {scale:.3e}")


def _inputs(mem: nn.Module, shape: CausalShape, dtype: torch.dtype, g: torch.Generator):
    """Random leaves as a model makes them: keys, values, queries, betas (where the memory has a beta gate)
    and its other gates in (0, 1), (B, T) or (B, T, F) for a width-F gate. Returns (keys, values, queries,
    betas, gates, named leaves)."""
    B, T, K, V = shape
    keys = torch.randn(B, T, K, generator=g, dtype=dtype)
    values = torch.randn(B, T, V, generator=g, dtype=dtype)
    queries = torch.randn(B, T, K, generator=g, dtype=dtype)
    gates = {n: torch.sigmoid(torch.randn(gate_shape(mem, n, B, T, K), generator=g, dtype=dtype))
             for n in getattr(mem, "gates", ())}
    betas = gates.pop("beta", None)
    leaves = {"keys": keys, "values": values, "queries": queries,
              **({"betas": betas} if betas is not None else {}), **{f"gate {n!r}": t for n, t in gates.items()}}
    for t in leaves.values():
        t.requires_grad_(True)
    return keys, values, queries, betas, gates, leaves


def _run(mem: nn.Module, fn, keys, values, queries, betas, gates) -> torch.Tensor:
    _reseed(mem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowCausalFormWarning)
        return fn(keys, values, queries, betas, **gates)


def check_causal(memory_or_spec: str | Memory, d_key: int = 4, *, shapes: Sequence[CausalShape] | None = None,
                 chunk: int = 8, atol: float = 1e-10, rtol: float = 1e-10, **memory_kwargs: Any) -> None:
    """Check ``memory.causal``; raise AssertionError naming the memory, the check and the case.

    For every (B, T, K, V) in ``shapes`` (default ``default_causal_shapes(d_key)``):

    * ``causal``: in float32 the output is (B, T, V), float32, finite, with finite gradients on keys, values
      and queries (required), betas, every declared gate and every parameter;
    * ``causal reference`` (float64): ``causal`` equals ``causal_reference`` (the reference loop's step with a
      read after every step; reads of every prefix for a memory without one) in outputs and in the gradients of
      every input and parameter, to ``atol + rtol · max|reference|``;
    * ``last position`` (float64): the read at T equals ``forward`` with the last query, the read after all
      writes (the two forms of the contract agree);
    * ``causality`` (float64): new keys, values, queries and gates after position t = T // 2 leave every
      output at or before t unchanged, and the output at t + 1 changes.

    Args:
        memory_or_spec: a spec string or registered name, built per key width with ``retrieval_bench.memory``;
            or a Memory instance (copied, never changed), used with K = ``d_key``.
        d_key: K of the default shapes. shapes: (B, T, K, V) cases.
        chunk: chunk length of chunked forms during the check (a memory's ``causal_chunk``), small so that the
            default T = 37 spans several chunks and a ragged last one.
        atol, rtol: tolerance of the float64 comparisons.
        **memory_kwargs: to ``retrieval_bench.memory`` (e.g. ``redraw="fixed"`` for FAVOR+).
    """
    if isinstance(memory_or_spec, str):
        label = memory_or_spec
    else:
        label = getattr(memory_or_spec, "spec_name", None) or type(memory_or_spec).__name__
    fail = _Fail(label)
    shapes = list(shapes) if shapes is not None else default_causal_shapes(d_key)
    if not isinstance(memory_or_spec, str):
        shapes = [(B, T, d_key, V) for B, T, _, V in shapes]
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(4321)
        for shape in shapes:
            K = shape[2]
            try:
                mem = (memory(memory_or_spec, d_key=K, **memory_kwargs) if isinstance(memory_or_spec, str)
                       else copy.deepcopy(memory_or_spec))
            except Exception as e:
                raise fail("build", f"memory({memory_or_spec!r}, d_key={K}) raised {type(e).__name__}: {e}") from e
            if hasattr(mem, "causal_chunk"):
                mem.causal_chunk = chunk
            try:
                _check_shape(fail, mem, shape, g, atol, rtol)
            except AssertionError:
                raise
            except Exception as e:  # a backward that fails, say: still name the memory and the case
                raise fail(f"[{_sid(shape)}]", f"raised {type(e).__name__}: {e}") from e


def _grads(y, leaves: dict, params: dict, cot) -> dict:
    wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
    grads = torch.autograd.grad(y, list(wrt.values()), cot, allow_unused=True)
    return {name: torch.zeros_like(wrt[name]) if gr is None else gr
            for name, gr in zip(wrt, grads, strict=True)}


def _check_shape(fail: _Fail, mem: nn.Module, shape: CausalShape, g: torch.Generator, atol: float,
                 rtol: float) -> None:
    B, T, K, V = shape
    sid = _sid(shape)
    mem.train()
    # float32: shape, dtype, finite output and gradients, as training runs it
    mem32 = mem.to(torch.float32)
    keys, values, queries, betas, gates, leaves = _inputs(mem32, shape, torch.float32, g)
    check = f"causal [{sid}]"
    try:
        y = _run(mem32, mem32.causal, keys, values, queries, betas, gates)
    except Exception as e:
        raise fail(check, f"raised {type(e).__name__}: {e}") from e
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (B, T, V) or y.dtype != torch.float32:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise fail(check, f"expected a float32 (B, T, V) = {(B, T, V)} output, got {got}")
    if not torch.isfinite(y).all():
        raise fail(check, "non-finite output")
    params = {n: p for n, p in mem32.named_parameters() if p.requires_grad}
    wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
    grads = torch.autograd.grad(y, list(wrt.values()), torch.randn(y.shape, generator=g), allow_unused=True)
    for what, gr in zip(wrt, grads, strict=True):
        if gr is None and what in ("keys", "values", "queries") and T > 1:
            raise fail(check, f"no gradient reaches {what}")
        if gr is not None and not torch.isfinite(gr).all():
            raise fail(check, f"d/d {what} is not finite")

    # float64: the fast form against its spec, outputs and gradients
    mem64 = mem.to(torch.float64)
    keys, values, queries, betas, gates, leaves = _inputs(mem64, shape, torch.float64, g)
    params = {n: p for n, p in mem64.named_parameters() if p.requires_grad}
    y = _run(mem64, mem64.causal, keys, values, queries, betas, gates)
    check = f"causal reference [{sid}, float64]"
    try:
        y_ref = _run(mem64, mem64.causal_reference, keys, values, queries, betas, gates)
    except Exception as e:
        raise fail(check, f"causal_reference raised {type(e).__name__}: {e}") from e
    fail.close(check, y, y_ref, "outputs of causal and causal_reference", atol, rtol)
    cot = torch.randn(y.shape, generator=g, dtype=torch.float64)
    fast, ref = _grads(y, leaves, params, cot), _grads(y_ref, leaves, params, cot)
    for what in fast:
        fail.close(check, fast[what], ref[what], f"d/d {what} of causal and causal_reference", atol, rtol)

    with torch.no_grad():
        _reseed(mem64)
        last = mem64(keys, values, betas, queries[:, -1:], **gates)
        fail.close(f"last position [{sid}, float64]", y[:, -1:].detach(), last,
                   "the read at T and forward's read after all writes", atol, rtol)
        if T > 1:
            t = (T - 1) // 2
            later = slice(t + 1, T)
            changed = [x.detach().clone() for x in (keys, values, queries)]
            new_gates = {n: x.detach().clone() for n, x in gates.items()}
            new_betas = None if betas is None else betas.detach().clone()
            for x in changed:
                x[:, later] = torch.randn(x[:, later].shape, generator=g, dtype=x.dtype)
            for x in [*new_gates.values(), *([] if new_betas is None else [new_betas])]:  # gates stay in (0, 1)
                x[:, later] = torch.sigmoid(torch.randn(x[:, later].shape, generator=g, dtype=x.dtype))
            y2 = _run(mem64, mem64.causal, *changed, new_betas, new_gates)
            fail.close(f"causality [{sid}, float64]", y2[:, : t + 1], y[:, : t + 1].detach(),
                       f"outputs at positions <= {t} before and after changing the inputs after {t}", atol, rtol)
            if torch.equal(y2[:, t + 1], y[:, t + 1].detach()):
                raise fail(f"causality [{sid}, float64]",
                           f"changing the inputs at position {t + 1} left its output unchanged")
