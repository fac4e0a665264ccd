"""The GPU against the CPU (DESIGN §9): every registered memory's forward (outputs and gradients), one training
step of the retrieval model, FWM's CUDA-graph form, and runtime.py on a CUDA device.

Every test is marked ``gpu`` and skipped without CUDA (run them with ``python -m pytest -q -m gpu
tests/test_gpu.py``). The checks are plain functions of a device, so that ``scripts/gpu_check.py`` can run them
where pytest is absent (``run_all``), and on the CPU (``--device cpu``: the CPU against itself, FWM's graphs
through ``runtime.rerun_capture``) so that their code has run before a GPU is lent.

Float32 tolerances follow tests/test_fast_forms.py: the device's float32 result may differ from the CPU's float64
one by 1e-5 of the largest value plus 4 times the CPU's own float32 error there (a difference of large terms,
as in an unnormalised delta rule, is no more exact on one device than on the other).
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
from collections.abc import Callable, Iterator

import torch
from conftest import fix_random_features  # tests/ is on sys.path

import retrieval_bench as rb
from retrieval_bench import registry, runtime
from retrieval_bench.memories import checkpointed
from retrieval_bench.memories.rules import FWMRule
from retrieval_bench.model import RetrievalModel, retrieval_loss

try:
    import pytest
except ImportError:  # scripts/gpu_check.py runs the checks through run_all instead
    pytest = None

F32_RTOL, F64_RTOL = 1e-5, 1e-10
EPS_RATIO = 2.0**-29  # float64's epsilon over float32's: the CPU's float64 error, estimated from its float32 one


def buildable(spec: str) -> bool:
    """Whether the spec names a memory (a composition the registry refuses, e.g. signed features under the
    attention normaliser, has nothing to compare)."""
    try:
        rb.memory(spec, d_key=8)
    except registry.RegistryError:
        return False
    return True


def memory_specs() -> list[str]:
    """Every registered memory and every φ × rule (× normalisation on ``linear``) that the registry builds, as
    tests/conftest.py's ``ALL_MEMORY_SPECS`` (repeated here so that the checks run without pytest)."""
    specs = list(rb.names("memories"))
    for rule_name in rb.names("update_rules"):
        rule_cls = registry.update_rules.get(rule_name)
        specs += [f"{phi}/{rule_name}" for phi in rb.names("feature_maps")]
        for norm in rb.names("normalisations"):
            specs.append(f"linear/{rule_name}/{norm}")
            if rule_cls.supports_attn:
                specs.append(f"linear/{rule_name}/{norm}+attn")
    return [s for s in dict.fromkeys(specs) if buildable(s)]


def _check_close(got: torch.Tensor, ref: torch.Tensor, rtol: float, ref_error: float, what: str) -> None:
    """max |got - ref| <= rtol · max |ref| + 4 · ref_error (got moved to the CPU, in float64)."""
    got = got.detach().cpu().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-6)
    assert err <= rtol * scale + 4 * ref_error, (
        f"{what}: max abs diff {err:.3e} > {rtol:.0e} x {scale:.3e} + 4 x {ref_error:.1e}")


def _compare(results: dict, names: list[str], what: str) -> None:
    """results[(device, dtype)] = list of tensors (None where absent): each device's float32 and float64 against
    the CPU's float64, with the CPU's own float32 error as the measure of conditioning."""
    ref, cpu32 = results["cpu", torch.float64], results["cpu", torch.float32]
    for (dev, dtype), got in results.items():
        for name, g, r, r32 in zip(names, got, ref, cpu32, strict=True):
            assert (g is None) == (r is None), f"{what} {name} on {dev}: a gradient is missing on one side"
            if g is None:
                continue
            r = r.double()
            own = (r32.double() - r).abs().max().item() if r.numel() else 0.0  # the CPU's float32 error
            if dtype == torch.float32:
                _check_close(g, r, F32_RTOL, own, f"{what} {name} ({dev}, float32)")
            else:
                _check_close(g, r, F64_RTOL, own * EPS_RATIO, f"{what} {name} ({dev}, float64)")


# ---------------------------------------------------------------------------------------------------- checks
def check_memory_parity(spec: str, device: torch.device) -> None:
    """A memory's training form on ``device`` against the CPU: output and gradients wrt keys, values, betas,
    queries and any other gates, in float32 and float64; then an evaluation-shaped read (more queries than
    values, no grad), which takes other forms (the delta rule's chunkwise W, FWM's plain loop)."""
    B, L, K, V, Q = 2, 20, 8, 5, 3  # L > 16: the chunked forms run two chunks, the second padded
    g = torch.Generator().manual_seed(1)
    mem = fix_random_features(rb.memory(spec, d_key=K))
    extra = [name for name in mem.gates if name != "beta"]
    base = [0.5 * torch.randn(B, L, K, generator=g, dtype=torch.float64), torch.randn(B, L, V, generator=g,
            dtype=torch.float64), torch.sigmoid(torch.randn(B, L, generator=g, dtype=torch.float64)),
            0.5 * torch.randn(B, Q, K, generator=g, dtype=torch.float64)]
    base += [torch.sigmoid(torch.randn(B, L, generator=g, dtype=torch.float64)) for _ in extra]
    cot = torch.randn(B, Q, V, generator=g, dtype=torch.float64)
    many_q = 0.5 * torch.randn(B, 3 * V, K, generator=g, dtype=torch.float64)
    mem(*(x.float() for x in base[:4]), **dict(zip(extra, (x.float() for x in base[4:]), strict=True)))  # draw Ω
    results, evals = {}, {}
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        m = copy.deepcopy(mem).to(dev)
        for dtype in (torch.float32, torch.float64):
            xs = [x.to(dev, dtype).requires_grad_() for x in base]
            y = m(*xs[:4], **dict(zip(extra, xs[4:], strict=True)))
            grads = torch.autograd.grad(y, xs, cot.to(dev, dtype), allow_unused=True)
            results[dev.type if dev.type == "cpu" else str(dev), dtype] = [y, *grads]
            with torch.no_grad():
                ys = m(xs[0], xs[1], xs[2], many_q.to(dev, dtype), **dict(zip(extra, xs[4:], strict=True)))
            evals[dev.type if dev.type == "cpu" else str(dev), dtype] = [ys]
    names = ["output", "d/dkeys", "d/dvalues", "d/dbetas", "d/dqueries", *(f"d/d{n}" for n in extra)]
    _compare(results, names, spec)
    _compare(evals, ["evaluation read"], spec)


def check_training_step(spec: str, device: torch.device) -> None:
    """``RetrievalModel(...).to(device)``: one step (forward, backward, Adam) from the CPU's init and batch gives
    the CPU's loss and parameters, float32 and float64."""
    S, B = 8, 4
    tk = rb.task("capacity", num_keys=S)
    batch = tk.sample(B, torch.Generator().manual_seed(2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = RetrievalModel(S, fix_random_features(rb.memory(spec, d_key=8)), d_key=8, num_values=tk.num_values)
    model(batch.keys[:1], batch.values[:1], batch.query[:1, None])  # draws a fixed Ω before the copies
    results, names = {}, ["loss", *(n for n, _ in model.named_parameters())]
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        for dtype in (torch.float32, torch.float64):
            m = copy.deepcopy(model).to(dev, dtype)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            keys, values, query, target = (t.to(dev) for t in (batch.keys, batch.values, batch.query,
                                                               batch.target))
            loss = retrieval_loss(m(keys, values, query[:, None])[:, 0], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            results[dev.type if dev.type == "cpu" else str(dev), dtype] = [loss.detach(),
                                                                            *(p.detach() for p in m.parameters())]
    _compare(results, names, f"{spec} training step")


@contextlib.contextmanager
def _patched(obj, **attrs) -> Iterator[None]:
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def _fwm_plan(device: torch.device, levels: int) -> dict:
    keep = {device.type: 2**40} if levels == 0 else {}
    return {"FWM_KEEP_ALL_BUDGET": keep, "FWM_STATE_BUDGET": 0 if levels == 2 else checkpointed.FWM_STATE_BUDGET}


def _fwm_loop(a, v, beta):
    rule = FWMRule()
    state = rule.init_state(a.shape[0], v.shape[-1], a.shape[-1], a, False)
    for t in range(a.shape[1]):
        state, _ = rule.step(state, a[:, t], v[:, t], {"beta": beta[:, t]}, t, False)
    return state["W"]


def check_fwm_graphs(device: torch.device, levels: int) -> None:
    """FWM's training form on ``device`` as captured graphs equals its eager form there and the CPU's per-step
    loop, for each plan (levels 0: every state kept; 1 and 2: checkpoints), including two calls of one shape
    before their backwards (they share the graph's buffers) and a second backward. On the CPU the graphs are
    "captured" by re-running (``runtime.rerun_capture``)."""
    B, L, F, V = 3, 70, 8, 6
    g = torch.Generator().manual_seed(4)
    inputs = [[torch.tanh(2 * torch.randn(B, L, F, generator=g, dtype=torch.float64)),
               3 * torch.randn(B, L, V, generator=g, dtype=torch.float64),
               torch.rand(B, L, generator=g, dtype=torch.float64)] for _ in range(2)]
    cot = torch.randn(B, V, F, generator=g, dtype=torch.float64)

    def grads(fn, xs, dev, dtype, second=False):
        xs = [x.to(dev, dtype).requires_grad_() for x in xs]
        W = fn(*xs)
        out = torch.autograd.grad(W, xs, cot.to(dev, dtype), retain_graph=second)
        if second:
            again = torch.autograd.grad(W, xs, cot.to(dev, dtype))
            for x, y in zip(out, again, strict=True):
                assert torch.equal(x, y), "a second backward differs from the first"
        return [W, *out]

    refs = [grads(_fwm_loop, xs, torch.device("cpu"), torch.float64) for xs in inputs]
    cpu_patch = {"_use_graphs": lambda a: True, "_CAPTURE": runtime.rerun_capture} if device.type == "cpu" else {}
    names = ["W_L", "d/da", "d/dv", "d/dbeta"]
    with _patched(checkpointed, **_fwm_plan(device, levels)), _patched(checkpointed, **cpu_patch):
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            checkpointed.clear_fwm_graphs()
            xs = [[x.to(device, dtype).requires_grad_() for x in inp] for inp in inputs]
            W1, W2 = checkpointed.fwm_state(*xs[0]), checkpointed.fwm_state(*xs[1])  # both before a backward
            g2 = torch.autograd.grad(W2, xs[1], cot.to(device, dtype))
            g1 = torch.autograd.grad(W1, xs[0], cot.to(device, dtype))
            assert len(checkpointed._GRAPHS) == 1 and not checkpointed._GRAPH_FAILED, (
                f"FWM's graphs were not captured (failed: {len(checkpointed._GRAPH_FAILED)}; see the log)")
            graphed = [[W1, *g1], [W2, *g2]]
            second = grads(checkpointed.fwm_state, inputs[0], device, dtype, second=True)
            with _patched(checkpointed, FWM_CUDA_GRAPHS=False, _use_graphs=lambda a: False):
                eager = grads(checkpointed.fwm_state, inputs[0], device, dtype)
            for name, a, b, c, r in zip(names, graphed[0], second, eager, refs[0], strict=True):
                _check_close(a, c.detach().cpu().double(), 1e-12, 0.0, f"FWM {name}, graph vs eager ({dtype})")
                _check_close(a, r.detach(), rtol, 0.0, f"FWM {name}, graph vs the CPU loop ({dtype})")
                _check_close(b, r.detach(), rtol, 0.0, f"FWM {name}, second call vs the CPU loop ({dtype})")
            for name, a, r in zip(names, graphed[1], refs[1], strict=True):
                _check_close(a, r.detach(), rtol, 0.0, f"FWM {name} of the other call ({dtype})")
    checkpointed.clear_fwm_graphs()


def check_runtime(device: torch.device) -> None:
    """resolve_device, timed and the peak-memory measures on ``device``."""
    if device.type == "cuda":
        assert runtime.resolve_device("auto") == torch.device("cuda", 0)
        assert runtime.resolve_device(str(device)) == device
    mb = 64
    grown = runtime.peak_memory_increase_mb(lambda: torch.ones(mb * 2**18, device=device).sum().item(), device)
    assert grown is not None and grown >= 0.9 * mb, grown
    x = torch.randn(512, 512, device=device)
    with runtime.timed(device) as t:
        for _ in range(10):
            x = x @ x / 512
    assert t.seconds is not None and t.seconds > 0


def check_grouped_sweep(device: torch.device) -> None:
    """A tiny sweep on ``device`` in groups of 4 (``train.group``): every run done, on that device, and each
    record as the CPU trains the run alone (within float32 tolerance over a few steps)."""
    import dataclasses
    import io
    import tempfile

    from rich.console import Console

    from retrieval_bench.config import from_dict
    from retrieval_bench.executors import InlineExecutor
    from retrieval_bench.store import Store
    from retrieval_bench.sweep import run_sweep
    from retrieval_bench.train import train_run

    raw = {"name": "grouped", "seeds": [1, 2], "task": {"name": "capacity", "num_keys": 6, "eval_sequences": 4},
           "model": {"memory": ["dpfp-1/sum", "dpfp-2/delta", "softmax"], "d_key": 8},
           "train": {"eval_every": 5, "max_steps": 10, "batch_size": 8, "lr": [1e-3, 3e-3], "stop_loss": 0.0,
                     "diagnostics": False, "device": str(device), "group": 4}}
    exp = from_dict(raw)
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"{folder}/r.db")
        state = run_sweep(exp, store, InlineExecutor(threads=1), live=False, console=Console(file=io.StringIO()))
        assert state.done == 12, (state.done, state.failed)
        rows = store.load("runs").set_index("run_id")
    assert rows["device"].str.startswith(str(device)).all()
    for cfg in exp.expand():
        alone = train_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu", group=1)))["row"]
        got = rows.loc[cfg.run_id]
        assert got["steps"] == alone["steps"] and got["status"] == alone["status"]
        assert abs(got["final_loss"] - alone["final_loss"]) <= 1e-4 * abs(alone["final_loss"]) + 1e-6, (
            cfg.model.memory, got["final_loss"], alone["final_loss"])


def all_checks(device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """Every check as (name, thunk), in the order run_all runs them."""
    checks = [("runtime", lambda: check_runtime(device)), ("grouped sweep", lambda: check_grouped_sweep(device))]
    checks += [(f"fwm graphs, levels {lv}", lambda lv=lv: check_fwm_graphs(device, lv)) for lv in (0, 1, 2)]
    for spec in memory_specs():
        checks.append((f"memory {spec}", lambda spec=spec: check_memory_parity(spec, device)))
        checks.append((f"training step {spec}", lambda spec=spec: check_training_step(spec, device)))
    return checks


def run_all(device: torch.device, log: Callable[[str], None] = print, budget_s: float | None = None) -> dict:
    """Run every check without pytest; returns {"passed": [...], "failed": {name: traceback}, "skipped": [...]}
    (skipped: those left when ``budget_s`` seconds had passed)."""
    t0, report = time.perf_counter(), {"passed": [], "failed": {}, "skipped": []}
    for name, check in all_checks(device):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            report["skipped"].append(name)
            continue
        try:
            check()
        except Exception:  # noqa: BLE001  (every failure is reported, and the next check still runs)
            report["failed"][name] = traceback.format_exc()
            log(f"FAIL {name}\n{report['failed'][name]}")
        else:
            report["passed"].append(name)
    log(f"{len(report['passed'])} passed, {len(report['failed'])} failed, {len(report['skipped'])} skipped "
        f"in {time.perf_counter() - t0:.1f} s on {device}")
    return report


# ---------------------------------------------------------------------------------------------------- pytest
if pytest is not None:
    pytestmark = [pytest.mark.gpu,
                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

    @pytest.fixture
    def device() -> torch.device:
        """The CUDA device these tests run on (``auto``: the first one)."""
        return runtime.resolve_device("auto")

    def test_runtime_on_the_device(device):
        check_runtime(device)

    def test_a_grouped_sweep_on_the_device_matches_solo_cpu_runs(device):
        check_grouped_sweep(device)

    @pytest.mark.parametrize("levels", [0, 1, 2], ids=["keep-all", "one-level", "two-levels"])
    def test_fwm_graphs_equal_eager_and_the_cpu_loop(device, levels):
        check_fwm_graphs(device, levels)

    def test_memory_forward_matches_the_cpu(memory_spec, device):
        if not buildable(memory_spec):
            pytest.skip(f"the registry refuses {memory_spec}")
        check_memory_parity(memory_spec, device)

    def test_training_step_matches_the_cpu(memory_spec, device):
        if not buildable(memory_spec):
            pytest.skip(f"the registry refuses {memory_spec}")
        check_training_step(memory_spec, device)
