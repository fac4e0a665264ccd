"""``bench --lm``: milliseconds per training step of the token-stream language model, each memory's causal fast
form beside its reference loop (``Memory.causal_reference``: the per-step loop read at every position).

A step is what the ``lm`` family trains: an MQAR batch, the query-only cross-entropy, backward and AdamW. Both
forms start from the same weights and see the same batches; at each length every memory's forms alternate step by
step in one process, so that a busy machine's drift reaches them all alike and the memories compare with each
other as well as with their reference loops. The table gives the median, the peak memory increase and the largest
difference between the two forms' losses.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Iterator

import torch

from .families import to_device
from .families.lm import LMFamily
from .group import stacked_step
from .lm import CausalLM, lm
from .runtime import device_name, peak_memory_increase_mb, resolve_device, timed, tune_malloc
from .runtime import threads as torch_threads
from .tasks import task as make_task

DEFAULT_LM_MEMORIES = ("softmax", "linear/sum", "dpfp-1/sum", "linear/delta")


@contextlib.contextmanager
def reference_causal(model: CausalLM) -> Iterator[None]:
    """Within the block every layer's memory reads through its reference loop instead of its causal form."""
    for mem in model.memories:
        mem.causal = mem.causal_reference  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        for mem in model.memories:
            del mem.causal


class _Forms:
    """One memory's timed forms at one length, from the same weights and batches: ``fast``, ``reference`` (the
    same model reading through its reference loop) and ``group of N`` (N runs trained as one stacked model,
    group.py, where the memory can be grouped). ``step(name, batch)`` trains one step of a form."""

    def __init__(self, spec: str, seq_len: int, *, batch_size: int, d_model: int, n_layers: int, n_heads: int,
                 vocab_size: int, reference: bool, device: torch.device, group: int):
        self.spec = spec
        self.fam = LMFamily()

        def build(seed):
            return lm(spec, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, conv=4,
                      seed=seed).to(device)

        base = build(0)
        names = ["fast", "reference"] if reference else ["fast"]
        self.models = {name: copy.deepcopy(base) for name in names}  # before a group is added: its own runs
        self.opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
                     for name, m in self.models.items()}
        self.members: list = []
        if group > 1 and self.fam.group_blocker(base) is None:
            self.members = [(m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1))
                            for m in (build(1 + i) for i in range(group))]
            names.append(f"group of {group}")
        self.names = names
        self.times: dict[str, list[float]] = {name: [] for name in names}
        self.losses: dict[str, list[float]] = {name: [] for name in names}
        self.peaks: dict[str, float | None] = {}

    def step(self, name: str, batch) -> None:
        if name.startswith("group of "):  # every run on the same batch: the data does not change the work
            stacked_step(self.fam, self.members, [batch] * len(self.members))
            return
        model = self.models[name]
        ctx = reference_causal(model) if name == "reference" else contextlib.nullcontext()
        with ctx:
            loss = self.fam.train_loss(model, batch)
            self.opts[name].zero_grad(set_to_none=True)
            loss.backward()
            self.opts[name].step()
        self.losses[name].append(loss.item())


def _time_forms(forms: list[_Forms], seq_len: int, *, batch_size: int, vocab_size: int, threads: int,
                repeat: int, device: torch.device) -> list[dict]:
    """Time every form of every memory in ``forms`` at one length, alternating across memories and forms step
    by step (the first step of each warms up), so that a machine's drift reaches all of them alike."""
    task = make_task("mqar", vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=max(1, seq_len // 8))
    gen = torch.Generator().manual_seed(0)
    batches = [to_device(task.sample(batch_size, gen), device) for _ in range(repeat + 1)]
    with torch_threads(threads):
        for i, batch in enumerate(batches):
            for f in forms:
                for name in f.names:
                    with timed(device) as t:
                        f.step(name, batch)
                    if i:
                        f.times[name].append(t.seconds * 1e3)
        for f in forms:
            for name in f.names:
                f.peaks[name] = peak_memory_increase_mb(lambda f=f, name=name: f.step(name, batches[-1]), device)
    from datetime import UTC, datetime

    from ._version import __version__

    when = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for f in forms:
        diff = (max(abs(a - b) for a, b in zip(f.losses["fast"], f.losses["reference"], strict=True))
                if "reference" in f.names else None)  # a group's losses are its own runs' (other weights)
        d_model, n_heads = f.models["fast"].d_model, f.models["fast"].n_heads
        rows += [{"memory": f.spec, "task": "mqar", "seq_len": seq_len, "form": name, "threads": threads,
                  "batch_size": batch_size, "d_key": d_model // n_heads,
                  "ms_step": statistics.median(f.times[name]), "peak_mb": f.peaks[name],
                  "max_diff": None if name.startswith("group") else diff, "status": "ok", "version": __version__,
                  "measured_at": when, "device": f"{device} ({device_name(device)})"} for name in f.names]
    return rows


def lm_step_ms(spec: str, seq_len: int, **kw) -> list[dict]:
    """Rows (one per form) for one memory at one length (``run_lm_bench`` for one memory)."""
    return run_lm_bench([spec], [seq_len], reference_max_len=seq_len if kw.pop("reference", True) else 0, **kw)


def run_lm_bench(memories: list[str], seq_lens: list[int], *, reference_max_len: int = 256, batch_size: int = 64,
                 d_model: int = 128, n_layers: int = 2, n_heads: int = 2, vocab_size: int = 512, threads: int = 2,
                 repeat: int = 3, device: str | torch.device = "cpu", group: int = 0,
                 malloc_tuned: bool = True) -> list[dict]:
    """Rows, one per memory, length and form: ms per training step (median), peak MB, and the largest
    difference between the fast and reference forms' losses. At each length every memory's forms alternate
    step by step in one process, so the memories can be compared with each other as well as with their
    reference loops. ``reference_max_len``: the longest T with a reference loop. ``device`` as
    ``bench.run_bench``'s: on a GPU the steps are timed to the end of their kernels and the peak is of allocated
    device memory. ``group`` > 1 adds the form ``group of N``: a step of N runs trained as one stacked model.
    ``malloc_tuned``: call ``tune_malloc()`` first, as the sweep's workers do (a process-wide setting), so that
    the steps are timed as runs train; without it glibc maps and unmaps every large tensor afresh, and the page
    faults cost the recurrent memories' steps, which hold more large tensors, more than softmax's."""
    device = resolve_device(device, "--device")
    if malloc_tuned:
        tune_malloc()
    memories = list(dict.fromkeys(memories))  # a memory named twice is timed once
    rows = []
    for T in seq_lens:
        forms = [_Forms(spec, T, batch_size=batch_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                        vocab_size=vocab_size, reference=T <= reference_max_len, device=device, group=group)
                 for spec in memories]
        rows += _time_forms(forms, T, batch_size=batch_size, vocab_size=vocab_size, threads=threads,
                            repeat=repeat, device=device)
    order = {spec: i for i, spec in enumerate(memories)}
    return sorted(rows, key=lambda r: order[r["memory"]])  # stable: by memory, then length, then form


def relative_lines(rows: list[dict], to: str = "softmax") -> list[str]:
    """Per length, each memory's fast step against ``to``'s (timed alternately in one process)."""
    ref = {r["seq_len"]: r["ms_step"] for r in rows if r["memory"] == to and r["form"] == "fast"}
    return [f"T={r['seq_len']}: {r['memory']}'s step takes {r['ms_step'] / ref[r['seq_len']]:.2f}x {to}'s"
            for r in rows if r["form"] == "fast" and r["memory"] != to and ref.get(r["seq_len"])]


def format_lm_table(rows: list[dict]) -> str:
    head = f"{'memory':14s} {'T':>5s} {'form':12s} {'ms/step':>9s} {'peak MB':>8s} {'max |Δloss|':>11s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{r['memory']:14s} {r['seq_len']:>5d} {r['form']:12s} {r['ms_step']:>9.1f} {peak:>8s} "
                     f"{diff:>11s}")
    return "\n".join(lines)
