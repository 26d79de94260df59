"""Client-side rate limits, so this server never asks DashScope faster than the contract allows.

- task queries (and the other `/tasks` calls: list, cancel) share one limiter per process,
  `EMO_MCP_MAX_QUERY_QPS` (default 20, the documented per-account query limit);
- detect and submit calls are limited per model, from the contract: emo-v1 5/s,
  emoji-v1 and emoji-detect-v1 1/s. emo-detect-v1 has no published figure: it gets 5/s, the
  figure of its family's generate model, which is an assumption (see README);
- a 429 pauses the whole limiter (not just the request that got it) for `Retry-After`, so
  concurrent callers do not hammer a throttled account.

Each limiter hands out start slots at least `1/rate` apart (a token bucket of size one), so no
window of one second ever holds more than `rate` starts (half-open windows).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import anyio

from server.models import EMO_DETECT, EMO_GENERATE, EMOJI_DETECT, EMOJI_GENERATE

DEFAULT_QUERY_QPS = 20.0
# Per-model call rates (calls per second); unknown models get the most conservative one.
MODEL_RATES: dict[str, float] = {EMO_GENERATE: 5.0, EMO_DETECT: 5.0, EMOJI_GENERATE: 1.0, EMOJI_DETECT: 1.0}
FALLBACK_MODEL_RATE = 1.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """Hands out start slots `1/rate` apart; `pause()` pushes every later slot past a deadline."""

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._paused_until = 0.0

    async def acquire(self) -> None:
        """Wait for this caller's slot. Slots are reserved in arrival order, so waiting is fair."""
        now = self._clock()
        slot = max(now, self._next, self._paused_until)
        self._next = slot + self._interval
        if slot > now:
            await self._sleep(slot - now)

    def pause(self, seconds: float) -> None:
        """Nobody starts before `seconds` from now (a 429's Retry-After, or our own backoff)."""
        until = self._clock() + max(0.0, seconds)
        self._paused_until = max(self._paused_until, until)
        self._next = max(self._next, until)


class Limits:
    """The limiters of one server process."""

    def __init__(self, query_qps: float = DEFAULT_QUERY_QPS, aliases: Mapping[str, tuple[str, ...]] | None = None):
        self.queries = RateLimiter(query_qps)
        self._official = {alias: official for official, names in (aliases or {}).items() for alias in names}
        self._models: dict[str, RateLimiter] = {}

    def model(self, model: str) -> RateLimiter:
        """The limiter of a model; a deployment alias shares its official model's limiter."""
        official = self._official.get(model, model)
        limiter = self._models.get(official)
        if limiter is None:
            limiter = self._models[official] = RateLimiter(MODEL_RATES.get(official, FALLBACK_MODEL_RATE))
        return limiter
