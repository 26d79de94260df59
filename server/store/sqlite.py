"""The embedded backend: one SQLite file in the state folder (the default; nothing to install or start).

WAL mode lets several server processes on one machine read and write the same file safely; a write
transaction is `BEGIN IMMEDIATE`, so writers queue on SQLite's lock (for up to `BUSY_TIMEOUT`) rather
than fail half-way. The file holds signed result URLs, so it (and SQLite's -wal and -shm beside it,
which SQLite gives the database file's mode) is created 0600 whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.store.database import Dialect, Row, Statement, Transaction
from server.store.migrations import migrations

LEDGER_FILE = "ledger.sqlite3"
FILE_MODE = 0o600
# Seconds a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT = 10.0
# SQLite's files beside the database; created with the database file's mode, tightened if older.
_COMPANIONS = ("-wal", "-shm", "-journal")
# A migration statement that adds a column (skipped on a replay that finds the column there, see `migrate`).
_ADD_COLUMN = re.compile(r"\s*ALTER\s+TABLE\s+\w+\s+ADD\s+COLUMN\s", re.IGNORECASE)
# Columns a ledger from before versioned migrations may lack (the `_ADDED_COLUMNS` of those releases,
# and the dedupe key of the baseline): added before the baseline adopts the file.
_LEGACY_COLUMNS = {"fingerprint": "TEXT", "local_id": "TEXT", "owner": "TEXT", "dedupe_key": "TEXT"}
# An unversioned ledger's usable submits get the dedupe key: the newest usable row per fingerprint
# (older identical ones were sent with allow_duplicate, and the unique index admits one only).
_BACKFILL_DEDUPE_KEY = (
    "UPDATE tasks SET dedupe_key = fingerprint WHERE rowid IN (SELECT MAX(rowid) FROM tasks"
    " WHERE fingerprint IS NOT NULL AND status NOT IN ('CANCELED', 'FAILED', 'NOT_FOUND', 'UNKNOWN')"
    " AND NOT (status = 'SUCCEEDED' AND COALESCE(code, '') = 'VideoExpired') GROUP BY fingerprint)"
)


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing; narrow it (and its companions) if wider."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    os.close(fd)
    for name in (path, *(path.with_name(path.name + suffix) for suffix in _COMPANIONS)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(name).st_mode) & 0o077:
                os.chmod(name, FILE_MODE)


def statements(script: str) -> Iterator[str]:
    """The complete statements of a migration (a trigger's body holds semicolons of its own), one by
    one: `executescript` would commit half-way through the migration's transaction."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        if not buffer and line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, tuple(params)).fetchall()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._db.execute(sql, tuple(params)).fetchone()
        return row


class SQLiteDatabase:
    """One connection per ledger; every call is a few hundred microseconds on local disk."""

    dialect: Dialect = "sqlite"

    def __init__(self, state_dir: Path, *, migrate: bool = True) -> None:
        self.path = state_dir / LEDGER_FILE
        self.location = str(self.path)
        private_file(self.path)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if migrate:
            self.migrate()

    # ------------------------------------------------------------------ Database

    def execute(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        # `durable` changes nothing here: in WAL mode with synchronous=NORMAL no commit waits for the disk.
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows: list[Row] = self._db.execute(sql, tuple(params)).fetchall()
        return rows

    def execute_batch(self, statements: Sequence[Statement], *, durable: bool = True) -> None:
        if not statements:
            return
        with self.transaction() as tx:
            for sql, params in statements:
                tx.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield _Tx(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def version(self) -> int:
        if not self._has_table("schema_migrations"):
            return 0
        row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> int:
        """Pending migrations in one `BEGIN IMMEDIATE` transaction: a second process starting at the same
        moment waits for it, then finds nothing left to do. A file from before versioning is adopted."""
        pending = migrations(self.dialect)
        if self.version() == len(pending):
            return len(pending)  # the usual start: one read, no write lock
        with self.transaction() as tx:
            current = self.version()
            if current == 0 and self._has_table("tasks"):
                self._adopt_unversioned()
            for migration in pending[current:]:
                for statement in statements(migration.sql):
                    try:
                        tx.execute(statement)
                    except sqlite3.OperationalError as exc:
                        # A replay (a ledger adopted as unversioned) meets a column it already has: SQLite has
                        # no ADD COLUMN IF NOT EXISTS, so this is that statement's PostgreSQL meaning.
                        if not (_ADD_COLUMN.match(statement) and "duplicate column name" in str(exc)):
                            raise
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                    (migration.version, migration.name, time.time()),
                )
        return len(pending)

    def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    def trace(self, callback: Callable[[str], object] | None) -> None:
        self._db.set_trace_callback(callback)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ helpers

    def _has_table(self, name: str) -> bool:
        found = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return found.fetchone() is not None

    def _adopt_unversioned(self) -> None:
        """A ledger written before migrations were versioned: add what its release had not yet added."""
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(tasks)").fetchall()}
        for name, kind in _LEGACY_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
        if "dedupe_key" not in have:
            self._db.execute(_BACKFILL_DEDUPE_KEY)
