"""The ``retrieval-bench`` command: parsing and printing only; the work lives in the library modules."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ._version import __version__

DEFAULT_STORE = "results/results.db"


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--dry-run", is_flag=True, help="Print the runs and their count; train nothing.")
@click.option("--rerun", is_flag=True, help="Run again even the runs already in the store.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPUs (and torch threads) per run on Ray.")
@click.option("--out", default="plots", show_default=True, help="Where the report's figures go.")
@click.option("--no-report", is_flag=True, help="Skip writing the report at the end.")
def run(experiment, store, workers, threads, sets, dry_run, rerun, executor, address, cpus_per_run, out,
        no_report):
    """Run EXPERIMENT (a TOML file or a shipped experiment's name; default: quick)."""
    from .config import ConfigError, load
    from .executors import make_executor
    from .store import Store
    from .sweep import label, plan, run_sweep

    try:
        exp = load(experiment, tuple(sets))
    except ConfigError as e:
        _fail(str(e))
    console = Console(stderr=True)
    if dry_run:
        runs = exp.expand()
        for r in runs:
            click.echo(f"{r.run_id}  {label(r)}")
        click.echo(f"{len(runs)} runs in experiment {exp.name!r}")
        return
    try:
        st = Store(store)
    except Exception as e:  # an unwritable path, a file that is not a database
        _fail(f"--store {store}: {e}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            _fail("--executor ray needs Ray: pip install 'retrieval-bench[ray]'")
        ex = make_executor("ray", threads=cpus_per_run, address=address)
    else:
        ex = make_executor("local", workers=workers, threads=threads)
    todo, stored = plan(exp, st, rerun)
    console.print(f"experiment {exp.name}: {len(todo)} runs to do, {len(stored)} already stored in {store}")
    try:
        state = run_sweep(exp, st, ex, rerun=rerun, console=console)
    except KeyboardInterrupt:
        console.print("interrupted: every finished run is stored; run the same command again to finish.")
        sys.exit(130)
    except (ConnectionError, ValueError) as e:  # a bad --address, more --cpus-per-run than any node has
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

    pivot = final_loss_table(runs)
    table = Table(title=f"final eval loss ({experiment}; median over seeds; columns: number of keys S)")
    table.add_column("memory", no_wrap=True)
    for col in pivot.columns:
        table.add_column(str(col), justify="right", no_wrap=True)
    for mem, row in pivot.iterrows():
        name = " ".join(map(str, mem)) if isinstance(mem, tuple) else str(mem)
        table.add_row(name, *("-" if v != v else f"{v:.1e}" for v in row.values))
    # A pipe or a narrow terminal would squeeze the numbers into ellipses: size the table to its content.
    Console(width=max(Console().width, 30 + 11 * len(pivot.columns))).print(table)


def _report(store: str, experiment: str | None, out: str, console: Console) -> None:
    from .report import write_report

    paths = write_report(store, out_dir=out, experiment=experiment)
    md = [p for p in paths if p.name == "report.md"]
    console.print(f"report: {', '.join(str(p) for p in md) or out}")


@main.command()
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--experiment", default=None, help="Only this experiment (default: every one in the store).")
@click.option("--out", default="plots", show_default=True)
def report(store, experiment, out):
    """Regenerate figures, tables and report.md from the store."""
    if not Path(store).is_file():
        _fail(f"--store {store}: no such results store")
    try:
        _report(store, experiment, out, Console(stderr=True))
    except ValueError as e:
        _fail(str(e))


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
        for name, origin in reg.origins().items():
            table.add_row(name, origin)
        console.print(table)
    console.print("composed memories: PHI/RULE[/NORM[+attn]], e.g. dpfp-3/delta, linear/sum, "
                  "favor-64/sum, tanh/fwm, linear/delta/sum+attn")
    table = Table(title="shipped experiments", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    import tomllib

    for name, path in shipped_experiments().items():
        table.add_row(name, str(tomllib.loads(path.read_text()).get("description", "")))
    console.print(table)


from .bench import bench_command  # noqa: E402  (the command lives beside the code it measures)

main.add_command(bench_command)
