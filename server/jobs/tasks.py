"""Answering `task_status`: from the ledger, waiting on the background watcher when asked to.

The watcher (`server.jobs.watcher`) owns every upstream query and download. A waiter never queries
upstream itself: it waits for the watcher's next change of that task, and any number of waiters
share each query. A finished task answers from the ledger, so it keeps working after the 24 h
expiry of task ids.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

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


class TaskTracker:
    def __init__(self, settings: Settings, ledger: Ledger, watcher: Watcher) -> None:
        self._settings = settings
        self._ledger = ledger
        self._watcher = watcher

    async def status(self, task_id: str, wait_seconds: float = 0, progress: Progress | None = None) -> TaskStatus:
        """The task now, or when it settles (video on disk) within `wait_seconds`."""
        started = time.monotonic()
        record = self._ledger.get_task(task_id)
        if record is None or (not settled(record) and wait_seconds <= 0):
            # A task this ledger never saw is adopted by one query; an open one gets fresh news,
            # shared with every other caller and at most one query per poll interval.
            await self._watcher.refresh(task_id)
            record = self._require(task_id)
        while not settled(record):
            remaining = wait_seconds - (time.monotonic() - started)
            if remaining <= 0:
                break
            if progress is not None:
                elapsed = time.monotonic() - started
                await progress(elapsed, float(wait_seconds), f"{record.status}: waited {elapsed:.0f}s")
            await self._watcher.wait_change(
                record.task_id, min(remaining, max(self._settings.poll_interval, PROGRESS_EVERY))
            )
            record = self._require(task_id)
        return self.to_result(record, asked=task_id)

    def _require(self, task_id: str) -> TaskRecord:
        record = self._ledger.get_task(task_id)
        if record is None:  # pragma: no cover - the watcher adopts or raises first
            raise TaskNotFoundError(f"Task {task_id} is not in this server's ledger and {UNKNOWN_MESSAGE}")
        return record

    def to_result(self, record: TaskRecord, asked: str | None = None) -> TaskStatus:
        """`asked` is the id the caller used: a submit's local id is shown only to whoever knows it."""
        query_error, download_error = self._watcher.errors(record.task_id)
        open_task = not record.finished and record.status not in LOCAL_STATUSES
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
            queue_ahead=self._ledger.queue_ahead(record) if open_task else None,
            local_id=record.local_id if asked == record.local_id and record.local_id != record.task_id else None,
            evidence_dir=None if video_in_evidence else record.evidence_dir,
            # Costs belong to every answer about a task (task_status and task_cancel alike).
            actual_cost_cny=actual_cost(self._settings.prices, record.family, record.usage),
            estimated_cost_cny=estimate_of(self._ledger, record.task_id),
        )
