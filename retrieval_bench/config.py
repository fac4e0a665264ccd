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
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import RegistryError, did_you_mean, tasks

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
#: the largest grid ``load`` expands unless told more (``run --max-runs``): no shipped experiment comes near it
DEFAULT_MAX_RUNS = 100_000
#: an experiment's name names its report folder: a plain file name, never a path or markup
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


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
    # The model family (families/): "retrieval", the paper's single retrieval layer (d_key, embed_factor), or
    # "lm", a causal language model of n_layers blocks for the token-stream tasks (the fields below).
    kind: str = "retrieval"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 1
    conv: int = 0  # kernel of the short causal depthwise convolution before each mixer; 0 = none
    mlp_ratio: int = 4  # the MLP's hidden width over d_model; 0 = no MLP (a mixer-only model, as Zoology's)


#: ``train.protocol``: which column of PROTOCOL_OPTIONS the options take where they are not set.
PROTOCOLS = ("suite", "official")
#: The options where the suite's protocol departs from the official code's, {field: (suite, official)}
#: (README, "Protocol: the suite against the official code").
PROTOCOL_OPTIONS = {
    "eval_set": ("fixed", "fresh"),  # one evaluation set per run, or a fresh one at every evaluation
    "eval_mean": ("query", "chunk"),  # the plain mean over queries, or the mean of per-chunk means
    "eval_omega": ("eval", "chunk"),  # one model call (one FAVOR+ Ω) per evaluation, or one per chunk
    "nonfinite": ("stop", "continue"),  # end the run at its first non-finite value, or train on and log NaN
}


def protocol_problem(train: dict[str, Any]) -> str | None:
    """The first unknown protocol value in a train section (values or grid lists), as "field: why", else None."""
    for key, allowed in (("protocol", PROTOCOLS), *PROTOCOL_OPTIONS.items()):
        for v in _as_list(train.get(key)):
            if v is not None and (not isinstance(v, str) or v not in allowed):
                return f"{key}: must be one of {', '.join(map(repr, allowed))}, got {v!r}"
    return None


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 100
    stop_loss: float = 1e-3
    patience: int = 11  # evaluations in a row without a new best (the official rule: strike > 10)
    max_steps: int = 100_000
    diagnostics: bool = True
    diag_positions: int = 64
    # The evaluation and stopping protocol (PROTOCOL_OPTIONS): an option left None takes its protocol's value.
    protocol: str = "suite"
    eval_set: str | None = None
    eval_mean: str | None = None
    eval_omega: str | None = None
    nonfinite: str | None = None
    # The lm family's optimizer and stop rule (families/lm.py); the retrieval family keeps the paper's plain Adam
    # and stop_loss, and refuses these (validation).
    weight_decay: float = 0.0  # AdamW's
    warmup: float = 0.0  # the fraction of max_steps over which the rate rises linearly from 0
    schedule: str = "constant"  # or "cosine": after the warm-up, decay to 0 at max_steps
    grad_clip: float = 0.0  # the largest gradient norm; 0 = no clipping
    stop_acc: float = 0.99  # solved when the eval accuracy reaches it
    # Where the run executes, not what it computes (identity.NOT_IDENTITY): "auto" (the first CUDA device if
    # there is one, else the CPU), "cpu", "cuda" or "cuda:N". Batches come from the run's own generators on the
    # host, so a run sees the same data on every device.
    device: str = "auto"
    # How many runs of one shape train together as one stacked model (group.py; not identity either): "auto"
    # (16 on a GPU; on the CPU 8 for small steps, else 1: group.group_size) or a number >= 1 (1: each alone).
    group: str | int = "auto"

    def __post_init__(self) -> None:
        # Canonical form: an option equal to its protocol's value is stored as None, its default, so that
        # writing out what the protocol implies changes no run id.
        if self.protocol in PROTOCOLS:
            col = PROTOCOLS.index(self.protocol)
            for name, values in PROTOCOL_OPTIONS.items():
                if getattr(self, name) == values[col]:
                    object.__setattr__(self, name, None)

    def option(self, name: str) -> str:
        """The value in force of a protocol option (a key of PROTOCOL_OPTIONS): its own, else its protocol's."""
        problem = protocol_problem(dataclasses.asdict(self))
        if problem:
            raise ConfigError(f"train.{problem}")
        value = getattr(self, name)
        return PROTOCOL_OPTIONS[name][PROTOCOLS.index(self.protocol)] if value is None else value


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
                if key == POINTS:  # a paired axis: each point sets several settings together
                    del secs[sec][key]
                    secs[sec].update(val)
                else:
                    secs[sec][key] = val
            for memory, changes in self.overrides:
                if secs["model"].get("memory") == memory:
                    for sec, vals in changes.items():
                        secs[sec].update(vals)
            for seed in self.seeds:
                runs.append(_build_run(self.name, secs, seed))
        return runs


_TOP_KEYS = {"name", "description", "seeds", "task", "model", "train", "override"}
#: a section's paired axis: ``points = [{seq_len = 64, num_kv_pairs = 8}, {seq_len = 128, ...}]`` sets those
#: settings together, one point per run (Zoology's (L, pairs) pairs), where a plain list would make their product
POINTS = "points"


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


def _validate(exp: Experiment, max_runs: int = DEFAULT_MAX_RUNS) -> None:
    """Check every key, type, value and size before any training starts; nothing is expanded before the
    grid's size is known, and no task or memory is built before its sizes are known to fit."""
    from .validation import check_fields, check_override_memories, check_runs, check_section, grid_size

    for sec in ("task", "model", "train"):
        check_section(sec, getattr(exp, sec))
    for i, (_, changes) in enumerate(exp.overrides):
        for sec, vals in changes.items():
            check_section(f"override[{i}].{sec}", vals, axes=False)
    if not exp.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in exp.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {list(exp.seeds)!r}")
    n, how = grid_size(exp)
    if n > max_runs:
        raise ConfigError(f"grid: {n:,} runs ({how}), more than the cap of {max_runs:,}; shrink an axis, or "
                          "raise the cap with --max-runs")
    for sec in ("model", "train"):
        check_fields(sec, sec, getattr(exp, sec))
    for i, (_, changes) in enumerate(exp.overrides):
        for sec, vals in changes.items():
            check_fields(f"override[{i}].{sec}", sec, vals)
    task_names = _as_list(exp.task.get("name", "capacity"))  # a list is an axis: every knob must suit each task
    if not task_names:
        raise ConfigError("task.name: an empty list names no task")
    for task_name in task_names:
        if not isinstance(task_name, str):
            raise ConfigError(f"task.name: expected a task name (a string), got {type(task_name).__name__} "
                              f"{task_name!r}")
    allowed_task = set.intersection(*(_task_params(n) for n in task_names)) | {"name"}
    for key in exp.task:
        for inner in (exp.task[key][0] if key == POINTS else {key: None}):
            if inner not in allowed_task:
                where = f"task.{POINTS}.{inner}" if key == POINTS else f"task.{key}"
                raise ConfigError(_unknown(where, inner, allowed_task))
    check_override_memories(exp)
    # The protocol options (train.protocol, eval_set, eval_mean, eval_omega, nonfinite): known values only.
    for where, train in [("train", exp.train),
                         *((f"override[{i}].train", ch.get("train", {})) for i, (_, ch) in enumerate(exp.overrides))]:
        problem = protocol_problem(train)
        if problem:
            raise ConfigError(f"{where}.{problem}")
    check_runs(exp.expand())


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _unknown(where: str, key: str, allowed) -> str:
    hint = did_you_mean(key, sorted(allowed))
    return f"{where}: unknown key{hint} (allowed: {', '.join(sorted(allowed))})"


def from_dict(raw: dict[str, Any], source: str = "", sets: tuple[str, ...] = (),
              max_runs: int = DEFAULT_MAX_RUNS) -> Experiment:
    """Build and validate an Experiment from parsed TOML plus ``section.key=value`` overrides; a grid of
    more than ``max_runs`` runs is refused before it is expanded."""
    from .overrides import apply_sets, parse_overrides

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    apply_sets(raw, sets)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(_unknown(key, key, _TOP_KEYS))
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("name: every experiment needs a name (a non-empty string)")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"name: {name!r} is not a plain name: use letters, digits and . _ - (not first a dot), "
                          "at most 100 characters (it names the report's folder)")
    for sec in ("task", "model", "train"):
        if not isinstance(raw.get(sec, {}), dict):
            raise ConfigError(f"[{sec}] must be a table")
    seeds = raw.get("seeds", [1])
    exp = Experiment(
        name=name, description=str(raw.get("description", "")),
        seeds=tuple(seeds) if isinstance(seeds, list) else (seeds,),
        task=raw.get("task", {}), model=raw.get("model", {}), train=raw.get("train", {}),
        overrides=parse_overrides(raw.get("override", [])), source=source,
    )
    _validate(exp, max_runs)
    return exp


def shipped_experiments() -> dict[str, Path]:
    """The experiment files that travel inside the package, by name."""
    return {p.stem: p for p in sorted(EXPERIMENTS_DIR.glob("*.toml"))}


def _kind(p: Path) -> str | None:
    """"file", "dir", "other" or None (nothing there); a path that cannot be looked at raises ConfigError."""
    import stat

    try:
        mode = p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # e.g. a file inside a directory this user may not enter
        raise ConfigError(f"experiment file {p}: cannot read it: {e.strerror or e}") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def resolve_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a shipped experiment."""
    p = Path(name_or_path)
    kind = _kind(p)
    if p.suffix == ".toml" or kind is not None:
        if kind == "dir":
            raise ConfigError(f"experiment file {name_or_path}: is a directory, not an experiment file")
        if kind != "file":
            raise ConfigError(f"experiment file not found: {name_or_path}")
        return p
    shipped = shipped_experiments()
    if name_or_path in shipped:
        return shipped[name_or_path]
    hint = did_you_mean(name_or_path, list(shipped))
    raise ConfigError(f"no experiment file or shipped experiment named {name_or_path!r}{hint} "
                      f"(shipped: {', '.join(shipped)})")


def load(name_or_path: str, sets: tuple[str, ...] = (), max_runs: int = DEFAULT_MAX_RUNS) -> Experiment:
    """Load, override and validate an experiment; raises ConfigError with the field named."""
    path = resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return from_dict(raw, source=str(path), sets=sets, max_runs=max_runs)
