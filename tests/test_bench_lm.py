"""``bench --lm``: the language model's step with each memory's causal fast form beside its reference loop."""

from __future__ import annotations

from click.testing import CliRunner

from retrieval_bench.bench_cli import bench_command
from retrieval_bench.bench_lm import lm_step_ms
from retrieval_bench.store import Store


def test_fast_and_reference_forms_train_the_same_model():
    rows = lm_step_ms("linear/delta", 16, batch_size=2, d_model=8, n_layers=1, n_heads=2, vocab_size=32,
                      threads=1, repeat=2)
    assert [r["form"] for r in rows] == ["fast", "reference"]
    assert rows[0]["max_diff"] < 1e-4  # the same losses, step after step, from the same weights and batches
    assert all(r["ms_step"] > 0 for r in rows)


def test_bench_lm_prints_and_stores_its_rows(tmp_path):
    store = tmp_path / "s.db"
    out = CliRunner().invoke(bench_command, ["--lm", "16", "--memory", "softmax", "--repeat", "1", "--threads", "1",
                                             "--store", str(store)])
    assert out.exit_code == 0, out.output
    assert "softmax" in out.output and "reference" in out.output
    rows = Store(store).load("bench")
    assert set(rows["form"]) == {"fast", "reference"} and set(rows["task"]) == {"mqar"}


def test_bench_lm_refuses_the_retrieval_models_reference_cap():
    from click.testing import CliRunner

    res = CliRunner().invoke(bench_command, ["--lm", "16", "--reference-max-gib", "4"])
    assert res.exit_code == 2 and "--reference-max-gib" in res.output, res.output


def test_memories_at_one_length_are_timed_together_and_compared_with_softmax():
    from retrieval_bench.bench_lm import relative_lines, run_lm_bench

    rows = run_lm_bench(["linear/sum", "softmax", "linear/sum"], [8, 16], reference_max_len=8, batch_size=2, d_model=8,
                        n_layers=1, n_heads=1, vocab_size=32, threads=1, repeat=1)
    assert [(r["memory"], r["seq_len"], r["form"]) for r in rows] == [
        ("linear/sum", 8, "fast"), ("linear/sum", 8, "reference"), ("linear/sum", 16, "fast"),
        ("softmax", 8, "fast"), ("softmax", 8, "reference"), ("softmax", 16, "fast")]
    assert all(r["max_diff"] < 1e-4 for r in rows if r["seq_len"] == 8)
    fast = {(r["memory"], r["seq_len"]): r["ms_step"] for r in rows if r["form"] == "fast"}
    lines = relative_lines(rows)
    assert len(lines) == 2 and lines[0].startswith("T=8: linear/sum's step takes")
    assert f"{fast['linear/sum', 16] / fast['softmax', 16]:.2f}x" in lines[1]
    assert relative_lines([r for r in rows if r["memory"] != "softmax"]) == []  # nothing to compare with


def test_bench_lm_runs_the_reference_loops_up_to_the_length_asked():
    out = CliRunner().invoke(bench_command, ["--lm", "8", "--lm", "16", "--memory", "linear/sum", "--repeat", "1",
                                             "--threads", "1", "--lm-reference-max", "16"])
    assert out.exit_code == 0, out.output
    refs = [line.split()[1] for line in out.output.splitlines() if " reference " in line]
    assert refs == ["8", "16"]
    out = CliRunner().invoke(bench_command, ["--lm", "8", "--lm", "16", "--memory", "linear/sum", "--repeat", "1",
                                             "--threads", "1", "--lm-reference-max", "8"])
    assert [line.split()[1] for line in out.output.splitlines() if " reference " in line] == ["8"]
    res = CliRunner().invoke(bench_command, ["--lm-reference-max", "512"])
    assert res.exit_code == 2 and "--lm-reference-max" in res.output, res.output


def test_the_causal_op_script_times_each_fast_form_beside_its_reference_loop():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "causal_op_bench.py"), "--seq-len", "8",
                          "--batch", "2", "--width", "4", "--repeat", "1", "linear/delta", "softmax"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""}, check=True)
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["linear/delta", "softmax"]
    assert all("fast" in line and "reference / fast" in line for line in lines)


def test_the_lm_bench_tunes_the_allocator_as_the_sweep_workers_do(monkeypatch):
    """Steps are timed as runs train: the sweep's workers call ``tune_malloc`` before training, and so does the
    language-model bench unless told not to."""
    from retrieval_bench import bench_lm

    calls = []
    monkeypatch.setattr(bench_lm, "tune_malloc", lambda: calls.append(1) or True)
    kw = dict(reference_max_len=0, batch_size=2, d_model=8, n_layers=1, n_heads=1, vocab_size=32, threads=1, repeat=1)
    bench_lm.run_lm_bench(["linear/sum"], [8], **kw)
    assert calls == [1]
    bench_lm.run_lm_bench(["linear/sum"], [8], malloc_tuned=False, **kw)
    assert calls == [1]
