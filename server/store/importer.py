"""`db import-sqlite`: an existing SQLite ledger's history copied into the ledger (PostgreSQL).

So a single-user install can grow into a cluster keeping its provenance (detections), its tasks,
their spend and the upload cache. Idempotent: every row has a key (detections, which have only a local
id, are matched by image, family and creation time), and a row the target already has is skipped, so a
second run copies only what is new. Safe while workers run: short transactions of `BATCH` rows,
`ON CONFLICT DO NOTHING`, never a table lock; the source file is opened read-only.

What is not copied, on purpose: the schema's own version table, the due queue's "filled" flag (the
target keeps its own), the due-queue rows of finished tasks (the queue holds open work only), and
the dedupe key of imported tasks (an imported usable task is still found by its fingerprint; the key
only guards two racing inserts, and an old row taking it could clash with a newer live one).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.store.ledger import LOCAL_STATUSES, TERMINAL_STATUSES, Ledger

BATCH = 500
# Copied first (the order rows depend on), then any other table both ledgers have (a newer module's).
_ORDER = ("detections", "tasks", "spend_estimates", "uploads", "model_rates", "due_queue")
# Spend's running totals are derived: the target's triggers move them as the rows arrive.
_NEVER = frozenset({"schema_migrations", "due_queue_meta", "sqlite_sequence", "spend_totals", "spend_detections"})
_DETECTION_KEY = ("image_url", "family", "created_at")
# Columns whose source value is replaced on the way in (see the module docstring).
_RESET = {"tasks": {"dedupe_key": None}, "due_queue": {"claimed_by": None}}


@dataclass(frozen=True)
class Copied:
    table: str
    copied: int
    skipped: int


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: give the path of an existing ledger.sqlite3.")
    try:
        source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a readable SQLite ledger ({exc}).") from exc
    return source


def _source_tables(source: sqlite3.Connection) -> dict[str, list[str]]:
    names = [str(row[0]) for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {name: [str(col[1]) for col in source.execute(f"PRAGMA table_info({name})")] for name in names}


def _target_columns(ledger: Ledger, table: str) -> list[str]:
    if ledger.dialect == "sqlite":
        return [str(row["name"]) for row in ledger.query(f"PRAGMA table_info({table})")]
    rows = ledger.query(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = ? ORDER BY ordinal_position",
        (table,),
    )
    return [str(row[0]) for row in rows]


def _batches(source: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Iterator[list[tuple[Any, ...]]]:
    cursor = source.execute(sql, tuple(params))
    while rows := cursor.fetchmany(BATCH):
        yield [tuple(row) for row in rows]


def import_sqlite(path: Path, ledger: Ledger) -> list[Copied]:
    """Copy what the ledger file at `path` holds and `ledger` does not; counts per table."""
    source = _open_source(path)
    try:
        tables = _source_tables(source)
        order = [name for name in _ORDER if name in tables]
        order += sorted(name for name in tables if name not in _ORDER and name not in _NEVER)
        report = []
        for table in order:
            target = _target_columns(ledger, table)
            if not target:
                continue  # a table only the source has (nothing to put it in)
            columns = [
                name for name in tables[table] if name in target and not (table == "detections" and name == "id")
            ]
            report.append(_copy(source, ledger, table, columns))
        return report
    finally:
        source.close()


def _copy(source: sqlite3.Connection, ledger: Ledger, table: str, columns: list[str]) -> Copied:
    listed = ", ".join(columns)
    select = f"SELECT {listed} FROM {table}"  # noqa: S608 (names from the two schemas, never user text)
    params: tuple[Any, ...] = ()
    if table == "due_queue":
        # Open work only: a task still in upstream's queue, or finished with its video not on disk yet.
        closed = sorted((TERMINAL_STATUSES | LOCAL_STATUSES) - {"SUCCEEDED"})
        select += (
            f" WHERE task_id IN (SELECT task_id FROM tasks WHERE status NOT IN ({','.join('?' * len(closed))})"  # noqa: S608
            " AND NOT (status = 'SUCCEEDED' AND video_path IS NOT NULL))"
        )
        params = tuple(closed)
    reset = _RESET.get(table, {})
    insert = (
        f"INSERT INTO {table} ({listed}) VALUES ({','.join('?' * len(columns))})"  # noqa: S608 (as above)
        + ("" if table == "detections" else " ON CONFLICT DO NOTHING")
        + " RETURNING 1"
    )
    key_at = [columns.index(name) for name in _DETECTION_KEY] if table == "detections" else []
    exists = "SELECT 1 FROM detections WHERE image_url = ? AND family = ? AND created_at = ? LIMIT 1"
    copied = skipped = 0
    for batch in _batches(source, select, params):
        with ledger.transaction() as tx:
            for values in batch:
                row = [
                    reset.get(name, value) if name in reset else value
                    for name, value in zip(columns, values, strict=True)
                ]
                if key_at and tx.one(exists, [row[at] for at in key_at]) is not None:
                    skipped += 1
                    continue
                if tx.execute(insert, row):
                    copied += 1
                else:
                    skipped += 1
    return Copied(table, copied, skipped)
