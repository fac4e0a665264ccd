"""Stores that outlive versions: run identity without defaults, schema migrations, reports that never pool.

The fixture tests/fixtures/store-0.2.1.db was written by retrieval-bench 0.2.1 (see tests/fixtures/README.md);
every test works on a copy of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from retrieval_bench import migrations
from retrieval_bench.config import RunConfig, TrainConfig, load
from retrieval_bench.identity import canonical, fingerprint, run_id
from retrieval_bench.report import capacity_table, write_report
from retrieval_bench.report.settings import report_dir, setting_groups
from retrieval_bench.store import Store, StoreError
from retrieval_bench.sweep import plan

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "store-0.2.1.db"
EXPERIMENTS = [FIXTURES / "store-0.2.1-tiny.toml", FIXTURES / "store-0.2.1-tiny_overwrite.toml"]


@pytest.fixture
def old_store(tmp_path) -> Path:
    path = tmp_path / "results.db"
    shutil.copy(OLD, path)
    return path


def _rows(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _legacy_id(config: dict) -> str:
    """The 0.2.1 rule: every field, defaults included."""
    text = json.dumps({"v": 1, **config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- identity -----------------------------------------------------------------------------------------------

def _one(*sets: str) -> RunConfig:
    return load(str(EXPERIMENTS[0]), sets).expand()[0]


def test_explicit_defaults_do_not_change_the_id():
    base = _one()
    same = _one("task.eval_sequences=20", "task.max_eval_queries=200", "task.seq_len=4",
                'task.eval_seq_len="train"', "train.lr=0.001", "model.embed_factor=2.2", "train.diagnostics=true")
    assert same.run_id == base.run_id and canonical(same) == canonical(base)
    for other in ("task.eval_sequences=21", "train.lr=0.002", "model.embed_factor=2.0", "task.seq_len=3"):
        assert _one(other).run_id != base.run_id, other


def test_a_new_field_with_a_default_changes_no_id():
    base = _one()
    Later = dataclasses.make_dataclass("Later", [("new_knob", int, dataclasses.field(default=3))],
                                       bases=(TrainConfig,), frozen=True)
    later = dataclasses.replace(base, train=Later(**dataclasses.asdict(base.train)))
    assert later.run_id == base.run_id
    changed = dataclasses.replace(base, train=Later(**dataclasses.asdict(base.train), new_knob=4))
    assert changed.run_id != base.run_id


def test_the_id_still_separates_what_matters():
    ids = {r.run_id for r in load(str(EXPERIMENTS[0])).expand()}
    assert len(ids) == 8  # 2 memories x 2 S x 2 seeds
    assert _one("train.max_steps=61").run_id != _one().run_id


# ---- migration of a 0.2.1 store -----------------------------------------------------------------------------

def test_a_0_2_1_store_migrates_keeping_every_run_and_its_records(old_store):
    before = _rows(old_store, "SELECT run_id, config FROM runs")
    counts = {rid: (_rows(old_store, f"SELECT count(*) FROM curves WHERE run_id = '{rid}'")[0][0],
                    _rows(old_store, f"SELECT count(*) FROM diagnostics WHERE run_id = '{rid}'")[0][0])
              for rid, _ in before}
    assert all(rid == _legacy_id(json.loads(c)) for rid, c in before)  # the fixture is what 0.2.1 wrote
    store = Store(old_store)
    assert store.migration["from"] == 1 and store.migration["changed"] == len(before)
    meta = dict(_rows(old_store, "SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(migrations.SCHEMA_VERSION) and meta["identity"] == fingerprint()
    after = dict(_rows(old_store, "SELECT run_id, config FROM runs"))
    assert len(after) == len(before)
    for old_id, config in before:
        new_id = run_id(RunConfig.from_dict(json.loads(config)))
        assert after[new_id] == config
        assert counts[old_id] == (
            _rows(old_store, f"SELECT count(*) FROM curves WHERE run_id = '{new_id}'")[0][0],
            _rows(old_store, f"SELECT count(*) FROM diagnostics WHERE run_id = '{new_id}'")[0][0])
    assert not _rows(old_store, "SELECT count(*) FROM curves WHERE run_id NOT IN (SELECT run_id FROM runs)")[0][0]
    assert all(i for (i,) in _rows(old_store, "SELECT identity FROM runs"))
    assert set(_rows(old_store, "SELECT family FROM runs")) == {("retrieval",)}
    assert not _rows(old_store, "SELECT * FROM runs WHERE lr IS NULL")
    # the backup beside it is the store as it was
    backup = Path(store.migration["backup"])
    assert backup.parent == old_store.parent
    assert sorted(_rows(backup, "SELECT run_id, config FROM runs")) == sorted(before)
    assert "meta" not in {r[0] for r in _rows(backup, "SELECT name FROM sqlite_master")}
    # opening again changes nothing
    digest = _digest(old_store)
    assert Store(old_store).migration is None and _digest(old_store) == digest


@pytest.mark.slow  # draws every figure: seconds of matplotlib
def test_a_migrated_0_2_1_store_resumes_with_nothing_to_run_and_reports(old_store, tmp_path):
    store = Store(old_store)
    for path in EXPERIMENTS:
        todo, stored = plan(load(str(path)), store)
        assert not todo and stored
    paths = write_report(old_store, tmp_path / "plots")
    assert {p.parent.name for p in paths} == {"tiny", "tiny_overwrite"}
    md = (tmp_path / "plots" / "tiny" / "report.md").read_text()
    assert "8 runs (8 done)" in md and "2 seeds" in md and "different settings" not in md


def test_a_store_from_a_newer_version_is_refused_unchanged(old_store):
    Store(old_store)
    con = sqlite3.connect(old_store)
    with con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    digest = _digest(old_store)
    with pytest.raises(StoreError, match=rf"schema version 99.*up to {migrations.SCHEMA_VERSION}"):
        Store(old_store)
    assert _digest(old_store) == digest


def test_a_store_lacking_a_column_gains_it_and_takes_new_runs(old_store):
    con = sqlite3.connect(old_store)
    con.execute("ALTER TABLE runs DROP COLUMN state_size")
    con.close()
    store = Store(old_store)
    assert store.migration["added"] >= 2  # state_size and identity
    cfg = load(str(EXPERIMENTS[0]), ("train.max_steps=7",)).expand()[0]
    store.write_run({"run_id": cfg.run_id, "status": "done", "state_size": 12, "config": cfg.to_dict()})
    assert _rows(old_store, f"SELECT state_size FROM runs WHERE run_id = '{cfg.run_id}'") == [(12,)]


def test_a_current_store_lacking_a_newer_column_gains_it_on_open(old_store):
    Store(old_store)  # schema up to date; then a column this version writes goes missing (an earlier build)
    con = sqlite3.connect(old_store)
    con.execute("ALTER TABLE runs DROP COLUMN device")
    con.close()
    store = Store(old_store)
    assert store.migration is None  # no upgrade, no backup: only the column added
    cfg = load(str(EXPERIMENTS[0]), ("train.max_steps=7",)).expand()[0]
    store.write_run({"run_id": cfg.run_id, "status": "done", "device": "cpu", "config": cfg.to_dict()})
    assert _rows(old_store, f"SELECT device FROM runs WHERE run_id = '{cfg.run_id}'") == [("cpu",)]


def test_runs_that_the_new_rule_finds_equal_are_merged_keeping_the_finished_one(old_store):
    (rid, config, status), = _rows(old_store, "SELECT run_id, config, status FROM runs LIMIT 1")
    twin = json.loads(config)
    twin["task"]["eval_sequences"] = 20  # written out explicitly: a new run id under 0.2.1's rule
    con = sqlite3.connect(old_store)
    with con:
        con.execute("INSERT INTO runs (run_id, experiment, status, config, finished_at) VALUES (?, ?, ?, ?, ?)",
                    (_legacy_id(twin), twin["experiment"], "failed", json.dumps(twin), "2099-01-01"))
        con.execute("INSERT INTO curves VALUES (?, 1, 'eval', 'loss', 9.0)", (_legacy_id(twin),))
    con.close()
    store = Store(old_store)
    assert store.migration["merged"] == 1
    new = run_id(RunConfig.from_dict(json.loads(config)))
    assert _rows(old_store, f"SELECT status FROM runs WHERE run_id = '{new}'") == [(status,)]
    assert not _rows(old_store, "SELECT * FROM curves WHERE value = 9.0")


def test_changed_defaults_recompute_the_ids(old_store):
    Store(old_store)
    ids = sorted(r for (r,) in _rows(old_store, "SELECT run_id FROM runs"))
    con = sqlite3.connect(old_store)
    with con:  # as if the store had been written under other defaults: its ids must be made again
        con.execute("UPDATE meta SET value = 'stale' WHERE key = 'identity'")
        con.execute("UPDATE runs SET run_id = 'x' || run_id")
    con.close()
    assert Store(old_store).migration["changed"] == len(ids)
    assert sorted(r for (r,) in _rows(old_store, "SELECT run_id FROM runs")) == ids


def test_a_setting_added_with_a_default_needs_no_upgrade(old_store):
    Store(old_store)
    meta = json.loads(dict(_rows(old_store, "SELECT key, value FROM meta"))["identity"])
    del meta["TrainConfig"]["stop_acc"]  # as written by a version before that setting
    con = sqlite3.connect(old_store)
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (json.dumps(meta),))
    con.close()
    ids = _rows(old_store, "SELECT run_id FROM runs ORDER BY run_id")
    assert Store(old_store).migration is None and len(list(old_store.parent.glob("*.bak*"))) == 1
    assert dict(_rows(old_store, "SELECT key, value FROM meta"))["identity"] == fingerprint()
    assert _rows(old_store, "SELECT run_id FROM runs ORDER BY run_id") == ids


def test_a_changed_default_recomputes_the_ids(old_store):
    Store(old_store)
    meta = json.loads(dict(_rows(old_store, "SELECT key, value FROM meta"))["identity"])
    meta["TrainConfig"]["patience"] = "10"  # as written by a version whose default patience was 10
    con = sqlite3.connect(old_store)
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (json.dumps(meta),))
    con.close()
    assert Store(old_store).migration is not None and len(list(old_store.parent.glob("*.bak*"))) == 2


def test_two_processes_opening_an_old_store_migrate_it_once(old_store):
    errors, results = [], []

    def open_it():
        try:
            results.append(Store(old_store).migration)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r is not None for r in results) == 1
    assert len(list(old_store.parent.glob("*.bak*"))) == 1


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100, None], ids=["empty", "bytes", "dir"])
def test_what_is_not_a_store_is_refused_unchanged(tmp_path, content):
    path = tmp_path / "x.db"
    if content is None:
        path.mkdir()
        with pytest.raises(StoreError, match="directory"):
            Store(path)
        return
    path.write_bytes(content)
    if not content:  # an empty file is a new, empty database
        Store(path)
        return
    with pytest.raises(StoreError, match="not a results store"):
        Store(path)
    assert path.read_bytes() == content


def test_a_truncated_store_is_refused(old_store):
    data = old_store.read_bytes()
    old_store.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError):
        Store(old_store)


def test_a_foreign_sqlite_database_is_refused_unchanged(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.close()
    digest = _digest(path)
    with pytest.raises(StoreError, match="not a retrieval-bench results store"):
        Store(path)
    assert _digest(path) == digest


# ---- reports: never pooled, never outside --out -------------------------------------------------------------

@pytest.mark.slow  # draws every figure: seconds of matplotlib
def test_runs_of_other_settings_are_reported_apart(old_store, tmp_path):
    store = Store(old_store)
    for cfg in load(str(EXPERIMENTS[0]), ("train.max_steps=100",)).expand():  # the same grid, another budget
        store.write_run({"run_id": cfg.run_id, "experiment": cfg.experiment, "task": "capacity",
                         "memory": cfg.model.memory, "num_keys": cfg.task.kwargs()["num_keys"],
                         "seq_len": cfg.task.kwargs()["num_keys"], "d_key": 8, "seed": cfg.seed,
                         "status": "done", "final_loss": 0.5, "steps": 100, "config": cfg.to_dict(),
                         "finished_at": "2099-01-01T00:00:00+00:00"})
    from retrieval_bench.report.frames import load_frames

    runs = load_frames(old_store)["runs"]
    groups = setting_groups(runs[runs["experiment"] == "tiny"])
    assert [label for label, _ in groups] == ["train.max_steps=100", "train.max_steps=60"]
    assert [len(g) for _, g in groups] == [8, 8]
    write_report(old_store, tmp_path / "plots", experiment="tiny")
    main = (tmp_path / "plots" / "tiny" / "report.md").read_text()
    other = (tmp_path / "plots" / "tiny--train.max_steps=60" / "report.md").read_text()
    assert "8 runs" in main and "2 seeds" in main and "train.max_steps=100" in main
    assert "8 runs" in other and "train.max_steps=60" in other
    # the memory-specific settings of an override are not a difference: each cell has one setting
    assert setting_groups(runs[runs["experiment"] == "tiny_overwrite"])[0][0] == ""


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "x[/]", "..", "a/b", "ok-name_1.2"])
def test_report_folders_never_leave_the_output_folder(tmp_path, name):
    out = tmp_path / "plots"
    d = report_dir(out, name)
    assert d.parent == out and d.name not in ("", ".", "..") and "/" not in d.name
    assert (d.name == name) == (name == "ok-name_1.2")


def test_failed_runs_are_not_counted_as_diverged():
    import pandas as pd

    runs = pd.DataFrame([
        {"memory": "linear/sum", "task": "capacity", "num_keys": 4, "seq_len": 4, "d_key": 8, "d_dot": 8,
         "seed": s, "status": st, "final_loss": 0.1 if st == "done" else None}
        for s, st in [(1, "done"), (2, "diverged"), (3, "failed"), (4, "failed")]])
    row = capacity_table(runs).iloc[0]
    assert (row["n_diverged"], row["n_failed"], row["n_seeds"]) == (1, 2, 4)
