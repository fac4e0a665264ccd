"""Run identity: what makes two runs the same run, and the id that names it.

A run's id is a hash of its canonical config: the experiment's name, the seed, the task's name, and every task,
model and train setting whose value differs from its default. Left out are

- settings equal to their defaults, whether written out or not: adding a setting with a default to a later
  version changes no stored id, and ``eval_sequences = 20`` written explicitly is the run it always was;
- task settings whose value the task resolves to its default anyway (``seq_len = S`` for ``capacity``,
  ``eval_seq_len = "train"`` where the evaluation length is the training length): a task setting counts only
  if building the task without it gives a task in another state;
- settings that say where or how a run is executed, not what it computes (``NOT_IDENTITY``).

The full config is stored beside every run, so ids can always be recomputed from a store (``migrations``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig

#: The version of this rule; 1 was "every field, defaults included" (0.2.1 and before).
ID_RULE = 2
#: (section, field) pairs that say where or how a run executes, not what it computes.
NOT_IDENTITY = frozenset({("train", "device"), ("train", "group")})


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: 1 == 1.0, but True != 1, and NaN equals NaN (a stored NaN is one value)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (tensors or other objects without a plain ==: different)
        return False


def _section(obj: Any, section: str) -> dict[str, Any]:
    """A dataclass section's settings that differ from their defaults, identity fields only."""
    out = {}
    for f in dataclasses.fields(obj):
        if (section, f.name) in NOT_IDENTITY:
            continue
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if default is dataclasses.MISSING or not _same(value, default):
            out[f.name] = value
    return out


def _state(task: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(task).items() if not k.startswith("_")}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


@functools.lru_cache(maxsize=4096)
def _task_settings(name: str, params: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """The task settings that change the task's state; all of them where the task cannot be built."""
    from .registry import tasks

    try:
        cls = tasks.get(name)
        full = _state(cls(**dict(params)))
    except Exception:  # noqa: BLE001  (an unbuildable task, a broken plugin: keep every setting)
        return params
    kept = dict(params)
    for key in sorted(dict(params)):
        trial = {k: v for k, v in kept.items() if k != key}
        try:
            same = _same_state(_state(cls(**trial)), full)
        except Exception:  # noqa: BLE001  (a required setting)
            same = False
        if same:
            kept = trial
    return tuple(sorted(kept.items()))


def canonical(cfg: RunConfig) -> dict[str, Any]:
    """The settings that make the run what it is (see the module docstring), as a JSON-ready dict."""
    try:
        params = _task_settings(cfg.task.name, cfg.task.params)
    except TypeError:  # an unhashable value (a list): keep everything
        params = cfg.task.params
    return {
        "experiment": cfg.experiment,
        "seed": cfg.seed,
        "task": {"name": cfg.task.name, **dict(params)},
        "model": _section(cfg.model, "model"),
        "train": _section(cfg.train, "train"),
    }


def canonical_json(cfg: RunConfig) -> str:
    return json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))


def run_id(cfg: RunConfig) -> str:
    """The run's id: 16 hex digits of the SHA-256 of its canonical config."""
    text = json.dumps({"id": ID_RULE, **canonical(cfg)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def defaults() -> dict[str, Any]:
    """What the ids of this version rest on: the rule, the settings left out, and every default (the config
    sections' and the built-in tasks' constructors'), as JSON-ready data. Stored in a store's ``meta`` table."""
    import inspect

    from .config import ModelConfig, TaskConfig, TrainConfig
    from .registry import tasks

    parts: dict[str, Any] = {"rule": ID_RULE, "not_identity": sorted(map(list, NOT_IDENTITY))}
    for cls in (TaskConfig, ModelConfig, TrainConfig):
        parts[cls.__name__] = {f.name: repr(f.default) for f in dataclasses.fields(cls)
                               if f.default is not dataclasses.MISSING}
    for name, origin in tasks.origins().items():
        if origin == "built-in":
            for klass in inspect.getmro(tasks.get(name)):
                if "__init__" in vars(klass):
                    parts[f"task:{name}:{klass.__name__}"] = {
                        p.name: repr(p.default) for p in inspect.signature(klass.__init__).parameters.values()
                        if p.default is not inspect.Parameter.empty}
    return parts


def fingerprint() -> str:
    return json.dumps(defaults(), sort_keys=True)


def ids_change(stored: str | None) -> bool:
    """Whether ids made under the ``stored`` fingerprint differ from this version's: the rule changed, or a
    default that both versions have changed. A setting added with a default (or dropped) changes no id."""
    if not stored:
        return True
    try:
        old = json.loads(stored)
    except ValueError:
        return True
    new = defaults()
    if old.get("rule") != new["rule"] or old.get("not_identity") != new["not_identity"]:
        return True
    for section, values in new.items():
        if isinstance(values, dict) and isinstance(old.get(section), dict):
            if any(old[section][k] != v for k, v in values.items() if k in old[section]):
                return True
    return False
