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
HOST = socket.gethostname()

Notify = Callable[..., None]


def owner_token() -> str:
    return f"{HOST}:{os.getpid()}"


def beijing_stamp(epoch: float) -> str:
    """The task list's time format: `YYYYMMDDhhmmss` in Beijing time."""
    return datetime.fromtimestamp(epoch, _BEIJING).strftime("%Y%m%d%H%M%S")


def _owner_dead(owner: str | None, created_at: float, started_at: float) -> bool:
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


def _created(item: dict[str, Any]) -> float | None:
    value = item.get("gmt_create")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000.0
    return None


class Reconciler:
    def __init__(
        self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence, notify: Notify
    ) -> None:
        self._settings = settings
        self._client = client
        self._ledger = ledger
        self._evidence = evidence
        self._notify = notify
        self._started_at = time.time()
        self._last_run = -math.inf
        self._lock = anyio.Lock()

    def pending(self) -> bool:
        return bool(self._ledger.rows([SUBMITTING, SUBMIT_UNKNOWN]))

    def next_due(self) -> float:
        return self._last_run + self._settings.poll_interval

    def mark_dead_submits(self) -> list[TaskRecord]:
        """SUBMITTING rows whose process is gone become SUBMIT_OUTCOME_UNKNOWN; returns the unknown rows."""
        for row in self._ledger.rows([SUBMITTING]):
            if _owner_dead(row.owner, row.created_at, self._started_at):
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
            unknown = self.mark_dead_submits()
            by_model: dict[str, list[TaskRecord]] = {}
            for row in unknown:
                by_model.setdefault(row.model, []).append(row)
            for model, rows in by_model.items():
                await self._reconcile_model(model, rows)

    async def _reconcile_model(self, model: str, rows: list[TaskRecord]) -> None:
        now = time.time()
        start = min(row.created_at for row in rows) - MATCH_SKEW
        body = await self._client.list_tasks(model, beijing_stamp(start), beijing_stamp(now + MATCH_SKEW))
        data = body.get("data")
        items = [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
        ids = [str(item.get("task_id")) for item in items if item.get("task_id")]
        # A task some other submit of this ledger already owns is not a candidate; one only adopted by id
        # (someone called task_status with it before this pass) still is.
        known = self._ledger.submitted_task_ids(ids)
        candidates = [
            item
            for item in items
            if item.get("task_id") and not known.get(str(item["task_id"])) and _created(item) is not None
        ]
        # Closest pairs first: a submit that never reached DashScope must not take the task of a later one.
        pairs = sorted(
            (abs((_created(c) or 0.0) - row.created_at), index, c_index)
            for index, row in enumerate(rows)
            for c_index, c in enumerate(candidates)
            if abs((_created(c) or 0.0) - row.created_at) <= MATCH_SKEW
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
