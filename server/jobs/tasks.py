"""Answering `task_status` from the ledger, and the background jobs that outlive a tool call.

The watcher (`server.jobs.watcher`) owns every upstream query and download. A waiter never queries
upstream itself: it waits for the watcher's next change of that task, and any number of waiters
share each query. A finished task answers from the ledger, so it keeps working after the 24 h
expiry of task ids.

A client gives up on a call after about 60 s, or cancels it; DashScope may take longer (read
timeouts, 429 retries, a long `Retry-After`). So work that must not be cut off half-way (a submit
and its bookkeeping, a task query, a detection) runs as a `Job` in `Background`, and the call waits
for it only as long as its bound allows: the job finishes and records its outcome either way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from server.config import Settings
from server.errors import EmoMcpError, TaskNotFoundError, UpstreamUnavailableError
from server.jobs.task_views import VideoLinks
from server.jobs.watcher import UNKNOWN_MESSAGE, Watcher, settled, unknown_task
from server.pricing import actual_cost
from server.results import TaskStatus
from server.store.ledger import LOCAL_STATUSES, Ledger, TaskRecord
from server.store.spend import estimate_of

logger = logging.getLogger(__name__)

Progress = Callable[[float, float, str], Awaitable[None]]
T = TypeVar("T")

__all__ = ["UNKNOWN_MESSAGE", "Background", "Job", "Progress", "TaskTracker"]

PROGRESS_EVERY = 5.0
# `task_status(wait_seconds=0)` on a task the ledger knows: fresh news if it can be had this soon,
# else the ledger's answer at once (a query may be queued behind the rate limit); the query goes on.
FRESH_BOUND = 1.0


class Job(Generic[T]):
    """One piece of background work and its outcome, for whoever waits on it (any number of callers)."""

    def __init__(self, work: Callable[[], Awaitable[T]] | None = None) -> None:
        # Set only when no background host runs the job: then its first waiter does.
        self._work = work
        self._done = anyio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self.finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, seconds: float | None = None) -> bool:
        """True once the job has finished; False when `seconds` passed first (the job goes on)."""
        work, self._work = self._work, None
        if work is not None:  # no background host: the waiter carries the work itself
            await self._run(work)
        with anyio.move_on_after(math.inf if seconds is None else max(0.0, seconds)):
            await self._done.wait()
        return self._done.is_set()

    def result(self) -> T:
        """The job's value, or its exception re-raised (only once it is done)."""
        assert self.done
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    async def _run(self, work: Callable[[], Awaitable[T]]) -> None:
        try:
            self._value = await work()
        except anyio.get_cancelled_exc_class():
            self._error = EmoMcpError("The server stopped before this work finished; call again.")
            raise
        except Exception as exc:  # handed to whoever waits (re-raised there); logged if nobody does
            self._error = exc
            if not isinstance(exc, EmoMcpError):
                logger.exception("background job failed")
        finally:
            self.finished_at = time.monotonic()
            self._done.set()


class Background:
    """The task group of a service's lifetime, where jobs finish even after their caller has gone."""

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None

    @asynccontextmanager
    async def hosting(self) -> AsyncIterator[None]:
        """Jobs started inside run here; leaving (the service closing) cancels the unfinished ones."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    def start(self, work: Callable[[], Awaitable[T]]) -> Job[T]:
        """Start `work` now; no checkpoint here, so a caller cancelled right after still has its job.

        Without a host (a service used outside `runtime.open_service`), the first waiter runs it.
        """
        if self._tg is None:
            return Job(work)
        job: Job[T] = Job()
        self._tg.start_soon(job._run, work)
        return job


class Deadline:
    """The bound of one call, fixed when it starts; no bound (`None`) for a caller that waits as long as it takes."""

    def __init__(self, seconds: float | None = None) -> None:
        self.bound = seconds
        self._end = math.inf if seconds is None else time.monotonic() + max(0.0, seconds)

    def left(self) -> float | None:
        return None if self.bound is None else max(0.0, self._end - time.monotonic())

    def scope(self) -> anyio.CancelScope:
        """A cancel scope that ends at the deadline (check `cancelled_caught` after it)."""
        return anyio.move_on_after(math.inf if self.bound is None else self._end - time.monotonic())

    def said(self) -> str:
        return "the time allowed" if self.bound is None else f"{round(self.bound, 1):g} s"


class TaskTracker:
    def __init__(self, settings: Settings, ledger: Ledger, watcher: Watcher, background: Background) -> None:
        self._settings = settings
        self._ledger = ledger
        self._watcher = watcher
        self._background = background
        self.links = VideoLinks(settings)

    async def status(
        self,
        task_id: str,
        wait_seconds: float = 0,
        progress: Progress | None = None,
        *,
        deadline: Deadline | None = None,
        note: str | None = None,
    ) -> TaskStatus:
        """The task now, or when it settles (video on disk) within `wait_seconds`, and never after `deadline`.

        Out of time while DashScope is being asked, the answer is the ledger's view with a note; the
        query goes on in the background and is recorded for the next call.
        """
        deadline = deadline or Deadline()
        started = time.monotonic()
        asking = False
        with deadline.scope() as scope:
            record = self._ledger.get_task(task_id)
            if record is None and self._settings.tenant is not None:
                # A tenant knows only the tasks it submitted here: an id it never saw may be another
                # tenant's on the same key, so it is never asked about (nor adopted) but answered as unknown.
                raise unknown_task(task_id)
            if record is not None and settled(record) and not self._watcher.verify(record):
                record = self._require(task_id)  # its video was missing or damaged: downloaded again
            if record is None or (not settled(record) and wait_seconds <= 0):
                # A task this ledger never saw is adopted by one query; an open one gets fresh news,
                # shared with every other caller and at most one query per poll interval.
                asking = True
                refresh = self._background.start(lambda: self._watcher.refresh(task_id))
                if record is None or record.status in LOCAL_STATUSES:
                    await refresh.wait()
                    refresh.result()
                else:
                    # No note: the ledger's view is as fresh as the last answer, and `last_error` is kept
                    # for what went wrong (a query that is only waiting its turn has not).
                    with anyio.move_on_after(FRESH_BOUND):
                        await refresh.wait()
                asking = False
                record = self._require(task_id)
            left = deadline.left()
            total = float(wait_seconds if left is None else min(wait_seconds, left))
            while not settled(record):
                remaining = wait_seconds - (time.monotonic() - started)
                if remaining <= 0:
                    break
                if progress is not None:
                    await progress(*self._progress(record, time.monotonic() - started, total))
                await self._watcher.wait_change(
                    record.task_id, min(remaining, max(self._settings.poll_interval, PROGRESS_EVERY))
                )
                record = self._require(task_id)
        found = self._ledger.get_task(task_id)
        if found is None:  # out of time before the first answer about an id this ledger never saw
            raise UpstreamUnavailableError(
                f"DashScope did not answer within {deadline.said()} about task {task_id}, which this server "
                "has not seen before. The query goes on in the background; call task_status again."
            )
        if scope.cancelled_caught and asking and not settled(found):
            note = _joined(
                note,
                f"DashScope did not answer within {deadline.said()}: this is the ledger's view from its last "
                "answer. The server keeps asking in the background; call task_status again.",
            )
        return self.to_result(found, asked=task_id, note=note)

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

    def to_result(self, record: TaskRecord, asked: str | None = None, note: str | None = None) -> TaskStatus:
        """`asked` is the id the caller used: a submit's local id is shown only to whoever knows it.

        `note` says why the answer may lag behind DashScope (it rides in `last_error`)."""
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
            video_link=self.links.of(record),
            video_sha256=record.video_sha256,
            video_bytes=record.video_bytes,
            usage=record.usage,
            code=record.code,
            message=record.message,
            download_error=download_error if not settled(record) else None,
            last_error=_joined(note, query_error if not settled(record) else None),
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


def _joined(*parts: str | None) -> str | None:
    return " ".join(part for part in parts if part) or None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
