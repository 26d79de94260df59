"""The SQLite ledger: every detection and every task, surviving restarts.

It is the memory behind provenance (generate only accepts boxes a passing detection of that
same image returned) and behind `task_status` across processes sharing one OUTPUT_DIR.
WAL mode lets several server processes read and write the same file safely.

It holds signed result URLs, so the file (and SQLite's -wal and -shm beside it, which SQLite gives
the database file's mode) is created 0600 whatever the umask. Free text from upstream (`code`,
`message`) passes `server.redaction.redact` before it is written: an echoed key never lands here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.redaction import redact

LEDGER_FILE = "ledger.sqlite3"
# A row is written BEFORE a submit is sent (SUBMITTING, keyed by a local id), so a crash between
# sending and recording can never hide a billed task. It becomes the real task id on an answer,
# SUBMIT_OUTCOME_UNKNOWN when no answer came (or its process died), and the watcher reconciles it
# with the upstream task list: found -> the real task id; not found within the window -> NOT_FOUND.
SUBMITTING = "SUBMITTING"
# Recorded when a submit was sent but no answer came back: a task may exist upstream.
SUBMIT_UNKNOWN = "SUBMIT_OUTCOME_UNKNOWN"
NOT_FOUND = "NOT_FOUND"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN", NOT_FOUND})
# Rows that are not upstream tasks (yet): never queried by id.
LOCAL_STATUSES = frozenset({SUBMITTING, SUBMIT_UNKNOWN})
# A SUCCEEDED task whose video URL no longer works: recorded, never retried.
VIDEO_EXPIRED = "VideoExpired"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS detections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    family TEXT NOT NULL,
    model TEXT NOT NULL,
    image_url TEXT NOT NULL,
    ratio TEXT,
    check_pass INTEGER NOT NULL,
    face_bbox TEXT,
    ext_bbox TEXT,
    code TEXT,
    message TEXT,
    request_id TEXT,
    evidence_dir TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_by_image ON detections (family, image_url);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    model TEXT NOT NULL,
    payload TEXT NOT NULL,
    ratio TEXT,
    status TEXT NOT NULL,
    submit_time TEXT,
    scheduled_time TEXT,
    end_time TEXT,
    video_url TEXT,
    video_path TEXT,
    video_sha256 TEXT,
    video_bytes INTEGER,
    usage TEXT,
    code TEXT,
    message TEXT,
    request_id TEXT,
    evidence_dir TEXT NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""
# Columns added after the first release; existing ledgers are migrated in place on open.
_ADDED_COLUMNS = {
    "fingerprint": "TEXT",  # sha256 of the normalized submit payload (dedup)
    "local_id": "TEXT",  # the id a submit had before upstream answered with a task id
    "owner": "TEXT",  # "<host>:<pid>" of the process sending a submit (to spot dead SUBMITTING rows)
}


FILE_MODE = 0o600
# SQLite's files beside the database; created with the database file's mode, tightened if older.
_COMPANIONS = ("-wal", "-shm", "-journal")
# Columns holding upstream's (or an exception's) free text: redacted on the way in.
_FREE_TEXT = frozenset({"code", "message"})


def _private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing; narrow it (and its companions) if wider."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    os.close(fd)
    for name in (path, *(path.with_name(path.name + suffix) for suffix in _COMPANIONS)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(name).st_mode) & 0o077:
                os.chmod(name, FILE_MODE)


def _clean(text: str | None) -> str | None:
    return None if text is None else redact(text)


# A row with one of these statuses does not stop an identical submit: nothing usable exists.
DEAD_STATUSES = frozenset({"FAILED", "CANCELED", "UNKNOWN", NOT_FOUND})
_DEAD = DEAD_STATUSES
_DEAD_MARKS = ",".join("?" * len(_DEAD))


def box_key(box: Sequence[int] | None) -> str | None:
    """Canonical text of a box, so equality in SQL is equality of the four integers."""
    return None if box is None else json.dumps([int(v) for v in box], separators=(",", ":"))


def _box(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in json.loads(text)]


@dataclass(frozen=True)
class Detection:
    id: int
    family: str
    model: str
    image_url: str
    ratio: str | None
    check_pass: bool
    face_bbox: list[int] | None
    ext_bbox: list[int] | None
    code: str | None
    message: str | None
    request_id: str | None


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    family: str
    model: str
    payload: dict[str, Any]
    ratio: str | None
    status: str
    submit_time: str | None
    scheduled_time: str | None
    end_time: str | None
    video_url: str | None
    video_path: str | None
    video_sha256: str | None
    video_bytes: int | None
    usage: dict[str, Any] | None
    code: str | None
    message: str | None
    request_id: str | None
    evidence_dir: str
    polls: int
    fingerprint: str | None = None
    local_id: str | None = None
    owner: str | None = None
    created_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Ledger:
    """A small synchronous store; every call is a few hundred microseconds on local disk."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LEDGER_FILE
        _private_file(self.path)
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._schemas: set[str] = set()
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._tx() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(tasks)").fetchall()}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
            # Every lookup a tool, resource, tick or CLI command makes has an index to serve it, so its
            # cost follows what it returns, not how long the history is (tests/test_engine.py checks
            # the query plans).
            db.execute("CREATE INDEX IF NOT EXISTS tasks_by_fingerprint ON tasks (fingerprint)")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_by_local_id ON tasks (local_id)")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status)")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at)")
            db.execute("CREATE INDEX IF NOT EXISTS detections_by_url ON detections (image_url)")
            db.execute("CREATE INDEX IF NOT EXISTS detections_by_created ON detections (created_at)")

    def close(self) -> None:
        self._db.close()

    def trace(self, callback: Callable[[str], object] | None) -> None:
        """See every statement this connection runs (the tests check their query plans)."""
        self._db.set_trace_callback(callback)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def ensure_schema(self, script: str) -> None:
        """Let a module keep its own small tables in this file (upload cache, spend estimates).

        Run once per script and connection: callers may ask on every read without paying for DDL.
        """
        if script in self._schemas:
            return
        self._db.executescript(script)
        self._schemas.add(script)

    def ensure_once(self, table: str, script: str) -> None:
        """Run `script` (tables, triggers, a one-time back-fill) if `table` does not exist yet.

        In one write transaction, statement by statement (`executescript` would commit halfway), so
        two processes opening an old ledger at once cannot both run it.
        """
        if table in self._schemas:
            return
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is None:
                for statement in _statements(script):
                    db.execute(statement)
        self._schemas.add(table)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One statement in its own transaction, for those modules' tables."""
        with self._tx() as db:
            return db.execute(sql, tuple(params)).fetchall()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One read, without a write transaction around it (a SELECT sees a consistent snapshot by
        itself): the watcher reads the due queue after every query, so the saving counts."""
        return self._db.execute(sql, tuple(params)).fetchall()

    # detections -------------------------------------------------------------

    def add_detection(
        self,
        *,
        family: str,
        model: str,
        image_url: str,
        ratio: str | None,
        check_pass: bool,
        face_bbox: Sequence[int] | None,
        ext_bbox: Sequence[int] | None,
        code: str | None,
        message: str | None,
        request_id: str | None,
        evidence_dir: str,
    ) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO detections (family, model, image_url, ratio, check_pass, face_bbox, ext_bbox,"
                " code, message, request_id, evidence_dir, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    family,
                    model,
                    image_url,
                    ratio,
                    int(check_pass),
                    box_key(face_bbox),
                    box_key(ext_bbox),
                    _clean(code),
                    _clean(message),
                    request_id,
                    evidence_dir,
                    time.time(),
                ),
            )
            return int(cursor.lastrowid or 0)

    def detections_of(self, image_url: str) -> list[Detection]:
        """Every detection of this exact image URL, newest first, both families."""
        rows = self._db.execute(
            "SELECT * FROM detections WHERE image_url = ? ORDER BY id DESC", (image_url,)
        ).fetchall()
        return [
            Detection(
                id=row["id"],
                family=row["family"],
                model=row["model"],
                image_url=row["image_url"],
                ratio=row["ratio"],
                check_pass=bool(row["check_pass"]),
                face_bbox=_box(row["face_bbox"]),
                ext_bbox=_box(row["ext_bbox"]),
                code=row["code"],
                message=row["message"],
                request_id=row["request_id"],
            )
            for row in rows
        ]

    # tasks ------------------------------------------------------------------

    def add_task(
        self,
        *,
        task_id: str,
        family: str,
        model: str,
        payload: dict[str, Any],
        ratio: str | None,
        status: str,
        request_id: str | None,
        evidence_dir: str,
        fingerprint: str | None = None,
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO tasks (task_id, family, model, payload, ratio, status, request_id,"
                " evidence_dir, fingerprint, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    task_id,
                    family,
                    model,
                    json.dumps(payload),
                    ratio,
                    status,
                    request_id,
                    evidence_dir,
                    fingerprint,
                    now,
                    now,
                ),
            )

    def begin_submit(
        self,
        *,
        local_id: str,
        family: str,
        model: str,
        payload: dict[str, Any],
        ratio: str | None,
        fingerprint: str,
        evidence_dir: str,
        owner: str,
        allow_duplicate: bool,
    ) -> TaskRecord | None:
        """Atomically (across processes): return the row an identical submit must reuse, or
        insert a SUBMITTING row for this one and return None."""
        now = time.time()
        with self._tx() as db:
            if not allow_duplicate:
                row = db.execute(
                    f"SELECT * FROM tasks WHERE fingerprint = ? AND status NOT IN ({_DEAD_MARKS})"  # noqa: S608
                    " AND NOT (status = 'SUCCEEDED' AND COALESCE(code, '') = ?) ORDER BY created_at DESC LIMIT 1",
                    (fingerprint, *sorted(_DEAD), VIDEO_EXPIRED),
                ).fetchone()
                if row is not None:
                    return _task(row)
            db.execute(
                "INSERT INTO tasks (task_id, family, model, payload, ratio, status, evidence_dir, fingerprint,"
                " local_id, owner, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    local_id,
                    family,
                    model,
                    json.dumps(payload),
                    ratio,
                    SUBMITTING,
                    evidence_dir,
                    fingerprint,
                    local_id,
                    owner,
                    now,
                    now,
                ),
            )
        return None

    def resolve_submit(
        self, local_id: str, *, task_id: str, status: str, request_id: str | None, evidence_dir: str
    ) -> None:
        """A local row learns its upstream task id (from the submit's answer or from reconciliation)."""
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET task_id = ?, status = ?, request_id = COALESCE(?, request_id), evidence_dir = ?,"
                " code = NULL, message = NULL, updated_at = ? WHERE local_id = ?",
                (task_id, status, request_id, evidence_dir, time.time(), local_id),
            )

    def merge_submit(self, local_id: str, task_id: str) -> None:
        """The task was adopted (by id, from task_status) before reconciliation matched it to this submit:
        the adopted row keeps its progress and takes the submit's identity; the local row goes."""
        with self._tx() as db:
            local = db.execute(
                "SELECT * FROM tasks WHERE local_id = ? AND task_id = ?", (local_id, local_id)
            ).fetchone()
            if local is None:
                return
            db.execute(
                "UPDATE tasks SET family = ?, model = ?, payload = ?, ratio = ?, fingerprint = ?, local_id = ?,"
                " updated_at = ? WHERE task_id = ?",
                (
                    local["family"],
                    local["model"],
                    local["payload"],
                    local["ratio"],
                    local["fingerprint"],
                    local_id,
                    time.time(),
                    task_id,
                ),
            )
            db.execute("DELETE FROM tasks WHERE task_id = ?", (local_id,))

    def delete_task(self, task_id: str) -> None:
        """Only for a submit refused outright: nothing exists upstream, nothing is billed."""
        with self._tx() as db:
            db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    def rows(self, statuses: Sequence[str]) -> list[TaskRecord]:
        """Every row in one of `statuses`, oldest first (the watcher's work list)."""
        marks = ",".join("?" * len(statuses))
        rows = self._db.execute(
            f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY created_at",  # noqa: S608 (no user text)
            tuple(statuses),
        ).fetchall()
        return [_task(row) for row in rows]

    def recent_videos(self, since: float, batch: int) -> Iterator[list[TaskRecord]]:
        """SUCCEEDED tasks with a recorded video created after `since`, newest first, `batch` at a time."""
        before = 1e308  # above any time (SQLite spells infinity "Inf", which its parser then rejects)
        while True:
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE created_at >= ? AND created_at < ? AND status = 'SUCCEEDED'"
                " AND video_path IS NOT NULL ORDER BY created_at DESC LIMIT ?",
                (since, before, batch),
            ).fetchall()
            if not rows:
                return
            yield [_task(row) for row in rows]
            before = float(rows[-1]["created_at"])

    def submitted_task_ids(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Which of `task_ids` this ledger knows: True if submitted through it, False if only adopted by id."""
        if not task_ids:
            return {}
        marks = ",".join("?" * len(task_ids))
        rows = self._db.execute(
            f"SELECT task_id, fingerprint FROM tasks WHERE task_id IN ({marks})",  # noqa: S608 (no user text)
            tuple(task_ids),
        ).fetchall()
        return {str(row[0]): row[1] is not None for row in rows}

    _TASK_COLUMNS = frozenset(
        {
            "status",
            "submit_time",
            "scheduled_time",
            "end_time",
            "video_url",
            "video_path",
            "video_sha256",
            "video_bytes",
            "usage",
            "code",
            "message",
            "polls",
            "owner",
        }
    )

    def update_task(self, task_id: str, **fields: Any) -> None:
        unknown = set(fields) - self._TASK_COLUMNS
        if unknown:
            raise ValueError(f"not task columns: {sorted(unknown)}")
        if "usage" in fields and fields["usage"] is not None:
            fields["usage"] = json.dumps(fields["usage"])
        for name in _FREE_TEXT & fields.keys():
            fields[name] = _clean(fields[name])
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE tasks SET {assignments}, updated_at = ? WHERE task_id = ?",  # noqa: S608 (names are whitelisted)
                (*fields.values(), time.time(), task_id),
            )

    def get_task(self, task_id: str) -> TaskRecord | None:
        """By upstream task id, or by the local id an unanswered submit was given."""
        row = self._db.execute(
            "SELECT * FROM tasks WHERE task_id = ? OR local_id = ? ORDER BY task_id = ? DESC LIMIT 1",
            (task_id, task_id, task_id),
        ).fetchone()
        return None if row is None else _task(row)

    def tasks(self, *, limit: int = 50) -> list[TaskRecord]:
        """Newest first."""
        rows = self._db.execute("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_task(row) for row in rows]


def _statements(script: str) -> Iterator[str]:
    """The complete statements of `script` (a trigger's body holds semicolons of its own)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


def _task(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        family=row["family"],
        model=row["model"],
        payload=json.loads(row["payload"]),
        ratio=row["ratio"],
        status=row["status"],
        submit_time=row["submit_time"],
        scheduled_time=row["scheduled_time"],
        end_time=row["end_time"],
        video_url=row["video_url"],
        video_path=row["video_path"],
        video_sha256=row["video_sha256"],
        video_bytes=row["video_bytes"],
        usage=json.loads(row["usage"]) if row["usage"] else None,
        code=row["code"],
        message=row["message"],
        request_id=row["request_id"],
        evidence_dir=row["evidence_dir"],
        polls=row["polls"],
        fingerprint=row["fingerprint"],
        local_id=row["local_id"],
        owner=row["owner"],
        created_at=float(row["created_at"]),
    )
