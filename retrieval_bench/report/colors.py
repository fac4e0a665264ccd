"""One fixed colour per memory: the same in every figure, every report and every process."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

# The paper's variants get hand-picked colours. A feature map's family shares a hue ramp per update rule,
# darker = larger d_dot, so capacity reads along the ramp (sum: DPFP blues, FAVOR+ oranges; delta: DPFP reds,
# FAVOR+ teals), while the members of one tasks/*.toml figure (capacity.toml, update_rules.toml) all differ.
BUILTIN_COLORS: dict[str, str] = {
    "softmax": "#1a1a1a",
    "linear/sum": "#2ca02c",
    "dpfp-1/sum": "#6baed6",
    "dpfp-2/sum": "#2171b5",
    "dpfp-3/sum": "#08306b",
    "favor-16/sum": "#fdae6b",
    "favor-32/sum": "#fd8d3c",
    "favor-64/sum": "#f16913",
    "favor-128/sum": "#d94801",
    "favor-256/sum": "#a63603",
    "favor-512/sum": "#7f2704",
    "tanh/sum": "#c5b0d5",
    "linear/delta": "#e377c2",
    "dpfp-1/delta": "#ef3b2c",
    "dpfp-2/delta": "#a50f15",
    "dpfp-3/delta": "#67000d",
    "favor-64/delta": "#17becf",
    "favor-128/delta": "#0e7c86",
    "favor-512/delta": "#084c52",
    "tanh/fwm": "#9467bd",
    "dpfp-1/fwm": "#8c564b",
}

# The key/query normalisations of one memory (report's normalisation figure), colour-blind safe (Okabe-Ito).
NORM_COLORS: dict[str, str] = {
    "sum": "#0072b2",
    "sum+attn": "#009e73",
    "l2": "#d55e00",
    "none": "#cc79a7",
    "none+attn": "#e69f00",
}

# Other names (plugins, other combinations) hash into this list, hues the built-ins leave free where possible.
HASH_PALETTE: tuple[str, ...] = (
    "#bcbd22", "#e6ab02", "#7f7f7f", "#e7298a", "#7570b3", "#a6761d", "#1b9e77", "#393b79",
)


def _slot(name: str) -> int:
    # sha1, not hash(): Python salts str hashes per process, and colours must match across processes.
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") % len(HASH_PALETTE)


def memory_color(name: str) -> str:
    """The colour of a memory in every figure.

    Args:
        name: A memory spec such as ``"dpfp-3/sum"`` or a plugin's name.

    Returns:
        A hex colour: the built-in one if the name has one, else a stable hash of the name into a fixed
        palette.
    """
    return BUILTIN_COLORS.get(name) or HASH_PALETTE[_slot(name)]


def palette(names: Iterable[str], fixed: Mapping[str, str] = BUILTIN_COLORS) -> dict[str, str]:
    """Colours for the memories that share one report, with no two alike.

    Each name keeps its fixed colour (else its hash slot, as ``memory_color``) unless an earlier name (fixed
    ones first, then sorted) already took that colour, in which case it walks the hash palette from its own
    slot. The result depends only on the set of names, so every figure of one report agrees.

    Args:
        names: Memory names (duplicates are ignored).
        fixed: Hand-picked colours: ``BUILTIN_COLORS`` for memories, ``NORM_COLORS`` for normalisations.

    Returns:
        A dict name -> hex colour.
    """
    colors: dict[str, str] = {}
    for name in sorted(set(names), key=lambda n: (n not in fixed, n)):
        start, n = _slot(name), len(HASH_PALETTE)
        candidates = [fixed.get(name) or HASH_PALETTE[start]] + [HASH_PALETTE[(start + i) % n] for i in range(n)]
        # more memories than colours: a repeat is unavoidable, so keep the name's own colour
        colors[name] = next((c for c in candidates if c not in colors.values()), candidates[0])
    return colors
