"""Finding the task behind a submit whose answer was lost, before anyone pays for it twice.

A submit row is written to the ledger before the request is sent. If no answer is recorded
(timeout, dropped connection, 5xx, or the process died), the row is SUBMIT_OUTCOME_UNKNOWN and
this module lists that model's recent tasks (`GET /tasks?model_name=&start_time=&end_time=`).

How good the match is, honestly: the list shows a task's id, model, status and creation time,
but not its inputs, so a listed task is matched to an unanswered submit by model and time only
(created within `MATCH_SKEW` of when the submit was sent) and by not already being a task of this
ledger. Several unanswered submits of one model are paired with candidates closest in time first. A task
created in that window by another client of the same account (not through this ledger) could be
taken for ours; the match is recorded in `reconciled.json` beside the request so a person can
check it. If nothing matches for `EMO_MCP_RECONCILE_WINDOW` seconds after the submit, the row
becomes NOT_FOUND (most likely nothing was created) and an identical submit is allowed again.

"Not found" frees a second, billed submit, so it is concluded only from a list that reads whole:
an answer without a `data` list, an entry whose id or creation time is missing or of another type
(a string, seconds instead of milliseconds), or a page that says more tasks exist than it holds,
means "cannot tell": the row stays SUBMIT_OUTCOME_UNKNOWN and the list is asked again later, less
often after each failure.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio

from server.config import Settings
from server.errors import EmoMcpError, UnreadableAnswerError, as_task_error
from server.models import Family
from server.store.evidence import Evidence
from server.store.ledger import NOT_FOUND, SUBMIT_UNKNOWN, SUBMITTING, Ledger, TaskRecord
from server.upstream.client import SUBMIT_TIMEOUT, DashScopeClient

logger = logging.getLogger(__name__)

_BEIJING = timezone(timedelta(hours=8))
# A listed task counts as ours if created this close to the moment the submit was sent.
MATCH_SKEW = 120.0
# A SUBMITTING row of a process on another host is considered dead after this long.
STALE_SUBMIT = max(120.0, (SUBMIT_TIMEOUT.read or 30.0) * 4)
BACKOFF_CAP = 300.0
# After finding no unanswered submit, the seconds before the ledger is asked again (`Reconciler.pending`).
PENDING_RECHECK = 1.0
# A gmt_create below this (Sept 2001 in ms) is in seconds or garbage: such a list cannot be matched.
MIN_CREATED_MS = 1e12
HOST = socket.gethostname()

Notify = Callable[..., None]
# Whether a SUBMITTING row's owner is gone: (owner, row created_at) -> dead. The watcher passes its
# worker's check (a heartbeat in the ledger, server/jobs/workers.py), which also reads old owners.
OwnerDead = Callable[[str | None, float], bool]
# Whether this worker may run a pass now (one worker of a cluster lists the tasks at a time).
MayRun = Callable[[], bool]


def owner_token() -> str:
    """The owner of a submit before worker ids (`host:pid`); still read for rows of older versions."""
    return f"{HOST}:{os.getpid()}"


def beijing_stamp(epoch: float) -> str:
    """The task list's time format: `YYYYMMDDhhmmss` in Beijing time."""
    return datetime.fromtimestamp(epoch, _BEIJING).strftime("%Y%m%d%H%M%S")


def legacy_owner_dead(owner: str | None, created_at: float, started_at: float) -> bool:
    """A `host:pid` owner: gone when its pid is, on this host; anywhere, when older than any submit."""
    host, _, pid = (owner or "").rpartition(":")
    if host != HOST or not pid.isdigit() or time.time() - created_at > STALE_SUBMIT:
        # Another host's process cannot be checked; and no submit takes this long (a reused pid).
        return time.time() - created_at > STALE_SUBMIT
    if int(pid) == os.getpid():
        return created_at < started_at  # an earlier process that had our pid
    return not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _created(item: dict[str, Any]) -> float:
    """Creation time in epoch seconds (`listed` has checked the entry)."""
    return float(item["gmt_create"]) / 1000.0


def listed(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of a task-list page, each with a task id and a creation time; anything else raises."""
    data = body.get("data")
    if not isinstance(data, list):
        raise ValueError("the answer has no data list")
    for item in data:
        if not isinstance(item, dict):
            raise ValueError(f"an entry is a {type(item).__name__}, not an object")
        task_id, created, status = item.get("task_id"), item.get("gmt_create"), item.get("status")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("an entry has no task_id")
        if not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created):
            raise ValueError(f"task {task_id}'s gmt_create is {created!r}, not a time in milliseconds")
        if created < MIN_CREATED_MS:
            raise ValueError(f"task {task_id}'s gmt_create {created!r} is not a time in milliseconds")
        if status is not None and not isinstance(status, str):
            raise ValueError(f"task {task_id}'s status is {status!r}")
    total = body.get("total")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        raise ValueError(f"its total is {total!r}")
    if isinstance(total, int) and total > len(data):
        raise ValueError(f"it holds {len(data)} of {total} tasks")
    return data


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        client: DashScopeClient,
        ledger: Ledger,
        evidence: Evidence,
        notify: Notify,
        owner_dead: OwnerDead | None = None,
        may_run: MayRun | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._ledger = ledger
        self._evidence = evidence
        self._notify = notify
        self._started_at = time.time()
        self._owner_dead: OwnerDead = owner_dead or (lambda owner, at: legacy_owner_dead(owner, at, self._started_at))
        self._may_run: MayRun = may_run or (lambda: True)
        self._last_run = -math.inf
        # Until when (monotonic) `pending` answers "no" without asking the ledger again.
        self._quiet_until = -math.inf
        self._lock = anyio.Lock()
        self._failures = 0
        # Why a pass could not decide, by local id: each such row's `last_error`.
        self.errors: dict[str, EmoMcpError] = {}

    def pending(self) -> bool:
        """Any unanswered submit to look for: one indexed probe, and after a "no" none again for
        `PENDING_RECHECK` seconds (or the poll interval, if shorter). The watcher asks on every tick, and
        with many open tasks a tick follows every query: the probe was the busiest read of all."""
        now = time.monotonic()
        if now < self._quiet_until:
            return False
        found = bool(
            self._ledger.query("SELECT 1 FROM tasks WHERE status IN (?, ?) LIMIT 1", (SUBMITTING, SUBMIT_UNKNOWN))
        )
        if not found:
            self._quiet_until = now + min(self._settings.poll_interval, PENDING_RECHECK)
        return found

    def look_again(self) -> None:
        """This process just left a submit unanswered: the next tick asks the ledger, whatever it said last."""
        self._quiet_until = -math.inf

    def next_due(self) -> float:
        """One pass every poll interval; after failed passes, less and less often."""
        interval = self._settings.poll_interval
        return self._last_run + min(max(BACKOFF_CAP, interval), interval * 2.0**self._failures)

    def failed(self) -> None:
        """A pass ended in an error: the next one waits longer."""
        self._failures += 1

    def mark_dead_submits(self) -> list[TaskRecord]:
        """SUBMITTING rows whose process is gone become SUBMIT_OUTCOME_UNKNOWN (or go, if never sent);
        returns the unknown rows."""
        for row in self._ledger.rows([SUBMITTING]):
            if not self._owner_dead(row.owner, row.created_at):
                continue
            if row.sent_at == 0.0:
                # Its worker died before the request left (waiting for its rate-limit turn, or just after
                # the row was written): nothing can exist upstream, so the row goes and an identical
                # generate may be sent at once, instead of being refused for EMO_MCP_RECONCILE_WINDOW.
                self._ledger.delete_task(row.task_id)
                self._notify(row.task_id)
                logger.warning("submit %s: its process died before sending it; nothing was sent", row.task_id)
            else:
                self._ledger.update_task(
                    row.task_id,
                    status=SUBMIT_UNKNOWN,
                    message="The process sending this submit stopped before an answer was recorded; "
                    "a task may exist and may be billed.",
                )
                logger.warning("submit %s: its process died; reconciling", row.task_id)
        return self._ledger.rows([SUBMIT_UNKNOWN])

    async def run_once(self) -> None:
        """One pass over every unanswered submit; concurrent callers share it."""
        if self._lock.locked():
            async with self._lock:
                return
        async with self._lock:
            if time.monotonic() - self._last_run < self._settings.poll_interval:
                return
            self._last_run = time.monotonic()
            if not self._may_run():
                return  # another worker is reconciling (the task list is the account's, not a worker's)
            unknown = self.mark_dead_submits()
            by_model: dict[str, list[TaskRecord]] = {}
            for row in unknown:
                by_model.setdefault(row.model, []).append(row)
            self.errors = {row.task_id: error for row in unknown if (error := self.errors.get(row.task_id))}
            clean = True
            for model, rows in by_model.items():
                try:
                    await self._reconcile_model(model, rows)
                except Exception as exc:  # one model's trouble: its rows stay unknown, the others go on
                    clean = False
                    error = as_task_error(exc, f"Could not look for the lost {model} submit(s)")
                    if not isinstance(exc, EmoMcpError):
                        logger.error("reconciling %s failed", model, exc_info=exc)
                    for row in rows:
                        self.errors[row.task_id] = error
                    logger.warning("reconciling %s: %s", model, error)
                else:
                    for row in rows:
                        self.errors.pop(row.task_id, None)
            self._failures = 0 if clean else self._failures + 1

    async def _reconcile_model(self, model: str, rows: list[TaskRecord]) -> None:
        now = time.time()
        start = min(row.created_at for row in rows) - MATCH_SKEW
        # The window ends where a match could still be (the newest lost submit plus the skew), not "now":
        # a window growing with every pass would, on a busy account, outgrow the one page asked for.
        end = min(now, max(row.created_at for row in rows)) + MATCH_SKEW
        body = await self._client.list_tasks(model, beijing_stamp(start), beijing_stamp(end))
        try:
            items = listed(body)
        except ValueError as exc:
            # Never "not found" from a list that does not read whole: that would free a second, billed submit.
            raise UnreadableAnswerError(
                f"DashScope's {model} task list could not be read ({exc}), so it is not known whether the lost "
                "submit created a task: it stays SUBMIT_OUTCOME_UNKNOWN (an identical generate is still refused) "
                "and the list is asked again later."
            ) from exc
        ids = [str(item["task_id"]) for item in items]
        # A task some other submit of this ledger already owns is not a candidate; one only adopted by id
        # (someone called task_status with it before this pass) still is.
        known = self._ledger.submitted_task_ids(ids)
        candidates = [item for item in items if not known.get(str(item["task_id"]))]
        # Closest pairs first: a submit that never reached DashScope must not take the task of a later one.
        pairs = sorted(
            (abs(_created(c) - row.created_at), index, c_index)
            for index, row in enumerate(rows)
            for c_index, c in enumerate(candidates)
            if abs(_created(c) - row.created_at) <= MATCH_SKEW
        )
        matched: dict[int, int] = {}
        for _, index, c_index in pairs:
            if index not in matched and c_index not in matched.values():
                matched[index] = c_index
        for index, row in enumerate(rows):
            if index in matched:
                chosen = candidates[matched[index]]
                choices = sum(1 for _, i, _c in pairs if i == index)
                self._adopt(row, chosen, choices, adopted=str(chosen["task_id"]) in known)
            elif now - row.created_at > self._settings.reconcile_window:
                self._ledger.update_task(
                    row.task_id,
                    status=NOT_FOUND,
                    message=(
                        f"No {model} task created near this submit appeared in DashScope's task list within "
                        f"{self._settings.reconcile_window:.0f}s: most likely nothing was created (nothing billed). "
                        "An identical generate is allowed again."
                    ),
                )
                self._notify(row.task_id)

    def _adopt(self, row: TaskRecord, item: dict[str, Any], choices: int, *, adopted: bool) -> None:
        assert row.local_id is not None
        task_id = str(item["task_id"])
        family: Family = "emoji" if row.family == "emoji" else "emo"
        task_dir = self._evidence.task_dir(family, task_id)
        pending = Path(row.evidence_dir)
        if (pending / "request.json").is_file():
            shutil.copy2(pending / "request.json", task_dir / "request.json")
        self._evidence.write_json(
            task_dir / "reconciled.json",
            {
                "local_id": row.local_id,
                "submit_dir": str(pending),
                "matched_by": "model and creation time (the task list does not show inputs)",
                "candidates_in_window": choices,
                "listed": item,
            },
        )
        # Polled like any other task from here on; a final listed status is confirmed by that query
        # (which also brings the video URL or the failure's code and message).
        listed = str(item.get("status") or "")
        status = listed if listed in {"PENDING", "RUNNING"} else "PENDING"
        if adopted:
            self._ledger.merge_submit(row.local_id, task_id)
        else:
            self._ledger.resolve_submit(
                row.local_id, task_id=task_id, status=status, request_id=None, evidence_dir=str(task_dir)
            )
        logger.info("submit %s reconciled as task %s (%d candidate(s))", row.local_id, task_id, choices)
        self._notify(row.local_id, task_id)
