"""Bad input is caught before training (issue 17): every malformed experiment, option or file gets exit status 2
(or the status it names) and one message naming the field, before anything is trained, with a store passed by
``--store`` left byte for byte as it was (or not created).

Each case of the issue is one parametrised id or one test here, through click's CliRunner, or a subprocess where
exit codes, signals or Ray need one. The Ray start-up tests are marked ``slow``.
"""

from __future__ import annotations

import errno
import lzma
import math
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import default_sigint  # tests/ is on sys.path
from rich.console import Console
from torch import nn

import retrieval_bench as rb
from retrieval_bench import config, sizing
from retrieval_bench.cli import main
from retrieval_bench.config import ConfigError, from_dict, load, shipped_experiments
from retrieval_bench.memories import parse_spec
from retrieval_bench.store import Store
from retrieval_bench.sweep import SweepState
from retrieval_bench.train import failed_result

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

BASE = """\
name = "v"
seeds = [1]
{top}
[task]
name = "capacity"
num_keys = [4, 6]
[model]
memory = ["linear/sum", "softmax"]
d_key = 8
[train]
max_steps = 20
eval_every = 10
diagnostics = false
{tail}
"""


def write_exp(folder: Path, top: str = "", tail: str = "") -> Path:
    path = folder / "exp.toml"
    path.write_text(BASE.format(top=top, tail=tail))
    return path


@pytest.fixture
def store(tmp_path) -> Path:
    """A results store that already holds a run, so that "untouched" means byte for byte."""
    path = tmp_path / "results.db"
    res = failed_result(from_dict({"name": "seeded", "task": {"num_keys": 4}, "model": {"memory": "softmax"}})
                        .expand()[0], "seeded for the test")
    Store(path).write_run(res["row"], res["curves"], res["diagnostics"])
    return path


@pytest.fixture
def memory_24gib(monkeypatch):
    """The sizes checks see a 24 GiB machine, whatever this one has."""
    monkeypatch.setattr(sizing, "physical_memory", lambda: 24 * GIB)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix != ".toml"}


def invoke(args: list[str], store: Path | None = None):
    """Run the CLI; with ``store``, return also whether the store's folder is exactly as before."""
    before = _files(store.parent) if store is not None else None
    res = CliRunner().invoke(main, [str(a) for a in args])
    untouched = before is None or _files(store.parent) == before
    return res, untouched


def assert_refused(res, field: str, untouched: bool = True, code: int = 2) -> None:
    assert res.exit_code == code, res.output
    assert field in res.output, res.output
    assert "Traceback" not in res.output and "error:" in res.output, res.output
    assert untouched, "the store changed"


# ---- the experiment file: grid axes, numbers, names, overrides, memories (points 1, 2, 4, 6, 7) --------------

SETS = [
    ("task.num_keys=[[4, 8]]", "task.num_keys"),  # a nested list: was a TypeError traceback
    ("task.num_keys=[]", "task.num_keys"),  # an empty axis: a traceback after "0 runs to do"
    ("model.memory=[]", "model.memory"),
    ("train.lr=inf", "train.lr"), ("train.lr=nan", "train.lr"), ("train.stop_loss=nan", "train.stop_loss"),
    ("train.lr=[1e-3, inf]", "train.lr"),
    ("model.embed_factor=-1", "model.embed_factor"), ("model.embed_factor=nan", "model.embed_factor"),
    ("model.embed_factor=0.1", "model.embed_factor"),  # int(0.1 * 4) = 0: no embedding at all
    ("model.redraw=\"bogus\"", "model.redraw"), ("model.redraw=-1", "model.redraw"),
    ("task.name=5", "task.name"),
    ("task.num_keys={a = 1}", "task.num_keys"),
    ("model.d_key=[", "model.d_key="),  # a syntax error naming the setting, not the string "["
    ("model.d_key=", "model.d_key="),
    ("name=\"../../escape\"", "name"), ("name=\"/tmp/abs\"", "name"), ("name=\"x[/]\"", "name"),
    ("name=\".hidden\"", "name"), (f"name=\"{'a' * 101}\"", "name"),
    ("model.memory=\"identity/delta\"", "identity/delta/l2"), ("model.memory=\"tanh/delta\"", "tanh/delta/l2"),
    ("model.memory=\"tanh/sum\"", "tanh/sum/l2"),
]


@pytest.mark.parametrize("setting, field", SETS, ids=[s[:40] for s, _ in SETS])
def test_bad_setting_is_refused_naming_the_field(tmp_path, store, setting, field):
    res, untouched = invoke(["run", write_exp(tmp_path), "--store", store, "--set", setting], store)
    assert_refused(res, field, untouched)


OVERRIDES = [
    ("[[override]]\nmemory = \"dpfp-1/sum\"\ntrain = { lr = 1e-4 }", "override[0].memory"),  # in no run
    ("[[override]]\nmemory = \"softmax\"\ntrain = { max_steps = -1 }", "override[0].train.max_steps"),
    ("[[override]]\nmemory = \"softmax\"\ntrain = { lr = inf }", "override[0].train.lr"),
    ("[[override]]\nmemory = \"softmax\"\ntrain = { lr = [1e-3, 1e-4] }", "override[0].train.lr"),
    ("[[override]]\nmemory = \"softmax\"\ntrain = { batchsize = 8 }", "override[0].train.batchsize"),
    ("[[override]]\nmemory = \"softmax\"\nmodel = { redraw = \"bogus\" }", "override[0].model.redraw"),
    ("[[override]]\nmemory = \"softmax\"\nmodel = { embed_factor = nan }", "override[0].model.embed_factor"),
    ("[[override]]\nmemory = \"softmax\"\ntrain = 5", "override[0].train"),
]


@pytest.mark.parametrize("tail, field", OVERRIDES, ids=[f for _, f in OVERRIDES])
def test_bad_override_is_refused_at_validation(tmp_path, store, tail, field):
    res, untouched = invoke(["run", write_exp(tmp_path, tail=tail), "--store", store], store)
    assert_refused(res, field, untouched)


@pytest.mark.parametrize("top", ["override = 5", "override.train = 5"])
def test_override_that_is_not_a_list_of_tables_gives_a_message(tmp_path, store, top):
    res, untouched = invoke(["run", write_exp(tmp_path, top=top), "--store", store], store)
    assert_refused(res, "override", untouched)


def test_good_override_still_applies(tmp_path):
    path = write_exp(tmp_path, tail="[[override]]\nmemory = \"softmax\"\ntrain = { lr = 1e-4 }")
    runs = load(str(path)).expand()
    assert {(r.model.memory, r.train.lr) for r in runs} == {("linear/sum", 1e-3), ("softmax", 1e-4)}


@pytest.mark.parametrize("setting, field", [("task.length_factor=1e12", "task.length_factor"),
                                            ("task.length_factor=inf", "task.length_factor")])
def test_task_values_found_at_validation(tmp_path, store, memory_24gib, setting, field):
    res, untouched = invoke(["run", write_exp(tmp_path), "--store", store, "--set", "task.name=\"overwrite\"",
                             "--set", setting], store)
    assert_refused(res, field, untouched)


def test_plain_names_pass():
    for name in ("capacity", "a.b_c-1", "X" * 100, "_x"):
        assert from_dict({"name": name, "task": {"num_keys": 4}}).name == name


# ---- the grid's size (point 1) ------------------------------------------------------------------------------

def test_astronomical_grid_is_refused_before_it_is_expanded(tmp_path, store, monkeypatch):
    def boom(self):
        raise AssertionError("the grid was expanded")

    monkeypatch.setattr(config.Experiment, "expand", boom)
    axis = "[" + ", ".join(str(i) for i in range(1, 101)) + "]"
    sets = [f"task.num_keys={axis}", f"model.d_key={axis}", f"train.batch_size={axis}",
            f"train.max_steps={axis}", f"train.eval_every={axis}"]
    args = ["run", write_exp(tmp_path), "--store", store]
    for s in sets:
        args += ["--set", s]
    res, untouched = invoke(args, store)
    assert_refused(res, "grid: 20,000,000,000 runs", untouched)
    assert "--max-runs" in res.output and "100 task.num_keys" in res.output


def test_max_runs_sets_the_cap(tmp_path, store):
    exp = write_exp(tmp_path)  # 2 x 2 axes x 1 seed = 4 runs
    res, untouched = invoke(["run", exp, "--store", store, "--max-runs", "3"], store)
    assert_refused(res, "grid: 4 runs", untouched)
    res = CliRunner().invoke(main, ["run", str(exp), "--store", str(store), "--max-runs", "4", "--dry-run"])
    assert res.exit_code == 0 and "4 runs in experiment" in res.output
    assert max(len(load(n).expand()) for n in shipped_experiments()) < config.DEFAULT_MAX_RUNS


# ---- sizes that cannot fit (point 3) ------------------------------------------------------------------------

@pytest.mark.parametrize("setting, field", [("task.num_keys=10000000", "task.num_keys"),
                                            ("model.d_key=1000000", "model.d_key"),
                                            ("train.batch_size=1000000", "train.batch_size")])
def test_impossible_sizes_fail_at_once_saying_what_they_need(store, memory_24gib, monkeypatch, setting, field):
    built = []
    real_build = config.TaskConfig.build
    monkeypatch.setattr(config.TaskConfig, "build", lambda self: built.append(self) or real_build(self))
    res, untouched = invoke(["run", "quick", "--store", store, "--set", setting], store)
    assert_refused(res, field, untouched)
    assert "would need about" in res.output and "24 GiB" in res.output
    if field == "task.num_keys":  # refused from the sizes alone, before any task is built
        assert built == []


def test_shipped_experiments_fit_on_a_24_gib_machine(memory_24gib):
    files = sorted((ROOT / "tasks").glob("*.toml")) + list(shipped_experiments().values())
    for path in files:
        assert load(str(path)).expand(), path


def _saved_bytes(model: rb.RetrievalModel, batch) -> int:
    """Bytes of every distinct storage autograd keeps for one training step's backward, plus the
    parameters' gradients."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(batch.keys, batch.values, batch.query[:, None])[:, 0]
        loss = rb.retrieval_loss(y, batch.target)
    loss.backward()
    return sum(storages.values()) + sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("spec", ["linear/sum", "dpfp-2/delta", "linear/delta/sum+attn", "tanh/fwm", "softmax",
                                  "favor-16/sum"])
def test_estimate_bounds_what_a_real_step_keeps(spec):
    """The estimate against the real thing: the parameters part is the model's parameter count times
    4 copies (weights, gradients, Adam's two moments), and the training part holds at least what autograd
    really saves for one step's backward."""
    S, K, B = 24, 8, 16
    task = rb.task("capacity", num_keys=S)
    model = rb.RetrievalModel(S, spec, d_key=K)
    est = sizing.estimate(S, S, task.seq_len, task.eval_seq_len, task.eval_sequences, task.max_eval_queries, K,
                          2.2, B, model.memory)
    count = sum(p.numel() for p in model.parameters())
    assert 16 * count <= est.parts["parameters"] <= 1.5 * 16 * count
    saved = _saved_bytes(model, task.sample(B, torch.Generator().manual_seed(0)))
    assert saved <= est.parts["training step"] <= 20 * saved
    bigger = sizing.estimate(S, S, 2 * task.seq_len, task.eval_seq_len, task.eval_sequences,
                             task.max_eval_queries, K, 2.2, 2 * B, model.memory)
    assert bigger.parts["training step"] > 3 * est.parts["training step"]


def test_too_large_compares_with_the_limit():
    est = sizing.Estimate({"parameters": GIB, "training step": 3 * GIB, "evaluation": 2 * GIB, "process": 0})
    assert est.total == 4 * GIB and est.largest == "training step"
    assert sizing.too_large(est, limit=4 * GIB) is None
    why = sizing.too_large(est, limit=4 * GIB - 1)
    assert why.startswith("train.batch_size") and "about 4 GiB" in why


# ---- plugins (point 5) --------------------------------------------------------------------------------------

class PlainMemory(nn.Module):
    """The documented forward, but not a retrieval_bench.Memory."""

    def forward(self, keys, values, betas=None, queries=None, **gates):
        return torch.softmax(queries @ keys.transpose(1, 2), dim=-1) @ values


def test_plugin_memory_that_is_no_memory_is_one_message_before_the_sweep(tmp_path, store, scoped_registries):
    scoped_registries["memories"].register("plain-mem", PlainMemory, origin="fake-dist")
    res, untouched = invoke(["run", write_exp(tmp_path), "--store", store, "--set", "model.memory=plain-mem"],
                            store)
    assert_refused(res, "model.memory", untouched)
    assert "retrieval_bench.Memory" in res.output


def test_signed_plugin_map_is_refused_with_a_sum_default_and_explicit_specs_work(scoped_registries):
    class SignedMap(rb.FeatureMap):
        non_negative = False

        def forward(self, x):
            return torch.sin(x)

    class UnmarkedMap(nn.Module):  # a map that says nothing about its sign is taken as non-negative
        def forward(self, x):
            return x.exp()

    scoped_registries["feature_maps"].register("signed", SignedMap, origin="fake-dist")
    scoped_registries["feature_maps"].register("unmarked", UnmarkedMap, origin="fake-dist")
    for spec in ("signed/delta", "signed/sum"):
        with pytest.raises(rb.RegistryError, match=f"{spec}/l2"):
            parse_spec(spec)
    for spec in ("signed/fwm", "signed/delta/l2", "signed/delta/sum", "signed/sum/attn", "unmarked/delta",
                 "tanh/fwm", "identity/delta/none", "linear/delta", "dpfp-1/sum"):
        parse_spec(spec)


@pytest.mark.slow
def test_reproduction_store_holds_no_spec_now_refused(tmp_path):
    db = tmp_path / "results.db"
    db.write_bytes(lzma.decompress((ROOT / "reproduction" / "results.db.xz").read_bytes()))
    con = sqlite3.connect(db)
    specs = {m for (m,) in con.execute("SELECT DISTINCT memory FROM runs")}
    con.close()
    assert specs
    for spec in specs:
        rb.memory(spec, d_key=64)


# ---- rich markup: names are printed, never read as markup (point 6) ------------------------------------------

def test_bracketed_names_print_literally(scoped_registries):
    state = SweepState(total=2, skipped=0)
    state.running = {"a": {"step": 3, "eval_loss": 0.5}}
    state.labels = {"a": "m[/] [bold]x S=4 seed=1"}
    console = Console(record=True, width=200)
    console.print(state.render())
    assert "m[/] [bold]x S=4 seed=1" in console.export_text()


def test_memory_name_with_brackets_runs_end_to_end(tmp_path, scoped_registries):
    scoped_registries["memories"].register("m[/]", rb.SoftmaxMemory, origin="x[/]")
    exp = write_exp(tmp_path)
    res = CliRunner().invoke(main, ["run", str(exp), "--store", str(tmp_path / "r.db"), "--workers", "1",
                                    "--set", "model.memory=m[/]", "--set", "task.num_keys=4",
                                    "--set", "train.max_steps=10", "--out", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert "m[/]" in res.output
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0 and "m[/]" in res.output and "x[/]" in res.output


# ---- the command line (point 8) -----------------------------------------------------------------------------

def test_directory_as_experiment_says_so(tmp_path, store):
    res, untouched = invoke(["run", tmp_path, "--store", store], store)
    assert_refused(res, "is a directory", untouched)


def test_experiment_in_unreadable_directory_gives_a_message(tmp_path, store, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    exp = write_exp(locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make stat fail as it does for other users
        real_stat = pathlib.Path.stat

        def stat(self, *a, **k):
            if str(self).startswith(str(locked) + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_stat(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "stat", stat)
    try:
        res, untouched = invoke(["run", exp, "--store", store], store)
    finally:
        locked.chmod(0o755)
    assert_refused(res, "cannot read", untouched)


def test_ctrl_c_while_loading_exits_130_with_one_line(tmp_path, store, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load", interrupted)
    res, untouched = invoke(["run", write_exp(tmp_path), "--store", store], store)
    assert res.exit_code == 130 and "interrupted" in res.output and "Aborted" not in res.output, res.output
    assert untouched


@pytest.mark.parametrize("option", [["--address", "head:6379"], ["--ray-start-timeout", "5"]])
def test_ray_options_without_ray_are_errors(tmp_path, store, option):
    res, untouched = invoke(["run", write_exp(tmp_path), "--store", store, *option], store)
    assert_refused(res, option[0], untouched)


BENCH = [(["--num-keys", "0"], "--num-keys"), (["--threads", "0"], "--threads"),
         (["--batch-size", "0"], "--batch-size"), (["--d-key", "0"], "--d-key"), (["--repeat", "0"], "--repeat"),
         (["--memory", "linaer/sum"], "--memory"), (["--task", "capacty"], "--task"),
         (["--memory", "dpfp-9/sum", "--d-key", "8"], "--memory")]


@pytest.mark.parametrize("args, option", BENCH, ids=[" ".join(a) for a, _ in BENCH])
def test_bad_bench_option_names_it_and_stores_nothing(tmp_path, monkeypatch, args, option):
    from retrieval_bench import bench

    def never(*a, **k):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(bench, "run_bench", never)
    db = tmp_path / "bench.db"
    res = CliRunner().invoke(main, ["bench", "--store", str(db), *args])
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output, res.output
    assert not db.exists()


@pytest.mark.parametrize("content", ["random", "text", "truncated", "read-only"])
def test_report_on_a_bad_store_is_a_message(tmp_path, store, content):
    path = tmp_path / "bad.db"
    if content == "random":
        path.write_bytes(os.urandom(4096))
    elif content == "text":
        path.write_text("not a database\n")
    elif content == "truncated":
        path.write_bytes(store.read_bytes()[:2048])
    else:
        path.write_bytes(store.read_bytes())
        path.chmod(0o444)
    before = path.read_bytes()
    res = CliRunner().invoke(main, ["report", "--store", str(path), "--out", str(tmp_path / "plots")])
    assert "Traceback" not in res.output, res.output
    if content == "read-only":  # reading needs no writing: it works (or names the store)
        assert res.exit_code == 0 or (res.exit_code == 2 and "--store" in res.output), res.output
    else:
        assert res.exit_code == 2 and "--store" in res.output, res.output
    assert path.read_bytes() == before


def test_unwritable_out_is_a_message_after_the_runs_are_stored(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    db = tmp_path / "r.db"
    res = CliRunner().invoke(main, ["run", str(write_exp(tmp_path)), "--store", str(db), "--workers", "1",
                                    "--set", "task.num_keys=4", "--set", "model.memory=softmax",
                                    "--out", str(blocker / "plots")])
    assert_refused(res, "--out")
    assert len(Store(db).load("runs")) == 1


def test_read_only_out_is_a_message(tmp_path, store, monkeypatch):
    from retrieval_bench import report

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "plots"))

    monkeypatch.setattr(report, "write_report", read_only)
    res = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(tmp_path / "plots")])
    assert_refused(res, "--out")
    assert "Read-only file system" in res.output


@pytest.mark.parametrize("error", [sqlite3.OperationalError, "StoreError"])
def test_full_disk_while_storing_keeps_the_runs_stored_before(tmp_path, monkeypatch, error):
    from retrieval_bench import store as store_mod

    real_write = store_mod.Store.write_run
    calls = []

    def write_run(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            exc = store_mod.StoreError if error == "StoreError" else error
            raise exc("database or disk is full")
        return real_write(self, *a, **k)

    monkeypatch.setattr(store_mod.Store, "write_run", write_run)
    db = tmp_path / "r.db"
    res = CliRunner().invoke(main, ["run", str(write_exp(tmp_path)), "--store", str(db), "--workers", "1",
                                    "--set", "model.memory=softmax", "--no-report"])
    assert_refused(res, "disk is full")
    assert "--store" in res.output and "kept" in res.output
    assert len(Store(db).load("runs")) == 1


# ---- Ray start-up (point 9) ---------------------------------------------------------------------------------

def _processes_using(folder: str) -> list[int]:
    """Processes with an open file under ``folder`` (a Ray instance's session files)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder) for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(int(pid))
        except OSError:
            continue
    return found


def _runs_on_workers(folder: str) -> bool:
    """Whether a process of the Ray instance using ``folder`` runs a task of a sweep (Ray titles a worker's
    process after the task it runs: ``ray::retrieval-bench-run``)."""
    for pid in _processes_using(folder):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::retrieval-bench-run"):
                    return True
        except OSError:
            continue
    return False


def _wait_gone(folder: str, timeout: float = 30.0) -> list[str]:
    """The processes still using ``folder`` after up to ``timeout`` s, each as "pid (ppid P): command line"."""
    end = time.monotonic() + timeout
    while (left := _processes_using(folder)) and time.monotonic() < end:
        time.sleep(0.5)
    return [_describe(pid) for pid in left]


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = f.read().rsplit(b")", 1)[1].split()[1].decode()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} (ppid {ppid}): {cmd}"


@pytest.fixture
def ray_cli(tmp_path):
    """Start ``retrieval-bench run ... --executor ray`` as a subprocess with a private Ray temp folder (short:
    Ray's socket paths are limited), so the test can see which processes are that instance's."""
    pytest.importorskip("ray")
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    procs = []

    def start(*args):
        cmd = [sys.executable, "-m", "retrieval_bench", "run", str(write_exp(tmp_path)), "--executor", "ray",
               "--store", str(tmp_path / "r.db"), "--no-report", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      preexec_fn=default_sigint))
        return procs[-1], ray_tmp

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait_for_line(proc, text: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if text in line or not line:
            return
    raise AssertionError(f"no {text!r} within {timeout} s")


@pytest.mark.slow
def test_ray_start_timeout_is_a_message_and_leaves_no_process(ray_cli):
    proc, ray_tmp = ray_cli("--ray-start-timeout", "0.5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "did not start within 0.5 s" in out and "--ray-start-timeout" in out and "Traceback" not in out
    assert _wait_gone(ray_tmp) == []


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_exits_130_and_leaves_no_process(ray_cli):
    proc, ray_tmp = ray_cli()
    _wait_for_line(proc, "runs to do")  # printed just before the executor starts Ray
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert _wait_gone(ray_tmp) == []


@pytest.mark.slow
def test_killed_driver_takes_its_ray_instance_down(ray_cli):
    proc, ray_tmp = ray_cli("--set", "train.max_steps=1000000", "--set", "train.eval_every=100000")
    end = time.monotonic() + 120
    while len(_processes_using(ray_tmp)) < 3 and time.monotonic() < end:  # the instance is starting
        time.sleep(0.5)
    assert len(_processes_using(ray_tmp)) >= 3, "Ray did not start"
    # the runs are on the workers: a task's process is titled after it. Not a fixed pause: three processes are
    # up seconds before Ray's agents and workers start, and a kill then would land amid Ray's start-up
    end = time.monotonic() + 120
    while not _runs_on_workers(ray_tmp) and time.monotonic() < end:
        time.sleep(0.5)
    assert _runs_on_workers(ray_tmp), "no run reached a Ray worker"
    proc.kill()
    proc.wait()
    assert _wait_gone(ray_tmp) == []


def test_finite_checks_cover_every_float_field():
    """Every float field of the model and train sections is checked for finiteness (a new one too)."""
    for sec, cls in (("model", config.ModelConfig), ("train", config.TrainConfig)):
        for f in config.dataclasses.fields(cls):
            if f.type == "float":
                with pytest.raises(ConfigError, match=f"{sec}.{f.name}: must be a finite number"):
                    from_dict({"name": "x", "task": {"num_keys": 4}, sec: {f.name: math.inf}})
