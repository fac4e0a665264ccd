"""One generic registry: built-ins register with a decorator, plugins through entry points.

Each registry maps a name to a factory. Entry points (group ``retrieval_bench.<kind>``) are read lazily: the
first lookup lists them, and a plugin's module is imported only when its name is asked for, so a broken plugin
fails only when used, with an error naming its distribution.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

BUILTIN = "built-in"



def did_you_mean(name: str, choices, n: int = 3, cutoff: float = 0.6, quote: bool = False) -> str:
    """"; did you mean a, b?" with the choices closest to ``name`` (difflib), or "" where none is close: the one
    hint every unknown name gets, in the registries, the experiment files and the CLI."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) if quote else c for c in close)}?" if close else ""

# The modules whose import registers the built-ins. ``import retrieval_bench`` imports none of them (they need
# torch); the first lookup in any registry does, so a name is never missing for want of an import.
BUILTIN_MODULES = ("retrieval_bench.feature_maps", "retrieval_bench.memories", "retrieval_bench.tasks")
_builtins = "unloaded"  # "loading" while their imports run (a lookup from inside them is then a no-op), "loaded"


def load_builtins() -> None:
    """Import the modules that register the built-in names, once. A failed import leaves them unloaded, so that
    the next lookup fails the same way instead of finding partial registries."""
    global _builtins
    if _builtins != "unloaded":
        return
    _builtins = "loading"
    try:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
    except BaseException:
        _builtins = "unloaded"
        raise
    _builtins = "loaded"


class RegistryError(ValueError):
    """An unknown name, a name claimed twice, or a plugin that fails to load."""


@dataclass
class _Entry:
    name: str
    origin: str  # "built-in" or the distribution that provides it
    obj: Any = None
    entry_point: EntryPoint | None = None


class Registry:
    """Names -> factories, with lazy entry-point plugins and close-match errors.

    Args:
        kind: plural noun used in messages and in the entry-point group (``retrieval_bench.<kind>``).
        resolver: optional ``name -> (base name, kwargs)`` for parametrised names such as ``dpfp-3``.
    """

    def __init__(self, kind: str, singular: str | None = None,
                 resolver: Callable[[str], tuple[str, dict]] | None = None):
        self.kind = kind
        plain = kind.replace("_", " ")
        self.singular = singular or (plain[:-3] + "y" if plain.endswith("ies") else plain.rstrip("s"))
        self.group = f"retrieval_bench.{kind}"
        self._entries: dict[str, _Entry] = {}
        self._plugins_loaded = False
        self._resolver = resolver
        self._conflicts: dict[str, list[str]] = {}

    # ---- registration -------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, origin: str = BUILTIN):
        """Register ``obj`` under ``name``; used bare (``reg.register("x", cls)``) or as a decorator."""

        def deco(o):
            self._add(_Entry(name=name, origin=origin, obj=o))
            return o

        return deco(obj) if obj is not None else deco

    def _add(self, entry: _Entry) -> None:
        old = self._entries.get(entry.name)
        if old is not None and not (old.origin == entry.origin and old.obj is entry.obj):
            self._conflicts.setdefault(entry.name, [old.origin]).append(entry.origin)
            return
        self._entries[entry.name] = entry

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        load_builtins()
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            origin = dist.name if dist is not None else ep.value
            self._add(_Entry(name=ep.name, origin=origin, entry_point=ep))

    def add_entry_point(self, ep: EntryPoint, origin: str | None = None) -> None:
        """Register an entry point by hand (tests use it to fake an installed plugin)."""
        self._load_plugins()
        self._add(_Entry(name=ep.name, origin=origin or ep.value, entry_point=ep))

    # ---- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def origins(self) -> dict[str, str]:
        """Name -> where it comes from; a name claimed twice shows every claimant."""
        self._load_plugins()
        out = {n: e.origin for n, e in sorted(self._entries.items())}
        for name, claimants in self._conflicts.items():
            out[name] = "CONFLICT: " + " and ".join(claimants)
        return dict(sorted(out.items()))

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except RegistryError:
            return False
        return True

    def resolve(self, name: str) -> tuple[Any, dict]:
        """Return ``(factory, kwargs)`` for a possibly parametrised name; raise with close matches."""
        self._load_plugins()
        base, kwargs = name, {}
        if name not in self._entries and self._resolver is not None:
            base, kwargs = self._resolver(name)
        if base in self._conflicts:
            raise RegistryError(
                f"{self.singular} {base!r} is claimed twice, by {' and '.join(self._conflicts[base])}"
            )
        entry = self._entries.get(base)
        if entry is not None and kwargs and entry.obj is not None and not _accepts(entry.obj, kwargs):
            entry = None  # "linear-2": a parameter on a map that takes none is no such name
        if entry is None:
            hint = did_you_mean(name, self.names(), cutoff=0.5, quote=True)
            raise RegistryError(
                f"unknown {self.singular} {name!r}{hint} (known: {', '.join(self.names())})"
            )
        if entry.obj is None:
            try:
                entry.obj = entry.entry_point.load()
            except Exception as e:  # a plugin may fail in any way; name who to blame
                raise RegistryError(
                    f"{self.singular} {base!r} from {entry.origin!r} failed to load "
                    f"({entry.entry_point.value}): {type(e).__name__}: {e}"
                ) from e
        return entry.obj, kwargs

    def get(self, name: str) -> Any:
        return self.resolve(name)[0]

    def origin(self, name: str) -> str:
        self._load_plugins()
        base = name if name in self._entries or self._resolver is None else self._resolver(name)[0]
        return self._entries[base].origin if base in self._entries else "?"

    @contextmanager
    def scoped(self) -> Iterator[Registry]:
        """Let a test register names that vanish afterwards (the built-ins are loaded first, so that a lookup
        inside the scope cannot load them into the state the scope throws away)."""
        load_builtins()
        saved = (dict(self._entries), {k: list(v) for k, v in self._conflicts.items()}, self._plugins_loaded)
        try:
            yield self
        finally:
            self._entries, self._conflicts, self._plugins_loaded = saved


def split_param(name: str) -> tuple[str, dict]:
    """``"dpfp-3" -> ("dpfp", {"n": 3})``; names without a numeric suffix are returned unchanged."""
    base, sep, arg = name.rpartition("-")
    if sep and arg.isdigit():
        return base, {"n": int(arg)}
    return name, {}


def _accepts(factory: Any, kwargs: dict) -> bool:
    """Whether ``factory`` names every parameter in ``kwargs`` (``**kwargs`` catch-alls do not count)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return all(k in params for k in kwargs)


tasks = Registry("tasks", "task")
feature_maps = Registry("feature_maps", "feature map", resolver=split_param)
update_rules = Registry("update_rules", "update rule")
normalisations = Registry("normalisations", "normalisation")
memories = Registry("memories", "memory")

REGISTRIES = {r.kind: r for r in (memories, feature_maps, update_rules, normalisations, tasks)}
