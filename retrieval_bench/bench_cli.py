"""The ``retrieval-bench bench`` command: options, checks, the table and the store; the timing lives in
``bench`` (the retrieval model) and ``bench_lm`` (the language model), imported only when the command runs, so
that ``retrieval-bench`` starts without torch."""

from __future__ import annotations

import math

import click


# ---------------------------------------------------------------------------------------------------- output
def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, one line per memory, size and form."""
    cols = [("memory", "memory", "s"), ("task", "task", "s"), ("S", "num_keys", "d"), ("L", "seq_len", "d"),
            ("form", "form", "s"), ("thr", "threads", "d"), ("ms/step", "ms_step", ".1f"),
            ("ms/eval", "ms_eval", ".1f"), ("peak MB", "peak_mb", ".0f"), ("max diff", "max_diff", ".1e"),
            ("rel diff", "max_rel_diff", ".1e"), ("diff@L", "diff_seq_len", "d"), ("status", "status", "s")]
    table = [[h for h, _, _ in cols]] + [[_fmt(r.get(k), f) for _, k, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    numeric = [f != "s" for _, _, f in cols]
    lines = []
    for j, line in enumerate(table):
        cells = [c.rjust(w) if num and j else c.ljust(w)
                 for c, w, num in zip(line, widths, numeric, strict=True)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def group_lines(rows: list[dict]) -> list[str]:
    """Per memory and size with a timed group: its step against one run's, and the time per run."""
    size = "num_keys" if rows and "num_keys" in rows[0] else "seq_len"  # S, or T with --lm
    fast = {(r["memory"], r[size]): r for r in rows if r["form"] == "fast"}
    out = []
    for r in rows:
        one = fast.get((r["memory"], r[size]))
        if not r["form"].startswith("group of ") or r["ms_step"] is None or one is None or not one["ms_step"]:
            continue
        n = int(r["form"].rsplit(" ", 1)[1])
        out.append(f"{r['memory']} {'S' if size == 'num_keys' else 'T'}={r[size]}: a step of {n} runs takes "
                   f"{r['ms_step'] / one['ms_step']:.2f}x "
                   f"one run's ({r['ms_step'] / n:.2f} ms per run against {one['ms_step']:.2f})")
    return out


def max_difference(rows: list[dict]) -> float | None:
    """The largest ``max_diff`` over the rows, or None where no reference was compared."""
    diffs = [r["max_diff"] for r in rows if r.get("max_diff") is not None]
    return max(diffs) if diffs else None


DEFAULT_MEMORIES = ("softmax", "dpfp-3/sum", "dpfp-3/delta", "favor-512/sum")


def check_options(memories: list[str], num_keys: list[int], task: str, d_key: int) -> None:
    """Raise click.BadParameter naming the option for a memory or task that is unknown or cannot be built at
    these sizes, before anything is timed or stored (the sizes' ranges are the options' types)."""
    from .memories import memory
    from .registry import RegistryError
    from .tasks import task as make_task

    for spec in memories:
        try:
            memory(spec, d_key=d_key)
        except (RegistryError, ValueError) as e:
            raise click.BadParameter(f"{spec!r}: {e}", param_hint="'--memory'") from None
    for S in num_keys:
        try:
            make_task(task, num_keys=S)
        except RegistryError as e:
            raise click.BadParameter(str(e), param_hint="'--task'") from None
        except (ValueError, TypeError) as e:
            raise click.BadParameter(f"{task} with S = {S}: {e}", param_hint="'--num-keys'") from None


_POSITIVE = click.IntRange(min=1)


@click.command("bench")
@click.option("--memory", "memories", multiple=True, default=DEFAULT_MEMORIES, show_default=True,
              help="Memory spec; repeat the option for several.")
@click.option("--num-keys", "num_keys", multiple=True, type=_POSITIVE, default=(600,), show_default=True,
              help="S; repeat the option for several.")
@click.option("--task", default="capacity", show_default=True, help="Task (sets L from S).")
@click.option("--threads", type=_POSITIVE, default=2, show_default=True, help="Torch threads while timing.")
@click.option("--repeat", type=_POSITIVE, default=5, show_default=True,
              help="Timed repeats per form (medians reported).")
@click.option("--batch-size", type=_POSITIVE, default=32, show_default=True)
@click.option("--d-key", type=_POSITIVE, default=64, show_default=True)
@click.option("--no-reference", is_flag=True, help="Time only the fast forms.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), default=None,
              help="Also append the rows to this results store (SQLite).")
@click.option("--chunkwise", is_flag=True,
              help="Also report the all-positions chunkwise delta rule's GFLOP/s (B 16, L 1024, F = V = 256).")
@click.option("--lm", "lm_lengths", multiple=True, type=_POSITIVE, metavar="T",
              help="Time the token-stream language model instead (B 64, d_model 128, 2 layers, MQAR) at length "
                   "T; repeat for several. Reference loops beside the fast forms up to --lm-reference-max.")
@click.option("--lm-reference-max", type=_POSITIVE, default=256, show_default=True, metavar="T",
              help="With --lm: the longest T timed through the reference loops too. A recurrent memory's loop keeps "
                   "every state for its backward, about 2 x layers x B x heads x T x F x V x 4 bytes (8 GiB at "
                   "T = 1024 with the defaults); softmax's reads each prefix, O(T^2) per step.")
@click.option("--reference-max-gib", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Skip a reference loop whose estimated autograd memory exceeds this (it is then compared on "
                   "fewer sequences).")
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the steps run; on a GPU the times wait for the kernels and peak MB is allocated device "
                   "memory (torch.cuda.max_memory_allocated).")
@click.option("--group", type=click.IntRange(min=2), default=None, metavar="N",
              help="Also time a training step of N runs of each memory trained as one stacked model (run "
                   "--group), beside the step of one run (with --lm too).")
def bench_command(memories, num_keys, task, threads, repeat, batch_size, d_key, no_reference, store_path,
                  chunkwise, lm_lengths, lm_reference_max, reference_max_gib, device, group):
    """Milliseconds per training step and evaluation, and peak memory: fast forms vs reference loops."""
    if lm_lengths:
        from .bench_lm import DEFAULT_LM_MEMORIES

        memories = DEFAULT_LM_MEMORIES if tuple(memories) == DEFAULT_MEMORIES else memories
        check_options(list(memories), [8], "capacity", 8)
    else:
        check_options(list(memories), list(num_keys), task, d_key)
    from .runtime import resolve_device

    try:
        where = resolve_device(device, "--device")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--device'") from None
    if lm_lengths and reference_max_gib != 2.0:
        raise click.BadParameter("applies to the retrieval model only; with --lm, --lm-reference-max sets the "
                                 "longest T with a reference loop", param_hint="'--reference-max-gib'")
    if not lm_lengths and lm_reference_max != 256:
        raise click.BadParameter("applies with --lm only", param_hint="'--lm-reference-max'")
    if chunkwise and where.type != "cpu":
        raise click.BadParameter("the chunkwise throughput is measured on the CPU only", param_hint="'--chunkwise'")
    store = None
    if store_path is not None:  # opened first: a store that cannot be written fails before the timing
        from .store import Store

        try:
            store = Store(store_path)
        except (*_store_errors(), OSError) as e:
            raise click.BadParameter(str(e), param_hint="'--store'") from None
    if lm_lengths:
        from .bench_lm import format_lm_table, relative_lines, run_lm_bench

        rows = run_lm_bench(list(memories), list(lm_lengths), threads=threads, repeat=repeat, device=where,
                            reference_max_len=0 if no_reference else lm_reference_max, group=group or 0)
        click.echo(format_lm_table(rows))
        for line in group_lines(rows) + relative_lines(rows):
            click.echo(line)
    else:
        from . import bench

        rows = bench.run_bench(list(memories), list(num_keys), task=task, threads=threads, repeat=repeat, device=where,
                               reference_max_bytes=int(reference_max_gib * 2**30),
                               batch_size=batch_size, d_key=d_key, include_reference=not no_reference,
                               group=group or 0)
        click.echo(format_table(rows))
        for line in group_lines(rows):
            click.echo(line)
    worst = max_difference(rows)
    if worst is not None:
        click.echo(f"max |fast - reference| over outputs and gradients: {worst:.2e}")
    if where.type == "cuda":
        click.echo(f"on {where} ({rows[0]['device'] if rows else where}); peak MB: the training step's peak of "
                   "allocated device memory above what was allocated before")
    else:
        click.echo("peak MB: the training step's peak resident-memory increase above the live memory (VmHWM)")
    if chunkwise:
        from .bench import chunkwise_throughput

        for chunk in (32, 64):
            r = chunkwise_throughput(chunk=chunk, threads=threads, repeat=repeat)
            click.echo(f"chunkwise delta rule, chunk {chunk}: {r['ms']:.1f} ms, {r['gflops']:.1f} GFLOP/s "
                       f"(matmul of the loop's shape {r['gemm_gflops']:.1f}, 1024³ matmul {r['peak_gflops']:.1f})")
    if store is not None:
        try:
            store.write_bench(rows)
        except _store_errors() as e:  # a full disk: one message, exit 2, as `run` does
            click.echo(f"error: --store {store_path}: the rows could not be stored: {e}", err=True)
            raise SystemExit(2) from None
        click.echo(f"stored {len(rows)} rows in {store_path}")


def _store_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    from .store import StoreError

    return StoreError, sqlite3.Error
