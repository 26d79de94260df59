"""The `workers` table: every server process sharing this ledger, with its last heartbeat.

Why: claims in the due queue and the owners of submits in flight name a worker, and a worker on
another host cannot be checked by pid. Each process registers a random id (with its host and pid,
for people and for the same-host fast path) and beats every lease/3; a worker whose heartbeat is
older than one lease is dead, and its claims and submits are taken over by the others.

Time is the ledger's clock (`Ledger.clock`): on PostgreSQL the database server's, so hosts with
skewed clocks agree on who is dead; on SQLite (one host) the host's.

The tables come from migration 0003 (`server/store/sql/<dialect>/0003_cluster.sql`).

Every statement here is portable (`?` placeholders, `INSERT ... ON CONFLICT`, `RETURNING`), so
the PostgreSQL backend can run it as it is (with its own placeholder style).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.store.ledger import Ledger

# A worker row this long without a heartbeat is removed (its id only matters while its claims could).
FORGET_AFTER = 7 * 24 * 3600.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float


class WorkerTable:
    """The workers table of one ledger."""

    def __init__(self, ledger: Ledger, clock: Clock | None = None) -> None:
        self._ledger = ledger
        # The ledger's clock by default: PostgreSQL's server clock, so skewed hosts agree (Ledger.clock).
        self.clock: Clock = clock or ledger.clock

    def beat(self, worker_id: str, host: str, pid: int) -> float:
        """Register the worker or renew its heartbeat (one upsert); returns the beat's time."""
        now = self.clock()
        self._ledger.execute(
            "INSERT INTO workers (worker_id, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?)"
            " ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (worker_id, host, pid, now, now),
            durable=False,
        )
        return now

    def get(self, worker_id: str) -> WorkerRow | None:
        rows = self._ledger.query(
            "SELECT worker_id, host, pid, started_at, heartbeat_at FROM workers WHERE worker_id = ?", (worker_id,)
        )
        if not rows:
            return None
        row = rows[0]
        return WorkerRow(str(row[0]), str(row[1]), int(row[2]), float(row[3]), float(row[4]))

    def retire(self, worker_id: str) -> None:
        """A clean stop: the worker is gone at once (its claims are released by the caller)."""
        self._ledger.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def stale(self, lease: float) -> list[str]:
        """Ids of workers whose heartbeat is older than `lease` (an index range)."""
        rows = self._ledger.query("SELECT worker_id FROM workers WHERE heartbeat_at < ?", (self.clock() - lease,))
        return [str(row[0]) for row in rows]

    def forget(self) -> None:
        """Remove workers silent for a week: the table stays the size of the cluster."""
        self._ledger.execute("DELETE FROM workers WHERE heartbeat_at < ?", (self.clock() - FORGET_AFTER,))
