"""The results store: SQLite, one transaction per finished run, so a killed sweep loses only runs in flight.

Tables (DESIGN §5): ``runs`` (one row a run: axes as flat columns, the full config as JSON), ``curves``
(long format: run_id, step, split, metric, value), ``diagnostics`` (run_id, step, position, metric, value)
and ``bench`` (timings from ``retrieval-bench bench``). Only the driver process writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from . import migrations

RUN_COLUMNS = {
    "run_id": "TEXT PRIMARY KEY", "experiment": "TEXT", "task": "TEXT", "memory": "TEXT",
    "num_keys": "INTEGER", "seq_len": "INTEGER", "d_key": "INTEGER", "d_dot": "INTEGER", "seed": "INTEGER",
    "status": "TEXT", "stop_reason": "TEXT", "steps": "INTEGER", "final_loss": "REAL", "best_loss": "REAL",
    "final_acc": "REAL", "wall_s": "REAL", "state_size": "INTEGER", "error": "TEXT", "config": "TEXT",
    "version": "TEXT", "finished_at": "TEXT", "identity": "TEXT", "family": "TEXT", "d_model": "INTEGER",
    "lr": "REAL", "eval_seq_len": "INTEGER", "device": "TEXT",
}
BENCH_COLUMNS = {
    "memory": "TEXT", "task": "TEXT", "num_keys": "INTEGER", "seq_len": "INTEGER", "form": "TEXT",
    "threads": "INTEGER", "batch_size": "INTEGER", "d_key": "INTEGER", "ms_step": "REAL", "ms_eval": "REAL",
    "peak_mb": "REAL", "max_diff": "REAL", "status": "TEXT", "version": "TEXT", "measured_at": "TEXT",
    "device": "TEXT",
}
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs ({", ".join(f"{k} {v}" for k, v in RUN_COLUMNS.items())});
CREATE TABLE IF NOT EXISTS curves (run_id TEXT, step INTEGER, split TEXT, metric TEXT, value REAL);
CREATE INDEX IF NOT EXISTS curves_run ON curves(run_id);
CREATE TABLE IF NOT EXISTS diagnostics (run_id TEXT, step INTEGER, position INTEGER, metric TEXT, value REAL);
CREATE INDEX IF NOT EXISTS diagnostics_run ON diagnostics(run_id);
CREATE TABLE IF NOT EXISTS bench ({", ".join(f"{k} {v}" for k, v in BENCH_COLUMNS.items())});
"""
# Runs with these statuses are final: a rerun of the sweep skips them. "failed" (an exception, a lost worker)
# is retried.
FINAL_STATUSES = ("done", "diverged")


class StoreError(RuntimeError):
    """A store that cannot be opened, migrated or written: the message names the file and what to do."""


class Store:
    """A SQLite results store at ``path``: created with its schema on first use, migrated on open when an older
    version wrote it (``migrations``), refused with a ``StoreError`` when it is not a store, is damaged or
    read-only where it must be written, or comes from a newer version."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a results store")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create its folder: {e.strerror or e}") from None
        self.migration = self._open()

    def _open(self) -> dict[str, Any] | None:
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open: {e}") from None
        try:
            try:
                have = migrations.tables(con)
                version = migrations.schema_version(con)
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: not a results store (SQLite says: {e})") from None
            if have and "runs" not in have:
                raise StoreError(f"{self.path}: a SQLite database, but not a retrieval-bench results store "
                                 f"(its tables: {', '.join(sorted(have))})")
            try:
                migrations.check_not_newer(version, self.path)
            except migrations.NewerStoreError as e:
                raise StoreError(str(e)) from None
            try:
                done = self._prepare(con, version)
            except sqlite3.OperationalError as e:
                what = ("it needs an upgrade to this version's schema, but cannot be written"
                        if version is not None and migrations.needs_upgrade(con) else "cannot be written")
                raise StoreError(f"{self.path}: {what} ({e}); make it writable, or work on a copy") from None
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: damaged or not a results store (SQLite says: {e})") from None
            return done
        finally:
            con.close()

    def _prepare(self, con: sqlite3.Connection, version: int | None) -> dict[str, Any] | None:
        """Migrate if needed, then WAL mode, the tables, the meta rows. Another process opening the same store
        at the same moment can make SQLite answer "locked" at once (a journal-mode change does not wait), so a
        locked store is tried again for up to a minute."""
        from .identity import fingerprint

        done = None
        for attempt in range(600):
            try:
                # a retry after a later step was locked finds the store migrated: keep the first attempt's record
                done = migrations.upgrade(self.path, con, RUN_COLUMNS, BENCH_COLUMNS) or done
                migrations.note_fingerprint(con)
                have = migrations.tables(con)
                for table, columns in (("runs", RUN_COLUMNS), ("bench", BENCH_COLUMNS)):
                    if table in have:  # a column this version writes and the store lacks (nullable: no backup)
                        migrations.add_missing_columns(con, table, columns)
                con.execute("PRAGMA journal_mode=WAL")  # readers (report) never block the writing driver
                con.executescript(SCHEMA)
                if version is None:
                    con.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                                    [("schema_version", str(migrations.SCHEMA_VERSION)),
                                     ("identity", fingerprint())])
                return done
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 599:
                    raise
                time.sleep(0.1)
        return None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    def finished_ids(self, run_ids: Iterable[str] | None = None) -> set[str]:
        """Ids of runs already stored with a final status."""
        with self._connect() as con:
            rows = con.execute(
                f"SELECT run_id FROM runs WHERE status IN ({','.join('?' * len(FINAL_STATUSES))})",
                FINAL_STATUSES).fetchall()
        done = {r[0] for r in rows}
        return done if run_ids is None else done & set(run_ids)

    def write_run(self, row: dict[str, Any], curves: Iterable[tuple] = (), diagnostics: Iterable[tuple] = ()):
        """Store one run atomically, replacing any earlier row with the same id (a rerun or a retry)."""
        row = {k: row.get(k) for k in RUN_COLUMNS}
        if isinstance(row["config"], dict):
            if row["identity"] is None:
                row["identity"] = _identity(row["config"])
            row["config"] = json.dumps(row["config"], sort_keys=True)
        rid = row["run_id"]
        try:
            self._write_run(rid, row, curves, diagnostics)
        except sqlite3.Error as e:  # a full disk, a store made read-only meanwhile: the run is not stored
            raise StoreError(f"{self.path}: could not store run {rid}: {e}; the runs stored before it are "
                             "kept") from None

    def _write_run(self, rid, row, curves, diagnostics) -> None:
        con = self._connect()
        try:
            with con:  # one transaction: all of the run or none of it
                con.execute("DELETE FROM runs WHERE run_id = ?", (rid,))
                con.execute("DELETE FROM curves WHERE run_id = ?", (rid,))
                con.execute("DELETE FROM diagnostics WHERE run_id = ?", (rid,))
                con.execute(f"INSERT INTO runs ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                            tuple(row.values()))
                con.executemany("INSERT INTO curves VALUES (?, ?, ?, ?, ?)", ((rid, *c) for c in curves))
                con.executemany("INSERT INTO diagnostics VALUES (?, ?, ?, ?, ?)",
                                ((rid, *d) for d in diagnostics))
        finally:
            con.close()

    def write_bench(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = [{k: r.get(k) for k in BENCH_COLUMNS} for r in rows]
        if not rows:
            return
        con = self._connect()
        try:
            with con:
                con.executemany(f"INSERT INTO bench ({','.join(BENCH_COLUMNS)}) VALUES "
                                f"({','.join('?' * len(BENCH_COLUMNS))})", [tuple(r.values()) for r in rows])
        finally:
            con.close()

    def load(self, table: str = "runs", experiment: str | None = None) -> pd.DataFrame:
        """A table as a DataFrame; ``experiment`` filters runs and the rows that belong to them."""
        if table not in ("runs", "curves", "diagnostics", "bench"):
            raise ValueError(f"unknown table {table!r}")
        con = self._connect()
        try:
            if experiment is None or table == "bench":
                return pd.read_sql_query(f"SELECT * FROM {table}", con)
            if table == "runs":
                return pd.read_sql_query("SELECT * FROM runs WHERE experiment = ?", con, params=(experiment,))
            return pd.read_sql_query(
                f"SELECT t.* FROM {table} t JOIN runs r ON r.run_id = t.run_id WHERE r.experiment = ?",
                con, params=(experiment,))
        finally:
            con.close()


def _identity(config: dict[str, Any]) -> str | None:
    """The canonical settings of a run's config (what its id hashes), None where it is not a run config."""
    from .config import RunConfig
    from .identity import canonical_json

    try:
        return canonical_json(RunConfig.from_dict(config))
    except (KeyError, TypeError, ValueError):
        return None
