"""Schema versions of the results store, and the ordered migrations that bring an older store up to date.

A store records its schema version and the fingerprint of the run-identity rule in a ``meta`` table (a store
without one was written by 0.2.1 or before: version 1). ``Store`` calls ``upgrade`` on open:

- a store of a newer schema than this code knows is refused, naming both versions (nothing is changed);
- an older store, or one whose ids were made under another identity rule or other defaults, is first copied
  beside itself (``<store>.schema<N>.bak``, through SQLite's backup API, so a store in WAL mode is copied whole),
  then brought up to date inside one transaction: the schema steps in order, every column the code writes added,
  and every run id recomputed from the run's stored config (its curves and diagnostics follow it). Runs that the
  new rule finds to be the same run (a default written out in one and not the other) are merged: the one with a
  final status and the latest finish is kept.

To change the schema, append a step to ``STEPS`` (it receives the open connection inside the transaction) and
raise ``SCHEMA_VERSION``. To change a config default or the identity rule, nothing else is needed: the
fingerprint (identity.defaults) changes and the next open recomputes the ids from the stored configs, which hold
every config field. A built-in task's default is different: a stored config holds only the task settings that
were given, so changing one needs a step that writes the old default into the stored configs that lack it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
LEGACY_VERSION = 1  # 0.2.1 and before: no meta table


def _create_meta(con: sqlite3.Connection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")


#: STEPS[v] takes a store from schema v to v + 1.
STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _create_meta,  # 1 -> 2: meta (schema version, identity fingerprint); the identity column (added below)
}


class NewerStoreError(RuntimeError):
    pass


def tables(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def read_meta(con: sqlite3.Connection) -> dict[str, str]:
    if "meta" not in tables(con):
        return {}
    return dict(con.execute("SELECT key, value FROM meta").fetchall())


def schema_version(con: sqlite3.Connection) -> int | None:
    """The store's schema version; None for an empty database (a new store)."""
    meta = read_meta(con)
    if "schema_version" in meta:
        return int(meta["schema_version"])
    return LEGACY_VERSION if "runs" in tables(con) else None


def check_not_newer(version: int | None, path: Path) -> None:
    from ._version import __version__

    if version is not None and version > SCHEMA_VERSION:
        raise NewerStoreError(
            f"{path}: this store has schema version {version}, written by a newer retrieval-bench; this is "
            f"retrieval-bench {__version__}, which reads schema versions up to {SCHEMA_VERSION}. Upgrade "
            f"retrieval-bench (pip install -U retrieval-bench) to use it; nothing was changed.")


def needs_upgrade(con: sqlite3.Connection) -> bool:
    """Whether the schema is older, or the ids were made under a rule or defaults that give other ids now."""
    from .identity import ids_change

    version = schema_version(con)
    if version is None:
        return False
    return version < SCHEMA_VERSION or ids_change(read_meta(con).get("identity"))


def note_fingerprint(con: sqlite3.Connection) -> None:
    """Record this version's fingerprint where it differs only in what changes no id (a setting added with a
    default): no backup, no rekeying, one small write."""
    from .identity import fingerprint

    if schema_version(con) == SCHEMA_VERSION and read_meta(con).get("identity") != fingerprint():
        con.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (fingerprint(),))


def backup(path: Path, version: int) -> Path:
    """A consistent copy of the store beside it, named after the schema version it had."""
    dest = path.with_name(f"{path.name}.schema{version}.bak")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.schema{version}.bak{n}")
        n += 1
    src, dst = sqlite3.connect(path), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return dest


def add_missing_columns(con: sqlite3.Connection, table: str, columns: dict[str, str]) -> list[str]:
    have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
    added = []
    for name, decl in columns.items():
        if name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl.replace('PRIMARY KEY', '').strip()}")
            added.append(name)
    return added


def _rank(status: str | None, finished_at: str | None) -> tuple:
    from .store import FINAL_STATUSES

    return (status in FINAL_STATUSES, finished_at or "")


def rekey(con: sqlite3.Connection) -> dict[str, int]:
    """Recompute every run's id and identity from its stored config; merge runs that become one.

    Returns counts: ``changed`` ids, ``merged`` runs dropped as duplicates, ``kept`` runs whose config could
    not be read (they keep their id)."""
    from .config import RunConfig
    from .identity import canonical_json

    rows = con.execute("SELECT run_id, config, status, finished_at FROM runs").fetchall()
    target: dict[str, list[tuple]] = {}
    identity: dict[str, tuple] = {}  # old id -> (identity, family, lr): columns the config gives
    kept = 0
    for rid, config, status, finished_at in rows:
        try:
            cfg = RunConfig.from_dict(json.loads(config))
            new, ident = cfg.run_id, (canonical_json(cfg), cfg.model.kind, cfg.train.lr)
        except Exception as e:  # noqa: BLE001  (a config this version cannot read: leave the run as it is)
            log.warning("run %s: config not readable (%s); its id is kept", rid, e)
            new, ident = rid, (None, None, None)
            kept += 1
        target.setdefault(new, []).append((rid, status, finished_at))
        identity[rid] = ident
    changed = merged = 0
    renames = []
    for new, group in target.items():
        group.sort(key=lambda g: _rank(g[1], g[2]), reverse=True)
        for rid, *_ in group[1:]:  # the same run stored twice under the old rule: keep the best record
            for table in ("runs", "curves", "diagnostics"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", (rid,))
            merged += 1
        winner = group[0][0]
        con.execute("UPDATE runs SET identity = ?, family = coalesce(family, ?), lr = coalesce(lr, ?) "
                    "WHERE run_id = ?", (*identity[winner], winner))
        if winner != new:
            renames.append((winner, new))
    # Two passes through temporary ids, so that no new id meets an old one that has not moved yet.
    for step in (lambda old, new: (old, "~" + new), lambda old, new: ("~" + new, new)):
        for old, new in renames:
            a, b = step(old, new)
            for table in ("runs", "curves", "diagnostics"):
                con.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", (b, a))
    changed = len(renames)
    return {"changed": changed, "merged": merged, "kept": kept}


def upgrade(path: Path, con: sqlite3.Connection, run_columns: dict[str, str],
            bench_columns: dict[str, str]) -> dict[str, int] | None:
    """Bring the store at ``path`` (open as ``con``, autocommit) up to date; None if it already was.

    Takes the write lock first and decides inside it, so two processes opening one old store migrate it once.
    """
    from ._version import __version__
    from .identity import fingerprint

    if not needs_upgrade(con):
        return None
    con.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(con)
        if version is None or not needs_upgrade(con):  # another process got there first
            con.execute("ROLLBACK")
            return None
        check_not_newer(version, path)
        copy = backup(path, version)
        for v in range(version, SCHEMA_VERSION):
            STEPS[v](con)
        added = add_missing_columns(con, "runs", run_columns)
        if "bench" in tables(con):
            added += add_missing_columns(con, "bench", bench_columns)
        counts = rekey(con)
        con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [("schema_version", str(SCHEMA_VERSION)), ("identity", fingerprint()),
                         ("migrated_by", __version__)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    log.info("%s: schema %d -> %d (backup %s), columns added %s, ids changed %d, merged %d", path, version,
             SCHEMA_VERSION, copy, added, counts["changed"], counts["merged"])
    return {"from": version, **counts, "added": len(added), "backup": str(copy)}
