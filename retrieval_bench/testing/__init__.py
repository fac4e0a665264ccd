"""Contract checks for memories, update rules and feature maps, to call from a plugin's own tests.

The contract (DESIGN §3, docs/plugins.md)::

    keys (B, L, K)  values (B, L, V)  betas (B, L)  queries (B, Q, K)  **gates {name: (B, L)}  ->  (B, Q, V)

(a gate of width F, ``Memory.gate_dim``, is (B, L, F); the checks make their inputs at that width).

Usage, in any test runner::

    from retrieval_bench.testing import check_feature_map, check_memory, check_update_rule

    def test_my_rule():
        check_update_rule("my-rule")             # the rule under several φ and every normalisation
        check_memory("dpfp-1/my-rule", d_key=4)  # one memory, every check

Every check raises ``AssertionError`` whose message names the memory and the check that failed, e.g.
``dpfp-1/my-rule: reference [B2-L6-Q3-K4-V2, float64]: outputs differ ...``. Nothing here imports pytest.
This project's own tests run these same checks over every registered name (tests/test_contract.py).

Random feature maps (FAVOR+) are reseeded before every call, so the fast form, the reference loop and the
trace of one check see the same draw; the global torch RNG is left as it was found.

``scoped_registries()`` puts every registry in a scope, so that what a test registers vanishes afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from ..registry import REGISTRIES, Registry
from ._base import EVAL_SEQUENCE, LONG_SEQUENCE, Shape, default_shapes, short_shapes
from ._base import reseed as _reseed  # noqa: F401  (the causal check reseeds the same way)
from .causal import check_causal
from .composed import RULE_COMPOSITIONS, check_feature_map, check_update_rule, composition
from .memory import check_memory


@contextmanager
def scoped_registries() -> Iterator[dict[str, Registry]]:
    """Every global registry in a scope, {kind: registry}: names registered inside vanish on exit, and names
    registered before are as they were (lm-eval's ``_clear``)."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(reg.scoped()) for kind, reg in REGISTRIES.items()}


__all__ = [
    "EVAL_SEQUENCE", "LONG_SEQUENCE", "RULE_COMPOSITIONS", "Shape", "check_feature_map", "check_memory",
    "check_causal", "check_update_rule", "composition", "default_shapes", "scoped_registries", "short_shapes",
]
