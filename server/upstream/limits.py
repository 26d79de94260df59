"""Client-side rate limits, so this server never asks DashScope faster than the contract allows.

- task queries (and the other `/tasks` calls: list, cancel) share one limiter per process,
  `EMO_MCP_MAX_QUERY_QPS` (default 20, the documented per-account query limit);
- detect and submit calls are limited per model, from the contract: emo-v1 5/s,
  emoji-v1 and emoji-detect-v1 1/s. emo-detect-v1 has no published figure: it gets 5/s, the
  figure of its family's generate model, which is an assumption (see README); `EMO_MCP_MODEL_QPS`
  replaces any of these figures (DashScope publishes only some, and accounts can be raised);
- a 429 pauses the whole limiter (not just the request that got it) for `Retry-After`, so
  concurrent callers do not hammer a throttled account.

Each limiter spaces starts `1/rate` apart and also counts the starts of the last second, so no
window of one second ever holds more than `rate` starts.

Workers sharing a ledger share these limits too (the account's limits are the sum of its callers'):
a `SharedWindow` (server/store/rates.py, injected by server/runtime.py, since this layer may not
import the store) hands out every worker's starts per key on one timeline, `window / limit` apart,
and holds every worker's pauses. A limiter reserves as many slots as it has callers waiting, up to
`LOOKAHEAD` seconds' worth, in one ledger statement, so the ledger's cost per start shrinks as the
rate grows (at 1,000 starts a second, one statement per 100). A slot this process wakes up for more
than `LATE` after its time is given up, not used: a late start could otherwise land in the same
second as the slots after it. The in-process spacing stays in front, so one worker alone still
reaches the full rate.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import anyio

from server.errors import LedgerUnavailable
from server.models import EMO_DETECT, EMO_GENERATE, EMOJI_DETECT, EMOJI_GENERATE

DEFAULT_QUERY_QPS = 20.0
# Per-model call rates (calls per second); unknown models get the most conservative one.
MODEL_RATES: dict[str, float] = {EMO_GENERATE: 5.0, EMO_DETECT: 5.0, EMOJI_GENERATE: 1.0, EMOJI_DETECT: 1.0}
FALLBACK_MODEL_RATE = 1.0
# The counting window: one second plus a margin for the time between a start and its arrival upstream.
# 1.02 s keeps the sustained rate at ~97% of the limit (bench/RATE.md: 19.5/s for 20, never more than
# 20 arrivals in any second at the fake). The previous 1.2 s cost 17%; 1.05 s once let a busy loop's
# late sends land 21 in one second, when every tick scanned the ledger (the due queue keeps it idle).
WINDOW = 1.02
# Shared slots are reserved this many seconds' worth at a time at most (never more than the callers
# waiting), and only while the cluster's timeline is at most HORIZON ahead: a 429 then pauses every
# worker within about HORIZON + LOOKAHEAD, the slots they already held.
LOOKAHEAD = 0.1
HORIZON = 0.15
# A reserved slot is used up to this long after its time: with WINDOW's 2% margin, the busiest second
# at the upstream still holds at most the limit (20/s: (1.0 + 0.01) / 0.051 < 20 slots apart).
LATE = 0.01
# A start may come this much before its time (its slot, or the in-process spacing) where that spacing is
# at most a fifth of it (limits of ~1,000/s and more): a tick's batch of queries then leaves in one or two
# turns of the event loop, not one sleep and one lock hand-over per start, each waiting behind whatever
# else the loop runs (200 ms of lag per query at 1,000 queries/s on four workers, bench/POLLING_AB.md).
# A second at the upstream then holds the starts of at most 1 + EARLY + LATE = 1.015 s of slots, still
# under WINDOW's 1.02 s. Below such rates a batch holds a start or two, and starts keep to their times.
EARLY = 0.005
PACE_WEIGHT = 0.2  # of the newest gap between two starts in the moving average of the pace

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

logger = logging.getLogger(__name__)
QUERY_KEY = "queries"


class SharedWindow(Protocol):
    """Starts and pauses counted across every worker of a cluster, per limiter key."""

    def reserve(self, key: str, count: int, spacing: float, horizon: float) -> tuple[float, int]:
        """Reserve `count` starts `spacing` apart on the key's cluster-wide timeline, the first at most
        `horizon` ahead: (seconds from now to the first, count granted), or (seconds to wait before
        asking again, 0) while the key is paused or the timeline is further ahead."""

    def pause(self, key: str, seconds: float) -> None:
        """Nobody under `key`, in any worker, starts for `seconds`."""


class RateLimiter:
    """At most `rate` starts in any window of one second, and starts at least `1/rate` apart.

    Callers queue in arrival order (a FIFO lock), taking turns by party (see `acquire`); the window is
    checked against the moments starts really happened, with a small margin, so a caller woken late by
    a busy event loop cannot bunch up with the next ones.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        window: float = WINDOW,
        shared: SharedWindow | None = None,
        key: str = QUERY_KEY,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._window = window
        self._interval = 1.0 / rate
        self._burst = max(1, math.floor(rate))
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._paused_until = 0.0
        self._starts: deque[float] = deque(maxlen=self._burst)
        # fast_acquire: a caller that finds the lock free does not yield first, so the callers of a batch
        # that need not sleep all pass in the same turn of the event loop.
        self._lock = anyio.Lock(fast_acquire=True)
        self._parties: dict[str, anyio.Lock] = {}
        self._shared = shared
        self._key = key
        # The shared timeline's spacing: `burst` starts per window, the window long enough for one whole
        # start when the rate is below 1/s.
        self._spacing = max(window, self._burst / rate) / self._burst
        self._batch = max(1, math.floor(rate * LOOKAHEAD))
        self._early = EARLY if self._spacing <= EARLY / 5 else 0.0
        self._expected = 0  # callers announced (`expect`) that have not come yet
        self._slots: deque[float] = deque()  # reserved shared slots, on this limiter's clock
        self._waiting = 0
        # Seconds between this process's starts lately (a moving average): a process slower than the
        # timeline's spacing reserves only the slots it can use within LATE of their times.
        self._pace = self._spacing
        self._last_start = -math.inf
        self._backlog = False  # another caller was waiting when the last start was made

    async def acquire(self, party: str = "") -> None:
        """Wait for this caller's turn. Callers of one `party` (a tenant of a shared key) queue among
        themselves first, so at most one of each party waits for the limiter itself, whose lock is FIFO:
        turns go round the parties, and a tenant with one call waits behind at most one call of each busy
        tenant, however many that one has queued."""
        queue = self._parties.get(party)
        if queue is None:
            queue = self._parties[party] = anyio.Lock(fast_acquire=True)
        self._expected = max(0, self._expected - 1)
        self._waiting += 1
        try:
            async with queue, self._lock:
                while True:
                    now = self._clock()
                    slot = max(now, self._next - self._early, self._paused_until)
                    if len(self._starts) == self._burst:
                        slot = max(slot, self._starts[0] + self._window)
                    if slot <= now:
                        wait = self._shared_wait(now)
                        if wait <= 0:
                            break
                        slot = now + wait
                    await self._sleep(slot - now)
                self._starts.append(now)
                self._next = max(self._next, now) + self._interval
                # The pace is how fast this process starts when callers queue: a gap after a start that
                # left nobody waiting is idleness, not slowness (a tick's batch comes all at once, then
                # nothing for a while), and counted would shrink every reservation to a slot or two.
                if self._backlog and now - self._last_start < 1.0:
                    self._pace += PACE_WEIGHT * (now - self._last_start - self._pace)
                self._last_start = now
                self._backlog = self._waiting > 1
        finally:
            self._waiting -= 1

    def expect(self, count: int) -> None:
        """`count` callers are about to come (a tick's batch of queries): the next shared reservation
        covers them all, not just the callers already waiting."""
        self._expected = max(0, count)

    def pause(self, seconds: float) -> None:
        """Nobody starts before `seconds` from now (a 429's Retry-After, or our own backoff), in any worker."""
        until = self._clock() + max(0.0, seconds)
        self._paused_until = max(self._paused_until, until)
        self._slots.clear()  # reserved before the 429: not to be used after it
        if self._shared is not None:
            try:
                self._shared.pause(self._key, seconds)
            except Exception:  # the shared store is locked or gone: this worker pauses anyway
                logger.warning("rate limit %s: could not share a pause", self._key, exc_info=True)

    def _wanted(self) -> int:
        """Slots to reserve: one per waiting caller, up to LOOKAHEAD's worth, and no more than this
        process can start within LATE of their times at its recent pace."""
        count = min(max(1, self._waiting + self._expected), self._batch)
        lag = self._pace - self._spacing
        if lag > 0:
            count = min(count, 1 + math.floor(LATE / lag))
        return count

    def _shared_wait(self, now: float) -> float:
        """0 when a reserved cluster slot is due now (it is used up), else the seconds until one is;
        reserves the next slots when none is left. A failing store leaves the local limit alone."""
        if self._shared is None:
            return 0.0
        slots = self._slots
        while slots and slots[0] < now - LATE:
            slots.popleft()  # woken too late for it: given up (see LATE)
        if not slots:
            try:
                wait, granted = self._shared.reserve(self._key, self._wanted(), self._spacing, HORIZON)
            except LedgerUnavailable:
                # The database is away: nothing may start (a detect could not be recorded, and a worker cut
                # off from the ledger must stop querying so that the others can take its tasks over).
                raise
            except Exception:  # locked or damaged: better one worker's limit than none at all
                logger.warning("rate limit %s: the shared window could not be read", self._key, exc_info=True)
                return 0.0
            if not granted:
                return max(wait, 0.001)  # paused (a 429 somewhere in the cluster), or other workers are ahead
            slots.extend(now + wait + index * self._spacing for index in range(granted))
        if slots[0] <= now + self._early + 1e-6:
            slots.popleft()
            return 0.0
        return slots[0] - now


class Limits:
    """The limiters of one server process."""

    def __init__(
        self,
        query_qps: float = DEFAULT_QUERY_QPS,
        aliases: Mapping[str, tuple[str, ...]] | None = None,
        model_rates: Mapping[str, float] | None = None,
        shared: SharedWindow | None = None,
    ):
        self._shared = shared
        self.queries = RateLimiter(query_qps, shared=shared, key=QUERY_KEY)
        self._official = {alias: official for official, names in (aliases or {}).items() for alias in names}
        self._models: dict[str, RateLimiter] = {}
        # The contract's figures, with the configured ones (EMO_MCP_MODEL_QPS, official names) over them.
        self.model_rates = {**MODEL_RATES, **(model_rates or {})}

    def model(self, model: str) -> RateLimiter:
        """The limiter of a model; a deployment alias shares its official model's limiter."""
        official = self._official.get(model, model)
        limiter = self._models.get(official)
        if limiter is None:
            rate = self.model_rates.get(official, FALLBACK_MODEL_RATE)
            limiter = self._models[official] = RateLimiter(rate, shared=self._shared, key=f"model:{official}")
        return limiter
