"""``bench --lm``: milliseconds per training step of the token-stream language model, each memory's causal fast
form beside its reference loop (``Memory.causal_reference``: the per-step loop read at every position).

A step is what the ``lm`` family trains: an MQAR batch, the query-only cross-entropy, backward and AdamW. Both
forms start from the same weights and see the same batches, alternating, in one process; the table gives the
median, the peak memory increase and the largest difference between the two forms' losses.
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
from .runtime import device_name, peak_memory_increase_mb, resolve_device, timed
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


def lm_step_ms(spec: str, seq_len: int, *, batch_size: int = 64, d_model: int = 128, n_layers: int = 2,
               n_heads: int = 2, vocab_size: int = 512, threads: int = 2, repeat: int = 3,
               reference: bool = True, device: str | torch.device = "cpu", group: int = 0) -> list[dict]:
    """Rows (one per form) for one memory at one length: ms per training step, peak MB, loss difference.
    ``device`` as ``bench.run_bench``'s: on a GPU the steps are timed to the end of their kernels and the peak
    is of allocated device memory. ``group`` > 1 adds the form ``group of N``: a step of N runs trained as one
    stacked model (group.py), where the memory can be grouped."""
    device = resolve_device(device, "--device")
    task = make_task("mqar", vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=max(1, seq_len // 8))
    base = lm(spec, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, conv=4,
              seed=0).to(device)
    fam = LMFamily()
    gen = torch.Generator().manual_seed(0)
    batches = [to_device(task.sample(batch_size, gen), device) for _ in range(repeat + 1)]
    forms = {"fast": contextlib.nullcontext, "reference": None} if reference else {"fast": contextlib.nullcontext}
    models = {name: copy.deepcopy(base) for name in forms}  # before a group is added: its runs are its own
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for name, m in models.items()}
    members: list = []
    if group > 1 and fam.group_blocker(base) is None:
        members = [(m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1))
                   for m in (lm(spec, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                conv=4, seed=1 + i).to(device) for i in range(group))]
        forms[f"group of {group}"] = None
    times: dict[str, list[float]] = {name: [] for name in forms}
    losses: dict[str, list[float]] = {name: [] for name in forms}

    def step(name: str, batch) -> None:
        if name.startswith("group of "):  # every run on the same batch: the data does not change the work
            stacked_step(fam, members, [batch] * len(members))
            return
        model = models[name]
        ctx = reference_causal(model) if name == "reference" else contextlib.nullcontext()
        with ctx:
            loss = fam.train_loss(model, batch)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        losses[name].append(loss.item())

    with torch_threads(threads):
        for i, batch in enumerate(batches):  # the first step warms up; forms alternate
            for name in forms:
                with timed(device) as t:
                    step(name, batch)
                if i:
                    times[name].append(t.seconds * 1e3)
        peak = {name: peak_memory_increase_mb(lambda name=name: step(name, batches[-1]), device) for name in forms}
    diff = (max(abs(a - b) for a, b in zip(losses["fast"], losses["reference"], strict=True))
            if "reference" in forms else None)  # a group's losses are its own runs' (other weights): no diff
    from datetime import UTC, datetime

    from ._version import __version__

    when = datetime.now(UTC).isoformat(timespec="seconds")
    return [{"memory": spec, "task": "mqar", "seq_len": seq_len, "form": name, "threads": threads,
             "batch_size": batch_size, "d_key": d_model // n_heads, "ms_step": statistics.median(times[name]),
             "peak_mb": peak[name], "max_diff": None if name.startswith("group") else diff, "status": "ok",
             "version": __version__,
             "measured_at": when, "device": f"{device} ({device_name(device)})"} for name in forms]


def run_lm_bench(memories: list[str], seq_lens: list[int], *, reference_max_len: int = 256, **kw) -> list[dict]:
    rows = []
    for spec in memories:
        for T in seq_lens:
            rows += lm_step_ms(spec, T, reference=T <= reference_max_len, **kw)
    return rows


def format_lm_table(rows: list[dict]) -> str:
    head = f"{'memory':14s} {'T':>5s} {'form':12s} {'ms/step':>9s} {'peak MB':>8s} {'max |Δloss|':>11s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{r['memory']:14s} {r['seq_len']:>5d} {r['form']:12s} {r['ms_step']:>9.1f} {peak:>8s} "
                     f"{diff:>11s}")
    return "\n".join(lines)
