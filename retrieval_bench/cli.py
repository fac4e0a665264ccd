"""The ``retrieval-bench`` command: parsing and printing only; the work lives in the library modules.

Every bad input ends in one line ``error: <field>: <why>`` on stderr and exit status 2, before any training and
with nothing written to the store; Ctrl-C ends in one line and status 130. User strings (experiment, memory and
plugin names, paths) reach rich only escaped, so a name with brackets is printed, never read as markup.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__

DEFAULT_STORE = "results/results.db"
DEFAULT_RAY_START_TIMEOUT_S = 120.0


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class _Main(click.Group):
    """The command group. Ctrl-C outside a sweep (while loading, validating, starting Ray) exits 130 with one
    line, as Ctrl-C during a sweep does, instead of click's "Aborted!" with status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C)", err=True)
            ctx.exit(130)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What reading or writing a store can raise: StoreError (the store's own message), sqlite3's errors and
    pandas' wrapper of them."""
    import pandas as pd

    from .store import StoreError

    return StoreError, sqlite3.Error, pd.errors.DatabaseError


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="retrieval-bench")
def main() -> None:
    """Associative-retrieval benchmarks for attention and fast-weight memories."""


@main.command()
@click.argument("experiment", default="quick")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="SQLite results store.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: one per core, each single-threaded).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads per worker.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a setting; a list value ([8, 16]) makes a grid axis. Repeatable.")
@click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
              help="Where the runs train (train.device; default auto: the first GPU if any, else the CPU). Not "
                   "part of a run's identity: a run stored from another device is skipped.")
@click.option("--group", default=None, metavar="auto|N",
              help="Runs of one shape (differing in seed, lr, ...) trained together as one stacked model "
                   "(train.group; default auto: 16 on a GPU; on the CPU 8 where batch_size·seq_len <= 1024, else "
                   "1). A run's record is the same as alone; not part of its identity.")
@click.option("--dry-run", is_flag=True, help="Print the runs and their count; train nothing.")
@click.option("--rerun", is_flag=True, help="Run again even the runs already in the store.")
@click.option("--max-runs", type=click.IntRange(min=1), default=None,
              help="Refuse a grid of more runs than this, counted before it is expanded (default 100,000).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs (and torch threads) per run on Ray.")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=None,
              help="GPUs per run on Ray (fractions allowed: 0.25 puts four runs on a GPU; default 0: runs train on "
                   "the CPU).")
@click.option("--ray-start-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Seconds to wait for Ray to start or connect (with --executor ray; default "
                   f"{DEFAULT_RAY_START_TIMEOUT_S:g}).")
@click.option("--out", default="plots", show_default=True, help="Where the report's figures go.")
@click.option("--no-report", is_flag=True, help="Skip writing the report at the end.")
def run(experiment, store, workers, threads, sets, device, group, dry_run, rerun, max_runs, executor, address,
        cpus_per_run, gpus_per_run, ray_start_timeout, out, no_report):
    """Run EXPERIMENT (a TOML file or a shipped experiment's name; default: quick)."""
    from .config import DEFAULT_MAX_RUNS, ConfigError, load

    if device is not None:
        sets = (*sets, f'train.device="{device}"')
    if group is not None:
        group = group.strip().lower()
        if group != "auto" and not (group.isdigit() and int(group) >= 1):
            _fail(f"--group: 'auto' or a number of runs >= 1, got {group!r}")
        sets = (*sets, f'train.group={group if group.isdigit() else chr(34) + group + chr(34)}')
    if executor != "ray":
        for opt, value in (("--address", address), ("--ray-start-timeout", ray_start_timeout),
                           ("--gpus-per-run", gpus_per_run)):
            if value is not None:
                _fail(f"{opt}: only with --executor ray")
    try:
        exp = load(experiment, tuple(sets), max_runs=max_runs or DEFAULT_MAX_RUNS)
    except ConfigError as e:
        _fail(str(e))
    if dry_run:
        from .sweep import label

        runs = exp.expand()
        for r in runs:
            click.echo(f"{r.run_id}  {label(r)}")
        click.echo(f"{len(runs)} runs in experiment {exp.name!r}")
        from .group import form_groups

        groups = [len(i) for i in form_groups(runs) if isinstance(i, list)]
        if groups:
            click.echo(f"{sum(groups)} of them in {len(groups)} groups of up to {max(groups)} runs per step "
                       "(--group)")
        return
    ray_options = {"address": address, "cpus_per_run": cpus_per_run, "gpus_per_run": gpus_per_run or 0.0,
                   "start_timeout_s": ray_start_timeout or DEFAULT_RAY_START_TIMEOUT_S}
    _run(exp, store, workers, threads, rerun, executor, ray_options, out, no_report)


def _run(exp, store, workers, threads, rerun, executor, ray_options, out, no_report) -> None:
    from .executors import make_executor
    from .store import Store
    from .sweep import plan, run_sweep

    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            _fail("--executor ray needs Ray: pip install 'retrieval-bench[ray]'")
    store_errors = _store_errors()
    try:
        st = Store(store)
    except (*store_errors, OSError) as e:  # an unwritable path, a file that is not a store, a newer store
        _fail(f"--store {store}: {e}")
    if executor == "ray":
        try:
            ex = make_executor("ray", threads=ray_options["cpus_per_run"], address=ray_options["address"],
                               start_timeout_s=ray_options["start_timeout_s"],
                               gpus_per_run=ray_options["gpus_per_run"])
        except ValueError as e:  # an impossible --gpus-per-run
            _fail(str(e))
    else:
        ex = make_executor("local", workers=workers, threads=threads)
    console = Console(stderr=True)
    try:
        todo, stored = plan(exp, st, rerun)
        console.print(f"experiment {escape(exp.name)}: {len(todo)} runs to do, {len(stored)} already stored in "
                      f"{escape(str(store))}", highlight=False)
        state = run_sweep(exp, st, ex, rerun=rerun, console=console)
    except KeyboardInterrupt:
        console.print("interrupted: every finished run is stored; run the same command again to finish.")
        sys.exit(130)
    except store_errors as e:  # a full disk, a store made read-only meanwhile: what was stored stays
        _fail(f"--store {store}: {e}" + ("" if "stored before" in str(e) else
                                         "; the runs stored before it are kept"))
    except (ConnectionError, ValueError) as e:  # a bad --address, Ray not starting, too many --cpus-per-run
        _fail(str(e))
    finally:
        ex.close()
    _final_table(st, exp.name, console)
    if not no_report:
        _report(store, exp.name, out, console)
    if state.failed:
        console.print(f"{state.failed} runs failed (stored with their error; rerun the command to retry).")
        sys.exit(1)


def _final_table(st, experiment: str, console: Console) -> None:
    runs = st.load("runs", experiment)
    if runs.empty:
        return
    from .report import final_loss_table
    from .report.lm import accuracy_by_state_table, is_lm

    lm_runs = is_lm(runs)
    if lm_runs:
        pivot = accuracy_by_state_table(runs).set_index(["memory", "d_model", "state_size"])
        title, first = f"{escape(experiment)}: query accuracy (best lr, median over seeds)", "memory d_model state"
    else:
        pivot = final_loss_table(runs)
        title, first = f"{escape(experiment)}: final eval loss (median over seeds)", "memory \\ keys S"
    table = Table()
    table.add_column(first, no_wrap=True)
    for col in pivot.columns:
        table.add_column(escape(str(col)), justify="right", no_wrap=True)
    for mem, row in pivot.iterrows():
        name = " ".join(map(str, mem)) if isinstance(mem, tuple) else str(mem)
        table.add_row(escape(name), *("-" if v != v else f"{v:.3f}" if lm_runs else f"{v:.1e}"
                                      for v in row.values))
    # A pipe or a narrow terminal would squeeze the numbers into ellipses: size the table to its content.
    wide = Console(width=max(Console().width, 30 + 11 * len(pivot.columns)))
    wide.print(title, style="italic")  # above the table, not its title: a title wraps at the table's width
    wide.print(table)


def _report(store: str, experiment: str | None, out: str, console: Console) -> None:
    """Write the report, or fail with one message naming --store (cannot be read) or --out (cannot be
    written); in ``run`` the runs are stored by then, and the message says how to write the report later."""
    from .report import write_report

    try:
        paths = write_report(store, out_dir=out, experiment=experiment)
    except _store_errors() as e:
        _fail(f"--store {store}: cannot be read: {e}")
    except OSError as e:
        _fail(f"--out {out}: cannot write the report: {e.strerror or e}"
              + (f" ({e.filename})" if e.filename else "")
              + f"; the runs are in {store}: `retrieval-bench report --store {store} --out DIR` writes it elsewhere")
    md = [p for p in paths if p.name == "report.md"]
    console.print(f"report: {escape(', '.join(str(p) for p in md) or out)}", highlight=False)


@main.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--experiment", default=None, help="Only this experiment (default: every one in the store).")
@click.option("--out", default="plots", show_default=True)
def report(store, experiment, out):
    """Regenerate figures, tables and report.md from the store."""
    try:
        exists = Path(store).is_file()
    except OSError as e:  # a store inside a folder this user may not enter
        _fail(f"--store {store}: cannot be read: {e.strerror or e}")
    if not exists:
        _fail(f"--store {store}: no such results store")
    try:
        _report(store, experiment, out, Console(stderr=True))
    except ValueError as e:  # an --experiment the store does not hold
        _fail(f"--experiment {experiment}: {e}" if experiment else str(e))


@main.command(name="list")
def list_cmd():
    """Show memories, feature maps, update rules, normalisations, tasks and shipped experiments."""
    from .config import shipped_experiments
    from .registry import REGISTRIES

    console = Console()
    for kind, reg in REGISTRIES.items():
        table = Table(title=kind.replace("_", " "), title_justify="left")
        table.add_column("name")
        table.add_column("from")
        for name, origin in reg.origins().items():  # plugin names and distributions are user strings
            table.add_row(escape(name), escape(origin))
        console.print(table)
    console.print("composed memories: PHI/RULE[/NORM[+attn]], e.g. dpfp-3/delta, linear/sum, "
                  "favor-64/sum, tanh/fwm, linear/delta/sum+attn", highlight=False)
    table = Table(title="shipped experiments", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    import tomllib

    for name, path in shipped_experiments().items():
        table.add_row(escape(name), escape(str(tomllib.loads(path.read_text()).get("description", ""))))
    console.print(table)


from .bench_cli import bench_command  # noqa: E402  (torch is imported only when it runs)

main.add_command(bench_command)
