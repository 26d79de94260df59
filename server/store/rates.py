"""The cluster's rate window: every process's upstream starts, counted in the shared ledger.

Why: DashScope's limits are per account, so the query limit and the per-model detect and submit
limits must hold for the sum of all workers. Each start is recorded under its limiter's key inside a
write transaction that first counts the key's starts in the last window; a start that would exceed
the limit is refused with the time until the oldest one leaves the window. A 429's `Retry-After` is
written to the key's row, so every worker pauses, not only the one that was told.

The transaction begins by touching the key's row in `rate_limits` (an upsert): on SQLite the write
lock serializes the whole transaction anyway; on PostgreSQL that row lock is what serializes the
starts of one key (READ COMMITTED would otherwise let two workers count the same window).

The tables come from migration 0003 (`server/store/sql/<dialect>/0003_cluster.sql`).

Time is the ledger's clock (`Ledger.clock`): on PostgreSQL the database server's, so skewed hosts
count one window. The in-process limiter (server/upstream/limits.py) stays in front of this, so
the ledger sees at most `rate` attempts per second per process.
"""

from __future__ import annotations

from collections.abc import Callable

from server.store.ledger import Ledger

# Slots older than this many windows are deleted by the next start of their key.
KEEP_WINDOWS = 2.0

Clock = Callable[[], float]


class SharedRates:
    """`server.upstream.limits.SharedWindow` on the ledger (injected by server/runtime.py)."""

    def __init__(self, ledger: Ledger, clock: Clock | None = None, *, scope: str = "") -> None:
        """`scope`: prefixes every key, so tenants with their own DashScope keys (issue 15) keep their
        own accounts' windows in one table, and tenants sharing a key share one."""
        self._ledger = ledger
        self._scope = f"{scope}:" if scope else ""
        # The ledger's clock by default: PostgreSQL's server clock, so skewed hosts agree (Ledger.clock).
        self.clock: Clock = clock or ledger.clock

    def try_start(self, key: str, limit: int, window: float) -> float:
        """Record a start now and return 0, or return how long to wait before asking again."""
        key = self._scope + key
        with self._ledger.transaction() as db:
            now = self.clock()
            [paused] = db.execute(
                "INSERT INTO rate_limits (key, paused_until) VALUES (?, 0) ON CONFLICT (key)"
                " DO UPDATE SET paused_until = rate_limits.paused_until RETURNING paused_until",
                (key,),
            )
            if float(paused[0]) > now:
                return float(paused[0]) - now
            counted = db.one("SELECT COUNT(*), MIN(at) FROM rate_slots WHERE key = ? AND at > ?", (key, now - window))
            assert counted is not None
            if int(counted[0]) >= limit:
                return max(0.001, float(counted[1]) + window - now)
            db.execute("INSERT INTO rate_slots (key, at) VALUES (?, ?)", (key, now))
            db.execute("DELETE FROM rate_slots WHERE key = ? AND at < ?", (key, now - KEEP_WINDOWS * window))
            return 0.0

    def pause(self, key: str, seconds: float) -> None:
        """Nobody in the cluster starts under `key` for `seconds` (a later pause never shortens one)."""
        key = self._scope + key
        until = self.clock() + max(0.0, seconds)
        self._ledger.execute(
            "INSERT INTO rate_limits (key, paused_until) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
            " paused_until = CASE WHEN excluded.paused_until > rate_limits.paused_until"
            " THEN excluded.paused_until ELSE rate_limits.paused_until END",
            (key, until),
        )
