"""One scripted check of a GPU, run from the repository root without installing anything:

    PYTHONPATH=. python scripts/gpu_check.py                       # on the GPU machine (needs about 4-5 min)
    PYTHONPATH=. python scripts/gpu_check.py --device cpu --quick  # the same code paths here, tiny sizes

(a) tests/test_gpu.py: with pytest where it is importable (``-m gpu``), else its checks through ``run_all``;
(b) one training step of the retrieval model (forward, backward, Adam, the batch moved to the device each step),
    timed CUDA-synchronised, median of several after warm-up, with peak device memory, at B = 32, d_key = 64:
    softmax, dpfp-3/sum, dpfp-3/delta, favor-512/sum at S = L = 600 (capacity) and tanh/fwm at S = 200, L = 400
    (overwrite), FWM also without its CUDA graphs and without keeping every state; and a step of 16 dpfp-3/sum
    runs trained as one stacked model (group.py), against one run's;
(c) everything under $OUT (default ./gpu_out): gpu_steps.csv, gpu_check.log, tests.log (and tests.xml), env.json.

Every part runs in its own process under a time limit, and the whole stays under ``--deadline`` seconds: a hang,
a crash or an out-of-memory costs its own row, which says so, and nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The targets per training step on one H200 (issue 19): ms, or for the group, times the single run's.
TARGET_MS = {"softmax": 3.0, "dpfp-3/sum": 5.0, "dpfp-3/delta": 10.0, "tanh/fwm": 20.0}
GROUP_TARGET_RATIO = 2.0

COLUMNS = ("name", "memory", "task", "num_keys", "seq_len", "batch_size", "d_key", "form", "device", "device_name",
           "ms_median", "ms_min", "timed_steps", "peak_mb", "peak_total_mb", "target_ms", "meets_target",
           "status", "torch", "measured_at")


def step_configs(quick: bool) -> list[dict]:
    """The timed configurations, most wanted first; ``quick`` shrinks every size (to run the code on a CPU)."""
    S, S_fwm, B, K, group = (16, 8, 4, 8, 4) if quick else (600, 200, 32, 64, 16)
    base = {"task": "capacity", "num_keys": S, "batch_size": B, "d_key": K}
    fwm = {"memory": "tanh/fwm", "task": "overwrite", "num_keys": S_fwm, "batch_size": B, "d_key": K}
    return [
        {"name": "softmax", "memory": "softmax", **base},
        {"name": "dpfp-3/sum", "memory": "dpfp-3/sum", **base},
        {"name": "dpfp-3/delta", "memory": "dpfp-3/delta", **base},
        {"name": "favor-512/sum", "memory": "favor-512/sum", **base},
        {"name": "tanh/fwm", **fwm},
        {"name": f"dpfp-3/sum group of {group}", "memory": "dpfp-3/sum", **base, "group": group},
        {"name": "tanh/fwm no graphs", **fwm, "fwm_graphs": False},
        {"name": "tanh/fwm no keep-all", **fwm, "fwm_keep_all": False},
        {"name": "tanh/fwm eager, checkpoints", **fwm, "fwm_graphs": False, "fwm_keep_all": False},
    ]


# ---------------------------------------------------------------------------------------------------- one step
def time_step(cfg: dict, device: str = "cuda", repeat: int = 20, warmup: int = 3, budget_s: float = 15.0,
              threads: int | None = None) -> dict:
    """Time one configuration's training step in this process; returns its CSV row (without ``status``)."""
    import torch

    from retrieval_bench import runtime
    from retrieval_bench.memories import checkpointed
    from retrieval_bench.model import RetrievalModel, retrieval_loss
    from retrieval_bench.tasks import task as make_task

    dev = runtime.resolve_device(device, field="--device")
    runtime.setup_process(threads if dev.type == "cpu" else None)
    if cfg.get("fwm_graphs") is False:
        checkpointed.FWM_CUDA_GRAPHS = False
    if cfg.get("fwm_keep_all") is False:
        checkpointed.FWM_KEEP_ALL_BUDGET = {}
    tk = make_task(cfg["task"], num_keys=cfg["num_keys"])
    g = torch.Generator().manual_seed(0)
    batches = iter([tk.sample(cfg["batch_size"], g) for _ in range(warmup + repeat + 2)])
    def build(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return RetrievalModel(cfg["num_keys"], cfg["memory"], d_key=cfg["d_key"],
                                  num_values=tk.num_values).to(dev)

    model = build(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if cfg.get("group"):  # G runs as one stacked model: one forward and backward, each run's own Adam
        from retrieval_bench.families.retrieval import RetrievalFamily

        fam, runs = RetrievalFamily(), [(m, torch.optim.Adam(m.parameters(), lr=1e-3))
                                        for m in map(build, range(cfg["group"]))]
        batches = iter([[tk.sample(cfg["batch_size"], g) for _ in runs] for _ in range(warmup + repeat + 2)])

    def group_step():
        from retrieval_bench.families import to_device
        from retrieval_bench.group import stacked_step

        stacked_step(fam, runs, [to_device(b, dev) for b in next(batches)])

    def step():
        b = next(batches)  # generated on the host, moved once per step: what a run on the device does
        keys, values, query, target = (t.to(dev) for t in (b.keys, b.values, b.query, b.target))
        loss = retrieval_loss(model(keys, values, query[:, None])[:, 0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = group_step if cfg.get("group") else step
    times = runtime.time_calls(step, dev, repeat=repeat, warmup=warmup, budget_s=budget_s)
    peak_mb = runtime.peak_memory_increase_mb(step, dev)
    runtime.reset_peak_memory(dev)
    step()
    runtime.synchronize(dev)
    peak_total = runtime.peak_memory_mb(dev)
    graphs = checkpointed._use_graphs(torch.empty(0, device=dev))
    form = ("eager (graph capture failed)" if checkpointed._GRAPH_FAILED else "graphs" if graphs else "eager") + (
        ", keep-all" if checkpointed.FWM_KEEP_ALL_BUDGET.get(dev.type, 0) else ", checkpoints")
    return {
        "name": cfg["name"], "memory": cfg["memory"], "task": cfg["task"], "num_keys": cfg["num_keys"],
        "seq_len": tk.seq_len, "batch_size": cfg["batch_size"], "d_key": cfg["d_key"],
        "form": form if cfg["memory"].endswith("fwm") else "", "device": str(dev),
        "device_name": runtime.device_name(dev), "ms_median": statistics.median(times) * 1e3,
        "ms_min": min(times) * 1e3, "timed_steps": len(times), "peak_mb": peak_mb, "peak_total_mb": peak_total,
        "torch": torch.__version__, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------- driver
class Log:
    """Print and append to $OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(cmd: list[str], timeout: float, log: Log) -> tuple[int | None, str]:
    """Run a part; returns (exit code or None on timeout, its output)."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(1.0, timeout))
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "platform": platform.platform(), "device": device}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import pytest

        info["pytest"] = pytest.__version__
    except ImportError:
        info["pytest"] = None
    return info


def run_tests(args, out: Path, log: Log, timeout: float, have_pytest: bool) -> str:
    """Part (a): the GPU tests; returns a one-line summary."""
    if have_pytest and args.device != "cpu":
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider",
               "-rfE", f"--junitxml={out / 'tests.xml'}"]
    else:  # no pytest, or the CPU (where the pytest tests skip): the same checks through run_all
        code = ("import sys, torch; sys.path.insert(0, 'tests'); import test_gpu; "
                f"from retrieval_bench.runtime import resolve_device; "
                f"r = test_gpu.run_all(resolve_device({args.device!r}), budget_s={timeout - 20:.0f}); "
                "sys.exit(1 if r['failed'] or r['skipped'] else 0)")
        cmd = [sys.executable, "-c", code]
    t0 = time.perf_counter()
    rc, text = _run(cmd, timeout, log)
    (out / "tests.log").write_text(text)
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    status = "timed out" if rc is None else ("passed" if rc == 0 else f"failed (exit {rc})")
    summary = f"tests: {status} in {time.perf_counter() - t0:.0f} s: {tail[0]}"
    log(summary if rc == 0 else summary + "\n" + text[-6000:])
    return summary


def run_steps(args, configs: list[dict], deadline: float, log: Log, csv_path: Path, rows: list[dict]) -> None:
    """Part (b): each configuration in its own process, its row appended to ``rows`` and the CSV as soon as it
    is known."""
    for cfg in configs:
        left = deadline - time.perf_counter()
        row = {k: cfg.get(k) for k in ("name", "memory", "task", "num_keys", "batch_size", "d_key")}
        if left < 20:
            row["status"] = "skipped: out of time"
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg), "--device", args.device,
                   "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            rc, text = _run(cmd, min(args.step_timeout, left), log)
            lines = [ln for ln in text.splitlines() if ln.startswith("ROW ")]
            other = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("ROW ")]
            if other:  # warnings (a failed graph capture, say) go to the log
                log(f"  {cfg['name']}: " + "\n  ".join(other[-20:]))
            if rc == 0 and lines:
                row = {**json.loads(lines[-1][4:]), "status": "ok"}
            else:
                why = "timed out" if rc is None else f"exit {rc}"
                row["status"] = f"failed: {why}: " + " | ".join(text.strip().splitlines()[-3:])[-300:]
        target = TARGET_MS.get(row["name"])
        if row["name"].startswith("dpfp-3/sum group of"):
            one = next((r for r in rows if r["name"] == "dpfp-3/sum" and r.get("ms_median")), None)
            target = one["ms_median"] * GROUP_TARGET_RATIO if one else None
        row["target_ms"] = target
        if target is not None and row.get("ms_median") is not None:
            row["meets_target"] = row["ms_median"] <= target
        rows.append(row)
        _write_csv(csv_path, rows)
        ms, peak = row.get("ms_median"), row.get("peak_total_mb")
        log(f"{row['name']:<30} " + (f"{ms:8.2f} ms/step (min {row['ms_min']:.2f}, n {row['timed_steps']}), "
                                     f"peak {_mb(row['peak_mb'])} MB above live, {_mb(peak)} MB in all"
                                     + (f", target {target:.1f} ms: {'met' if row['meets_target'] else 'MISSED'}"
                                        if target is not None else "")
                                     + (f" [{row['form']}]" if row.get("form") else "")
                                     if ms is not None else row["status"]))


def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: the code paths, not figures)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="output folder (default $OUT)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (to run the script on a CPU)")
    p.add_argument("--repeat", type=int, default=20, help="timed steps per configuration (at most)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (FWM captures its graphs there)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--deadline", type=float, default=330.0, help="seconds for everything")
    p.add_argument("--tests-timeout", type=float, default=150.0)
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds per timed configuration")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one configuration (JSON) in this process
    args = p.parse_args(argv)
    if args.one:
        row = time_step(json.loads(args.one), args.device, args.repeat, args.warmup, threads=args.threads)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    t0 = time.perf_counter()
    deadline = t0 + args.deadline
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    env = environment(args.device)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    log(f"gpu_check {datetime.now(UTC).isoformat(timespec='seconds')}: {json.dumps(env)}")
    if args.device != "cpu" and not env["cuda_available"]:
        log("no CUDA device: nothing to check (--device cpu runs the code paths on the CPU)")
        return 2
    configs = step_configs(args.quick)
    first, rest = configs[:6], configs[6:]  # the targets first, then FWM's forms for comparison
    csv_path = out / "gpu_steps.csv"
    rows: list[dict] = []
    run_steps(args, first, deadline - (0 if args.skip_tests else args.tests_timeout), log, csv_path, rows)
    summary = "tests: skipped"
    if not args.skip_tests:
        left = deadline - time.perf_counter()
        summary = run_tests(args, out, log, min(args.tests_timeout, left), env["pytest"] is not None) \
            if left > 30 else "tests: skipped (out of time)"
    run_steps(args, rest, deadline, log, csv_path, rows)
    failed = [r["name"] for r in rows if r.get("status") != "ok"]
    log(f"done in {time.perf_counter() - t0:.0f} s; {summary}; {len(rows) - len(failed)}/{len(rows)} timings ok"
        + (f" (not: {', '.join(failed)})" if failed else "") + f"; files in {out}")
    return 0 if not failed and "passed" in summary else 1


if __name__ == "__main__":
    sys.exit(main())
