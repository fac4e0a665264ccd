"""The grammar of memory names, without torch: the one place that reads ``PHI/RULE[/NORM[+attn]]``.

A composed fast-weight memory is named ``PHI/RULE[/NORM[+attn]]``: a feature map, an update rule and a key/query
normalisation (``none``, ``sum``, ``l2``, or a plugin's), optionally followed by ``+attn`` for the attention
normaliser z_t; ``attn`` alone means ``none+attn``. Without NORM the rule's default applies (``RULE_DEFAULTS``
for the built-in rules, the rule class's ``default_norm``/``default_attn`` for a plugin's).

``memories.parse_spec`` checks the parts against the registries on top of this; the report and ``list`` use it
directly, so that neither needs torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: The normalisation a built-in rule uses when a memory name gives none, as (norm, attn): the paper's meaning of
#: each rule (PAPER §4.3): ``sum`` is attention-normalised without sum normalisation, ``delta`` sum-normalised
#: without the attention normaliser ("ours" in the official code), ``fwm`` uses neither. The rule classes take
#: their ``default_norm``/``default_attn`` from here.
RULE_DEFAULTS: dict[str, tuple[str, bool]] = {
    "sum": ("none", True),
    "delta": ("sum", False),
    "fwm": ("none", False),
    "decay": ("none", False),  # RetNet / GLA / Mamba-2 divide by no sum of scores (memories/decay.py)
    "gated-delta": ("l2", False),  # Gated DeltaNet L2-normalises its keys and queries
    "generalised-delta": ("l2", False),  # RWKV-7's rule: unit write keys (memories/generalised.py says why)
}

FORM = "PHI/RULE[/NORM[+attn]]"


class SpecError(ValueError):
    """A memory name that is not of the form ``PHI/RULE[/NORM[+attn]]``."""


@dataclass(frozen=True)
class MemorySpec:
    """A composed memory: feature map, update rule, key/query normalisation and the attention normaliser."""

    phi: str
    rule: str
    norm: str
    attn: bool

    @property
    def name(self) -> str:
        """The canonical name, with every part explicit: ``linear/sum`` -> ``linear/sum/attn``."""
        return f"{self.phi}/{self.rule}/{norm_label(self.norm, self.attn, short=True)}"

    @property
    def norm_label(self) -> str:
        """The normalisation as the report labels it: ``sum``, ``sum+attn``, ``none+attn``."""
        return norm_label(self.norm, self.attn)


def norm_label(norm: str, attn: bool, short: bool = False) -> str:
    """``norm`` with ``+attn`` where the attention normaliser is on; ``short``: ``none+attn`` is ``attn``."""
    if short and attn and norm == "none":
        return "attn"
    return norm + ("+attn" if attn else "")


def split(spec: object) -> tuple[str, str, str | None]:
    """(φ, rule, NORM part or None) of a composed name; raises ``SpecError`` for any other string."""
    parts = spec.split("/") if isinstance(spec, str) else []
    if len(parts) not in (2, 3) or not all(parts):
        raise SpecError(f"memory {spec!r} is not of the form {FORM}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def parse_norm(spec: str, part: str) -> tuple[str, bool]:
    """(norm, attn) of the NORM part of ``spec``: ``sum+attn`` -> (sum, True), ``attn`` -> (none, True)."""
    norm, _, extra = part.partition("+")
    if extra not in ("", "attn"):
        raise SpecError(f"memory {spec!r}: only '+attn' may follow the normalisation, got '+{extra}'")
    attn = extra == "attn" or norm == "attn"
    return ("none" if norm == "attn" else norm), attn


def read(spec: object, defaults: Mapping[str, tuple[str, bool]] = RULE_DEFAULTS) -> MemorySpec:
    """The ``MemorySpec`` of a composed name, syntax only (no registry is asked). Without NORM the rule's
    default comes from ``defaults``; a rule it does not know raises ``SpecError``."""
    phi, rule, part = split(spec)
    if part is not None:
        return MemorySpec(phi, rule, *parse_norm(spec, part))
    if rule not in defaults:
        raise SpecError(f"memory {spec!r}: the default normalisation of rule {rule!r} is not known here")
    norm, attn = defaults[rule]
    return MemorySpec(phi, rule, norm, attn)
