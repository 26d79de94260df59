"""Leases on the due queue's rows: one worker at a time queries or downloads a task.

A claimed row (`claimed_by` set) has its `due_at` pushed to the lease's end and is not handed out
again before that; the claimer renews it while the step is in flight (a download can outlast a
lease) and files the next due time when done. A row whose claimer stopped renewing (killed, cut
off) becomes due when the lease ends, and whoever claims it then takes the task over.

The tables come from migration 0003 (`server/store/sql/<dialect>/0003_cluster.sql`).

`DueQueue.claim` (server/store/queue.py) is the tick's bulk claim; this module holds the other lease
statements: one task's claim for a caller's fresh query, renewal, and releases. On PostgreSQL the
single-task claim needs no row lock beyond the UPDATE's own (its WHERE is re-checked on the locked
row); the bulk claim is the one that takes `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from server.store.ledger import Ledger

Taken = Literal["taken", "held", "none"]


class Leases:
    """Lease statements on the `due_queue` table (created by `DueQueue`)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def hold(self, name: str, worker_id: str, now: float, lease: float) -> bool:
        """Take (or keep) the named chore for `lease` seconds, unless another worker's lease on it runs."""
        rows = self._ledger.execute(
            "INSERT INTO cluster_leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
            " SET holder = excluded.holder, until = excluded.until"
            " WHERE cluster_leases.until <= ? OR cluster_leases.holder = excluded.holder RETURNING holder",
            (name, worker_id, now + lease, now),
        )
        return bool(rows)

    def holder_of(self, name: str) -> str | None:
        rows = self._ledger.query("SELECT holder FROM cluster_leases WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def take_over(self, name: str, dead: str, worker_id: str, now: float, lease: float) -> bool:
        """The named chore of a worker known dead, before its lease runs out (compare and swap)."""
        rows = self._ledger.execute(
            "UPDATE cluster_leases SET holder = ?, until = ? WHERE name = ? AND holder = ? RETURNING holder",
            (worker_id, now + lease, name, dead),
        )
        return bool(rows)

    def drop(self, worker_id: str) -> None:
        """A clean stop: this worker's chores are free at once."""
        self._ledger.execute("DELETE FROM cluster_leases WHERE holder = ?", (worker_id,))

    def take(self, task_id: str, worker_id: str, now: float, lease: float) -> Taken:
        """Claim one task now, whatever its due time, unless another worker's lease on it is running.

        "taken": ours until `now + lease`; "held": another worker has it in flight; "none": the task has
        no row in the queue (nobody follows it, so nothing can run twice)."""
        rows = self._ledger.execute(
            "UPDATE due_queue SET due_at = ?, claimed_by = ? WHERE task_id = ?"
            " AND (claimed_by IS NULL OR claimed_by = ? OR due_at <= ?) RETURNING task_id",
            (now + lease, worker_id, task_id, worker_id, now),
            durable=False,
        )
        if rows:
            return "taken"
        return "held" if self._ledger.query("SELECT 1 FROM due_queue WHERE task_id = ?", (task_id,)) else "none"

    def holder(self, task_id: str, now: float) -> str | None:
        """The worker whose lease on this task is running, if any."""
        rows = self._ledger.query(
            "SELECT claimed_by FROM due_queue WHERE task_id = ? AND claimed_by IS NOT NULL AND due_at > ?",
            (task_id, now),
        )
        return str(rows[0][0]) if rows else None

    def renew(self, worker_id: str, task_ids: Sequence[str], until: float) -> int:
        """Extend this worker's claims on the steps it has in flight; returns how many it still holds."""
        if not task_ids:
            return 0
        marks = ",".join("?" * len(task_ids))
        rows = self._ledger.execute(
            f"UPDATE due_queue SET due_at = ? WHERE claimed_by = ? AND task_id IN ({marks}) RETURNING task_id",  # noqa: S608
            (until, worker_id, *task_ids),
            durable=False,
        )
        return len(rows)

    def release_workers(self, worker_ids: Sequence[str], now: float) -> list[str]:
        """Claims of dead (or stopping) workers: due at once, for whoever runs now."""
        if not worker_ids:
            return []
        marks = ",".join("?" * len(worker_ids))
        rows = self._ledger.execute(
            f"UPDATE due_queue SET due_at = ?, claimed_by = NULL WHERE claimed_by IN ({marks}) RETURNING task_id",  # noqa: S608
            (now, *worker_ids),
        )
        return [str(row[0]) for row in rows]
