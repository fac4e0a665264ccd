"""Experiments as data: TOML -> frozen dataclasses -> a grid of runs, each with a canonical hash as its id.

An experiment file has ``name``, ``description``, ``seeds`` and the sections ``[task]``, ``[model]``,
``[train]``. Every leaf that is a list is a grid axis; the runs are the product of the axes times the seeds.
``[[override]]`` tables change the train or model settings of the runs of one memory, e.g. the FWM-tanh
baseline's own learning rate and batch size::

    [[override]]
    memory = "tanh/fwm"
    train = { lr = 1e-4, batch_size = 128 }

Strings and dicts exist only here, at the edge; everything after ``load`` is a frozen dataclass, and every
error names the field.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import RegistryError, tasks

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"


class ConfigError(ValueError):
    """A bad experiment: the message names the field."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "capacity"
    params: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, e.g. (("num_keys", 20),)

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def build(self):
        return tasks.get(self.name)(**self.kwargs())


@dataclass(frozen=True)
class ModelConfig:
    memory: str = "dpfp-1/sum"
    d_key: int = 64
    embed_factor: float = 2.2
    redraw: str | int = "call"  # FAVOR+ redraw policy: "call", "fixed" or every N training steps


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 100
    stop_loss: float = 1e-3
    patience: int = 10  # evaluations in a row without a new best (the official code stops after 11)
    max_steps: int = 100_000
    diagnostics: bool = True
    diag_positions: int = 64


@dataclass(frozen=True)
class RunConfig:
    experiment: str
    task: TaskConfig
    model: ModelConfig
    train: TrainConfig
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = {"name": self.task.name, **self.task.kwargs()}
        return d

    @functools.cached_property
    def run_id(self) -> str:
        """A hash of the settings that make the run what it is (``identity``): defaults left out."""
        from .identity import run_id

        return run_id(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The inverse of ``to_dict``; a stored config from an older version gets the defaults of the fields it
        lacks."""
        task = dict(d["task"])
        name = task.pop("name")
        return cls(d["experiment"], TaskConfig(name, tuple(sorted(task.items()))), ModelConfig(**d["model"]),
                   TrainConfig(**d["train"]), d["seed"])


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str = ""
    seeds: tuple[int, ...] = (1,)
    task: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = ()
    source: str = ""

    def expand(self) -> list[RunConfig]:
        """The grid: the product of every list-valued leaf, times the seeds, with overrides applied."""
        axes = [(sec, key, vals) for sec, d in (("task", self.task), ("model", self.model), ("train", self.train))
                for key, vals in d.items() if isinstance(vals, list)]
        runs = []
        for combo in itertools.product(*(vals for _, _, vals in axes)):
            secs = {"task": dict(self.task), "model": dict(self.model), "train": dict(self.train)}
            for (sec, key, _), val in zip(axes, combo, strict=True):
                secs[sec][key] = val
            for memory, changes in self.overrides:
                if secs["model"].get("memory") == memory:
                    for sec, vals in changes.items():
                        secs[sec].update(vals)
            for seed in self.seeds:
                runs.append(_build_run(self.name, secs, seed))
        return runs


_TOP_KEYS = {"name", "description", "seeds", "task", "model", "train", "override"}


def _fields(cls) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _task_params(name: str) -> set[str]:
    """Constructor parameters a task accepts, following **kwargs up its base classes."""
    try:
        cls = tasks.get(name)
    except RegistryError as e:
        raise ConfigError(f"task.name: {e}") from None
    params: set[str] = set()
    for klass in inspect.getmro(cls):
        if "__init__" in vars(klass):
            sig = inspect.signature(klass.__init__)
            params |= {p.name for p in sig.parameters.values()
                       if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
                break
    return params


def _check_type(where: str, value: Any, expected: Any) -> None:
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "str | int": (str, int)}
    ok = kinds.get(str(expected), (object,))
    if isinstance(value, bool) and bool not in ok:
        ok = ()
    if not isinstance(value, ok):
        raise ConfigError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")


def _build_run(experiment: str, secs: dict[str, dict[str, Any]], seed: int) -> RunConfig:
    task = dict(secs["task"])
    name = task.pop("name", "capacity")
    try:
        model = ModelConfig(**secs["model"])
        train = TrainConfig(**secs["train"])
    except TypeError as e:  # unknown keys were rejected in load(); this is a defensive edge
        raise ConfigError(str(e)) from None
    return RunConfig(experiment, TaskConfig(name, tuple(sorted(task.items()))), model, train, seed)


def _validate(exp: Experiment) -> None:
    """Check every key, type and size before any training starts."""
    for sec, cls in (("model", ModelConfig), ("train", TrainConfig)):
        allowed = _fields(cls)
        for key, val in getattr(exp, sec).items():
            if key not in allowed:
                raise ConfigError(_unknown(f"{sec}.{key}", key, allowed))
            for v in val if isinstance(val, list) else [val]:
                _check_type(f"{sec}.{key}", v, allowed[key])
    task_name = exp.task.get("name", "capacity")
    if isinstance(task_name, list):
        raise ConfigError("task.name: one task per experiment file")
    allowed_task = _task_params(task_name) | {"name"}
    for key in exp.task:
        if key not in allowed_task:
            raise ConfigError(_unknown(f"task.{key}", key, allowed_task))
    if not exp.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in exp.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {list(exp.seeds)!r}")
    for key in ("batch_size", "eval_every", "max_steps", "patience", "diag_positions"):
        for v in _as_list(exp.train.get(key, 1)):
            if v < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {v}")
    for v in _as_list(exp.train.get("lr", 1.0)):
        if not v > 0:
            raise ConfigError(f"train.lr: must be > 0, got {v}")
    # Build every distinct task and memory once: impossible sizes and unknown names surface here.
    from .memories import memory

    runs = exp.expand()
    for t in {r.task for r in runs}:
        try:
            t.build()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"task ({t.name}, {dict(t.params)}): {e}") from None
    for m in {r.model for r in runs}:
        try:
            memory(m.memory, d_key=m.d_key)
        except RegistryError as e:
            raise ConfigError(f"model.memory: {e}") from None
        except ValueError as e:
            raise ConfigError(f"model ({m.memory}, d_key={m.d_key}): {e}") from None
        if m.d_key < 1:
            raise ConfigError(f"model.d_key: must be >= 1, got {m.d_key}")


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _unknown(where: str, key: str, allowed) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(allowed), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{where}: unknown key{hint} (allowed: {', '.join(sorted(allowed))})"


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``[8, 16]``, ``1e-3``, ``true``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: dict[str, Any], source: str = "", sets: tuple[str, ...] = ()) -> Experiment:
    """Build and validate an Experiment from parsed TOML plus ``section.key=value`` overrides."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in sets:
        path, eq, text = item.partition("=")
        sec, dot, key = path.strip().partition(".")
        if not eq or not dot or sec not in ("task", "model", "train"):
            if path.strip() in ("seeds", "name", "description") and eq:
                raw[path.strip()] = parse_value(text.strip())
                continue
            raise ConfigError(f"--set {item!r}: expected section.key=value with section task, model or train")
        raw.setdefault(sec, {})[key.strip()] = parse_value(text.strip())
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(_unknown(key, key, _TOP_KEYS))
    if "name" not in raw or not isinstance(raw["name"], str) or not raw["name"]:
        raise ConfigError("name: every experiment needs a name (a non-empty string)")
    for sec in ("task", "model", "train"):
        if not isinstance(raw.get(sec, {}), dict):
            raise ConfigError(f"[{sec}] must be a table")
    overrides = []
    for i, ov in enumerate(raw.get("override", [])):
        if not isinstance(ov, dict) or not isinstance(ov.get("memory"), str):
            raise ConfigError(f"override[{i}]: needs memory = \"NAME\" and train/model tables")
        extra = set(ov) - {"memory", "train", "model"}
        if extra:
            raise ConfigError(f"override[{i}]: unknown key {sorted(extra)[0]} (allowed: memory, train, model)")
        for sec in ("train", "model"):
            for key in ov.get(sec, {}):
                if key not in _fields(TrainConfig if sec == "train" else ModelConfig):
                    raise ConfigError(_unknown(f"override[{i}].{sec}.{key}", key,
                                               _fields(TrainConfig if sec == "train" else ModelConfig)))
        overrides.append((ov["memory"], {s: dict(ov.get(s, {})) for s in ("train", "model")}))
    seeds = raw.get("seeds", [1])
    exp = Experiment(
        name=raw["name"], description=str(raw.get("description", "")),
        seeds=tuple(seeds) if isinstance(seeds, list) else (seeds,),
        task=raw.get("task", {}), model=raw.get("model", {}), train=raw.get("train", {}),
        overrides=tuple(overrides), source=source,
    )
    _validate(exp)
    return exp


def shipped_experiments() -> dict[str, Path]:
    """The experiment files that travel inside the package, by name."""
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.toml"))}


def resolve_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a shipped experiment."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"experiment file not found: {name_or_path}")
        return p
    shipped = shipped_experiments()
    if name_or_path in shipped:
        return shipped[name_or_path]
    import difflib

    close = difflib.get_close_matches(name_or_path, list(shipped), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"no experiment file or shipped experiment named {name_or_path!r}{hint} "
                      f"(shipped: {', '.join(shipped)})")


def load(name_or_path: str, sets: tuple[str, ...] = ()) -> Experiment:
    """Load, override and validate an experiment; raises ConfigError with the field named."""
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return from_dict(raw, source=str(path), sets=sets)
