"""The ledger: every detection and every task, surviving restarts, on SQLite or PostgreSQL.

It is the memory behind provenance (generate only accepts boxes a passing detection of that same
image returned) and behind `task_status` across processes sharing it. The rows live behind the
`server.store.database.Database` interface: SQLite in the state folder by default (`server.store.sqlite`),
PostgreSQL when `EMO_MCP_DATABASE_URL` is set (`server.store.postgres`); nothing above the store knows
which. The schema is versioned (`server/store/sql/<dialect>/`), brought up to date when a ledger opens.

Free text from upstream (`code`, `message`) passes `server.redaction.redact` before it is written: an
echoed key never lands here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings
from server.redaction import redact
from server.store.database import Database, Dialect, Row, Statement, Transaction, open_database
from server.store.migrations import named_queries
from server.store.sqlite import FILE_MODE, LEDGER_FILE

__all__ = ["FILE_MODE", "LEDGER_FILE", "Ledger"]

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

# Seconds between two readings of the database's clock (its offset from this host's clock is kept).
CLOCK_REFRESH = 10.0
# Ids per read of `get_tasks` (and the due queue's `contexts`): well inside SQLite's parameter limit.
BATCH_READ = 500

# Columns holding upstream's (or an exception's) free text: redacted on the way in.
_FREE_TEXT = frozenset({"code", "message"})


def _clean(text: str | None) -> str | None:
    return None if text is None else redact(text)


# A row with one of these statuses does not stop an identical submit: nothing usable exists.
DEAD_STATUSES = frozenset({"FAILED", "CANCELED", "UNKNOWN", NOT_FOUND})
# The same rule as SQL (literal, so PostgreSQL can match it to the partial unique index
# `tasks_one_live_per_fingerprint` of the baseline migration, whose predicate it repeats).
LIVE_PREDICATE = (
    "status NOT IN ('CANCELED', 'FAILED', 'NOT_FOUND', 'UNKNOWN')"
    " AND NOT (status = 'SUCCEEDED' AND COALESCE(code, '') = 'VideoExpired')"
)
_LIVE_BY_FINGERPRINT = (
    f"SELECT * FROM tasks WHERE fingerprint = ? AND {LIVE_PREDICATE} ORDER BY created_at DESC LIMIT 1"  # noqa: S608
)
_LIVE_BY_DEDUPE_KEY = f"SELECT * FROM tasks WHERE dedupe_key = ? AND {LIVE_PREDICATE} LIMIT 1"  # noqa: S608


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
    # A submit's request: 0.0 not sent yet, else when it was about to leave; None: not recorded (older rows).
    sent_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Ledger:
    """The store's one door to its database: the domain's questions here, other modules' SQL through
    `execute`/`query`/`transaction` (portable SQL) and `sql(name)` (a dialect's named query)."""

    def __init__(self, state_dir: Path, url: str | None = None, *, database: Database | None = None) -> None:
        self._db = database if database is not None else open_database(state_dir, url)
        self.dialect: Dialect = self._db.dialect
        # Where the rows are, for messages (a file, or the URL without its password).
        self.location = self._db.location
        # The database's own clock, where it has one (PostgreSQL); the offset from ours, and when read.
        self._db_clock: Callable[[], float] | None = getattr(self._db, "clock", None)
        self._offset = 0.0
        self._offset_read = -CLOCK_REFRESH

    @classmethod
    def open(cls, settings: Settings) -> Ledger:
        """The ledger the settings name: PostgreSQL for `EMO_MCP_DATABASE_URL`, else SQLite in the state folder."""
        return cls(settings.state_dir, settings.database_url)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def trace(self, callback: Callable[[str], object] | None) -> None:
        """See every statement this ledger runs (the tests check their query plans)."""
        self._db.trace(callback)

    def ping(self) -> None:
        """A cheap round trip; `LedgerUnavailable` when the database does not answer."""
        self._db.ping()

    def clock(self) -> float:
        """The cluster's time in epoch seconds: heartbeats, leases, due times and the shared rate window.

        On PostgreSQL it is the database server's clock, so hosts with skewed clocks still agree on when
        a lease ends or a window slides. It is not a round trip per call: the offset from this host's
        clock is read every `CLOCK_REFRESH` s (one `clock_timestamp()`, halfway through the round trip)
        and kept; while the database is away the last offset stands. SQLite (one host): `time.time()`."""
        if self._db_clock is None:
            return time.time()
        if time.monotonic() - self._offset_read >= CLOCK_REFRESH:
            self._offset_read = time.monotonic()
            try:
                before = time.time()
                theirs = self._db_clock()
                self._offset = theirs - (before + time.time()) / 2
            except Exception:  # unreachable: the caller's own statement will say so; the old offset stands
                self._offset_read -= CLOCK_REFRESH - 1.0  # try again in a second
        return time.time() + self._offset

    @property
    def down(self) -> bool:
        """Whether the database counts as unreachable right now (PostgreSQL's breaker is open)."""
        return bool(getattr(self._db, "down", False))

    def version(self) -> int:
        """The schema's migration version."""
        return self._db.version()

    def sql(self, name: str) -> str:
        """A named query in this backend's dialect (`server/store/sql/<dialect>/queries.sql`)."""
        return named_queries(self.dialect)[name]

    def _tx(self) -> AbstractContextManager[Transaction]:
        return self._db.transaction()

    def transaction(self) -> AbstractContextManager[Transaction]:
        """Several statements as one write transaction."""
        return self._db.transaction()

    def execute(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        """One statement in its own transaction, for those modules' tables (`durable`: see
        `server.store.database.Database.execute`)."""
        return self._db.execute(sql, params, durable=durable)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One read, without a write transaction around it (a SELECT sees a consistent snapshot by
        itself): the watcher reads the due queue after every query, so the saving counts."""
        return self._db.query(sql, params)

    def execute_batch(self, statements: Sequence[Statement], *, durable: bool = True) -> None:
        """Statements as one transaction, sent at once (see `Database.execute_batch`)."""
        self._db.execute_batch(statements, durable=durable)

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
            inserted = db.execute(
                "INSERT INTO detections (family, model, image_url, ratio, check_pass, face_bbox, ext_bbox,"
                " code, message, request_id, evidence_dir, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " RETURNING id",
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
            return int(inserted[0][0])

    def detections_of(self, image_url: str) -> list[Detection]:
        """Every detection of this exact image URL, newest first, both families."""
        rows = self._db.query("SELECT * FROM detections WHERE image_url = ? ORDER BY id DESC", (image_url,))
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
                "INSERT INTO tasks (task_id, family, model, payload, ratio, status, request_id,"
                " evidence_dir, fingerprint, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT DO NOTHING",
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
        insert a SUBMITTING row for this one and return None.

        Not check-then-insert alone: the unique index on `dedupe_key` (usable rows only) lets one of
        several identical submits racing on different workers insert; the others' `ON CONFLICT DO
        NOTHING` inserts nothing, and they return the winner's row. `allow_duplicate` rows carry no key.
        """
        now = time.time()
        values = (local_id, family, model, json.dumps(payload), ratio, SUBMITTING, evidence_dir, fingerprint)
        key = None if allow_duplicate else fingerprint
        with self._tx() as db:
            if not allow_duplicate:
                row = db.one(_LIVE_BY_FINGERPRINT, (fingerprint,))
                if row is not None:
                    return _task(row)
            inserted = db.execute(
                "INSERT INTO tasks (task_id, family, model, payload, ratio, status, evidence_dir, fingerprint,"
                " local_id, owner, dedupe_key, created_at, updated_at, sent_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0) ON CONFLICT DO NOTHING RETURNING task_id",
                (*values, local_id, owner, key, now, now),
            )
            if inserted:
                return None
            # Lost the race: the winner committed its row just now (PostgreSQL's next statement sees it).
            winner = db.one(_LIVE_BY_DEDUPE_KEY, (fingerprint,))
        if winner is None:  # the winner's row is already gone (refused): this submit may go ahead
            return self.begin_submit(
                local_id=local_id,
                family=family,
                model=model,
                payload=payload,
                ratio=ratio,
                fingerprint=fingerprint,
                evidence_dir=evidence_dir,
                owner=owner,
                allow_duplicate=allow_duplicate,
            )
        return _task(winner)

    def mark_sent(self, local_id: str) -> None:
        """A submit's request is about to leave (durable, before any byte goes): from now on its outcome
        can only be unknown, never "not sent" (`server.jobs.reconcile.Reconciler.mark_dead_submits`)."""
        now = time.time()
        self._db.execute(
            "UPDATE tasks SET sent_at = ?, updated_at = ? WHERE task_id = ? AND status = ?",
            (now, now, local_id, SUBMITTING),
        )

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
            local = db.one("SELECT * FROM tasks WHERE local_id = ? AND task_id = ?", (local_id, local_id))
            if local is None:
                return
            # The local row goes first: its dedupe key moves to the adopted row, and the unique index
            # admits one holder at a time (unless another usable row took the key meanwhile).
            db.execute("DELETE FROM tasks WHERE task_id = ?", (local_id,))
            key = local["dedupe_key"]
            if key is not None and db.one(_LIVE_BY_DEDUPE_KEY, (key,)) is not None:
                key = None
            db.execute(
                "UPDATE tasks SET family = ?, model = ?, payload = ?, ratio = ?, fingerprint = ?, local_id = ?,"
                " dedupe_key = ?, updated_at = ? WHERE task_id = ?",
                (
                    local["family"],
                    local["model"],
                    local["payload"],
                    local["ratio"],
                    local["fingerprint"],
                    local_id,
                    key,
                    time.time(),
                    task_id,
                ),
            )

    def delete_task(self, task_id: str) -> None:
        """Only for a submit refused outright: nothing exists upstream, nothing is billed."""
        with self._tx() as db:
            db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    def rows(self, statuses: Sequence[str]) -> list[TaskRecord]:
        """Every row in one of `statuses`, oldest first (the watcher's work list)."""
        marks = ",".join("?" * len(statuses))
        rows = self._db.query(
            f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY created_at",  # noqa: S608 (no user text)
            tuple(statuses),
        )
        return [_task(row) for row in rows]

    def recent_videos(self, since: float, batch: int) -> Iterator[list[TaskRecord]]:
        """SUCCEEDED tasks with a recorded video created after `since`, newest first, `batch` at a time."""
        before = 1e308  # above any time (SQLite spells infinity "Inf", which its parser then rejects)
        while True:
            rows = self._db.query(
                "SELECT * FROM tasks WHERE created_at >= ? AND created_at < ? AND status = 'SUCCEEDED'"
                " AND video_path IS NOT NULL ORDER BY created_at DESC LIMIT ?",
                (since, before, batch),
            )
            if not rows:
                return
            yield [_task(row) for row in rows]
            before = float(rows[-1]["created_at"])

    def submitted_task_ids(self, task_ids: Sequence[str]) -> dict[str, bool]:
        """Which of `task_ids` this ledger knows: True if submitted through it, False if only adopted by id."""
        if not task_ids:
            return {}
        marks = ",".join("?" * len(task_ids))
        rows = self._db.query(
            f"SELECT task_id, fingerprint FROM tasks WHERE task_id IN ({marks})",  # noqa: S608 (no user text)
            tuple(task_ids),
        )
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

    def record_answer(self, task_id: str, **fields: Any) -> None:
        """`update_task` for what an upstream answer about a task says (status, times, URL, the query
        count), committed without waiting for the disk: the watcher writes one after every query, and a
        database crash that forgot the last of them only means the task is asked again."""
        self._update_task(task_id, fields, durable=False)

    def update_task(self, task_id: str, **fields: Any) -> None:
        self._update_task(task_id, fields, durable=True)

    def answer_statement(self, task_id: str, **fields: Any) -> Statement:
        """`record_answer`'s statement, not run: the watcher sends a tick's answers in one batch."""
        return self._task_update(task_id, fields)

    def _update_task(self, task_id: str, fields: dict[str, Any], *, durable: bool) -> None:
        self._db.execute(*self._task_update(task_id, fields), durable=durable)

    def _task_update(self, task_id: str, fields: dict[str, Any]) -> Statement:
        unknown = set(fields) - self._TASK_COLUMNS
        if unknown:
            raise ValueError(f"not task columns: {sorted(unknown)}")
        if "usage" in fields and fields["usage"] is not None:
            fields["usage"] = json.dumps(fields["usage"])
        for name in _FREE_TEXT & fields.keys():
            fields[name] = _clean(fields[name])
        assignments = ", ".join(f"{name} = ?" for name in fields)
        return (
            f"UPDATE tasks SET {assignments}, updated_at = ? WHERE task_id = ?",  # noqa: S608 (names are whitelisted)
            (*fields.values(), time.time(), task_id),
        )

    def get_task(self, task_id: str) -> TaskRecord | None:
        """By upstream task id, or by the local id an unanswered submit was given."""
        rows = self._db.query(
            "SELECT * FROM tasks WHERE task_id = ? OR local_id = ? ORDER BY task_id = ? DESC LIMIT 1",
            (task_id, task_id, task_id),
        )
        return _task(rows[0]) if rows else None

    def get_tasks(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        """Several tasks by upstream id in one read (the watcher's claimed batch), keyed by id; an id with
        no row is absent."""
        found: dict[str, TaskRecord] = {}
        for start in range(0, len(task_ids), BATCH_READ):
            chunk = task_ids[start : start + BATCH_READ]
            marks = ",".join("?" * len(chunk))
            for row in self._db.query(f"SELECT * FROM tasks WHERE task_id IN ({marks})", tuple(chunk)):  # noqa: S608
                record = _task(row)
                found[record.task_id] = record
        return found

    def tasks(self, *, limit: int = 50) -> list[TaskRecord]:
        """Newest first."""
        rows = self._db.query("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_task(row) for row in rows]


def _task(row: Row) -> TaskRecord:
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
        sent_at=None if row["sent_at"] is None else float(row["sent_at"]),
    )
