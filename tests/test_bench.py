"""The benchmark: rows and their keys, skipping a reference that would not fit, the table, the CLI command."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import retrieval_bench as rb
from retrieval_bench.bench import ROW_KEYS, peak_memory_mb, reference_form, run_bench, tune_malloc
from retrieval_bench.bench_cli import bench_command, format_table, max_difference

TINY = {"num_keys": [6], "threads": 1, "repeat": 1, "batch_size": 3, "d_key": 8, "warmup": 0}


def test_rows_have_the_keys_and_both_forms_agree():
    rows = run_bench(["dpfp-1/delta", "softmax"], **TINY)
    expected = [(m, f) for m in ("dpfp-1/delta", "softmax") for f in ("fast", "reference")]
    assert [(r["memory"], r["form"]) for r in rows] == expected
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["status"] == "ok" and r["task"] == "capacity"
        assert r["num_keys"] == 6 and r["seq_len"] == 6 and r["diff_seq_len"] == 6
        assert r["ms_step"] > 0 and r["ms_eval"] > 0
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
        assert 0 <= r["max_diff"] < 1e-4 and r["max_rel_diff"] < 1e-4
    assert max_difference(rows) == max(r["max_diff"] for r in rows)


def test_overwrite_task_sets_the_length():
    rows = run_bench(["tanh/fwm"], task="overwrite", include_reference=False, **TINY)
    assert [(r["form"], r["seq_len"], r["max_diff"]) for r in rows] == [("fast", 12, None)]


def test_reference_is_skipped_over_the_memory_cap_and_compared_on_less():
    rows = run_bench(["dpfp-2/sum"], reference_max_bytes=5_000, **TINY)  # not even one whole sequence fits
    fast, ref = rows
    assert fast["status"] == "ok" and fast["ms_step"] > 0
    assert ref["form"] == "reference" and ref["status"].startswith("skipped:")
    assert ref["ms_step"] is None and ref["ms_eval"] is None and ref["peak_mb"] is None
    # the forms are still compared, on fewer sequences and a shorter prefix that fit the cap
    assert 1 <= fast["diff_seq_len"] < fast["seq_len"]
    assert fast["max_diff"] is not None and fast["max_diff"] < 1e-4


def test_format_table_lists_every_row():
    rows = run_bench(["linear/sum"], include_reference=False, **TINY)
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["memory", "task", "S"]
    assert len(lines) == 2 + len(rows) and "linear/sum" in lines[2]


def test_reference_form_swaps_forward_and_restores_it():
    mem = rb.memory("dpfp-1/delta", d_key=4)
    with reference_form(mem):
        assert mem.forward == mem.reference
    assert "forward" not in vars(mem)


def test_tune_malloc_and_peak_memory():
    assert isinstance(tune_malloc(), bool)

    def touch():
        x = torch.ones(16 * 2**20)  # 64 MB, written
        return float(x[-1])

    peak = peak_memory_mb(touch)
    if peak is not None:  # Linux
        assert peak >= 50


def test_cli_prints_the_table_and_stores_rows(tmp_path):
    store = tmp_path / "results.db"
    args = ["--memory", "dpfp-1/delta", "--num-keys", "6", "--threads", "1", "--repeat", "1",
            "--batch-size", "3", "--d-key", "8", "--store", str(store)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert "dpfp-1/delta" in result.output and "reference" in result.output
    assert "max |fast - reference|" in result.output
    try:
        from retrieval_bench.store import Store
    except ImportError:
        assert "not stored" in result.output
        return
    table = Store(store).load("bench")
    assert list(table["form"]) == ["fast", "reference"]
    assert math.isfinite(table["ms_step"].iloc[0])


@pytest.mark.parametrize("flag", ["--no-reference"])
def test_cli_without_reference(flag):
    args = ["--memory", "softmax", "--num-keys", "6", "--threads", "1", "--repeat", "1", "--batch-size", "3",
            "--d-key", "8", flag]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert "reference" not in result.output.split("max")[0].replace("fast - reference", "")


def test_chunkwise_throughput_reports_rates():
    from retrieval_bench import bench

    r = bench.chunkwise_throughput(batch=2, seq_len=64, d_feat=16, d_value=8, chunk=16, threads=1, repeat=1)
    assert set(r) == {"ms", "gflops", "gemm_gflops", "peak_gflops"} and all(x > 0 for x in r.values())
    assert bench.chunkwise_flops(1, 64, 16, 8, 16) == 4 * (6 * 16 * 16 * 8 + 2 * 16 * 16 * (3 * 16 + 2 * 8))


def test_bench_records_the_device_and_an_older_store_gains_the_column(tmp_path):
    """Each row says where it ran; a store whose bench table predates the column gets it on open, and its old
    rows keep their numbers (NULL device)."""
    import shutil
    from pathlib import Path

    from retrieval_bench.store import Store

    store = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "store-0.2.1.db", store)
    before = Store(store).load("bench")
    args = ["--memory", "dpfp-1/sum", "--num-keys", "6", "--threads", "1", "--repeat", "1", "--batch-size", "3",
            "--d-key", "8", "--device", "cpu", "--store", str(store)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    after = Store(store).load("bench")
    assert len(after) == len(before) + 2
    old, new = after.iloc[: len(before)], after.iloc[len(before):]
    assert old["ms_step"].tolist() == before["ms_step"].tolist() and old["device"].isna().all()
    assert all(d.startswith("cpu (") for d in new["device"])


def test_bench_refuses_a_device_it_cannot_use(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    db = tmp_path / "b.db"
    result = CliRunner().invoke(bench_command, ["--memory", "softmax", "--device", "cuda", "--store", str(db)])
    assert result.exit_code == 2 and "--device" in result.output and "CUDA" in result.output, result.output
    assert not db.exists()
    result = CliRunner().invoke(bench_command, ["--memory", "softmax", "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device" in result.output, result.output


def test_cli_times_a_group_beside_one_run_and_skips_memories_that_cannot_group():
    args = ["--memory", "dpfp-1/sum", "--memory", "favor-8/sum", "--num-keys", "6", "--threads", "1", "--repeat",
            "1", "--batch-size", "3", "--d-key", "8", "--no-reference", "--group", "3"]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    grouped = [ln for ln in lines if "group of 3" in ln]
    assert len(grouped) == 2 and "ok" in grouped[0] and "skipped: its memory holds a state" in grouped[1]
    assert any(ln.startswith("dpfp-1/sum S=6: a step of 3 runs takes") for ln in lines)
    lm = CliRunner().invoke(bench_command, ["--lm", "16", "--memory", "linear/sum", "--group", "2", "--no-reference",
                                            "--repeat", "1", "--threads", "1"])
    assert lm.exit_code == 0, lm.output
    assert "group of 2" in lm.output and "linear/sum T=16: a step of 2 runs takes" in lm.output
