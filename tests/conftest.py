"""Shared tiny fixtures: seeded torch, the Agg backend, random memory inputs, and the memories to test.

Sizes stay tiny (B <= 3, K, V <= 8, L <= 70) so the whole core suite runs in seconds on two CPU cores.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

import pytest  # noqa: E402
import torch  # noqa: E402

import retrieval_bench as rb  # noqa: E402
from retrieval_bench import registry  # noqa: E402

# Tiny tensors gain nothing from intra-op threads, and on a busy two-core machine the OpenMP hand-off of small
# LAPACK calls (FAVOR+'s QR) costs ~0.3 s each.
torch.set_num_threads(1)


def composed_specs() -> list[str]:
    """Every registered φ × every registered rule (with the rule's default normalisation), plus every
    normalisation, with and without the attention normaliser, on the ``linear`` map.

    Built from the registries, so a newly registered feature map, rule or normalisation is covered without
    writing a test.
    """
    specs: list[str] = []
    for rule_name in rb.names("update_rules"):
        try:
            rule_cls = registry.update_rules.get(rule_name)
        except registry.RegistryError:  # a broken plugin fails its own cases, not the collection
            specs.append(f"linear/{rule_name}")
            continue
        for phi in rb.names("feature_maps"):
            specs.append(f"{phi}/{rule_name}")
        for norm in rb.names("normalisations"):
            specs.append(f"linear/{rule_name}/{norm}")
            if rule_cls.supports_attn:
                specs.append(f"linear/{rule_name}/{norm}+attn")
    return list(dict.fromkeys(specs))


#: registered memories (softmax, plugins) plus the composed fast-weight memories.
ALL_MEMORY_SPECS = list(dict.fromkeys(rb.names("memories") + composed_specs()))


def has_no_op_write(spec: str) -> bool:
    """Whether some write is known to leave the memory unchanged: β = 0 for a rule gated by β alone, v = 0
    for an ungated one.

    Not so for softmax or with the attention normaliser, which re-weight every earlier write; a rule with
    other gates (a decay α) has no generic no-op write."""
    mem = rb.memory(spec, d_key=4)
    return isinstance(mem, rb.FastWeightMemory) and not mem.attn and set(mem.gates) <= {"beta"}


def pytest_generate_tests(metafunc):
    """A test that takes ``memory_spec`` runs once per entry of ``ALL_MEMORY_SPECS`` (timm-style contracts);
    one that takes ``no_op_write_spec`` once per such memory that has a no-op write."""
    if "memory_spec" in metafunc.fixturenames:
        metafunc.parametrize("memory_spec", ALL_MEMORY_SPECS)
    if "no_op_write_spec" in metafunc.fixturenames:
        metafunc.parametrize("no_op_write_spec", [s for s in ALL_MEMORY_SPECS if has_no_op_write(s)])


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global torch seed (the library itself never touches it)."""
    torch.manual_seed(0)


def fix_random_features(mem: torch.nn.Module) -> torch.nn.Module:
    """Freeze FAVOR+-like redraws so that two calls see the same Ω (a map with a ``policy`` attribute)."""
    phi = getattr(mem, "phi", None)
    if phi is not None and hasattr(phi, "policy"):
        phi.policy = "fixed"
        phi.seed(0)
    return mem


@pytest.fixture
def build_memory():
    """``build_memory(spec, d_key)``: a memory whose random features (if any) are drawn once and kept."""

    def build(spec: str, d_key: int = 4, **kwargs):
        return fix_random_features(rb.memory(spec, d_key=d_key, **kwargs))

    return build


@pytest.fixture
def make_inputs():
    """``make_inputs(B, L, K, V, Q, dtype)`` -> keys (B,L,K), values (B,L,V), betas (B,L) in (0,1),
    queries (B,Q,K), each a leaf tensor requiring grad."""

    def make(b=2, l=6, k=4, v=3, q=2, dtype=torch.float64, requires_grad=True):
        keys = torch.randn(b, l, k, dtype=dtype)
        values = torch.randn(b, l, v, dtype=dtype)
        betas = torch.sigmoid(torch.randn(b, l, dtype=dtype))
        queries = torch.randn(b, q, k, dtype=dtype)
        out = (keys, values, betas, queries)
        return tuple(t.requires_grad_(requires_grad) for t in out)

    return make


@pytest.fixture
def scoped_registries():
    """Every global registry in a scope: names registered in the test vanish afterwards (lm-eval's _clear)."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(reg.scoped()) for kind, reg in rb.REGISTRIES.items()}
