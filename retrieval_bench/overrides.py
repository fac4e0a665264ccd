"""What changes an experiment file's settings: ``--set section.key=value`` items, and ``[[override]]`` tables
(one memory's own train/model settings). Their structure is checked here; their values, with the sections', in
``config._validate``."""

from __future__ import annotations

import tomllib
from typing import Any

from .config import ConfigError


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``[8, 16]``, ``1e-3``, ``true``, ``"a b"``), else a bare string
    (``linear/sum``). Text that opens a TOML array, table or string must be one: ``[`` is a syntax error,
    not the string "["."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        if not text:
            raise ConfigError("no value after '='") from None
        if text[0] in "[{\"'":
            raise ConfigError(f"malformed value {text!r} ({e})") from None
        return text


def apply_sets(raw: dict[str, Any], sets: tuple[str, ...]) -> None:
    """Apply ``--set section.key=value`` items to a parsed experiment file, in place."""
    for item in sets:
        path, eq, text = item.partition("=")
        sec, dot, key = path.strip().partition(".")
        top = not dot and path.strip() in ("seeds", "name", "description")
        if not eq or not (top or (dot and sec in ("task", "model", "train"))):
            raise ConfigError(f"--set {item!r}: expected section.key=value with section task, model or train")
        try:
            value = parse_value(text)
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {path.strip()}: {e}") from None
        if top:
            raw[path.strip()] = value
        else:
            if not isinstance(raw.setdefault(sec, {}), dict):
                raise ConfigError(f"[{sec}] must be a table")
            raw[sec][key.strip()] = value


def parse_overrides(raw: Any) -> tuple[tuple[str, dict[str, dict[str, Any]]], ...]:
    """The ``[[override]]`` tables' structure (their values are checked in ``_validate``, as sections' are)."""
    if not isinstance(raw, list):
        raise ConfigError(f"override: expected [[override]] tables (memory = \"NAME\", train = {{...}}, "
                          f"model = {{...}}), got {type(raw).__name__} {raw!r}")
    overrides = []
    for i, ov in enumerate(raw):
        if not isinstance(ov, dict) or not isinstance(ov.get("memory"), str):
            raise ConfigError(f"override[{i}]: needs memory = \"NAME\" and train/model tables")
        extra = set(ov) - {"memory", "train", "model"}
        if extra:
            raise ConfigError(f"override[{i}]: unknown key {sorted(extra)[0]} (allowed: memory, train, model)")
        for sec in ("train", "model"):
            if not isinstance(ov.get(sec, {}), dict):
                raise ConfigError(f"override[{i}].{sec}: must be a table ({sec} = {{ key = value }}), got "
                                  f"{type(ov[sec]).__name__} {ov[sec]!r}")
        overrides.append((ov["memory"], {s: dict(ov.get(s, {})) for s in ("train", "model")}))
    return tuple(overrides)
