"""The one background loop that owns every upstream task query of this server process.

Why: agents forget to poll, clients give up after ~60 s, processes crash, and a result URL
expires 24 h after the task ends. So the watcher, not the agent, follows each open task in the
ledger, downloads a video the moment its task succeeds (whether or not anyone asks), and records
failures. `task_status` callers only wait on the watcher's state; a caller that wants fresh news
(`wait_seconds=0`) shares the one query in flight, and gets no new query at all if the task was
queried less than one interval ago.

Work is found through the due queue (`server/store/queue.py`), never by scanning the ledger: a
tick claims the tasks that are due (as many as the query rate allows), sleeps until the next due
time, and each finished step files its task's next due time from its schedule
(`server/jobs/schedule.py`). Start-up answers the MCP handshake first; recovery then runs in the
background, in bounded steps: unanswered submits of dead processes are reconciled, stale `.part`
files of tasks awaiting a download are removed, and recent videos missing on disk are fetched again.

No one task's trouble stops it: whatever a step raises (the upstream, a parser, the disk, a bug) is
recorded on that task (`last_error` / `download_error`) and the step is retried with a growing
delay, while every other task goes on. An answer is believed only when it reads as one: a body
without a known `task_status` is "not known yet", and an answer that would end a task without its
video (SUCCEEDED with no URL, UNKNOWN for a task this ledger follows) is asked again a few times
before it is recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from server.config import Settings
from server.errors import (
    EmoMcpError,
    LedgerUnavailable,
    StorageError,
    TaskNotFoundError,
    UnreadableAnswerError,
    UpstreamError,
    as_task_error,
)
from server.jobs.changes import ChangeFeed, change_feed
from server.jobs.reconcile import HOST, Reconciler, legacy_owner_dead, pid_alive
from server.jobs.schedule import (
    AHEAD_COUNTED,
    Eta,
    estimate,
    keep_cadence,
    learned_rate,
    next_query,
    parse_beijing,
)
from server.jobs.workers import Worker
from server.jobs.writes import WriteBehind
from server.media.sources import file_sha256
from server.models import Family, template_max_seconds
from server.store.database import Statement
from server.store.evidence import Evidence
from server.store.leases import Leases
from server.store.ledger import LOCAL_STATUSES, TERMINAL_STATUSES, VIDEO_EXPIRED, Ledger, TaskRecord
from server.store.queue import DOWNLOAD, QUERY, Context, DueQueue, Rate
from server.upstream.answers import snippet
from server.upstream.client import DashScopeClient

logger = logging.getLogger(__name__)

UNKNOWN_MESSAGE = (
    "DashScope does not know this task: the id is wrong, or the task ended more than 24 hours ago "
    "(task ids expire then)."
)


def unknown_task(task_id: str) -> TaskNotFoundError:
    """The answer about an id that names no task of the caller's: the same words whether DashScope said
    so or (tenant mode) the id is only another tenant's, which is never asked about."""
    return TaskNotFoundError(
        f"Task {task_id} is not in this server's ledger and {UNKNOWN_MESSAGE} "
        "Use the task_id returned by emo_generate or emoji_generate.",
        task_id,
    )


EXPIRED_MESSAGE = (
    "The task SUCCEEDED (and was billed) but its video URL no longer works ({why}); result URLs expire "
    "24 hours after the task ends, so the video could not be saved."
)
NO_URL_MESSAGE = (
    "DashScope reported this task SUCCEEDED (so it was billed) in {n} answers but never gave its video URL, "
    "so the video could not be saved. Keep the task id and request ids for Alibaba Cloud support."
)
DOWNLOAD_BACKOFF_CAP = 300.0
# Recent enough that a missing video can still be fetched again (result URLs live 24 h).
RECOVER_WINDOW = 26 * 3600.0
# Seconds after start before recovery checks the saved videos (a day's worth of stats).
RECOVER_DELAY = 1.0
RECOVER_BATCH = 200
# Output seconds assumed for an EMO task whose audio length is unknown, until tasks have finished.
DEFAULT_OUTPUT_SECONDS = 10.0
QUERY_BACKOFF_CAP = 300.0
# Statuses a task answer may carry (the SDK also knows SUSPENDED); any other value is not believed.
KNOWN_STATUSES = frozenset({"PENDING", "RUNNING", "SUSPENDED", "SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})
# An answer that would end a task without its video is believed only after this many in a row.
DOUBTFUL_ANSWERS = 3
# Ticks (a claim and two reads of the due queue) come at most this often (or a tenth of the poll interval,
# if shorter): every finished step wakes the loop, and with many steps in flight the finished ones of
# those milliseconds share one tick instead of each paying its own.
TICK_GAP = 0.05
# A tick's steps' answers and next due times wait at most this long to be written together (a step that
# ends a task writes at once): at the default limit of 20 queries/s a batch holds two queries, not one.
WRITE_GAP = 0.1
# A tick that claimed at least this many tasks claims again at the next tick without reading first.
BUSY_CLAIM = 4
# At most this long between two reads of the due queue's earliest due time (see `Watcher._known_next`).
DUE_RECHECK = 0.25


def _video_url(output: dict[str, Any]) -> str | None:
    """emo-v1 puts it in output.results.video_url, emoji-v1 directly in output.video_url."""
    results = output.get("results")
    if isinstance(results, dict) and isinstance(results.get("video_url"), str):
        return str(results["video_url"])
    url = output.get("video_url")
    return url if isinstance(url, str) else None


def _infer_family(body: dict[str, Any]) -> Family:
    """For a task another process submitted before the ledger knew it."""
    output = body.get("output") or {}
    usage = body.get("usage") or {}
    if isinstance(output.get("results"), dict) or usage.get("video_ratio") in {"1:1", "3:4"}:
        return "emo"
    return "emoji"


def video_destination(record: TaskRecord) -> Path:
    return Path(record.evidence_dir) / f"{Path(record.evidence_dir).name}.mp4"


def needs_download(record: TaskRecord) -> bool:
    return (
        record.status == "SUCCEEDED"
        and record.code != VIDEO_EXPIRED
        and not (record.video_path and Path(record.video_path).is_file())
    )


def settled(record: TaskRecord) -> bool:
    """Nothing more will happen to this task: finished, and its video saved (or known lost)."""
    return record.finished and not needs_download(record)


@dataclass(frozen=True)
class _Prefetched:
    """A tick's step's row and queue context, read with the rest of its batch (None: not found then)."""

    record: TaskRecord | None
    context: Context | None
    due_at: float | None = None  # the due time it was claimed at (epoch seconds)


@dataclass
class _State:
    """What the watcher knows about one task beyond the ledger (in memory, per process)."""

    inflight: anyio.Event | None = None
    last_query: float = -math.inf
    error: EmoMcpError | None = None
    query_failures: int = 0
    retry_at: float = 0.0  # epoch seconds: after a failed query, when to ask again (backed off)
    doubts: int = 0  # answers in a row that would end the task without its video
    download_error: str | None = None
    download_failures: int = 0
    next_download: float = 0.0  # epoch seconds
    changed: anyio.Event = field(default_factory=anyio.Event)


class Watcher:
    def __init__(
        self,
        settings: Settings,
        client: DashScopeClient,
        ledger: Ledger,
        evidence: Evidence,
        *,
        recover: bool = True,
    ) -> None:
        self._settings = settings
        self._client = client
        self._ledger = ledger
        self._evidence = evidence
        self.interval = settings.poll_interval
        self._recover_on_start = recover
        self._states: dict[str, _State] = {}
        self._inflight: set[str] = set()
        # Steps in flight at once: what the query limit can serve in about a second (more would only
        # queue inside the limiter, in front of a caller's fresh query).
        self._budget = max(2, math.ceil(settings.max_query_qps))
        # Claims wait until this many slots are free: a quarter of the budget is a quarter of a second of
        # queries at the limit, so a due task waits at most that long, and a saturated watcher claims
        # (a write) a few times per second instead of once per query.
        self._refill = max(1, self._budget // 4)
        self._tick_gap = min(TICK_GAP, self.interval / 10)
        # The due queue's earliest due time as last read, lowered since by this worker's own filings
        # (`_filed`): a tick with nothing due before it reads nothing. Read again at least every
        # `_recheck` s for what other workers filed and did not claim themselves (one that died since).
        self._known_next: float | None = None
        self._known_at = -math.inf
        self._recheck = min(self.interval / 2, DUE_RECHECK)
        self._last_tick = -math.inf
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self.queue = DueQueue(ledger)
        self._rates: dict[str, Rate] = {}
        # A claimed task is not handed out again for a lease (`EMO_MCP_LEASE_SECONDS`): its step files a
        # due time sooner, and the heartbeat renews the claims of steps still in flight.
        self.lease = settings.lease_seconds
        self.worker = Worker(ledger, self.lease)
        self._owner = self.worker.id
        self.leases = Leases(ledger)
        # Tasks this worker has a step in flight for (ticks and callers' fresh queries alike).
        self._held: set[str] = set()
        self.changes: ChangeFeed = change_feed(ledger)
        # The answers and next due times of the steps the ticks start, written a tick's worth at a time.
        self.writes = WriteBehind(ledger, min(WRITE_GAP, self.interval / 5))
        self._started = time.time()
        self._ledger_lost = False  # the last tick found the ledger database unreachable
        self.reconciler = Reconciler(
            settings, client, ledger, evidence, self._reconciled, self._owner_dead, self._may_reconcile
        )
        client.metrics.leases_held(lambda: len(self._held))
        self.queue.on_takeover = client.metrics.leases_taken_over

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow every open task until cancelled; recovery runs beside it, after the handshake."""
        if not self._settings.api_key:
            task_status.started()  # nothing can be queried without a key
            return
        try:
            self.queue.fill_once(self._now())
            # Steps a killed process had in flight are due now, not when their lease runs out.
            dead = [task_id for task_id, owner in self.queue.claims() if self._claimer_dead(owner)]
            self.queue.release(dead, self._now())
            self._known_at = -math.inf
            self._client.metrics.leases_taken_over(len(dead))
        except Exception:  # a damaged ledger must not keep the server from starting
            logger.exception("watcher: could not prepare the due queue; following it as it is")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                tg.start_soon(self._heartbeat)
                tg.start_soon(self.changes.run)
                tg.start_soon(self.writes.run)
                if self._recover_on_start:
                    tg.start_soon(self._recover_in_background)
                while True:
                    try:
                        delay = self._tick(tg)
                        self._ledger_lost = False
                    except LedgerUnavailable as exc:
                        # Cut off: nothing is claimed or queried (the others take the tasks over once the
                        # claims' leases run out); said once per outage, not every interval.
                        if not self._ledger_lost:
                            logger.warning("watcher: no task is followed while the ledger is unreachable: %s", exc)
                        self._ledger_lost = True
                        delay = self.interval
                    except Exception:  # a locked or damaged ledger: this round is skipped, not the server
                        logger.exception("watcher: could not read the ledger; trying again in %.2fs", self.interval)
                        delay = self.interval
                    with anyio.move_on_after(delay):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    gathering = self._last_tick + self._tick_gap - time.monotonic()
                    if gathering > 0:
                        await anyio.sleep(gathering)
        finally:
            self.writes.flush()
            # A clean stop hands this worker's claims to the others at once (a kill waits for the lease).
            try:
                self.leases.release_workers([self._owner], self._now())
                self.leases.drop(self._owner)
            except Exception:  # the ledger is going away too: the lease runs out instead
                logger.debug("could not release this worker's claims", exc_info=True)
            self.worker.retire()

    async def _heartbeat(self) -> None:
        """Every lease/3: this worker is alive, its steps in flight keep their claims, and the claims of
        workers whose heartbeat ran out are released (due at once, for whoever claims next)."""
        while True:
            await anyio.sleep(self.worker.beat_every)
            try:
                self.worker.beat()
                now = self._now()
                self.leases.renew(self._owner, sorted(self._held), now + self.lease)
                stale = self.worker.stale()
                released = self.leases.release_workers(stale, now) if stale else []
                if released:
                    self._filed(now)
                    logger.info("watcher: %d claim(s) of %d stopped worker(s) released", len(released), len(stale))
                    self._client.metrics.leases_taken_over(len(released))
                    self._wake.set()
            except LedgerUnavailable:  # said by the tick; the heartbeat runs out, as it should
                pass
            except Exception:  # a locked ledger: the next beat tries again (three per lease)
                logger.warning("watcher: heartbeat could not be recorded", exc_info=True)

    def _now(self) -> float:
        """The cluster's time for the due queue and its leases: the ledger's clock (PostgreSQL: the
        database server's, so workers on hosts with skewed clocks agree on when a lease ends)."""
        return self._ledger.clock()

    def _claimer_dead(self, owner: str) -> bool:
        """At start: a claim of a dead worker (or of a dead `host:pid` process of an older version)."""
        return self.worker.dead(owner) if self.worker.is_worker_id(owner) else _claimer_dead(owner)

    def _may_reconcile(self) -> bool:
        """One worker's pass at a time: the lease is kept by whoever runs the passes while it lives."""
        now = self._now()
        if self.leases.hold("reconcile", self._owner, now, self.lease):
            return True
        holder = self.leases.holder_of("reconcile")
        # A killed holder on this host is known dead at once (a restart reconciles its own lost submits).
        return (
            holder is not None
            and self._claimer_dead(holder)
            and self.leases.take_over("reconcile", holder, self._owner, now, self.lease)
        )

    def _owner_dead(self, owner: str | None, created_at: float) -> bool:
        """A SUBMITTING row's owner: a worker id is judged by its heartbeat, a `host:pid` by its pid."""
        if self.worker.is_worker_id(owner):
            return self.worker.dead(owner)
        return legacy_owner_dead(owner, created_at, self._started)

    async def _recover_in_background(self) -> None:
        try:
            # Recovery yields between bounded batches, so the handshake and calls are never held up.
            await anyio.lowlevel.checkpoint()
            await self.recover()
        except Exception:  # a damaged folder or ledger: the server goes on; the next start tries again
            logger.exception("recovery after restart stopped early; following the ledger's tasks anyway")

    async def recover(self) -> None:
        """Make the ledger and the disk agree after a crash, in bounded batches through indexes."""
        self.reconciler.mark_dead_submits()
        self._wake.set()
        removed = 0
        task_ids = self.queue.task_ids()
        for start in range(0, len(task_ids), RECOVER_BATCH):
            removed += self._remove_stale_parts(task_ids[start : start + RECOVER_BATCH])
            await anyio.lowlevel.checkpoint()
        checked = 0
        # The videos' check reads a day's worth of history (a stat each): it waits out the start-up, when
        # a client's handshake and first calls come, and those never queue behind it.
        await anyio.sleep(RECOVER_DELAY)
        for batch in self._ledger.recent_videos(time.time() - RECOVER_WINDOW, RECOVER_BATCH):
            for record in batch:
                self._verify_video(record)
            checked += len(batch)
            await anyio.lowlevel.checkpoint()  # between batches, calls and polls go first
        logger.info("watcher recovered: %d stale partial download(s) removed, %d video(s) checked", removed, checked)

    def _remove_stale_parts(self, task_ids: list[str]) -> int:
        """Partial downloads of dead processes, looked for only in the folders of open tasks (a finished
        download renames its file, so only a task still in the queue can have one)."""
        removed = 0
        for task_id in task_ids:
            record = self._ledger.get_task(task_id)
            if record is None:
                continue
            for part in Path(record.evidence_dir).glob("*.part"):
                owner = part.suffixes[-2].lstrip(".") if len(part.suffixes) >= 2 else ""
                mine = owner == str(os.getpid())
                # Ours only if left by an earlier process with our pid: recovery runs beside our own
                # downloads, whose files are younger than this process.
                try:
                    if mine and part.stat().st_mtime >= self._started:
                        continue
                except FileNotFoundError:  # finished (renamed) meanwhile
                    continue
                if not owner.isdigit() or mine or not pid_alive(int(owner)):
                    part.unlink(missing_ok=True)
                    removed += 1
        return removed

    def verify(self, record: TaskRecord) -> bool:
        """A caller is about to be told this task's video is saved: check it is (one stat), before
        recovery's pass reaches it. False when it is missing or damaged (downloaded again)."""
        if record.video_path is None or record.status != "SUCCEEDED":
            return True
        path = Path(record.video_path)
        try:
            intact = record.video_bytes is None or path.stat().st_size == record.video_bytes
        except OSError:
            intact = False
        if not intact:
            self._verify_video(record)
        return intact

    def _verify_video(self, record: TaskRecord) -> None:
        if not record.video_path:
            return
        path = Path(record.video_path)
        if path.is_file():
            if record.video_bytes is not None and path.stat().st_size != record.video_bytes:
                logger.warning("task %s: video on disk has the wrong size; downloading again", record.task_id)
                # Kept aside, not deleted: if the URL has expired it is all there is.
                path.replace(record.video_path + ".wrong-size")
            else:
                return
        self._ledger.update_task(record.task_id, video_path=None, video_sha256=None, video_bytes=None)
        self.queue.schedule(record.task_id, record.model, record.created_at, self._now(), DOWNLOAD)
        self._filed(self._now())
        self._wake.set()

    def _tick(self, tg: TaskGroup) -> float:
        """Start the due steps the rate allows; return how long to sleep before the next one is due."""
        self._last_tick = time.monotonic()
        now = self._now()
        wake = now + self.interval
        if self.reconciler.pending():
            due = self.reconciler.next_due()
            if due <= time.monotonic():
                tg.start_soon(self._reconcile)
                due = time.monotonic() + self.interval
            wake = min(wake, now + (due - time.monotonic()))
        free = self._budget - len(self._inflight)
        if free < self._refill:
            # Nearly every slot is busy (the rate limit binds): refill in batches, not one claim (a write)
            # and two reads per finished step; a finishing step wakes this loop again (notify).
            return max(0.0, wake - self._now())
        # What falls due before the next tick may come is claimed now (ticks are `_tick_gap` apart), so a
        # busy worker claims a tick's worth at a time, and its steps start together: one claim, two reads
        # and one rate reservation for the batch. A step runs at most that early, and its next due time
        # counts from the due time it was claimed at (`_file_next`), so the cadence stays the interval.
        ahead = self._tick_gap
        upcoming = self._known_next
        if time.monotonic() - self._known_at >= self._recheck:
            upcoming = self._read_next_due()
        elif upcoming is None or upcoming > now + ahead:
            # Nothing is due yet, as far as this worker knows: no read at all (every finished step wakes
            # this loop, and its filing only lowered what is known).
            return max(0.0, min(wake, upcoming - ahead if upcoming is not None else wake) - self._now())
        # A claim is a write: made only when something is due (every finished step wakes this loop).
        due = upcoming is not None and upcoming <= now + ahead
        claimed = self.queue.claim_due(now, free, self.lease, self._owner, ahead=ahead) if due else {}
        due_now = list(claimed)
        # A caller's fresh query may be running one of them; its end files the next due time.
        starting = [task_id for task_id in due_now if self._state(task_id).inflight is None]
        records: dict[str, TaskRecord] = {}
        contexts: dict[str, Context] = {}
        if starting:
            # The rows and queue contexts of the whole batch in two reads, not two per step.
            records = self._ledger.get_tasks(starting)
            contexts = self.queue.contexts(starting, AHEAD_COUNTED)
            self._client.expect_queries(len(starting))
        for task_id in starting:
            state = self._state(task_id)
            state.inflight = anyio.Event()
            self._inflight.add(task_id)
            prefetched = _Prefetched(records.get(task_id), contexts.get(task_id), claimed[task_id])
            tg.start_soon(self._step, task_id, state.inflight, prefetched)
        if len(self._inflight) < self._budget:
            if len(claimed) >= BUSY_CLAIM:
                # A busy queue: more falls due before the next tick, most likely. Claimed then without
                # reading the earliest due time first (a claim that finds nothing costs what that read
                # costs, and one that finds a batch saves it).
                self._known_next = upcoming = now + ahead
            elif due:
                upcoming = self._read_next_due()
            if upcoming is not None:
                wake = min(wake, upcoming - ahead)
        # With every slot busy, a finishing step wakes the loop (notify), so no busy wait.
        return max(0.0, wake - self._now())

    def _read_next_due(self) -> float | None:
        self._known_next = self.queue.next_due()
        self._known_at = time.monotonic()
        return self._known_next

    def _filed(self, due_at: float) -> None:
        """This worker filed a due time: what it knows of the queue's earliest one can only come sooner."""
        if self._known_next is None or due_at < self._known_next:
            self._known_next = due_at

    def watch(self, task_id: str, expected_seconds: float | None = None) -> None:
        """A task was just submitted or adopted: look at it now."""
        record = self._ledger.get_task(task_id)
        if record is not None and record.status not in LOCAL_STATUSES and not settled(record):
            self.queue.schedule(record.task_id, record.model, record.created_at, self._now())
            self._filed(self._now())
        self._wake.set()

    def expect(self, task_id: str, seconds: float | None) -> None:
        """The output length a submitted task is expected to have (its audio, its template)."""
        self.queue.expect(task_id, seconds)

    def _reconciled(self, *task_ids: str) -> None:
        """The reconciler found (or gave up on) an unanswered submit: queue what is now a real task."""
        for task_id in task_ids:
            self.watch(task_id)
        self.notify(*task_ids)

    def notify(self, *task_ids: str) -> None:
        """Wake everyone waiting on these tasks (and the loop: work may be due)."""
        for task_id in task_ids:
            state = self._states.get(task_id)
            if state is not None:
                state.changed.set()
                state.changed = anyio.Event()
        self._wake.set()

    # ------------------------------------------------------------------ for task_status

    async def refresh(self, task_id: str) -> None:
        """Fresh news for one caller: share the query in flight, or make one if the last is old enough."""
        record = self._ledger.get_task(task_id)
        if record is not None and record.status in LOCAL_STATUSES:
            await self._reconcile()
            return
        if record is not None:
            # A local `submit-...` id finds its task once reconciled: work on the real id from here on.
            task_id = record.task_id
        state = self._state(task_id)
        if state.inflight is not None:
            await state.inflight.wait()
        elif record is None or time.monotonic() - state.last_query >= self.interval or needs_download(record):
            # The task's lease first: a step another live worker has in flight is not run twice here;
            # its answer reaches this caller through the ledger.
            if record is not None and self.leases.take(task_id, self._owner, self._now(), self.lease) == "held":
                await self.wait_change(task_id, self.lease)
                return
            state.inflight = anyio.Event()
            await self._step(task_id, state.inflight)
        # A known task's query error is reported in its result (`last_error`) while the watcher retries;
        # only an id nobody knows (not in the ledger, unknown upstream) is an error for the caller.
        if record is None and state.error is not None:
            raise state.error

    async def wait_change(self, task_id: str, seconds: float) -> None:
        """Until this process changes the task (its own event, at once) or any worker does (the change
        feed, within about half a second), or `seconds` pass."""
        changed = self._state(task_id).changed
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:

                async def first(waiting: Callable[[], Awaitable[object]]) -> None:
                    await waiting()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, changed.wait)
                tg.start_soon(first, lambda: self.changes.wait(task_id, seconds))

    def errors(self, task_id: str) -> tuple[str | None, str | None]:
        """(last query error, last download error) of a task, for its status answer."""
        state = self._states.get(task_id)
        error = state.error if state is not None else None
        error = error or self.reconciler.errors.get(task_id)
        return (str(error) if error else None), (state.download_error if state is not None else None)

    # ------------------------------------------------------------------ the work

    def _state(self, task_id: str) -> _State:
        state = self._states.get(task_id)
        if state is None:
            state = self._states[task_id] = _State()
        return state

    async def _reconcile(self) -> None:
        try:
            await self.reconciler.run_once()
        except Exception:  # the ledger, the disk or a bug: unanswered submits stay unknown, retried later
            logger.exception("reconciling unanswered submits failed")
            self.reconciler.failed()

    async def _step(self, task_id: str, done: anyio.Event, prefetched: _Prefetched | None = None) -> None:
        """Query the task if it is not finished, then download its video if it succeeded.

        `prefetched` (a tick's step): its row and queue context, read with the rest of its batch; its
        answer and next due time are then written with the batch's (`self.writes`), and the step ends
        once they are. Without it (a caller's fresh query) everything is read and written at once."""
        state = self._state(task_id)
        self._held.add(task_id)
        # The row as this step leaves it, so filing the next due time need not read it again; None
        # after any failure (then it is read afresh).
        latest: TaskRecord | None = None
        later: list[Statement] | None = [] if prefetched is not None else None
        try:
            record = prefetched.record if prefetched is not None else None
            record = record or self._ledger.get_task(task_id)
            if record is None or not record.finished or (record.status == "SUCCEEDED" and not record.video_url):
                # The schedule counts from when a query starts, so one lands every interval, not every
                # interval plus a round trip; "starts" is when the limiter lets it go (`_poll` moves it
                # there): a step that waited its turn must not file its next query that much earlier.
                began = time.monotonic()
                state.last_query = began
                try:
                    record = await self._poll(task_id, record, state, later)
                except Exception as exc:  # this task's trouble (upstream, parser, disk, bug), never the server's
                    self._query_failed(task_id, state, began, exc)
                    return
                state.error = None
                state.query_failures = 0
            if needs_download(record) and record.video_url:
                try:
                    await self._download(record, state)
                except Exception as exc:  # a full disk, a locked ledger, a bug: back off and retry
                    self._download_failed(record, state, _as_error(exc, "Could not save the video"))
            else:
                latest = record
        except Exception as exc:  # reading the ledger itself failed: retried at the next due time
            self._query_failed(task_id, state, time.monotonic(), exc)
        finally:
            try:
                context = prefetched.context if prefetched is not None and latest is not None else None
                was_due = prefetched.due_at if prefetched is not None else None
                self._file_next(task_id, state, latest, context, later, was_due)
            except (OSError, sqlite3.Error, StorageError) as exc:  # the lease brings it back if unwritten
                logger.warning("task %s: could not schedule its next query: %s", task_id, exc)
            try:
                if later:
                    await self.writes.add(later, task_id).wait()
            finally:
                state.inflight = None
                self._inflight.discard(task_id)
                self._held.discard(task_id)
                done.set()
                self.notify(task_id)

    def _file_next(
        self,
        task_id: str,
        state: _State,
        record: TaskRecord | None = None,
        context: Context | None = None,
        later: list[Statement] | None = None,
        was_due: float | None = None,
    ) -> None:
        """After a step: the task's next due time from its schedule, or out of the queue once settled.

        `context`: the task's queue context read with its batch (else read here); `later`: where a
        tick's step puts its filing for the batch write (else it is written at once); `was_due`: the
        due time a tick claimed the task at, from which the next one counts (`keep_cadence`)."""
        record = record or self._ledger.get_task(task_id)
        if record is None or record.status in LOCAL_STATUSES or settled(record):
            self.queue.remove(task_id)
            if record is not None and record.task_id != task_id:
                self.queue.remove(record.task_id)
            return
        now = self._now()
        if needs_download(record) and record.video_url:
            self.queue.file(
                record.task_id,
                record.model,
                record.created_at,
                max(now, state.next_download),
                DOWNLOAD,
                owner=self._owner,
            )
            self._filed(max(now, state.next_download))
            return
        began = state.last_query if state.last_query > -math.inf else time.monotonic()
        began_epoch = now - (time.monotonic() - began)
        if state.error is not None:  # the last query failed: ask again after its backed-off delay
            self.queue.file(
                record.task_id, record.model, record.created_at, max(now, state.retry_at), QUERY, owner=self._owner
            )
            self._filed(max(now, state.retry_at))
            return
        if context is None or context.entry.task_id != record.task_id:
            context = self.queue.context(record.task_id, AHEAD_COUNTED)
        if context is None:  # adopted or restored without a row: queue it first
            self.queue.schedule(record.task_id, record.model, record.created_at, now)
            self._filed(now)
            context = self.queue.context(record.task_id, AHEAD_COUNTED)
        eta = self._estimate(record, context) if context is not None else None
        due = next_query(
            schedule=self._settings.poll_schedule,
            began=began_epoch,
            eta=eta,
            interval=self.interval,
            max_interval=self._settings.poll_max_interval,
        )
        if was_due is not None:
            due = keep_cadence(due, began=began_epoch, was_due=was_due, now=now)
        filing = self.queue.file_statement(
            record.task_id, record.model, record.created_at, due, QUERY, eta, owner=self._owner
        )
        if later is None:
            self._ledger.execute(*filing, durable=False)
        else:
            later.append(filing)
        self._filed(due)

    def _estimate(self, record: TaskRecord, context: Context) -> Eta:
        rate, rate_basis = learned_rate(record.model, self._rate(record.model), prior=self._settings.is_beijing)
        entry = context.entry
        if entry.expected_seconds is None:
            entry = dataclasses.replace(entry, expected_seconds=self._assumed_seconds(record.model))
        ahead_end = None
        if context.ahead_id is not None:
            ahead_end = context.ahead_end
            if ahead_end is None and rate is not None:
                seconds = context.ahead_seconds or self._assumed_seconds(entry.model)  # one model's queue
                ahead_end = (context.ahead_start or self._now()) + seconds * rate
        scheduled = parse_beijing(record.scheduled_time) if record.status == "RUNNING" else None
        return estimate(
            entry,
            now=self._now(),
            status=record.status,
            scheduled=scheduled,
            ahead_end=ahead_end,
            ahead_count=context.ahead_count,
            rate=rate,
            rate_basis=rate_basis,
        )

    def _rate(self, model: str) -> Rate:
        """The model's learned sums, read once per process and kept current by `_learn`."""
        rate = self._rates.get(model)
        if rate is None:
            rate = self._rates[model] = self.queue.rate(model)
        return rate

    def _assumed_seconds(self, model: str) -> float:
        """An output length for a task whose own is unknown: the mean of finished ones, else a prior."""
        rate = self._rate(model)
        if rate.finished:
            return rate.output_seconds / rate.finished
        return float(template_max_seconds()) if model.startswith("emoji") else DEFAULT_OUTPUT_SECONDS

    def _learn(self, before: TaskRecord | None, after: TaskRecord) -> None:
        """A task just finished: its run time per output second joins its model's rate, and the task
        behind it (which starts now) is asked about soon, not at its old estimate."""
        if after.status == "SUCCEEDED" and (before is None or before.status != "SUCCEEDED"):
            start, end = parse_beijing(after.scheduled_time), parse_beijing(after.end_time)
            seconds = (after.usage or {}).get("video_duration")
            if start is not None and end is not None and isinstance(seconds, int | float) and seconds > 0:
                self.queue.learn(after.model, float(seconds), max(0.0, end - start))
                self._rates.pop(after.model, None)
        behind = self.queue.behind(after.model, after.created_at)
        if behind is not None:
            soon = self._now()  # it has just started: one query gives its real start (scheduled_time)
            # `schedule` keeps the earlier due time and leaves a claim in flight alone.
            self.queue.schedule(behind.task_id, behind.model, behind.created_at, soon, behind.stage)
            self._filed(soon)
            self._wake.set()

    def _query_failed(self, task_id: str, state: _State, began: float, exc: Exception) -> None:
        """Record the failure on the task and ask again after a delay that grows with each failure."""
        state.error = _as_error(exc, f"Could not follow task {task_id}")
        state.query_failures += 1
        delay = min(QUERY_BACKOFF_CAP, self.interval * 2**state.query_failures)
        state.retry_at = self._now() + (began + delay - time.monotonic())
        if not isinstance(exc, TaskNotFoundError):
            logger.warning("task %s: query failed (next in %.1fs): %s", task_id, delay, state.error)

    async def _poll(
        self, task_id: str, record: TaskRecord | None, state: _State, later: list[Statement] | None = None
    ) -> TaskRecord:
        """One query and what it says, recorded; `later`: where an answer that changes nothing but the
        row's own fields goes for the batch write (else, and for every final answer, written at once)."""
        body = await self._client.get_task(task_id, started=lambda: setattr(state, "last_query", time.monotonic()))
        output = body.get("output")
        status = output.get("task_status") if isinstance(output, dict) else None
        if not isinstance(output, dict) or not isinstance(status, str) or status not in KNOWN_STATUSES:
            what = "no task_status" if status is None else f"the task_status {snippet(status)!r}, which is not one"
            again = "call task_status again" if record is None else "it is asked again"
            raise UnreadableAnswerError(
                f"DashScope's answer about task {task_id} has {what} this server knows, so the task's state is "
                f"not known yet (nothing was changed); {again}."
            )
        if record is None:
            if status == "UNKNOWN":
                raise unknown_task(task_id)
            record = self._adopt(task_id, body)
        polls = record.polls + 1
        if polls == 1 or status != record.status:
            # Evidence of every change, not of every answer: a task queued for hours would leave a
            # file per minute saying the same thing. The ledger counts every query (`polls`).
            self._evidence.write_poll(Path(record.evidence_dir), polls, status, body)
        fields: dict[str, Any] = {"polls": polls}
        video_url = _video_url(output) if status == "SUCCEEDED" else None
        doubtful = (status == "UNKNOWN" and not record.finished) or (status == "SUCCEEDED" and not video_url)
        doubtful = doubtful or (record.status == "SUCCEEDED" and status == "UNKNOWN")
        state.doubts = state.doubts + 1 if doubtful else 0
        if doubtful and state.doubts < DOUBTFUL_ANSWERS:
            # Would end the task without its video: believed only if it says so again.
            self._ledger.record_answer(task_id, polls=polls)
            raise UnreadableAnswerError(
                f"DashScope answered {status} for task {task_id}"
                + (" without a video URL" if status == "SUCCEEDED" else "")
                + f" ({state.doubts} of {DOUBTFUL_ANSWERS} such answers before it is believed); asking again."
            )
        if record.status == "SUCCEEDED" and status == "UNKNOWN":
            # The task id expired before its video URL was recorded: the result is gone.
            fields.update(code=VIDEO_EXPIRED, message=EXPIRED_MESSAGE.format(why="the task id expired"))
            self._ledger.update_task(task_id, **fields)
            return self._reread(task_id)
        fields["status"] = status
        for name in ("submit_time", "scheduled_time", "end_time"):
            if output.get(name):
                fields[name] = str(output[name])
        if status == "SUCCEEDED":
            fields["video_url"] = video_url
            fields["usage"] = body.get("usage") if isinstance(body.get("usage"), dict) else None
            if not video_url:
                fields.update(code=VIDEO_EXPIRED, message=NO_URL_MESSAGE.format(n=state.doubts))
        elif status in {"FAILED", "CANCELED"}:
            fields["code"] = str(output.get("code") or status)
            fields["message"] = str(output.get("message") or "")
        elif status == "UNKNOWN":
            fields["code"], fields["message"] = "UNKNOWN", UNKNOWN_MESSAGE
        if status not in TERMINAL_STATUSES:
            # Only polls, status and upstream's times changed: the row is known without reading it back
            # (this runs for every answer about every open task).
            if later is None:
                self._ledger.record_answer(task_id, **fields)
            else:
                later.append(self._ledger.answer_statement(task_id, **fields))
            return dataclasses.replace(record, **fields)
        self._ledger.record_answer(task_id, **fields)
        updated = self._reread(task_id)
        if status in TERMINAL_STATUSES:
            self._evidence.write_json(Path(updated.evidence_dir) / "result.json", body)
            if not record.finished:
                self._learn(record, updated)
        return updated

    def _reread(self, task_id: str) -> TaskRecord:
        record = self._ledger.get_task(task_id)
        assert record is not None
        return record

    def _adopt(self, task_id: str, body: dict[str, Any]) -> TaskRecord:
        family = _infer_family(body)
        evidence_dir = self._evidence.task_dir(family, task_id)
        model = "emo-v1" if family == "emo" else "emoji-v1"
        self._ledger.add_task(
            task_id=task_id,
            family=family,
            model=model,
            payload={},
            ratio=None,
            status="PENDING",
            request_id=None,
            evidence_dir=str(evidence_dir),
        )
        return self._reread(task_id)

    async def _download(self, record: TaskRecord, state: _State) -> None:
        assert record.video_url
        destination = video_destination(record)
        if destination.is_file():
            # Renamed only after verification, so it is complete: the crash came before the ledger write.
            self._ledger.update_task(
                record.task_id,
                video_path=str(destination),
                video_sha256=file_sha256(destination),
                video_bytes=destination.stat().st_size,
            )
            return
        try:
            got = await self._client.download(record.video_url, video_destination(record))
        except UpstreamError as exc:
            if exc.status_code == 429 or exc.status_code >= 500:
                self._download_failed(record, state, exc)
                return
            # The storage host refuses the signed URL (403 expired, 404 gone): retrying cannot help.
            why = f"HTTP {exc.status_code} {exc.code}"
            self._ledger.update_task(record.task_id, code=VIDEO_EXPIRED, message=EXPIRED_MESSAGE.format(why=why))
            state.download_error = None
            return
        except EmoMcpError as exc:
            self._download_failed(record, state, exc)
            return
        self._ledger.update_task(
            record.task_id, video_path=str(got.path), video_sha256=got.sha256, video_bytes=got.size
        )
        self._evidence.write_json(
            Path(record.evidence_dir) / "video.json",
            {"file": got.path.name, "bytes": got.size, "sha256": got.sha256, "seconds": round(got.seconds, 4)},
        )
        state.download_error = None
        state.download_failures = 0
        self._client.metrics.downloaded(got.size)

    def _download_failed(self, record: TaskRecord, state: _State, exc: EmoMcpError) -> None:
        state.download_failures += 1
        state.download_error = str(exc)
        delay = min(DOWNLOAD_BACKOFF_CAP, self.interval * 2**state.download_failures)
        state.next_download = self._now() + delay
        logger.warning("task %s: download failed (retry in %.0fs): %s", record.task_id, delay, exc)


def _claimer_dead(owner: str) -> bool:
    """A `host:pid` claim (older versions): of a dead process on this host, or of an earlier one with our pid."""
    host, _, pid = owner.rpartition(":")
    if host != HOST or not pid.isdigit():
        return False  # another host's process cannot be checked: its lease runs out
    return int(pid) == os.getpid() or not pid_alive(int(pid))


def _as_error(exc: Exception, doing: str) -> EmoMcpError:
    error = as_task_error(exc, doing)
    if not isinstance(exc, EmoMcpError | OSError | sqlite3.Error):
        logger.error("%s: unexpected %s", doing, type(exc).__name__, exc_info=exc)
    return error
