"""The due queue: when each open task next needs the watcher, and what it is expected to do.

Why a table of its own: the watcher asks "what is due now?" and "when is the next one due?"
after every finished step; both are one indexed lookup here, so a tick costs the number of
due tasks, not the number of rows the ledger has ever held. A row exists only while a task
needs work (a query, or its video's download) and goes when the task settles.

Claiming moves a row's `due_at` forward by a lease, so a step in flight is not started twice,
and a step whose process died is taken up again once the lease runs out. The same shape carries
to PostgreSQL, where a claim is `FOR UPDATE SKIP LOCKED` (the dialects' `claim` in
`server/store/sql/<dialect>/queries.sql`), so concurrent workers never claim the same task. The tables
are the baseline migration's.

Its writes (claims, due times) commit without waiting for the disk (`durable=False`, see
`server.store.database.Database.execute`): they follow every query, and a database crash that forgot
the last of them only means a task is claimed or asked again.

The row also holds the task's schedule estimate (expected output seconds, start and end, how
they were reckoned), and `model_rates` holds each model's learned processing rate as running
sums, so an estimate never reads the history either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.store.database import Row, Statement
from server.store.ledger import BATCH_READ, LOCAL_STATUSES, TERMINAL_STATUSES, VIDEO_EXPIRED, Ledger

# "query": the task is PENDING/RUNNING upstream (in this account's queue); "download": it
# SUCCEEDED and its video is not on disk yet.
QUERY, DOWNLOAD = "query", "download"

_FILL_OPEN = (
    "INSERT INTO due_queue (task_id, model, created_at, stage, due_at)"  # noqa: S608 (no user text)
    " SELECT task_id, model, created_at, ?, ? FROM tasks WHERE status NOT IN ("
    + ",".join("?" * len(TERMINAL_STATUSES | LOCAL_STATUSES))
    + ") ON CONFLICT DO NOTHING RETURNING task_id"
)


@dataclass(frozen=True)
class Entry:
    """One task's place in the queue and its estimate (times are epoch seconds)."""

    task_id: str
    model: str
    created_at: float
    stage: str
    due_at: float
    expected_seconds: float | None
    expected_start: float | None
    expected_end: float | None
    basis: str | None


@dataclass(frozen=True)
class Context:
    """A task's entry and what its estimate needs of the task just ahead of it (`DueQueue.context`)."""

    entry: Entry
    ahead_count: int
    ahead_id: str | None
    ahead_seconds: float | None
    ahead_start: float | None
    ahead_end: float | None


class Estimate(Protocol):
    """What the queue keeps of a schedule estimate (`server.jobs.schedule.Eta` has these)."""

    @property
    def start(self) -> float | None: ...
    @property
    def end(self) -> float | None: ...
    @property
    def basis(self) -> str: ...


@dataclass(frozen=True)
class Rate:
    """A model's learned processing rate, as running sums over its finished tasks."""

    finished: int
    output_seconds: float
    run_seconds: float


class DueQueue:
    """The due queue and the learned rates, in the ledger's file (and transactions)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # Told how many claims of other workers a claim took over after their lease ran out (a metric).
        self.on_takeover: Callable[[int], object] | None = None

    def fill_once(self, now: float) -> int:
        """A ledger from before the due queue: queue its open tasks, once (one pass, then never again)."""
        if self._ledger.query("SELECT value FROM due_queue_meta WHERE key = 'filled'"):
            return 0
        statuses = sorted(TERMINAL_STATUSES | LOCAL_STATUSES)
        open_rows = self._ledger.execute(_FILL_OPEN, (QUERY, now, *statuses))
        downloads = self._ledger.execute(
            "INSERT INTO due_queue (task_id, model, created_at, stage, due_at)"
            " SELECT task_id, model, created_at, ?, ? FROM tasks WHERE status = 'SUCCEEDED' AND video_path IS NULL"
            " AND COALESCE(code, '') != ? ON CONFLICT DO NOTHING RETURNING task_id",
            (DOWNLOAD, now, VIDEO_EXPIRED),
        )
        self._ledger.execute(
            "INSERT INTO due_queue_meta (key, value) VALUES ('filled', '1')"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        return len(open_rows) + len(downloads)

    # ------------------------------------------------------------------ the watcher's questions

    def claim(self, now: float, limit: int, lease: float, owner: str) -> list[str]:
        """Up to `limit` due tasks, earliest first; each is pushed `lease` seconds ahead while in flight."""
        return list(self.claim_due(now, limit, lease, owner))

    def claim_due(self, now: float, limit: int, lease: float, owner: str, *, ahead: float = 0.0) -> dict[str, float]:
        """`claim`, also taking what falls due within `ahead` seconds: {task id: the due time it was
        claimed at}, earliest first. Why the due time: the next one counts from it (a step that ran a
        little early or late keeps its task's cadence, see Watcher._file_next)."""
        if limit <= 0:
            return {}
        rows = self._ledger.execute(
            self._ledger.sql("claim"), (now + max(0.0, ahead), limit, now + lease, owner), durable=False
        )
        # A row still claimed by another worker was due only because that claim's lease ran out: a takeover.
        taken = sum(1 for row in rows if row[1] is not None and row[1] != owner)
        if taken and self.on_takeover is not None:
            self.on_takeover(taken)
        return {str(row[0]): float(row[2]) for row in sorted(rows, key=lambda row: float(row[2]))}

    def claims(self) -> list[tuple[str, str]]:
        """(task id, claimer) of the steps in flight (a few rows: the claimed ones only)."""
        rows = self._ledger.query("SELECT task_id, claimed_by FROM due_queue WHERE claimed_by IS NOT NULL")
        return [(str(row[0]), str(row[1])) for row in rows]

    def release(self, task_ids: Sequence[str], now: float) -> None:
        """Claims of a process that died: due at once, for whoever runs now."""
        for task_id in task_ids:
            self._ledger.execute("UPDATE due_queue SET due_at = ?, claimed_by = NULL WHERE task_id = ?", (now, task_id))

    def next_due(self) -> float | None:
        rows = self._ledger.query("SELECT MIN(due_at) FROM due_queue")
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def task_ids(self) -> list[str]:
        """Every queued task (the queue holds open tasks only: this never reads the history)."""
        return [str(row[0]) for row in self._ledger.query("SELECT task_id FROM due_queue")]

    def schedule(self, task_id: str, model: str, created_at: float, due_at: float, stage: str = QUERY) -> None:
        """Queue a task (or move it): its estimate, if any, is kept."""
        self._ledger.execute(self._ledger.sql("schedule"), (task_id, model, created_at, stage, due_at), durable=False)

    def file(
        self,
        task_id: str,
        model: str,
        created_at: float,
        due_at: float,
        stage: str,
        eta: Estimate | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        """After a step: the task's next due time (queued if it was not), its claim released, and its
        new estimate if one was made: one statement, as this runs after every query.

        Only a claim `owner` holds (or no claim) is touched: a worker that stalled past its lease must not
        clear the claim of the worker that took the task over, nor move that worker's lease. `owner=None`
        (a single process, the tests) files whatever the claim."""
        self._ledger.execute(
            *self.file_statement(task_id, model, created_at, due_at, stage, eta, owner=owner), durable=False
        )

    def file_statement(
        self,
        task_id: str,
        model: str,
        created_at: float,
        due_at: float,
        stage: str,
        eta: Estimate | None = None,
        *,
        owner: str | None = None,
    ) -> Statement:
        """`file`'s statement, not run: the watcher sends a tick's filings in one batch."""
        mine = "" if owner is None else " WHERE due_queue.claimed_by IS NULL OR due_queue.claimed_by = ?"
        who = () if owner is None else (owner,)
        if eta is None:
            return (
                "INSERT INTO due_queue (task_id, model, created_at, stage, due_at) VALUES (?,?,?,?,?)"  # noqa: S608
                " ON CONFLICT (task_id) DO UPDATE SET due_at = excluded.due_at, stage = excluded.stage,"
                " claimed_by = NULL" + mine,
                (task_id, model, created_at, stage, due_at, *who),
            )
        return (
            "INSERT INTO due_queue (task_id, model, created_at, stage, due_at, expected_start, expected_end, basis)"  # noqa: S608
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (task_id) DO UPDATE SET due_at = excluded.due_at,"
            " stage = excluded.stage, claimed_by = NULL, expected_start = excluded.expected_start,"
            " expected_end = excluded.expected_end, basis = excluded.basis" + mine,
            (task_id, model, created_at, stage, due_at, eta.start, eta.end, eta.basis, *who),
        )

    def reschedule(self, task_id: str, due_at: float, stage: str, *, owner: str | None = None) -> None:
        """Move a queued task and release its claim: only a claim `owner` holds (or none), as in `file`."""
        mine = "" if owner is None else " AND (claimed_by IS NULL OR claimed_by = ?)"
        self._ledger.execute(
            "UPDATE due_queue SET due_at = ?, stage = ?, claimed_by = NULL WHERE task_id = ?" + mine,  # noqa: S608
            (due_at, stage, task_id, *(() if owner is None else (owner,))),
            durable=False,
        )

    def expect(self, task_id: str, seconds: float | None) -> None:
        """The task's expected output length (audio, template), known at submit."""
        self._ledger.execute("UPDATE due_queue SET expected_seconds = ? WHERE task_id = ?", (seconds, task_id))

    def remove(self, task_id: str) -> None:
        self._ledger.execute("DELETE FROM due_queue WHERE task_id = ?", (task_id,))

    # ------------------------------------------------------------------ reads

    def get(self, task_id: str) -> Entry | None:
        rows = self._ledger.query("SELECT * FROM due_queue WHERE task_id = ?", (task_id,))
        return _entry(rows[0]) if rows else None

    def context(self, task_id: str, cap: int) -> Context | None:
        """A task's entry with what its estimate needs of the queue ahead of it (the task just before
        it in its model's queue, and how many are ahead, counting at most `cap`): one statement of
        index probes instead of three reads, since the watcher asks after every query of every task."""
        return self.contexts([task_id], cap).get(task_id)

    def contexts(self, task_ids: Sequence[str], cap: int) -> dict[str, Context]:
        """`context` of several tasks in one read per `BATCH_READ` ids (the watcher's claimed batch)."""
        ahead = (
            "(SELECT a.{column} FROM due_queue a WHERE a.model = q.model AND a.stage = ?"
            " AND a.created_at < q.created_at ORDER BY a.created_at DESC LIMIT 1)"
        )
        columns = ("task_id", "expected_seconds", "expected_start", "expected_end")
        found: dict[str, Context] = {}
        for start in range(0, len(task_ids), BATCH_READ):
            chunk = task_ids[start : start + BATCH_READ]
            rows = self._ledger.query(
                "SELECT q.*, (SELECT COUNT(*) FROM (SELECT 1 FROM due_queue c WHERE c.model = q.model"  # noqa: S608
                " AND c.stage = ? AND c.created_at < q.created_at LIMIT ?) AS counted) AS ahead_count, "
                + ", ".join(ahead.format(column=column) + f" AS ahead_{column}" for column in columns)
                + f" FROM due_queue q WHERE q.task_id IN ({','.join('?' * len(chunk))})",
                (QUERY, cap, *([QUERY] * len(columns)), *chunk),
            )
            for row in rows:
                found[str(row["task_id"])] = _context(row)
        return found

    def behind(self, model: str, created_at: float) -> Entry | None:
        """The task just after this moment in the model's queue: the next to start when one ends."""
        rows = self._ledger.query(
            "SELECT * FROM due_queue WHERE model = ? AND stage = ? AND created_at > ? ORDER BY created_at LIMIT 1",
            (model, QUERY, created_at),
        )
        return _entry(rows[0]) if rows else None

    def position(self, model: str, created_at: float, cap: int = -1) -> int:
        """How many open tasks of this model were submitted earlier (an index range, not a scan),
        counting at most `cap` of them when given: the watcher only needs "none" or "some", and a
        count of a deep queue costs its depth on every query."""
        # An alias for the subquery (PostgreSQL 15 requires one); no LIMIT at all when uncapped (-1 is
        # SQLite's "no limit", an error to PostgreSQL).
        limit = " LIMIT ?" if cap >= 0 else ""
        rows = self._ledger.query(
            "SELECT COUNT(*) FROM (SELECT 1 FROM due_queue WHERE model = ? AND stage = ? AND created_at < ?"  # noqa: S608
            f"{limit}) AS ahead",
            (model, QUERY, created_at, *([cap] if cap >= 0 else [])),
        )
        return int(rows[0][0])

    # ------------------------------------------------------------------ learned rates

    def rate(self, model: str) -> Rate:
        rows = self._ledger.query(
            "SELECT finished, output_seconds, run_seconds FROM model_rates WHERE model = ?", (model,)
        )
        if not rows:
            return Rate(0, 0.0, 0.0)
        return Rate(int(rows[0][0]), float(rows[0][1]), float(rows[0][2]))

    def learn(self, model: str, output_seconds: float, run_seconds: float) -> None:
        """One finished task's output length and run time join the model's running sums."""
        self._ledger.execute(
            "INSERT INTO model_rates (model, finished, output_seconds, run_seconds) VALUES (?, 1, ?, ?)"
            " ON CONFLICT (model) DO UPDATE SET finished = model_rates.finished + 1,"
            " output_seconds = model_rates.output_seconds + excluded.output_seconds,"
            " run_seconds = model_rates.run_seconds + excluded.run_seconds",
            (model, output_seconds, run_seconds),
        )


def _context(row: Row) -> Context:
    def number(name: str) -> float | None:
        value = row[name]
        return None if value is None else float(value)

    return Context(
        entry=_entry(row),
        ahead_count=int(row["ahead_count"]),
        ahead_id=None if row["ahead_task_id"] is None else str(row["ahead_task_id"]),
        ahead_seconds=number("ahead_expected_seconds"),
        ahead_start=number("ahead_expected_start"),
        ahead_end=number("ahead_expected_end"),
    )


def _entry(row: Row) -> Entry:
    get = row.__getitem__
    return Entry(
        task_id=str(get("task_id")),
        model=str(get("model")),
        created_at=float(get("created_at")),
        stage=str(get("stage")),
        due_at=float(get("due_at")),
        expected_seconds=None if get("expected_seconds") is None else float(get("expected_seconds")),
        expected_start=None if get("expected_start") is None else float(get("expected_start")),
        expected_end=None if get("expected_end") is None else float(get("expected_end")),
        basis=get("basis"),
    )
