"""The command line: run, list, dry-run, and one clear message with exit code 2 for every bad input."""

from __future__ import annotations

import tomllib

import pytest
from click.testing import CliRunner

from retrieval_bench.cli import main


@pytest.fixture
def tiny(tiny_experiment):
    """Four runs (S = 4, 6 x linear/sum, dpfp-1/delta), diagnostics on: the whole pipeline."""
    return tiny_experiment.toml(task={"num_keys": [4, 6]}, model={"memory": ["linear/sum", "dpfp-1/delta"]})


def test_console_script_is_declared():
    import pathlib

    meta = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["retrieval-bench"] == "retrieval_bench.cli:main"


def test_version_is_the_one_in_the_code():
    """Runs record ``retrieval_bench.__version__``; the build and ``--version`` must say the same. Installed
    metadata that differs means a stale install (an editable one keeps the version it was installed with)."""
    from importlib.metadata import version

    import retrieval_bench

    assert version("retrieval-bench") == retrieval_bench.__version__, "stale install: pip install -e ."
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"retrieval-bench, version {retrieval_bench.__version__}"


def test_run_writes_store_table_and_report(tiny, tmp_path, fake_save):
    """Store, table and report.md (its figures not rendered: fake_save; test_report.py renders), then resume."""
    store, out = tmp_path / "r.db", tmp_path / "plots"
    res = CliRunner().invoke(main, ["run", str(tiny), "--store", str(store), "--workers", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "final eval loss" in res.output and "linear/sum" in res.output
    assert any(line.strip() == "tiny: final eval loss (median over seeds)" for line in res.output.splitlines())
    assert (out / "tiny" / "report.md").is_file()
    res2 = CliRunner().invoke(main, ["run", str(tiny), "--store", str(store), "--workers", "1", "--no-report"])
    assert res2.exit_code == 0 and "0 runs to do, 4 already stored" in res2.output


def test_dry_run_trains_nothing(tiny, tmp_path):
    res = CliRunner().invoke(main, ["run", str(tiny), "--dry-run", "--store", str(tmp_path / "r.db"),
                                    "--set", "task.num_keys=[4, 5, 6]"])
    assert res.exit_code == 0 and "6 runs in experiment 'tiny'" in res.output
    assert not (tmp_path / "r.db").exists()


def test_list_shows_every_registry_and_shipped_experiments():
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0
    for word in ("softmax", "dpfp", "favor", "delta", "fwm", "overwrite", "capacity", "quick", "built-in", "l2"):
        assert word in res.output


@pytest.mark.parametrize("args, message", [
    (["--set", "model.memory=linaer/sum"], "did you mean"),
    (["--set", "task.name=capacty"], "task.name"),
    (["--set", "train.lr=fast"], "train.lr"),
    (["--set", "train.batchsize=3"], "train.batchsize"),
    (["--set", "task.num_keys=0"], "num_keys"),
    (["--set", "model.memory=dpfp-9/sum"], "d_key"),
    (["--set", "nonsense"], "--set"),
])
def test_bad_input_is_one_message_exit_2_nothing_written(tiny, tmp_path, args, message):
    store = tmp_path / "r.db"
    res = CliRunner().invoke(main, ["run", str(tiny), "--store", str(store), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not store.exists()


def test_malformed_and_missing_files_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    for target in (str(bad), str(tmp_path / "nope.toml"), "no-such-experiment"):
        res = CliRunner().invoke(main, ["run", target, "--store", str(tmp_path / "r.db")])
        assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r.db").exists()


def test_report_on_missing_store_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["report", "--store", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "no such results store" in res.output


def test_report_runs_without_torch(tmp_path):
    """``retrieval-bench report`` (and ``import retrieval_bench``) never import torch: a report starts fast on any
    machine that holds a store. Run in a fresh interpreter, where torch's import is refused outright."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    store = tmp_path / "store.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "store-0.2.1.db", store)  # a store of an older version
    code = f"""
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported by the report")

sys.meta_path.insert(0, NoTorch())
import retrieval_bench as rb
from retrieval_bench.cli import main
main(["report", "--store", {str(store)!r}, "--experiment", "tiny", "--out", {str(tmp_path / "plots")!r}],
     standalone_mode=False)
assert rb.__version__ and "torch" not in sys.modules
print("no torch")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "no torch" in res.stdout, res.stderr[-3000:]
    assert (tmp_path / "plots" / "tiny" / "report.md").is_file()
