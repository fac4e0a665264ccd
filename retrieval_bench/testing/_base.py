"""What every contract check shares: the cases, random inputs as the model makes them, and failures that name the
memory and the check."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..feature_maps import FeatureMap
from ..memories import Memory, memory
from ..memories.causal import gate_width
from ..memories.chunked import QUERY_CHUNK

Shape = tuple[int, int, int, int, int]  # (B, L, Q, K, V)

#: A sequence longer than two chunks of the chunked training form (``memories.chunked.QUERY_CHUNK`` steps per
#: chunk); odd, so no multiple of 8 divides it and ``chunk_length`` keeps the full chunk: the last one is padded.
LONG_SEQUENCE = 2 * QUERY_CHUNK + 5

#: Length of the evaluation-form check: with many queries and no autograd the delta rule builds W chunk by
#: chunk (``delta_chunkwise``, 64 steps per chunk), so 70 steps make two chunks, the last one short.
EVAL_SEQUENCE = 70

# Per-step trace entries the diagnostics read, and the trailing shape each must have after (B, L).
TRACE_PER_STEP = {"v_bar": "V", "v_new": "V", "v": "V", "state_norm": "", "normaliser": "",
                  "normaliser_l1": "", "beta": ""}

# Gradients that must reach their input in every case. A gate or a parameter may legitimately not enter an
# output (a decay at t = 1 acts on the empty state), so for those only finiteness is checked per case; that
# every declared gate does reach the output is checked over all the cases together.
REQUIRED_GRADS = ("keys", "values", "queries")


def default_shapes(d_key: int) -> list[Shape]:
    """(B, L, Q, K, V) cases: L = 1, K ≠ V both ways, K = V, several queries, another K, and L = 37
    (``LONG_SEQUENCE``): three chunks of the chunked training form's 16 steps, the last one padded."""
    return [(2, 1, 1, d_key, d_key + 1), (2, 6, 3, d_key, 2), (1, 9, 2, d_key, d_key),
            (3, 5, 2, d_key + 2, 3), (1, LONG_SEQUENCE, 2, d_key, 3)]


def short_shapes(d_key: int) -> list[Shape]:
    """Fewer, shorter cases for sweeps over many compositions."""
    return [(2, 1, 1, d_key, d_key + 1), (2, 7, 3, d_key, 2)]


def shape_id(shape: Shape) -> str:
    return "B{}-L{}-Q{}-K{}-V{}".format(*shape)


class Checker:
    """Builds the memory under test and raises AssertionErrors that name it and the check."""

    def __init__(self, spec_or_memory: str | Memory, d_key: int, memory_kwargs: dict[str, Any]):
        self.spec = spec_or_memory if isinstance(spec_or_memory, str) else None
        self.instance = None if self.spec is not None else spec_or_memory
        self.label = self.spec or getattr(spec_or_memory, "spec_name", None) or type(spec_or_memory).__name__
        self.d_key = d_key
        self.memory_kwargs = memory_kwargs
        self._built: dict[int, Memory] = {}
        #: inputs that received a non-zero gradient in some case (checked once all cases have run)
        self.reached: set[str] = set()

    def fail(self, check: str, detail: str) -> AssertionError:
        return AssertionError(f"{self.label}: {check}: {detail}")

    def build(self, d_key: int) -> Memory:
        """The memory for keys of width ``d_key`` (an instance under test is used as it is)."""
        if self.instance is not None:
            return self.instance
        if d_key not in self._built:
            try:
                self._built[d_key] = memory(self.spec, d_key=d_key, **self.memory_kwargs)
            except Exception as e:  # a broken plugin may fail in any way; report it as this check's failure
                raise self.fail("build", f"memory({self.spec!r}, d_key={d_key}) raised "
                                         f"{type(e).__name__}: {e}") from e
            if not isinstance(self._built[d_key], nn.Module):
                got = type(self._built[d_key]).__name__
                raise self.fail("build", f"expected a torch.nn.Module, got {got}")
        return self._built[d_key]

    def close(self, check: str, actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float,
              rtol: float) -> None:
        try:
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        except AssertionError as e:
            raise self.fail(check, f"{what} differ: {e}") from None

    def finite(self, check: str, t: torch.Tensor | None, what: str, required: bool = True) -> None:
        if t is None:
            if required:
                raise self.fail(check, f"no gradient reaches {what} (it does not enter the output)")
            return
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise self.fail(check, f"{what} has {bad} non-finite entries")


def reseed(mem: nn.Module) -> None:
    """Make the next call's random draws equal to the last call's (FAVOR+'s Ω, a plugin's global-RNG use)."""
    for m in mem.modules():
        if isinstance(m, FeatureMap):
            m.seed(0)
    torch.default_generator.manual_seed(0)  # CPU only: fork_rng below restores no device generator


def call(mem: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` after reseeding ``mem``'s random draws."""
    reseed(mem)
    return fn(*args, **kwargs)


def gate_shape(mem: nn.Module, name: str, B: int, L: int, K: int) -> tuple[int, ...]:
    """(B, L) for a scalar gate, (B, L, width) for a wider one (``Memory.gate_dim``; 1 where it has none)."""
    width = gate_width(mem, name, K)
    return (B, L) if width == 1 else (B, L, width)


def make_inputs(mem: Memory, shape: Shape, dtype: torch.dtype, g: torch.Generator, requires_grad: bool = True):
    """Random inputs as the model makes them: betas (or None without a beta gate) and the other gates in
    (0, 1), as leaf tensors. Returns (args, gates, named leaves): args = (keys (B, L, K), values (B, L, V),
    betas (B, L) or None, queries (B, Q, K)), gates {name: (B, L), or (B, L, F) for a width-F gate}."""
    B, L, Q, K, V = shape
    keys = torch.randn(B, L, K, generator=g, dtype=dtype)
    values = torch.randn(B, L, V, generator=g, dtype=dtype)
    queries = torch.randn(B, Q, K, generator=g, dtype=dtype)
    gate_names = tuple(getattr(mem, "gates", ()))
    gates = {name: torch.sigmoid(torch.randn(gate_shape(mem, name, B, L, K), generator=g, dtype=dtype))
             for name in gate_names}
    betas = gates.pop("beta", None)
    leaves = {"keys": keys, "values": values, "queries": queries}
    if betas is not None:
        leaves["betas"] = betas
    leaves.update({f"gate {name!r}": t for name, t in gates.items()})
    for t in leaves.values():
        t.requires_grad_(requires_grad)
    return (keys, values, betas, queries), gates, leaves


def gradients(y: torch.Tensor, leaves: dict[str, torch.Tensor], params: dict[str, nn.Parameter],
              cotangent: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """d<y, cotangent>/d every leaf and parameter, by name (None where one does not enter y)."""
    wrt = {**leaves, **{f"parameter {n!r}": p for n, p in params.items()}}
    grads = torch.autograd.grad(y, list(wrt.values()), cotangent, allow_unused=True)
    return dict(zip(wrt, grads, strict=True))


def finite_number(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
