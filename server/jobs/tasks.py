"""Answering `task_status`: from the ledger, waiting on the background watcher when asked to.

The watcher (`server.jobs.watcher`) owns every upstream query and download. A waiter never queries
upstream itself: it waits for the watcher's next change of that task, and any number of waiters
share each query. A finished task answers from the ledger, so it keeps working after the 24 h
expiry of task ids.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from server.config import Settings
from server.errors import TaskNotFoundError
from server.jobs.watcher import UNKNOWN_MESSAGE, Watcher, settled
from server.pricing import actual_cost
from server.results import TaskStatus
from server.store.ledger import LOCAL_STATUSES, Ledger, TaskRecord
from server.store.spend import estimate_of

Progress = Callable[[float, float, str], Awaitable[None]]

__all__ = ["UNKNOWN_MESSAGE", "Progress", "TaskTracker"]

PROGRESS_EVERY = 5.0
# `task_status(wait_seconds=0)` on a task the ledger knows: fresh news if it can be had this soon,
# else the ledger's answer at once (a query may be queued behind the rate limit).
FRESH_BOUND = 1.0


class TaskTracker:
    def __init__(self, settings: Settings, ledger: Ledger, watcher: Watcher) -> None:
        self._settings = settings
        self._ledger = ledger
        self._watcher = watcher

    async def status(self, task_id: str, wait_seconds: float = 0, progress: Progress | None = None) -> TaskStatus:
        """The task now, or when it settles (video on disk) within `wait_seconds`."""
        started = time.monotonic()
        record = self._ledger.get_task(task_id)
        if record is None:
            # A task this ledger never saw is adopted by one query.
            await self._watcher.refresh(task_id)
            record = self._require(task_id)
        elif not settled(record) and wait_seconds <= 0:
            # Fresh news, shared with every other caller and at most one query per poll interval.
            with anyio.move_on_after(FRESH_BOUND):
                await self._watcher.refresh(task_id)
            record = self._require(task_id)
        while not settled(record):
            remaining = wait_seconds - (time.monotonic() - started)
            if remaining <= 0:
                break
            if progress is not None:
                done, total, note = self._progress(record, time.monotonic() - started, float(wait_seconds))
                await progress(done, total, note)
            await self._watcher.wait_change(
                record.task_id, min(remaining, max(self._settings.poll_interval, PROGRESS_EVERY))
            )
            record = self._require(task_id)
        return self.to_result(record, asked=task_id)

    def _progress(self, record: TaskRecord, waited: float, wait_seconds: float) -> tuple[float, float, str]:
        """A real fraction where the task has an expected end (elapsed / expected), else the time waited."""
        entry = self._watcher.queue.get(record.task_id)
        if entry is not None and entry.expected_end is not None and entry.expected_end > record.created_at:
            now = time.time()
            total = entry.expected_end - record.created_at
            elapsed = now - record.created_at
            left = max(0.0, entry.expected_end - now)
            # Progress must increase: past the expected end it creeps towards the total instead.
            done = min(elapsed, total * (1 - 0.05 / (1 + max(0.0, elapsed - total))))
            return done, total, f"{record.status}: about {left:.0f}s left (expected end {_iso(entry.expected_end)})"
        return waited, wait_seconds, f"{record.status}: waited {waited:.0f}s"

    def _require(self, task_id: str) -> TaskRecord:
        record = self._ledger.get_task(task_id)
        if record is None:  # pragma: no cover - the watcher adopts or raises first
            raise TaskNotFoundError(f"Task {task_id} is not in this server's ledger and {UNKNOWN_MESSAGE}")
        return record

    def to_result(self, record: TaskRecord, asked: str | None = None) -> TaskStatus:
        """`asked` is the id the caller used: a submit's local id is shown only to whoever knows it."""
        query_error, download_error = self._watcher.errors(record.task_id)
        open_task = not record.finished and record.status not in LOCAL_STATUSES
        entry = self._watcher.queue.get(record.task_id) if open_task else None
        eta_end = entry.expected_end if entry is not None else None
        # The video is saved in the evidence folder: that folder is said once, as video_path's parent.
        video_in_evidence = bool(
            record.video_path and record.evidence_dir and Path(record.video_path).parent == Path(record.evidence_dir)
        )
        return TaskStatus(
            sandbox=self._settings.sandbox,
            task_id=record.task_id,
            task_status=record.status,
            finished=record.finished,
            model=record.model,
            submit_time=record.submit_time,
            scheduled_time=record.scheduled_time,
            end_time=record.end_time,
            video_url=record.video_url,
            video_path=record.video_path,
            video_sha256=record.video_sha256,
            video_bytes=record.video_bytes,
            usage=record.usage,
            code=record.code,
            message=record.message,
            download_error=download_error if not settled(record) else None,
            last_error=query_error if not settled(record) else None,
            queue_ahead=self._watcher.queue.position(record.model, record.created_at) if open_task else None,
            eta_seconds=round(max(0.0, eta_end - time.time()), 1) if eta_end is not None else None,
            expected_end=_iso(eta_end) if eta_end is not None else None,
            eta_basis=entry.basis if entry is not None and eta_end is not None else None,
            local_id=record.local_id if asked == record.local_id and record.local_id != record.task_id else None,
            evidence_dir=None if video_in_evidence else record.evidence_dir,
            # Costs belong to every answer about a task (task_status and task_cancel alike).
            actual_cost_cny=actual_cost(self._settings.prices, record.family, record.usage),
            estimated_cost_cny=estimate_of(self._ledger, record.task_id),
        )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
