"""This process as a worker of the cluster: its id, its heartbeat, and who else is alive.

Every process sharing a ledger (several HTTP workers, or Claude Desktop and Cursor on one
OUTPUT_DIR) is a worker with a random id. Claims in the due queue and the owners of submits in
flight carry that id, so another worker can tell a live claim from a dead one on any host: a worker
is dead once its heartbeat is older than the lease (`EMO_MCP_LEASE_SECONDS`). On the same host a
gone pid says so at once (the fast path a restart relies on). Owners written before worker ids
(`host:pid`) are still understood by `server.jobs.reconcile`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from server.jobs.reconcile import pid_alive
from server.store.ledger import Ledger
from server.store.workers import WorkerTable

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
# When this process began (as near as its imports): a worker row with our pid registered before it was an
# earlier process's; one registered since is another service of this very process (tests run several).
PROCESS_STARTED = time.time()


class Worker:
    """One process's identity and its view of the others' liveness."""

    def __init__(self, ledger: Ledger, lease: float) -> None:
        self.id = uuid.uuid4().hex
        self.host = HOST
        self.pid = os.getpid()
        self.lease = lease
        self.table = WorkerTable(ledger)
        self.table.beat(self.id, self.host, self.pid)  # registered before its first claim or submit

    @property
    def beat_every(self) -> float:
        """Three beats per lease: one lost beat (a busy disk, a slow transaction) is not a death."""
        return self.lease / 3.0

    def now(self) -> float:
        return self.table.clock()

    def beat(self) -> None:
        self.table.beat(self.id, self.host, self.pid)

    def is_worker_id(self, owner: str | None) -> bool:
        return bool(owner) and ":" not in str(owner)

    def dead(self, owner: str | None) -> bool:
        """Whether the worker `owner` names is gone (this worker never is; an unknown id is)."""
        if owner == self.id:
            return False
        if not owner:
            return True
        row = self.table.get(owner)
        if row is None:
            return True
        if row.host == self.host:
            if row.pid == self.pid and row.started_at < PROCESS_STARTED:
                return True  # our pid, before we started: an earlier process's
            if row.pid != self.pid and not pid_alive(row.pid):
                return True  # same host: its process is gone
        return row.heartbeat_at < self.now() - self.lease

    def stale(self) -> list[str]:
        """Workers whose heartbeat ran out (their claims are free)."""
        return [worker for worker in self.table.stale(self.lease) if worker != self.id]

    def retire(self) -> None:
        try:
            self.table.retire(self.id)
        except Exception:  # the ledger is closing or locked: the heartbeat simply runs out
            logger.debug("could not retire worker %s", self.id, exc_info=True)
