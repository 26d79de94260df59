"""The watcher's writes after each query, gathered for up to a tenth of a second and sent as one batch.

Why: after every answer about an open task the watcher writes two rows (the answer: the query count,
status and times; the task's next due time and estimate). Run one by one they were two round trips
per query on PostgreSQL, each blocking the event loop for its whole round trip (the ledger driver is
synchronous): at hundreds of queries a second a worker spent most of its time waiting on them, and
the database most of its CPU committing them. Gathered for `gap` seconds (`WRITE_GAP`, 0.1 s, or a fifth
of the poll interval), they leave as one pipelined transaction (`Ledger.execute_batch`); on SQLite at the
default 20 queries/s that halves the commits. An answer that ends a task is never held back here.

Only soft writes come here (`durable=False`): what the watcher re-derives by itself. A batch that
cannot be written (the ledger is away) loses nothing that matters: the tasks' claims stay, their
leases run out, and they are asked again. The steps that wrote wait for their batch before they say
the task changed (`notify`), so whoever reads the ledger then sees the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from server.errors import LedgerUnavailable
from server.store.database import Statement
from server.store.ledger import Ledger

logger = logging.getLogger(__name__)


class WriteBehind:
    """Statements queued by the watcher's steps, written together by `run` every `gap` seconds at most."""

    def __init__(self, ledger: Ledger, gap: float) -> None:
        self._ledger = ledger
        self._gap = gap
        self._pending: list[Statement] = []
        self._keys: set[str] = set()
        self._repeated = False  # a key came twice into the batch now gathering
        self._written = anyio.Event()  # set once the batch now gathering has been written (or given up)
        self._wake = anyio.Event()
        self.batches = 0  # written so far (tests and benches read it)
        self.failed = 0

    def add(self, statements: Sequence[Statement], key: str) -> anyio.Event:
        """Queue `statements` (the writes of the row or rows `key` names: a task's answer and filing);
        the event is set once they are written (or their batch failed)."""
        self._repeated = self._repeated or key in self._keys
        self._keys.add(key)
        self._pending.extend(statements)
        self._wake.set()
        return self._written

    async def run(self) -> None:
        """Until cancelled: wait for statements, gather for `gap`, write them in one batch."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await anyio.sleep(self._gap)
            self.flush()

    def flush(self) -> None:
        """Write what is pending now (also at shutdown, so a clean stop leaves its answers behind)."""
        batch, self._pending = self._pending, []
        written, self._written = self._written, anyio.Event()
        if not self._repeated:
            # Each key's rows are written once in this batch, so the order between keys is free: the same
            # statements together (a stable sort), which the database driver sends as one `executemany`.
            order = {sql: index for index, (sql, _) in reversed(list(enumerate(batch)))}
            batch.sort(key=lambda statement: order[statement[0]])
        self._keys, self._repeated = set(), False
        try:
            if batch:
                self._ledger.execute_batch(batch, durable=False)
                self.batches += 1
        except LedgerUnavailable:
            self.failed += 1  # the tick says the ledger is away, once per outage
        except Exception:  # a locked or damaged ledger: these tasks' leases bring them back
            self.failed += 1
            logger.warning("watcher: %d write(s) after queries were not recorded", len(batch), exc_info=True)
        finally:
            written.set()
