"""Speed and memory of each memory's fast form against its reference loop (DESIGN §4, §8).

``run_bench`` times, in one process, one full training step (forward, backward, Adam step on
``RetrievalModel``) and one evaluation (the task's whole eval set under no_grad) per memory and size, for the
fast form and for the reference form (``FastWeightMemory.reference``: the per-step loop of ``reference.py``),
alternating the two forms repeat by repeat so that machine noise hits both alike. It also checks that the two
forms agree: the maximum absolute difference of outputs and gradients (wrt keys, values, gates and queries).

Peak memory is the kernel's own high-water mark of the resident set (VmHWM in /proc/self/status), reset
just before a training step with ``/proc/self/clear_refs`` after returning the allocator's free memory to the
OS, so ``peak_mb`` is the step's largest resident-memory increase above the process's live memory, allocator
fragmentation included. Where clear_refs cannot be written, a thread samples the resident set every 0.5 ms
instead (which can miss spikes shorter than that).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import torch

from .families import to_device
from .memories import FastWeightMemory, Memory, SoftmaxMemory
from .model import RetrievalModel, retrieval_loss
from .runtime import device_name, peak_memory_increase_mb, resolve_device, timed, tune_malloc
from .tasks import task as make_task

ROW_KEYS = ("memory", "task", "num_keys", "seq_len", "form", "threads", "batch_size", "d_key", "ms_step",
            "ms_eval", "peak_mb", "max_diff", "max_rel_diff", "diff_seq_len", "status", "version",
            "measured_at", "device")

# Python-level steps a reference evaluation may take before it is skipped as too slow to repeat (the softmax
# reference loops over every sequence, query and position: 2.4 million iterations at S = 600).
REFERENCE_MAX_EVAL_STEPS = 100_000



def peak_memory_mb(fn) -> float | None:
    """Largest increase of the resident set (MB) above the live memory while ``fn()`` runs (on the CPU)."""
    return peak_memory_increase_mb(fn)


# ---------------------------------------------------------------------------------------------------- forms
@contextlib.contextmanager
def reference_form(memory: Memory) -> Iterator[None]:
    """Within the block, ``memory.forward`` is its reference loop (``memory.reference``)."""
    memory.forward = memory.reference  # an instance attribute shadows the class's forward for nn.Module calls
    try:
        yield
    finally:
        del memory.forward


def reference_bytes(memory: Memory, batch: int, seq_len: int, num_queries: int, d_key: int,
                    d_value: int) -> int:
    """Estimated autograd memory of the reference loop's training step (bytes), as the memory states it."""
    return memory.reference_bytes(batch, seq_len, num_queries, d_key, d_value)


def _reference_eval_steps(memory: Memory, num_seqs: int, seq_len: int, num_queries: int) -> int:
    return num_seqs * num_queries * seq_len if isinstance(memory, SoftmaxMemory) else seq_len


def form_difference(model: RetrievalModel, keys: torch.Tensor, values: torch.Tensor,
                    queries: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Max |fast - reference| over the memory's output and its gradients wrt keys, values, gates and queries.

    The memory's inputs come from the model (so they are what training feeds it); a random output gradient
    weighs every output. Random feature maps get the same draw for both forms.

    Returns:
        (max absolute difference, max over tensors of (max abs difference / max abs reference value)).
    """
    mem = model.memory
    with torch.no_grad():
        k, v, betas, q, gates = model.inputs(keys, values, queries)
    leaves = [k, v, q] + ([betas] if betas is not None else []) + list(gates.values())
    leaves = [x.detach().requires_grad_() for x in leaves]
    k, v, q = leaves[:3]
    betas = leaves[3] if betas is not None else None
    gates = dict(zip(gates, leaves[3 + (betas is not None):], strict=True))
    g = torch.Generator().manual_seed(seed)
    outs = []
    for form in (mem.forward, mem.reference):
        if isinstance(mem, FastWeightMemory):
            mem.phi.seed(seed)
        y = form(k, v, betas, q, **gates)
        gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
        g.manual_seed(seed)
        outs.append([y.detach(), *torch.autograd.grad(y, leaves, gy, allow_unused=True)])
    abs_diff = rel_diff = 0.0
    for fast, ref in zip(*outs, strict=True):
        if fast is None or ref is None:
            continue
        d = (fast - ref).abs().max().item() if fast.numel() else 0.0
        abs_diff = max(abs_diff, d)
        rel_diff = max(rel_diff, d / max(ref.abs().max().item(), 1e-30))
    return abs_diff, rel_diff


# ---------------------------------------------------------------------------------------------------- bench
def _median_ms(times: list[float]) -> float | None:
    return statistics.median(times) * 1e3 if times else None


def run_bench(memories: list[str], num_keys: list[int], task: str = "capacity", threads: int = 2,
              repeat: int = 5, batch_size: int = 32, d_key: int = 64, include_reference: bool = True,
              reference_max_bytes: int = 2 * 2**30, warmup: int = 1, seed: int = 0,
              malloc_tuned: bool = True, device: str | torch.device = "cpu", group: int = 0) -> list[dict]:
    """Time a training step and an evaluation per memory and size, fast form against reference loop.

    Args:
        memories: memory specs, e.g. ``["dpfp-3/delta", "softmax"]``.
        num_keys: the S values; the task sets L (capacity: L = S; overwrite: L = 2S).
        task: a registered task name. threads: torch intra-op threads while timing.
        repeat: timed repeats per form (medians are reported); ``warmup`` untimed ones go first.
        batch_size: B of the training step. d_key: K.
        include_reference: also time the reference form (and check that the forms agree).
        reference_max_bytes: the reference is skipped where its estimated autograd memory exceeds this.
        seed: seeds the batches, the eval set and (without touching the global RNG) the model's init.
        malloc_tuned: call ``tune_malloc()`` first, as the sweep's workers do (a process-wide setting).
        device: where the steps run (``auto``, ``cpu``, ``cuda``, ``cuda:N``). On a GPU each timed block
            waits for its kernels (``runtime.timed``) and ``peak_mb`` is the step's peak of allocated device
            memory above what was allocated before (``torch.cuda.max_memory_allocated``). The forms'
            disagreement is measured on the CPU in float64 either way.
        group: where > 1, also time a training step of ``group`` runs of this memory trained as one stacked
            model (group.py; form ``group of N``, its ``ms_step`` the whole group's step), beside the fast
            form's step of one run. Memories that cannot be grouped get a skipped row.

    Returns:
        One dict per memory, size and form, with keys ``ROW_KEYS``: ``ms_step``/``ms_eval`` are medians,
        ``peak_mb`` the training step's peak resident-memory increase, ``max_diff``/``max_rel_diff`` the
        forms' largest disagreement (measured at ``diff_seq_len``, which is smaller than ``seq_len`` where the
        reference does not fit there), ``status`` ``"ok"`` or ``"skipped: <why>"``.
    """
    from . import __version__

    device = resolve_device(device, "--device")
    if malloc_tuned:
        tune_malloc()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for spec in memories:
            for S in num_keys:
                rows.extend(_bench_one(spec, S, task, threads, repeat, batch_size, d_key, include_reference,
                                       reference_max_bytes, warmup, seed, device, group))
    finally:
        torch.set_num_threads(old_threads)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    where = f"{device} ({device_name(device)})"
    for row in rows:
        row.update(version=__version__, measured_at=stamp, device=where)
    return [{k: row.get(k) for k in ROW_KEYS} for row in rows]


def _make_model(spec: str, S: int, d_key: int, seed: int, num_values: int) -> RetrievalModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return RetrievalModel(S, spec, d_key=d_key, num_values=num_values)


def _bench_one(spec, S, task_name, threads, repeat, batch_size, d_key, include_reference, reference_max_bytes,
               warmup, seed, device, group=0):
    """The rows of one memory at one size: its forms built, compared, timed and measured."""
    tk = make_task(task_name, num_keys=S)
    L, V = tk.seq_len, tk.num_values
    g = torch.Generator().manual_seed(seed)  # drawn on the host, as a run's batches are, then moved
    batches = [to_device(tk.sample(batch_size, g), device) for _ in range(warmup + repeat + 1)]
    ev = to_device(tk.eval_set(g), device)
    forms = _Forms(_make_model(spec, S, d_key, seed, V).to(device), ev)
    status = {"fast": "ok"}
    diff, diff_len = (None, None), None
    if include_reference:
        mem = forms.models["fast"].memory
        status["reference"] = _reference_status(mem, reference_bytes(mem, batch_size, L, 1, d_key, V),
                                                reference_max_bytes)
        if status["reference"] == "ok":
            forms.add_reference()
            steps = _reference_eval_steps(mem, ev.queries.shape[0], L, ev.queries.shape[1])
            if steps > REFERENCE_MAX_EVAL_STEPS:
                forms.eval_ok["reference"] = False
                status["reference"] = f"ok (eval skipped: ~{steps:,} python steps)"
        if hasattr(mem, "reference"):
            diff, diff_len = _difference(spec, S, tk, to_device(batches[0], torch.device("cpu")), d_key, seed,
                                         reference_max_bytes)
    if group > 1:
        why = forms.add_group(group, lambda i: _make_model(spec, S, d_key, seed + 1 + i, V).to(device))
        status[forms.GROUP] = "ok" if why is None else f"skipped: {why}"
    step_t, eval_t = forms.time(batches, warmup, repeat, device)
    peak = {name: peak_memory_increase_mb(lambda name=name: forms.train_step(name, batches[-1]), device)
            for name in forms.models}
    return [{"memory": spec, "task": task_name, "num_keys": S, "seq_len": L, "form": name, "threads": threads,
             "batch_size": batch_size, "d_key": d_key, "ms_step": _median_ms(step_t.get(name, [])),
             "ms_eval": _median_ms(eval_t.get(name, [])), "peak_mb": peak.get(name), "max_diff": diff[0],
             "max_rel_diff": diff[1], "diff_seq_len": diff_len, "status": status[name]}
            for name in ("fast", "reference", forms.GROUP) if name in status]


def _reference_status(mem: Memory, need: int, cap: int) -> str:
    """"ok" where the reference loop is timed, else why it is skipped."""
    if not hasattr(mem, "reference"):
        return "skipped: the memory has no reference form"
    if need > cap:
        return f"skipped: the reference would need ~{need / 2**30:.1f} GiB (cap {cap / 2**30:.1f} GiB)"
    return "ok"


class _Forms:
    """The forms of one memory from the same weights (the fast one, and a copy that reads through the reference
    loop), each with its Adam: a training step and an evaluation of each, and their timing side by side."""

    def __init__(self, fast: RetrievalModel, ev):
        self.models = {"fast": fast}
        self.ev = ev
        self.eval_ok = {"fast": True}
        self.opts = {"fast": torch.optim.Adam(fast.parameters(), lr=1e-3)}
        self.GROUP = "group"
        self.group: list[tuple[RetrievalModel, torch.optim.Optimizer]] = []

    def add_group(self, n: int, build) -> str | None:
        """Also time ``n`` runs (models ``build(i)``, each with its Adam) trained as one stacked model; returns
        why they cannot be, or None."""
        from .families.retrieval import RetrievalFamily

        self.GROUP = f"group of {n}"
        why = RetrievalFamily().group_blocker(self.models["fast"])
        if why is not None:
            return why
        models = [build(i) for i in range(n)]
        self.group = [(m, torch.optim.Adam(m.parameters(), lr=1e-3)) for m in models]
        self.models[self.GROUP] = models[0]  # a name to time and measure under; its step trains all n
        self.eval_ok[self.GROUP] = False  # a group's runs evaluate each on its own, as alone
        return None

    def add_reference(self) -> None:
        self.models["reference"] = copy.deepcopy(self.models["fast"])
        self.opts["reference"] = torch.optim.Adam(self.models["reference"].parameters(), lr=1e-3)
        self.eval_ok["reference"] = True

    def _form(self, name: str):
        model = self.models[name]
        return model, (reference_form(model.memory) if name == "reference" else contextlib.nullcontext())

    def train_step(self, name: str, batch) -> None:
        if name == self.GROUP and self.group:
            return self._group_step(batch)
        model, ctx = self._form(name)
        with ctx:
            y = model(batch.keys, batch.values, batch.query[:, None])[:, 0]
            loss = retrieval_loss(y, batch.target)
            self.opts[name].zero_grad(set_to_none=True)
            loss.backward()
            self.opts[name].step()

    def _group_step(self, batch) -> None:
        """One step of the group, every run on ``batch`` (the data does not change the work)."""
        from .families.retrieval import RetrievalFamily
        from .group import stacked_step

        stacked_step(RetrievalFamily(), self.group, [batch] * len(self.group))

    def evaluate(self, name: str) -> None:
        model, ctx = self._form(name)
        ev = self.ev
        with ctx, torch.no_grad():
            retrieval_loss(model(ev.keys, ev.values, ev.queries), ev.targets, ev.mask)

    def time(self, batches, warmup: int, repeat: int, device) -> tuple[dict, dict]:
        """Seconds of each timed training step and evaluation per form, after ``warmup`` untimed repeats; the
        forms alternate within each repeat, so that drifts in machine load hit both."""
        step_t = {name: [] for name in self.models}
        eval_t = {name: [] for name in self.models}
        for i in range(warmup + repeat):
            for name in self.models:
                with timed(device) as step:
                    self.train_step(name, batches[i])
                if self.eval_ok[name]:
                    with timed(device) as evaluation:
                        self.evaluate(name)
                if i >= warmup:
                    step_t[name].append(step.seconds)
                    if self.eval_ok[name]:
                        eval_t[name].append(evaluation.seconds)
        return step_t, eval_t


def _difference(spec, S, tk, batch, d_key, seed, max_bytes):
    """Forms' disagreement on one training batch: at full size where the reference fits in ``max_bytes``,
    else on fewer sequences, else on a prefix of every sequence (the query then reads a shorter memory)."""
    model = _make_model(spec, S, d_key, seed, tk.num_values)
    keys, values, query = batch.keys, batch.values, batch.query[:, None]
    B, L = keys.shape
    per_seq = reference_bytes(model.memory, 1, L, 1, d_key, tk.num_values)
    if per_seq * B > max_bytes:
        B = max(1, min(B, int(max_bytes // max(per_seq, 1))))
        keys, values, query = keys[:B], values[:B], query[:B]
    if per_seq * B > max_bytes:
        L = max(1, int(L * max_bytes / (per_seq * B)))
        keys, values = keys[:, :L], values[:, :L]
    d = form_difference(model, keys, values, query, seed)
    return d, L


# ---------------------------------------------------------------------------------------------------- chunkwise
def chunkwise_flops(batch: int, seq_len: int, d_feat: int, d_value: int, chunk: int) -> float:
    """Floating-point operations of ``delta_chunkwise`` reading every position (matmuls only; the C×C
    triangular solves add C³/3 per chunk, a few per cent at C = 64)."""
    C = chunk
    n = math.ceil(seq_len / C)
    per_chunk = (6 * C * d_feat * d_value  # [W; Q] Sᵀ (2C rows), Kᵀ δ
                 + 2 * C * C * (3 * d_feat + 2 * d_value))  # B Kᵀ, T B, T V, Q Kᵀ, tril(Q Kᵀ) δ
    return float(batch * n * per_chunk)


def chunkwise_throughput(batch: int = 16, seq_len: int = 1024, d_feat: int = 256, d_value: int = 256,
                         chunk: int = 64, threads: int = 2, repeat: int = 5) -> dict:
    """GFLOP/s of the all-positions chunkwise delta rule (forward, no autograd) against plain GEMMs.

    Returns:
        dict with ``ms`` (median), ``gflops`` (achieved), ``gemm_gflops`` (a (B·2C, F) x (F, V) matmul, the
        shape of the loop's main product, batched as one GEMM) and ``peak_gflops`` (a 1024³ matmul).
    """
    from .memories.chunked import delta_chunkwise

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.rand(batch, seq_len, d_feat, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.rand(batch, seq_len, d_feat, generator=g), dim=-1)
    v = torch.randn(batch, seq_len, d_value, generator=g)
    beta = torch.rand(batch, seq_len, generator=g)

    def timed(fn):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    try:
        with torch.no_grad():
            t = timed(lambda: delta_chunkwise(k, v, beta, q, chunk=chunk))
            a = torch.randn(batch * 2 * chunk, d_feat, generator=g)
            b = torch.randn(d_feat, d_value, generator=g)
            t_gemm = timed(lambda: a @ b)
            x = torch.randn(1024, 1024, generator=g)
            t_peak = timed(lambda: x @ x)
    finally:
        torch.set_num_threads(old)
    return {"ms": t * 1e3, "gflops": chunkwise_flops(batch, seq_len, d_feat, d_value, chunk) / t / 1e9,
            "gemm_gflops": 2 * batch * 2 * chunk * d_feat * d_value / t_gemm / 1e9,
            "peak_gflops": 2 * 1024**3 / t_peak / 1e9}
