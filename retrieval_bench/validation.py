"""Checks of an experiment's values and sizes, before any run is built or trained (``config._validate``
calls them in order): every error is a ConfigError whose message names the field.

* values: scalars or flat, non-empty lists (grid axes), finite numbers, known keys of the right type and range,
  for the sections and the ``[[override]]`` tables alike;
* the grid: its number of runs from the axes' lengths alone, refused above a cap before it is expanded;
* overrides: each names a memory that some run has;
* runs: every distinct task and memory built once, after checking from the sizes alone that the parameters
  fit, then each distinct run's peak memory estimated (``sizing``) against this machine's memory.
"""

from __future__ import annotations

import math
from typing import Any

from .config import (
    POINTS,
    ConfigError,
    Experiment,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _as_list,
    _check_type,
    _fields,
    _unknown,
)
from .registry import RegistryError, did_you_mean


def check_leaf(where: str, value: Any) -> None:
    """One value of a section: a scalar (a nested list or a table would not hash into a run), finite if a
    number (inf and nan pass every comparison with a bound)."""
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a value or a list of values, got a table {value!r}")
    if isinstance(value, list):
        raise ConfigError(f"{where}: a grid axis is a flat list of values, got a nested list {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")


def check_section(where: str, values: Any, axes: bool = True) -> None:
    """Every value of a section (``axes``: lists are grid axes; an override takes single values)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a table, got {type(values).__name__} {values!r}")
    for key, val in values.items():
        if key == POINTS and axes:
            check_points(f"{where}.{key}", val)
            continue
        if isinstance(val, list):
            if not axes:
                raise ConfigError(f"{where}.{key}: an override sets one value, not a list ({val!r})")
            if not val:
                raise ConfigError(f"{where}.{key}: an empty list makes a grid of no runs; give at least one value")
            for v in val:
                check_leaf(f"{where}.{key}", v)
        else:
            check_leaf(f"{where}.{key}", val)


def check_points(where: str, points: Any) -> None:
    """A paired axis: a non-empty list of tables with the same keys, each value a scalar."""
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError(f"{where}: a paired axis is a non-empty list of tables, e.g. [{{seq_len = 64, "
                          f"num_kv_pairs = 8}}, {{seq_len = 128, num_kv_pairs = 16}}], got {points!r}")
    keys = set(points[0])
    for i, p in enumerate(points):
        if set(p) != keys:
            raise ConfigError(f"{where}[{i}]: every point sets the same keys ({', '.join(sorted(keys))}), got "
                              f"{', '.join(sorted(p))}")
        for k, v in p.items():
            if k == POINTS:
                raise ConfigError(f"{where}[{i}].{k}: points do not nest")
            check_leaf(f"{where}[{i}].{k}", v)


_AT_LEAST_1 = {("train", k) for k in ("batch_size", "eval_every", "max_steps", "patience", "diag_positions")}
_AT_LEAST_1 |= {("model", k) for k in ("d_key", "d_model", "n_layers", "n_heads")}
_AT_LEAST_0 = {("model", "conv"), ("model", "mlp_ratio"), ("train", "weight_decay"), ("train", "grad_clip")}
_CHOICES = {("model", "kind"): ("retrieval", "lm"), ("train", "schedule"): ("constant", "cosine")}
#: settings that only the lm family reads: a retrieval run that sets them is a mistake, not a silent no-op
LM_ONLY = {("model", k) for k in ("d_model", "n_layers", "n_heads", "conv", "mlp_ratio")} | {
    ("train", k) for k in ("weight_decay", "warmup", "schedule", "grad_clip", "stop_acc")}


def check_fields(where: str, sec: str, values: dict[str, Any]) -> None:
    """Keys, types and ranges of a model or train table (a section or an override's)."""
    allowed = _fields(ModelConfig if sec == "model" else TrainConfig)
    if POINTS in values:  # a paired axis: its points' settings, checked as if each were the section's
        for i, point in enumerate(values[POINTS]):
            check_fields(f"{where}.{POINTS}[{i}]", sec, point)
        values = {k: v for k, v in values.items() if k != POINTS}
    for key, val in values.items():
        if key not in allowed:
            raise ConfigError(_unknown(f"{where}.{key}", key, allowed))
        for v in _as_list(val):
            _check_type(f"{where}.{key}", v, allowed[key])
            if (sec, key) in _AT_LEAST_1 and v < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {v}")
            if (sec, key) in _AT_LEAST_0 and v < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {v}")
            if (sec, key) in _CHOICES and v not in _CHOICES[sec, key]:
                raise ConfigError(f"{where}.{key}: must be one of {', '.join(map(repr, _CHOICES[sec, key]))}, "
                                  f"got {v!r}")
            if (sec, key) == ("train", "device"):
                from .runtime import resolve_device

                try:
                    resolve_device(v, f"{where}.{key}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            if (sec, key) == ("train", "group") and not (v == "auto" or (isinstance(v, int) and v >= 1)):
                raise ConfigError(f"{where}.{key}: must be 'auto' or a number of runs >= 1, got {v!r}")
            if (sec, key) == ("train", "warmup") and not 0 <= v < 1:
                raise ConfigError(f"{where}.{key}: a fraction of max_steps in [0, 1), got {v}")
            if (sec, key) == ("train", "stop_acc") and not 0 < v <= 1:
                raise ConfigError(f"{where}.{key}: an accuracy in (0, 1], got {v}")
            if (sec, key) in (("train", "lr"), ("model", "embed_factor")) and not v > 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {v}")
            if (sec, key) == ("model", "redraw") and not (v in ("call", "fixed") or (isinstance(v, int) and v >= 1)):
                raise ConfigError(f"{where}.{key}: must be 'call', 'fixed' or a number of steps >= 1, got {v!r}")


def grid_size(exp: Experiment) -> tuple[int, str]:
    """(number of runs, how it comes about), from the axes' lengths alone: nothing is expanded."""
    axes = [(f"{sec}.{key}", len(v)) for sec in ("task", "model", "train")
            for key, v in getattr(exp, sec).items() if isinstance(v, list)]
    axes.append(("seeds", len(exp.seeds)))
    return math.prod(n for _, n in axes), " x ".join(f"{n} {name}" for name, n in axes)


def check_override_memories(exp: Experiment) -> None:
    """An override must name a memory that some run of the grid has (else it would be silently ignored)."""
    if not exp.overrides:
        return
    if "memory" not in exp.model:
        raise ConfigError(f"override[0].memory: the experiment sets no model.memory, so no run has memory "
                          f"{exp.overrides[0][0]!r}; name the memories in [model]")
    grid = _as_list(exp.model["memory"])
    for i, (mem, _) in enumerate(exp.overrides):
        if mem not in grid:
            hint = did_you_mean(mem, grid, n=1, quote=True)
            raise ConfigError(f"override[{i}].memory: {mem!r} is in no run of the grid{hint} "
                              f"(model.memory: {', '.join(map(str, grid))})")


def check_families(runs: list[RunConfig]) -> None:
    """Each run's model family fits its task and settings: a language model needs a token-stream task and a
    d_model its heads divide; a retrieval model needs a key-value task and sets none of the lm's settings."""
    from dataclasses import fields

    defaults = {("model", f.name): f.default for f in fields(ModelConfig)}
    defaults |= {("train", f.name): f.default for f in fields(TrainConfig)}
    for r in {(r.task, r.model, r.train) for r in runs}:
        task, model, train = r
        stream = "vocab_size" in task.kwargs() or _is_stream(task.name)
        if model.kind == "lm":
            if not stream:
                raise ConfigError(f"model.kind: 'lm' needs a token-stream task (mqar, mqar-reassign, "
                                  f"noisy-recall), not {task.name!r}")
            if model.d_model % model.n_heads:
                raise ConfigError(f"model.d_model: {model.d_model} does not split into n_heads = {model.n_heads} "
                                  "heads of equal width")
            _check_lm_size(task, model, train)
            continue
        if stream:
            raise ConfigError(f"model.kind: the token-stream task {task.name!r} is learnt by a language model: "
                              "set [model] kind = \"lm\"")
        for sec, obj in (("model", model), ("train", train)):
            for (s_, key) in LM_ONLY:
                if s_ == sec and getattr(obj, key) != defaults[sec, key]:
                    raise ConfigError(f"{sec}.{key}: applies to model.kind = 'lm' only (this run is a "
                                      "retrieval model)")


def _check_lm_size(task, model: ModelConfig, train: TrainConfig) -> None:
    """A language model's peak memory from its sizes alone (float32): parameters with their gradients and AdamW's
    two moments, and the activations a training step keeps (about 12 + 2·mlp_ratio d_model-wide tensors per
    token and layer; the logits are made at the query positions only). Refused where it cannot fit."""
    from . import sizing

    kw = task.kwargs()
    vocab, T = kw.get("vocab_size", 8192), max(kw.get("seq_len", 64), kw.get("eval_seq_len") or 0)
    if not all(isinstance(x, int) for x in (vocab, T)):
        return  # the task's own check names the field
    d, layers = model.d_model, model.n_layers
    params = 2 * vocab * d + layers * d * d * (4 + 2 * model.mlp_ratio)
    acts = train.batch_size * T * d * layers * (12 + 2 * model.mlp_ratio)
    why = sizing.too_large(sizing.Estimate({"parameters": 16 * params, "training step": 4 * acts,
                                            "evaluation": 0, "process": sizing.PROCESS_BYTES}))
    if why:
        raise ConfigError(f"{why} (task {task.name} vocab_size={vocab} seq_len={T}, model {model.memory} "
                          f"d_model={d} n_layers={layers}, train.batch_size={train.batch_size})")


def _is_stream(name: str) -> bool:
    from .registry import tasks
    from .tasks import Task

    try:
        return not issubclass(tasks.get(name), Task)
    except Exception:  # noqa: BLE001  (an unknown task is named by the task check)
        return False


def check_runs(runs: list[RunConfig]) -> None:
    """Build every distinct task and memory once (unknown names and impossible sizes surface here), after
    checking from the sizes alone that its parameters fit, then estimate each distinct run's peak memory."""
    from . import sizing
    from .memories import Memory, memory

    check_families(runs)

    for t, m in {(r.task, r.model) for r in runs if getattr(r.model, "kind", "retrieval") == "retrieval"}:
        kw = t.kwargs()
        S, V = kw.get("num_keys"), kw.get("num_values", kw.get("num_keys"))
        if not (isinstance(S, int) and isinstance(V, int) and S >= 1 and V >= 1):
            continue  # the task's own check names the field
        if int(m.embed_factor * S) < 1:
            raise ConfigError(f"model.embed_factor: the key embedding's width int(embed_factor * num_keys) must be "
                              f">= 1, got int({m.embed_factor} * {S})")
        params = sizing.parameter_bytes(S, V, m.d_key, m.embed_factor, gates=0)
        why = sizing.too_large(sizing.Estimate({"parameters": params, "training step": 0, "evaluation": 0,
                                                "process": sizing.PROCESS_BYTES}))
        if why:
            raise ConfigError(f"{why} (task {t.name} num_keys={S}, model {m.memory} d_key={m.d_key})")
    built_tasks = {}
    for t in {r.task for r in runs}:
        try:
            built_tasks[t] = t.build()
        except (ValueError, TypeError, OverflowError) as e:
            raise ConfigError(f"task ({t.name}, {dict(t.params)}): {e}") from None
        except Exception as e:  # a plugin task's own bug: one message, not a traceback
            raise ConfigError(f"task.name: building {t.name!r} raised {type(e).__name__}: {e}") from None
    built = {}
    for m in {r.model for r in runs}:
        try:
            d_key = m.d_model // m.n_heads if m.kind == "lm" else m.d_key  # a language model's head width
            built[m] = mem = memory(m.memory, d_key=d_key)
        except RegistryError as e:
            raise ConfigError(f"model.memory: {e}") from None
        except ValueError as e:
            raise ConfigError(f"model ({m.memory}, d_key={m.d_key}): {e}") from None
        except Exception as e:  # a plugin memory's own bug
            raise ConfigError(f"model.memory: building {m.memory!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(mem, Memory):
            raise ConfigError(
                f"model.memory: {m.memory!r} is a {type(mem).__module__}.{type(mem).__qualname__}, not a "
                "retrieval_bench.Memory; a plugin memory subclasses retrieval_bench.Memory, which gives it the "
                "defaults the model and the diagnostics read (gates, gate_bias, projection_init, d_dot, "
                "state_size, trace)")
    for t, m, batch, diag in {(r.task, r.model, r.train.batch_size, r.train.diagnostics) for r in runs}:
        if getattr(m, "kind", "retrieval") != "retrieval":  # the estimate follows the retrieval model's shapes
            continue
        task = built_tasks[t]
        S, L = getattr(task, "num_keys", None), getattr(task, "seq_len", None)
        if not (isinstance(S, int) and isinstance(L, int)):  # a plugin task of another shape: not estimated
            continue
        Le = getattr(task, "eval_seq_len", L)
        est = sizing.estimate(S, getattr(task, "num_values", S), L, Le, getattr(task, "eval_sequences", 20),
                              getattr(task, "max_eval_queries", Le), m.d_key, m.embed_factor, batch, built[m],
                              diagnostics=diag)
        why = sizing.too_large(est)
        if why:
            raise ConfigError(f"{why} (task {t.name} num_keys={S} seq_len={L}, model {m.memory} d_key={m.d_key}, "
                              f"train.batch_size={batch})")
