"""The contract (DESIGN §3) over every registered memory, plugins included, via ``retrieval_bench.testing``.

The cases come from the registries when the tests are collected: every registered memory, every update rule
under a few feature maps, every rule and every feature map on its own. An installed plugin
(``pip install ./examples/gated-delta``) is covered without writing a test; one that fails to import fails
only its own cases, naming its distribution.
"""

from __future__ import annotations

import pytest

import retrieval_bench as rb
from retrieval_bench.testing import check_feature_map, check_memory, check_update_rule

# Feature maps every rule is composed with: positive and dense, sparse, and random (one fixed draw of Ω).
PHIS = ("linear", "dpfp-1", "favor-4")
D_KEY = 4


def contract_specs() -> list[str]:
    rules = rb.names("update_rules")
    return list(dict.fromkeys(rb.names("memories") + [f"{phi}/{rule}" for rule in rules for phi in PHIS]))


@pytest.mark.parametrize("spec", contract_specs())
def test_memory_contract(spec):
    kwargs = {"redraw": "fixed"} if spec.startswith("favor") else {}
    check_memory(spec, d_key=D_KEY, **kwargs)


@pytest.mark.parametrize("rule", rb.names("update_rules"))
def test_update_rule_contract(rule):
    """The rule's class attributes, then the rule under more feature maps and every normalisation."""
    check_update_rule(rule, d_key=D_KEY)


@pytest.mark.parametrize("name", rb.names("feature_maps"))
def test_feature_map_contract(name):
    """dim() against the output, non-negativity where claimed, then the map under every update rule."""
    check_feature_map(name, d_key=D_KEY)
