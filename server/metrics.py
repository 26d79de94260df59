"""Operational metrics, for the `/metrics` endpoint of the HTTP transport.

Why it sits at the base layer: the events worth counting happen deep down (an upstream call in
`server/upstream/client.py`, a lease claimed in `server/jobs/watcher.py`), and those layers may
only import what is below them. So this module knows nothing of them: it offers a few named
events, and the layers that see them call it.

Why two classes: stdio serves one person on one machine, nobody scrapes it, and
`prometheus_client` costs about 55 ms to import. `Metrics` is the do-nothing base every layer
holds by default (`NO_METRICS`); `PrometheusMetrics` imports the library only when it is built (by
the HTTP transport), into a registry of its own, not the library's global one, so two apps in one
process (tests) or one app built twice never collide or count each other's events.

Ledger latency is measured without touching the store: `time_ledger` wraps the public methods of
one ledger object (whichever backend it is), the one door every read and write goes through.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

# Names of the families (also what the tests look for).
PREFIX = "emo_mcp"
# Ledger calls are sub-millisecond on local SQLite and a network round trip on PostgreSQL.
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Ledger methods that are not calls worth timing (or that must stay exactly what they are): set-up, and
# factories whose work happens after they return (a transaction's context manager, a named query's text).
_NOT_TIMED = frozenset({"close", "trace", "open", "sql", "transaction"})


class Metrics:
    """The events the server counts. This base counts nothing (stdio, the CLI, tests that do not look)."""

    def upstream_call(self, endpoint: str, status: int | None) -> None:
        """One request sent to DashScope (or its storage); `status` None when no answer came."""

    def leases_held(self, count: Callable[[], int]) -> None:
        """How to read, at scrape time, how many task leases this process holds right now."""

    def leases_taken_over(self, count: int) -> None:
        """Leases of dead processes released so that this one (or another) takes their tasks."""

    def downloaded(self, size: int) -> None:
        """One verified video saved, of `size` bytes."""

    def ledger_call(self, operation: str, seconds: float) -> None:
        """One ledger method call and how long it took."""

    def time_ledger(self, ledger: object) -> None:
        """Time every public method of `ledger` from now on (nothing to do when nothing is counted)."""


NO_METRICS = Metrics()


class PrometheusMetrics(Metrics):
    """The same events as Prometheus families, in a registry owned by this object."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._calls = Counter(
            f"{PREFIX}_upstream_calls",
            "Requests sent to DashScope and its storage, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self._throttled = Counter(
            f"{PREFIX}_upstream_throttled",
            "Upstream answers HTTP 429 (throttled), by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self._tasks = Gauge(
            f"{PREFIX}_tasks",
            "Tasks in the ledger by status (read from the ledger at scrape time: the whole cluster's view).",
            ["status"],
            registry=self.registry,
        )
        self._ledger_up = Gauge(
            f"{PREFIX}_ledger_up",
            "1 when the ledger answered this scrape's task count in time, else 0.",
            registry=self.registry,
        )
        self._held = Gauge(
            f"{PREFIX}_leases_held", "Task leases this process holds now (steps in flight).", registry=self.registry
        )
        self._taken_over = Counter(
            f"{PREFIX}_leases_taken_over",
            "Leases of dead processes released for takeover.",
            registry=self.registry,
        )
        self._downloads = Counter(f"{PREFIX}_downloads", "Videos downloaded and verified.", registry=self.registry)
        self._download_bytes = Counter(
            f"{PREFIX}_download_bytes", "Bytes of the videos downloaded and verified.", registry=self.registry
        )
        self._ledger = Histogram(
            f"{PREFIX}_ledger_seconds",
            "Duration of ledger calls, by method.",
            ["operation"],
            buckets=LEDGER_BUCKETS,
            registry=self.registry,
        )
        self._ledger_children: dict[str, Histogram] = {}

    def upstream_call(self, endpoint: str, status: int | None) -> None:
        self._calls.labels(endpoint).inc()
        if status == 429:
            self._throttled.labels(endpoint).inc()

    def leases_held(self, count: Callable[[], int]) -> None:
        self._held.set_function(lambda: float(count()))

    def leases_taken_over(self, count: int) -> None:
        if count:
            self._taken_over.inc(count)

    def downloaded(self, size: int) -> None:
        self._downloads.inc()
        self._download_bytes.inc(size)

    def ledger_call(self, operation: str, seconds: float) -> None:
        # The labelled child once per operation: `labels()` validates and locks on every call, and this
        # runs for every ledger call (several per task query).
        child = self._ledger_children.get(operation)
        if child is None:
            child = self._ledger_children[operation] = self._ledger.labels(operation)
        child.observe(seconds)

    def set_task_counts(self, counts: Mapping[str, int] | None) -> None:
        """The scrape's task counts by status, or None when the ledger did not answer in time
        (the previous figures are dropped rather than shown as if current)."""
        self._tasks.clear()
        self._ledger_up.set(0 if counts is None else 1)
        for status, count in (counts or {}).items():
            self._tasks.labels(status).set(count)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def time_ledger(self, ledger: object) -> None:
        for name in dir(type(ledger)):
            if name.startswith("_") or name in _NOT_TIMED:
                continue
            method = getattr(ledger, name, None)
            # Generators are timed by nobody: their work happens while the caller iterates.
            if callable(method) and not inspect.isgeneratorfunction(method) and not isinstance(method, type):
                setattr(ledger, name, self._timed(name, method))

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        # A method's series appears on its first call, not as a zero row for every method at start.
        observe = functools.partial(self.ledger_call, name)
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return await method(*args, **kwargs)
                finally:
                    observe(time.perf_counter() - began)

            return timed_async

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                observe(time.perf_counter() - began)

        return timed
