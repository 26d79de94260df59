"""The cluster's rate window: every process's upstream starts, reserved in the shared ledger.

Why: DashScope's limits are per account, so the query limit and the per-model detect and submit
limits must hold for the sum of all workers. Each limiter key has one row in `rate_limits` holding
`tat`, the earliest moment the key's next start may have (a generic cell rate algorithm: starts are
spaced `spacing` apart on one timeline for the whole cluster). A worker reserves its next few starts
with one upsert that moves `tat` on by their spacing and returns where its slots begin, so the cost
is one statement per batch of starts, whatever the window holds (the previous design counted the
last window's starts, row by row, in a transaction per start: 4 statements per query). With
`spacing = window / limit`, no window of `window` seconds holds more than `limit` reserved slots.

A 429's `Retry-After` is written to the key's row (`paused_until`), so every worker pauses, not only
the one that was told: a reservation asked for while the key is paused grants nothing and says how
long to wait.

The row lock of the upsert is what serializes the reservations of one key on PostgreSQL (READ
COMMITTED re-reads the row it waited for), and SQLite's write lock does the same there. The columns
come from migrations 0003 and 0005 (`server/store/sql/<dialect>/`).

Time is the ledger's clock (`Ledger.clock`): on PostgreSQL the database server's, so skewed hosts
share one timeline. The in-process limiter (server/upstream/limits.py) stays in front of this,
converts the slots to its own clock, and drops a slot it could not use in time.
"""

from __future__ import annotations

from collections.abc import Callable

from server.store.ledger import Ledger

Clock = Callable[[], float]

# One statement. A paused key grants nothing; so does a timeline already more than `horizon` ahead of
# now (`granted` = -1), so that no worker holds slots far in the future when a 429 pauses the key.
# Otherwise the slots start at max(tat, now) (`granted`) and tat moves on by their spacing. Every SET
# expression sees the row as it was. CASE rather than GREATEST/MAX: one text for both dialects.
_RESERVE = (
    "INSERT INTO rate_limits (key, paused_until, tat, granted) VALUES (?, 0, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " granted = CASE WHEN rate_limits.paused_until > ? OR rate_limits.tat > ? THEN -1"
    " WHEN rate_limits.tat > ? THEN rate_limits.tat ELSE ? END,"
    " tat = CASE WHEN rate_limits.paused_until > ? OR rate_limits.tat > ? THEN rate_limits.tat"
    " WHEN rate_limits.tat > ? THEN rate_limits.tat + ? ELSE ? END"
    " RETURNING paused_until, tat, granted"
)


class SharedRates:
    """`server.upstream.limits.SharedWindow` on the ledger (injected by server/runtime.py)."""

    def __init__(self, ledger: Ledger, clock: Clock | None = None, *, scope: str = "") -> None:
        """`scope`: prefixes every key, so tenants with their own DashScope keys (issue 15) keep their
        own accounts' windows in one table, and tenants sharing a key share one."""
        self._ledger = ledger
        self._scope = f"{scope}:" if scope else ""
        # The ledger's clock by default: PostgreSQL's server clock, so skewed hosts agree (Ledger.clock).
        self.clock: Clock = clock or ledger.clock

    def reserve(self, key: str, count: int, spacing: float, horizon: float) -> tuple[float, int]:
        """Reserve `count` starts `spacing` apart, the first at most `horizon` seconds ahead: (seconds
        from now to the first slot, count granted), or (seconds to wait before asking again, 0) while
        the key is paused or its timeline is further ahead than `horizon`."""
        key = self._scope + key
        now = self.clock()
        span = max(1, count) * spacing
        ahead = now + horizon
        [row] = self._ledger.execute(
            _RESERVE, (key, now + span, now, now, ahead, now, now, now, ahead, now, span, now + span), durable=False
        )
        paused, tat, granted = float(row[0]), float(row[1]), float(row[2])
        if paused > now:
            return paused - now, 0
        if granted < 0:
            return max(0.001, tat - ahead), 0
        return max(0.0, granted - now), max(1, count)

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
