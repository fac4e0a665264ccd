"""Shared tiny fixtures: seeded torch, the Agg backend, random memory inputs, the memories to test, scoped
registries, tiny experiments, and an executor that records the events it reports.

What a memory reads stays small (B <= 3 and K, V <= 8 in most tests; the longest sequences, L = 120, span several
chunks of the chunked fast forms) and runs are short (tens of steps), so the default run takes seconds per module
on two CPU cores. A test that takes longer is marked ``slow`` (run them with ``python -m pytest -q -m slow``), one
that needs CUDA ``gpu``; the default run leaves both out.
"""

from __future__ import annotations

import copy
import json
import os
import tomllib
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

import pytest  # noqa: E402
import torch  # noqa: E402

import retrieval_bench as rb  # noqa: E402
from retrieval_bench import registry  # noqa: E402
from retrieval_bench.config import Experiment, from_dict  # noqa: E402
from retrieval_bench.executors import Executor  # noqa: E402
from retrieval_bench.testing import composition  # noqa: E402
from retrieval_bench.testing import scoped_registries as _scoped_registries  # noqa: E402

# Tiny tensors gain nothing from intra-op threads, and on a busy two-core machine the OpenMP hand-off of small
# LAPACK calls (FAVOR+'s QR) costs ~0.3 s each.
torch.set_num_threads(1)


def composed_specs() -> list[str]:
    """Every registered φ × every registered rule (with the rule's default normalisation, or l2 where the registry
    refuses that default for a signed map: ``retrieval_bench.testing.composition``), plus every normalisation,
    with and without the attention normaliser, on the ``linear`` map.

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
            specs.append(composition(phi, rule_name))
        for norm in rb.names("normalisations"):
            specs.append(f"linear/{rule_name}/{norm}")
            if rule_cls.supports_attn:
                specs.append(f"linear/{rule_name}/{norm}+attn")
    return list(dict.fromkeys(specs))


#: registered memories (softmax, plugins) plus the composed fast-weight memories.
ALL_MEMORY_SPECS = list(dict.fromkeys(rb.names("memories") + composed_specs()))


def pytest_generate_tests(metafunc):
    """A test that takes ``memory_spec`` runs once per entry of ``ALL_MEMORY_SPECS`` (timm-style)."""
    if "memory_spec" in metafunc.fixturenames:
        metafunc.parametrize("memory_spec", ALL_MEMORY_SPECS)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global torch seed (the library itself never touches it)."""
    torch.manual_seed(0)


def default_sigint() -> None:
    """``preexec_fn`` of a CLI started to be interrupted: SIGINT as a terminal leaves it. A shell without job
    control starts background commands (`pytest ... &`) with SIGINT ignored, the child would inherit that, and
    Ctrl-C would do nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def count_runs(db) -> int:
    """Rows in a store's runs table, read while another process may be writing it (0 before it exists)."""
    import sqlite3
    from pathlib import Path

    if not Path(db).exists():
        return 0
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def cli_sweep_killed(toml, db, workers: str = "1", runs: int = 2, seconds: float = 120) -> list[str]:
    """Start ``retrieval-bench run TOML`` into the store ``db`` in a process of its own and kill it (SIGKILL)
    once ``runs`` runs are stored (or it ended, or ``seconds`` passed). Returns the command, to resume with."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "retrieval_bench", "run", str(toml), "--store", str(db), "--workers", workers,
           "--no-report"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    while count_runs(db) < runs and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return cmd


def assert_sampling_leaves_global_rng(task) -> None:
    """A task draws from the generators it is given only: sampling and eval sets leave torch's global RNG as
    they found it."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    task.sample(4, torch.Generator().manual_seed(0))
    task.eval_set(torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


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
    with _scoped_registries() as regs:
        yield regs


@pytest.fixture
def fake_save(monkeypatch):
    """Reports without rendering: PNG + PDF output is the slow part of a report, so tests of what a report holds
    skip it and get the paths it would write (test_report.py's tests named "renders" render for real)."""
    from retrieval_bench.report import write

    monkeypatch.setattr(write, "_save", lambda fig, stem: [stem.with_suffix(".png"), stem.with_suffix(".pdf")])


# ---- tiny experiments --------------------------------------------------------------------------------------

#: The smallest experiment worth running: one capacity run with S = 4, two evaluations in 20 steps. A test
#: changes what it needs (``TinyExperiments.raw``).
TINY_EXPERIMENT: dict[str, Any] = {
    "name": "tiny", "seeds": [1],
    "task": {"name": "capacity", "num_keys": 4},
    "model": {"memory": "linear/sum", "d_key": 8},
    "train": {"eval_every": 10, "max_steps": 20},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for the plain names used here
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"tiny experiments write no {type(v).__name__} to TOML")


def to_toml(raw: dict[str, Any]) -> str:
    """An experiment dict as a TOML file's text: top-level values, then one table per section."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, values in raw.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == raw, text  # what the CLI reads is what the test meant
    return text


class TinyExperiments:
    """Tiny experiments as a dict, an ``Experiment``, or a TOML file in the test's folder.

    Every method takes changes to ``TINY_EXPERIMENT``: a section's dict is merged into that section (a section
    it lacks is added), any other value replaces the top-level key, e.g.
    ``raw(seeds=[1, 2], task={"num_keys": [4, 6]}, train={"diagnostics": False})``.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def raw(self, **changes: Any) -> dict[str, Any]:
        raw = copy.deepcopy(TINY_EXPERIMENT)
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key].update(copy.deepcopy(value))
            else:
                raw[key] = copy.deepcopy(value)
        return raw

    def load(self, **changes: Any) -> Experiment:
        return from_dict(self.raw(**changes))

    def toml(self, **changes: Any) -> Path:
        """Written to ``<tmp_path>/<name>.toml``."""
        raw = self.raw(**changes)
        path = self.folder / f"{raw['name']}.toml"
        path.write_text(to_toml(raw))
        return path


@pytest.fixture
def tiny_experiment(tmp_path) -> TinyExperiments:
    """Builds tiny experiments (``TinyExperiments``); TOML files go to the test's ``tmp_path``."""
    return TinyExperiments(tmp_path)


class RecordingExecutor(Executor):
    """Wraps an executor and keeps the live-view events it reports: ``started`` and ``progress``."""

    def __init__(self, inner: Executor):
        self.inner, self.started, self.progress = inner, [], []

    def run(self, configs, on_start=None, on_progress=None):
        def start(ev):
            self.started.append(ev)
            if on_start:
                on_start(ev)

        def progress(ev):
            self.progress.append(ev)
            if on_progress:
                on_progress(ev)

        yield from self.inner.run(configs, start, progress)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def record_events():
    """``record_events(executor)``: the executor, wrapped in a ``RecordingExecutor``."""
    return RecordingExecutor
