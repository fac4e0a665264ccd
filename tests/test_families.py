"""Model families under one training loop: the lm family end to end (train, store, report), its optimizer
schedule, its query-only logits, and the checks that keep a family with its own kind of task."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import retrieval_bench as rb
from retrieval_bench.config import ConfigError, from_dict
from retrieval_bench.families import family
from retrieval_bench.families.lm import LMFamily, query_logits
from retrieval_bench.lm import lm
from retrieval_bench.report import lm as report_lm
from retrieval_bench.report import write_report
from retrieval_bench.store import Store
from retrieval_bench.train import train_run


def _lm_experiment(**changes) -> dict:
    raw = {"name": "tiny_lm", "seeds": [1],
           "task": {"name": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "eval_sequences": 8,
                    "eval_seq_len": 32},
           "model": {"kind": "lm", "memory": "linear/delta", "d_model": 8, "n_layers": 2, "n_heads": 2, "conv": 2},
           "train": {"batch_size": 4, "max_steps": 6, "eval_every": 3, "lr": 3e-3, "weight_decay": 0.1,
                     "warmup": 0.2, "schedule": "cosine", "grad_clip": 1.0, "diag_positions": 4}}
    for path, value in changes.items():
        sec, key = path.split(".")
        raw[sec][key] = value
    return raw


def test_an_lm_run_trains_and_records_what_the_report_needs():
    (cfg,) = from_dict(_lm_experiment()).expand()
    out = train_run(cfg)
    row = out["row"]
    assert row["status"] == "done" and row["family"] == "lm" and row["steps"] == 6
    assert row["num_keys"] == 2 and row["seq_len"] == 16 and row["eval_seq_len"] == 32 and row["d_model"] == 8
    model = lm("linear/delta", vocab_size=32, d_model=8, n_layers=2, n_heads=2, conv=2)
    assert row["state_size"] == model.state_size(16) > 0
    assert 0 <= row["final_acc"] <= 1 and math.isfinite(row["final_loss"])
    evals = [c for c in out["curves"] if c[1:3] == ("eval", "acc")]
    assert [c[0] for c in evals] == [3, 6]
    metrics = {d[2] for d in out["diagnostics"]}
    assert {"acc_by_gap", "acc_by_position", "acc_by_length"} <= metrics
    assert any(m.startswith("L1H1.") for m in metrics) and any(m.startswith("L0H0.state_norm") for m in metrics)
    lengths = [d[1] for d in out["diagnostics"] if d[2] == "acc_by_length"]
    assert lengths == [32]  # the doublings of the training length up to eval_seq_len
    assert train_run(cfg)["row"]["final_acc"] == row["final_acc"]  # seeded: the same run, the same numbers


def test_query_logits_are_the_model_logits_at_the_queries():
    task = rb.task("mqar", vocab_size=32, seq_len=16, num_kv_pairs=2)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    model = lm("softmax", vocab_size=32, d_model=8, n_layers=2, n_heads=2, conv=3).double()
    mask = batch.targets != -100
    torch.testing.assert_close(query_logits(model, batch.tokens, mask), model(batch.tokens)[mask])


def test_the_lm_schedule_warms_up_then_decays_to_zero():
    (cfg,) = from_dict(_lm_experiment(**{"train.max_steps": 10, "train.warmup": 0.2})).expand()
    model = torch.nn.Linear(2, 2)
    opt, schedule = LMFamily().optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[0] == pytest.approx(3e-3 / 2) and rates[1] == pytest.approx(3e-3)  # 2 warm-up steps
    assert all(a > b for a, b in zip(rates[1:], rates[2:], strict=False))  # cosine: falls every step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 at max_steps


def test_the_retrieval_family_keeps_the_papers_optimizer():
    (cfg,) = from_dict({"name": "r", "task": {"name": "capacity", "num_keys": 4},
                        "model": {"memory": "linear/sum", "d_key": 4}}).expand()
    opt, schedule = family("retrieval").optimizer(cfg, torch.nn.Linear(2, 2))
    assert type(opt) is torch.optim.Adam and schedule is None


@pytest.mark.parametrize("change, field", [
    ({"model.kind": "retrieval"}, "model.kind"),  # a token-stream task needs the lm
    ({"model.d_model": 9}, "model.d_model"),  # 2 heads do not split 9
    ({"model.kind": "transformer"}, "model.kind"),
    ({"train.schedule": "linear"}, "train.schedule"),
    ({"train.warmup": 1.5}, "train.warmup"),
    ({"train.stop_acc": 0.0}, "train.stop_acc"),
    ({"model.conv": -1}, "model.conv"),
])
def test_bad_lm_settings_name_the_field(change, field):
    raw = _lm_experiment(**change)
    if change.get("model.kind") == "retrieval":
        raw["model"] = {"memory": "linear/sum"}
        raw["train"] = {"max_steps": 5}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(raw)


def test_a_retrieval_run_refuses_lm_settings_and_a_token_task():
    with pytest.raises(ConfigError, match=r"model\.kind: 'lm' needs a token-stream task"):
        from_dict({"name": "x", "task": {"name": "capacity", "num_keys": 4}, "model": {"kind": "lm"}})
    with pytest.raises(ConfigError, match=r"train\.weight_decay: applies to model\.kind = 'lm' only"):
        from_dict({"name": "x", "task": {"name": "capacity", "num_keys": 4}, "train": {"weight_decay": 0.1}})


@pytest.mark.slow  # draws every figure: seconds of matplotlib
def test_the_lm_report_takes_the_best_learning_rate_and_draws_its_figures(tmp_path):
    store = Store(tmp_path / "s.db")
    raw = _lm_experiment(**{"train.lr": [1e-3, 3e-3], "model.memory": ["softmax", "linear/sum"],
                            "train.max_steps": 3})
    for cfg in from_dict(raw).expand():
        out = train_run(cfg)
        store.write_run(out["row"], out["curves"], out["diagnostics"])
    runs = store.load("runs")
    best = report_lm.best_lr(runs)
    assert len(best) == 2 and (best["lrs_tried"] == 2).all()
    for _, b in best.iterrows():
        accs = runs[runs["memory"] == b["memory"]].set_index("lr")["final_acc"]
        assert b["acc"] == accs.max() and accs[b["lr"]] == accs.max()
    paths = write_report(tmp_path / "s.db", tmp_path / "plots")
    assert {p.parent.name for p in paths} == {"tiny_lm"}  # both learning rates in one report, not apart
    names = {p.name for p in paths}
    assert {"state_size.png", "pairs.png", "extrapolation.png", "layers.png", "accuracy_table.csv",
            "report.md"} <= names
    md = (tmp_path / "plots" / "tiny_lm" / "report.md").read_text()
    assert "Accuracy against state size" in md and "Learning rate per point" in md
    table = pd.read_csv(tmp_path / "plots" / "tiny_lm" / "accuracy_table.csv")
    assert set(table["memory"]) == {"softmax", "linear/sum"}


def test_the_accuracy_table_has_a_row_per_memory_and_width_and_its_points_in_order():
    """Softmax's state (its KV cache) grows with the length: it still takes one row per width, with its state's
    range; the points read by length, 64 before 128 and 256, not as text."""
    rows = []
    for T in (256, 64, 128):
        for memory, d_dot, state in (("softmax", math.nan, 2 * 32 * T), ("linear/sum", 32, 32 * 33)):
            for lr, acc in ((1e-2, 0.5), (3e-3, 0.9 if T == 256 else 0.1)):
                rows.append({"memory": memory, "d_model": 32, "num_keys": T // 16, "seq_len": T, "lr": lr,
                             "seed": 1, "status": "done", "final_acc": acc, "state_size": state, "d_dot": d_dot})
    table = report_lm.accuracy_by_state_table(pd.DataFrame(rows))
    assert list(table.columns) == ["memory", "d_model", "state_size", "T=64, pairs=4", "T=128, pairs=8",
                                   "T=256, pairs=16"]
    assert list(table["memory"]) == ["linear/sum", "softmax"]
    assert list(table["state_size"]) == ["1056", "4096-16384"]
    for _, row in table.iterrows():  # each point at its best rate
        assert row.iloc[3:].tolist() == [0.5, 0.5, 0.9]


def test_an_lm_report_pools_its_learning_rates_and_widths():
    """The language model's report takes each point's best learning rate and plots by width: runs that differ in
    them share one report. The retrieval report has neither axis, and reports such runs apart."""
    import json

    from retrieval_bench.report.settings import setting_groups

    rows = []
    for lr in (1e-3, 3e-3):
        for width in (32, 64):
            ident = json.dumps({"experiment": "x", "seed": 1, "task": {"name": "mqar", "num_kv_pairs": 8},
                                "model": {"kind": "lm", "memory": "softmax", "d_model": width},
                                "train": {"lr": lr}})
            rows.append({"memory": "softmax", "task": "mqar", "num_keys": 8, "seq_len": 64, "d_key": None,
                         "family": "lm", "identity": ident, "config": ident, "finished_at": f"{lr}{width}"})
    runs = pd.DataFrame(rows)
    assert [label for label, _ in setting_groups(runs)] == [""]
    assert len(setting_groups(runs.assign(family="retrieval"))) == 4


def test_a_paired_axis_sets_its_settings_together():
    raw = _lm_experiment()
    raw["task"]["points"] = [{"seq_len": 16, "num_kv_pairs": 2}, {"seq_len": 32, "num_kv_pairs": 4}]
    del raw["task"]["seq_len"], raw["task"]["num_kv_pairs"]
    raw["model"]["d_model"] = [8, 16]
    runs = from_dict(raw).expand()
    pairs = sorted({(r.task.kwargs()["seq_len"], r.task.kwargs()["num_kv_pairs"]) for r in runs})
    assert pairs == [(16, 2), (32, 4)] and len(runs) == 4  # 2 points x 2 widths, not 2 x 2 x 2
    assert all("points" not in r.task.kwargs() for r in runs)


@pytest.mark.parametrize("points, message", [
    ([], "non-empty list of tables"),
    ([{"seq_len": 16}, {"num_kv_pairs": 2}], "every point sets the same keys"),
    ([{"seq_len": [16, 32]}], "nested list"),
    ([{"seq_lenn": 16}], "task.points.seq_lenn: unknown key"),
    ([{"seq_len": 4, "num_kv_pairs": 4}], "seq_len"),  # too short for its pairs: the task says so
])
def test_a_bad_paired_axis_names_the_field(points, message):
    raw = _lm_experiment()
    raw["task"]["points"] = points
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


@pytest.mark.parametrize("kind", ["retrieval", "lm"])
def test_a_feature_maps_own_option_reaches_it_and_no_other(kind):
    if kind == "lm":
        raw = _lm_experiment(**{"model.memory": ["favor-4/sum", "dpfp-1/sum"], "model.redraw": "fixed"})
    else:
        raw = {"name": "r", "task": {"name": "capacity", "num_keys": 4},
               "model": {"memory": ["favor-4/sum", "dpfp-1/sum"], "d_key": 4, "redraw": "fixed"}}
    for cfg in from_dict(raw).expand():
        task = cfg.task.build()
        model = family(kind).build(cfg, task)
        mems = model.memories if kind == "lm" else [model.memory]
        for mem in mems:
            assert getattr(mem.phi, "policy", "fixed") == "fixed"  # FAVOR+ took it; DPFP has no such option
