"""How a waiter learns that a task changed, whichever worker recorded the change.

`ChangeFeed` is the seam: `wait(task_id, seconds)` returns when the task's row changes or the time
is up. `PollingFeed` is the SQLite implementation (and the fallback anywhere): it reads the row's
version (`server.store.changes.task_version`) every `POLL_SECONDS` while someone waits, so a
waiter on worker B returns about half a second after worker A records the change. A PostgreSQL
feed plugs in here: one `LISTEN emo_task_changed` connection per process, a NOTIFY per task write
(see `server/store/changes.py`), waking the waiters of that task id at once.

Changes made by this process wake its waiters sooner still, through the watcher's own events.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio

from server.store.changes import task_version
from server.store.ledger import Ledger

POLL_SECONDS = 0.5


class ChangeFeed(Protocol):
    async def wait(self, task_id: str, seconds: float) -> None:
        """Return once the task's row changes (on any worker), or after `seconds`."""


class PollingFeed:
    """A cheap probe of the task's row every `every` seconds while waiting."""

    def __init__(self, ledger: Ledger, every: float = POLL_SECONDS) -> None:
        self._ledger = ledger
        self._every = every

    async def wait(self, task_id: str, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        seen = task_version(self._ledger, task_id)
        while (left := end - time.monotonic()) > 0:
            await anyio.sleep(min(self._every, left))
            if task_version(self._ledger, task_id) != seen:
                return
