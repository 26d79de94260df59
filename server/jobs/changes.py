"""How a waiter learns that a task changed, whichever worker recorded the change.

`ChangeFeed` is the seam: `wait(task_id, seconds)` returns when the task's row changes or the time
is up. `PollingFeed` is the SQLite implementation (and the fallback anywhere): it reads the row's
version (`server.store.changes.task_version`) every `POLL_SECONDS` while someone waits, so a
waiter on worker B returns about half a second after worker A records the change.
`ListeningFeed` is PostgreSQL's: one dedicated connection per process LISTENs on `emo_task_changed`
(the 0004 migration's trigger NOTIFYs it for every task row written, by any worker), on a thread of
its own, and each notification wakes that task's waiters at once, with no reads while they wait.
While that connection is lost (a database outage) waiters fall back to the polling feed, and the
thread reconnects by itself (`PostgresDatabase.listen`).

Changes made by this process wake its waiters sooner still, through the watcher's own events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.from_thread
import anyio.to_thread

from server.store.changes import task_version
from server.store.ledger import Ledger

POLL_SECONDS = 0.5


class ChangeFeed(Protocol):
    async def wait(self, task_id: str, seconds: float) -> None:
        """Return once the task's row changes (on any worker), or after `seconds`."""

    async def run(self) -> None:
        """Whatever the feed needs while the server runs (the watcher's task group runs it)."""


class Listener(Protocol):
    """A backend that can LISTEN (server.store.postgres.PostgresDatabase.listen)."""

    def listen(
        self, deliver: Callable[[str], object], state: Callable[[bool], object], stop: threading.Event
    ) -> None: ...


def change_feed(ledger: Ledger) -> ChangeFeed:
    """LISTEN/NOTIFY where the backend has it (PostgreSQL), else the polling feed."""
    database = ledger.database
    if callable(getattr(database, "listen", None)):
        return ListeningFeed(ledger, database)  # type: ignore[arg-type]
    return PollingFeed(ledger)


class PollingFeed:
    """A cheap probe of the task's row every `every` seconds while waiting."""

    def __init__(self, ledger: Ledger, every: float = POLL_SECONDS) -> None:
        self._ledger = ledger
        self._every = every

    async def run(self) -> None:
        return None  # nothing runs in the background: it reads only while someone waits

    async def wait(self, task_id: str, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        seen = task_version(self._ledger, task_id)
        while (left := end - time.monotonic()) > 0:
            await anyio.sleep(min(self._every, left))
            if task_version(self._ledger, task_id) != seen:
                return


class ListeningFeed:
    """Waiters woken by NOTIFY; the polling feed while the listening connection is down.

    `run` holds the listening thread for the server's life. A waiter registers an event under its task
    id; the thread hands each notified id to the event loop, which sets that id's events. Losing the
    connection sets every event too, so waiters switch to polling for the rest of their wait.
    """

    def __init__(self, ledger: Ledger, database: Listener, every: float = POLL_SECONDS) -> None:
        self._ledger = ledger
        self._database = database
        self._every = every  # the fallback's probe interval while the listener is down
        self._waiters: dict[str, set[anyio.Event]] = {}
        self.listening = False
        self.delivered = 0  # notifications that woke someone (tests read it)

    async def run(self) -> None:
        stop = threading.Event()
        try:
            await anyio.to_thread.run_sync(
                self._database.listen, self._deliver, self._state, stop, abandon_on_cancel=True
            )
        finally:
            stop.set()  # the thread ends within its notify timeout
            self.listening = False

    async def wait(self, task_id: str, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        seen: float | bool | None = False  # False: not polling (no version read yet)
        while (left := end - time.monotonic()) > 0:
            if not self.listening:  # the listener is down: read the row's version, as PollingFeed does
                if seen is False:
                    seen = task_version(self._ledger, task_id)
                await anyio.sleep(min(self._every, left))
                if task_version(self._ledger, task_id) != seen:
                    return
                continue
            seen = False
            event = anyio.Event()
            self._waiters.setdefault(task_id, set()).add(event)
            try:
                with anyio.move_on_after(left):
                    await event.wait()
            finally:
                waiting = self._waiters.get(task_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[task_id]
            if self.listening and event.is_set():
                return  # notified
            # Timed out (the loop ends), or the listener was lost (poll for what is left).

    # ------------------------------------------------------------------ from the listening thread

    def _deliver(self, task_id: str) -> None:
        if task_id in self._waiters:
            anyio.from_thread.run_sync(self._wake, task_id)

    def _state(self, listening: bool) -> None:
        if listening != self.listening:
            anyio.from_thread.run_sync(self._set_state, listening)

    # ------------------------------------------------------------------ on the event loop

    def _wake(self, task_id: str) -> None:
        for event in self._waiters.get(task_id, ()):
            event.set()
            self.delivered += 1

    def _set_state(self, listening: bool) -> None:
        self.listening = listening
        if not listening:
            for events in self._waiters.values():
                for event in events:
                    event.set()
