"""runtime.py on the CPU (device choice, timing, peak memory, process set-up, StaticGraph's data flow), and FWM's
device forms run here: its CUDA-graph path through ``rerun_capture`` (the same static-buffer data flow, without
a GPU), its keep-every-state plan, and the ops per step that decide its time on a GPU."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retrieval_bench import runtime
from retrieval_bench.memories import checkpointed
from retrieval_bench.memories.checkpointed import fwm_state
from retrieval_bench.memories.rules import FWMRule

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- device
def _fake_cuda(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_resolve_device_without_cuda(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert runtime.resolve_device("auto") == CPU
    assert runtime.resolve_device(" CPU ") == CPU
    assert runtime.resolve_device(torch.device("cpu")) == CPU
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"--device: .*CUDA.*not available"):
            runtime.resolve_device(setting, field="--device")


def test_resolve_device_with_cuda(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    assert runtime.resolve_device("auto") == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda") == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert runtime.resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match=r"\[train\] device: .*device 2.*only 2"):
        runtime.resolve_device("cuda:2", field="[train] device")


@pytest.mark.parametrize("setting", ["gpu", "tpu", "cpu:1", "auto:0", "cuda:", "cuda:-1", "", 3])
def test_resolve_device_rejects_unknown_settings(setting):
    with pytest.raises(ValueError, match=r"^device: unknown device"):
        runtime.resolve_device(setting)


# ---------------------------------------------------------------------------------------------------- timing
def test_timed_waits_for_cuda_work_on_entry_and_exit(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    gpu = torch.device("cuda", 0)
    with runtime.timed(gpu) as t:
        assert calls == [gpu] and t.seconds is None
        time.sleep(0.002)
    assert calls == [gpu, gpu] and t.seconds >= 0.002
    with runtime.timed(CPU):
        pass
    assert len(calls) == 2  # the CPU has nothing to wait for


def test_time_calls_warms_up_and_stops_at_its_budget():
    n = []
    times = runtime.time_calls(lambda: n.append(1), CPU, repeat=3, warmup=2)
    assert len(n) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    times = runtime.time_calls(lambda: time.sleep(0.01), CPU, repeat=50, warmup=0, budget_s=0.005)
    assert len(times) == 1  # the first call alone used the budget


# ---------------------------------------------------------------------------------------------------- memory
def test_peak_memory_increase_sees_a_step_allocation():
    mb = 64

    def touch():
        x = torch.ones(mb * 2**18)  # 64 MB of float32, every page written
        return float(x[-1])

    grown = runtime.peak_memory_increase_mb(touch, CPU)
    assert grown is not None and grown >= 0.9 * mb
    assert runtime.peak_memory_increase_mb(lambda: None, CPU) < mb / 4


def test_peak_memory_since_reset_on_the_cpu():
    runtime.reset_peak_memory(CPU)
    x = torch.ones(32 * 2**18)  # 32 MB
    peak = runtime.peak_memory_mb(CPU)
    assert peak is not None and peak >= 32 + runtime._rss_bytes() / 2**20 - x.numel() * 4 / 2**20 - 1


def test_cuda_peak_memory_reads_the_allocator(monkeypatch):
    allocated, state = [100 * 2**20], {"peak": 0, "resets": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def reset(device=None):
        state["resets"] += 1
        state["peak"] = allocated[0]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    gpu = torch.device("cuda", 0)

    def step():
        state["peak"] = allocated[0] + 48 * 2**20

    assert runtime.peak_memory_increase_mb(step, gpu) == 48
    assert runtime.reset_peak_memory(gpu) and state["resets"] == 2
    assert runtime.peak_memory_mb(gpu) == 100


# ---------------------------------------------------------------------------------------------------- process
def test_threads_are_set_and_restored():
    old = torch.get_num_threads()
    with runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    with runtime.threads(None):
        assert torch.get_num_threads() == old
    assert runtime.set_threads(0) == old and torch.get_num_threads() == 1  # at least one
    torch.set_num_threads(old)


def test_tune_malloc_reports_whether_it_applied():
    assert runtime.tune_malloc() is (runtime._libc() is not None)


# ---------------------------------------------------------------------------------------------------- graphs
def test_static_graph_replays_new_inputs_into_fresh_outputs():
    calls = []

    def fn(x, y):
        calls.append(1)
        return (x * 2 + y, x.sum(0))

    x0, y0 = torch.randn(3, 4), torch.randn(3, 4)
    g = runtime.StaticGraph(fn, (x0, y0), runtime.rerun_capture)
    x0.add_(1.0)  # the graph holds its own copies of the inputs
    x1, y1 = torch.randn(3, 4), torch.randn(3, 4)
    out1 = g(x1, y1)
    torch.testing.assert_close(out1[0], x1 * 2 + y1, rtol=0, atol=0)
    torch.testing.assert_close(out1[1], x1.sum(0), rtol=0, atol=0)
    out2 = g(y1, x1)
    torch.testing.assert_close(out1[0], x1 * 2 + y1, rtol=0, atol=0)  # an earlier result is not overwritten
    torch.testing.assert_close(out2[0], y1 * 2 + x1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="differs from the captured"):
        g(torch.randn(2, 4), y1)


# ---------------------------------------------------------------------------------------------------- FWM
def _fwm_inputs(l, dtype=torch.float64, b=2, f=5, v=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.tanh(2 * torch.randn(b, l, f, generator=g, dtype=dtype)).requires_grad_()
    vals = (3 * torch.randn(b, l, v, generator=g, dtype=dtype)).requires_grad_()  # large: the clipping acts
    beta = torch.rand(b, l, generator=g, dtype=dtype).requires_grad_()
    return a, vals, beta


def _loop(a, v, beta):
    """FWM's spec: the rule's step function, one write at a time."""
    rule = FWMRule()
    state = rule.init_state(a.shape[0], v.shape[-1], a.shape[-1], a, False)
    for t in range(a.shape[1]):
        state, _ = rule.step(state, a[:, t], v[:, t], {"beta": beta[:, t]}, t, False)
    return state["W"]


def _value_and_grads(fn, xs, cot):
    W = fn(*xs)
    return [W.detach(), *torch.autograd.grad(W, xs, cot)]


@pytest.fixture(params=[0, 1, 2], ids=["keep-all", "one-level", "two-levels"])
def plan_levels(request, monkeypatch):
    """FWM's three plans on the CPU: every state kept (a GPU's default), checkpoints in one or two levels."""
    if request.param == 0:
        monkeypatch.setitem(checkpointed.FWM_KEEP_ALL_BUDGET, "cpu", 2**40)
    elif request.param == 2:
        monkeypatch.setattr(checkpointed, "FWM_STATE_BUDGET", 0)
    return request.param


@pytest.fixture
def cpu_graphs(monkeypatch):
    """FWM's CUDA-graph path on the CPU: captured by re-running, cached as on a GPU."""
    monkeypatch.setattr(checkpointed, "_use_graphs", lambda a: True)
    monkeypatch.setattr(checkpointed, "_CAPTURE", runtime.rerun_capture)
    checkpointed.clear_fwm_graphs()
    yield
    checkpointed.clear_fwm_graphs()


@pytest.mark.parametrize("l", [1, 2, 3, 4, 9, 10, 11, 20, 21, 23, 36, 57, 60])
def test_fwm_plans_equal_the_loop(plan_levels, l):
    xs = _fwm_inputs(l)
    assert checkpointed._plan(xs[0], xs[1])[0] == (plan_levels if l > 1 or plan_levels != 2 else 2)
    cot = torch.randn(2, 4, 5, dtype=torch.float64)
    for got, want in zip(_value_and_grads(fwm_state, xs, cot), _value_and_grads(_loop, xs, cot), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fwm_graph_path_equals_the_eager_form(plan_levels, cpu_graphs):
    xs = _fwm_inputs(30)
    cot = torch.randn(2, 4, 5, dtype=torch.float64)
    graphed = _value_and_grads(fwm_state, xs, cot)
    assert len(checkpointed._GRAPHS) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpointed, "_use_graphs", lambda a: False)
        eager = _value_and_grads(fwm_state, xs, cot)
    for got, want in zip(graphed, eager, strict=True):
        assert torch.equal(got, want)


def test_fwm_graphs_keep_each_call_apart(plan_levels, cpu_graphs):
    """Two calls of one shape share the captured buffers: the second forward must not change the first's
    backward, and a second backward (retain_graph) recomputes what the first released."""
    first, second = _fwm_inputs(25, seed=1), _fwm_inputs(25, seed=2)
    cot = torch.randn(2, 4, 5, dtype=torch.float64)
    W1, W2 = fwm_state(*first), fwm_state(*second)
    g1 = torch.autograd.grad(W1, first, cot, retain_graph=True)
    g2 = torch.autograd.grad(W2, second, cot)
    g1_again = torch.autograd.grad(W1, first, cot)
    assert len(checkpointed._GRAPHS) == 1
    for xs, W, grads in ((first, W1, g1), (second, W2, g2), (first, W1, g1_again)):
        want = _value_and_grads(_loop, xs, cot)
        torch.testing.assert_close(W.detach(), want[0], rtol=1e-12, atol=1e-12)
        for got, ref in zip(grads, want[1:], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_fwm_graph_cache_is_bounded_and_a_failed_capture_runs_eagerly(cpu_graphs, monkeypatch, caplog):
    for l in (5, 6, 7):
        fwm_state(*_fwm_inputs(l)).sum().backward()
    assert len(checkpointed._GRAPHS) == checkpointed._GRAPHS_KEPT

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(checkpointed, "_CAPTURE", broken)
    xs = _fwm_inputs(9)
    cot = torch.randn(2, 4, 5, dtype=torch.float64)
    got = _value_and_grads(fwm_state, xs, cot)
    assert "running it eagerly" in caplog.text and len(checkpointed._GRAPH_FAILED) == 1
    for g, want in zip(got, _value_and_grads(_loop, xs, cot), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("levels", [0, 1])
def test_fwm_ops_per_step_stay_few(levels, monkeypatch):
    """On a GPU each op of FWM's loop costs a launch, so its time is ops per step × L: forward 5 per step, the
    backward 7 plus the recompute's 5 (none where every state is kept), and a few per segment."""
    if levels == 0:
        monkeypatch.setitem(checkpointed.FWM_KEEP_ALL_BUDGET, "cpu", 2**40)
    L = 200
    a, v, beta = _fwm_inputs(L, torch.float32)
    with _CountOps() as fwd:
        W = fwm_state(a, v, beta)
    with _CountOps() as bwd:
        W.backward(torch.ones_like(W))
    per_segment = 30 * len(checkpointed._plan(a, v)[1])
    assert fwd.n <= 5 * L + 40
    assert bwd.n <= (7 if levels == 0 else 12) * L + per_segment + 80


# ---------------------------------------------------------------------------------------------------- the GPU check
def _gpu_check_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_times_a_training_step_on_the_cpu(monkeypatch):
    """scripts/gpu_check.py's timing path (what the GPU run will execute) runs here: FWM's forms switched as it
    asks, a row with the step's time and memory."""
    gpu_check = _gpu_check_script()
    for name in ("FWM_CUDA_GRAPHS", "FWM_KEEP_ALL_BUDGET"):  # time_step switches these for its process
        monkeypatch.setattr(checkpointed, name, getattr(checkpointed, name))
    cfg = next(c for c in gpu_check.step_configs(quick=True) if c["name"] == "tanh/fwm eager, checkpoints")
    row = gpu_check.time_step(cfg, "cpu", repeat=2, warmup=1, threads=1)
    assert row["timed_steps"] == 2 and row["ms_median"] > 0 and row["ms_min"] <= row["ms_median"]
    assert (row["memory"], row["seq_len"], row["form"]) == ("tanh/fwm", 16, "eager, checkpoints")
    assert not checkpointed.FWM_CUDA_GRAPHS and checkpointed.FWM_KEEP_ALL_BUDGET == {}
    assert set(gpu_check.COLUMNS) >= set(row)


def test_gpu_checks_run_on_the_cpu():
    """tests/test_gpu.py's checks, which pytest skips without CUDA, run here against the CPU itself (FWM's graphs
    through rerun_capture), so that their code has run before a GPU is lent."""
    import test_gpu

    test_gpu.check_fwm_graphs(CPU, 1)
    test_gpu.check_memory_parity("dpfp-3/delta", CPU)
    test_gpu.check_training_step("tanh/fwm", CPU)
    assert "tanh/fwm" in test_gpu.memory_specs() and "softmax" in test_gpu.memory_specs()


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """The whole script, each part in its own process, at tiny sizes on the CPU (about two minutes here)."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"),
                        "--device", "cpu", "--quick", "--repeat", "2", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with (out / "gpu_steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["status"] == "ok" and float(r["ms_median"]) > 0 for r in rows)
    assert "tests: passed" in (out / "gpu_check.log").read_text()
