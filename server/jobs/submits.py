"""Submitting a paid task so that it is never billed twice.

- The request's fingerprint (sha256 of the canonical JSON of the normalized payload: model,
  inputs, boxes, template or style) is looked up first: an identical request whose task is
  alive or succeeded returns that task (`deduplicated: true`) unless `allow_duplicate` is set.
- A ledger row (SUBMITTING, keyed by a local id) is written in the same transaction, before the
  request is sent, so neither a second process nor a crash can slip a duplicate past it.
- An answer turns the row into the real task; a clear refusal deletes it (nothing was created);
  no answer leaves it SUBMIT_OUTCOME_UNKNOWN for `server.jobs.reconcile` to resolve, and an identical
  submit is refused meanwhile.
- Writing the row (`begin`) and sending (`send`) are two steps so the caller can hand `send` to a
  background job: a client that gives up on the call never leaves the row SUBMITTING.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from server.config import Settings
from server.errors import DuplicateSubmitError, SubmitOutcomeUnknownError, UpstreamError, UpstreamUnavailableError
from server.jobs.watcher import Watcher
from server.models import Family
from server.results import Submitted
from server.store.evidence import Evidence
from server.store.ledger import LOCAL_STATUSES, SUBMIT_UNKNOWN, SUBMITTING, Ledger, TaskRecord
from server.upstream.client import SUBMIT_TIMEOUT, DashScopeClient

logger = logging.getLogger(__name__)

NEXT_STEP = (
    "Call task_status with this task_id (wait_seconds up to 50 waits in one call); "
    "the video is downloaded when the task succeeds, even if nobody asks."
)


# A generate that meets an identical submit in flight (here or on another worker) waits this long at most
# for its answer, reading the ledger every JOIN_POLL seconds: the winner's answer is the loser's too.
JOIN_SECONDS = (SUBMIT_TIMEOUT.read or 30.0) + 5.0
JOIN_POLL = 0.1


def fingerprint(payload: dict[str, Any]) -> str:
    """Identity of a generate request: equal payloads, equal fingerprints, whatever the key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class InFlight:
    """An identical submit is being sent (its SUBMITTING row exists): join it rather than refuse."""

    record: TaskRecord
    output_size: str


@dataclass(frozen=True)
class PendingSubmit:
    """A submit whose SUBMITTING row is written and whose request is not sent yet."""

    local_id: str
    family: Family
    model: str
    payload: dict[str, Any]
    folder: Path  # the request's evidence until a task id exists
    output_size: str


class Submitter:
    def __init__(
        self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence, watcher: Watcher
    ) -> None:
        self._settings = settings
        self._client = client
        self._ledger = ledger
        self._evidence = evidence
        self._watcher = watcher

    def expect(self, task_id: str, seconds: float | None) -> None:
        """The submitted task's expected output length, for its schedule (a submit is always followed)."""
        self._watcher.expect(task_id, seconds)

    def begin(
        self,
        family: Family,
        payload: dict[str, Any],
        ratio: str,
        output_size: str,
        *,
        allow_duplicate: bool = False,
    ) -> PendingSubmit | Submitted | InFlight:
        """The SUBMITTING row, the task an identical request already has (`deduplicated`), or the identical
        submit still in flight (`join` it).

        Synchronous on purpose: nothing can cancel a caller between this row and the `send` it hands on.
        """
        model = str(payload["model"])
        local_id = f"submit-{uuid.uuid4().hex[:16]}"
        pending = self._evidence.pending_submit_dir(family)
        existing = self._ledger.begin_submit(
            local_id=local_id,
            family=family,
            model=model,
            payload=payload,
            ratio=ratio,
            fingerprint=fingerprint(payload),
            evidence_dir=str(pending),
            owner=self._watcher.worker.id,
            allow_duplicate=allow_duplicate,
        )
        if existing is not None:
            pending.rmdir()
            if existing.status == SUBMITTING:
                return InFlight(existing, output_size)
            return self._reuse(existing, output_size)
        self._evidence.write_json(pending / "request.json", payload)
        return PendingSubmit(local_id, family, model, payload, pending, output_size)

    def withdraw(self, submit: PendingSubmit) -> None:
        """Take back a submit whose row is written but whose request was never sent (refused by a rule
        checked with the row counted: a tenant's daily budget); a joined identical call is woken."""
        self._ledger.delete_task(submit.local_id)
        self._watcher.notify(submit.local_id)
        shutil.rmtree(submit.folder, ignore_errors=True)

    async def send(self, submit: PendingSubmit) -> Submitted:
        """The one paid request; its row becomes the task, is deleted (a clear refusal) or is left to the
        reconciler (no answer). Run it where a caller's timeout or cancellation cannot cut it short."""
        local_id, model, pending = submit.local_id, submit.model, submit.folder
        sent = False

        def sending() -> None:
            nonlocal sent
            self._ledger.mark_sent(local_id)  # raises (the ledger is away): nothing is sent
            sent = True

        try:
            body = await self._client.submit(submit.payload, sending=sending)
        except SubmitOutcomeUnknownError as exc:
            self._unknown(submit, str(exc))
            raise SubmitOutcomeUnknownError(
                f"{exc} A {model} task may have been created and may be billed, so do NOT submit again. "
                f"It is recorded as {local_id} (request saved in {pending}); the server is looking for it in "
                f"DashScope's task list. Call task_status with task_id {local_id} to follow it: it turns into the "
                "real task once found. An identical generate is refused until then."
            ) from exc
        except (UpstreamError, UpstreamUnavailableError):
            # A clear refusal (or no connection at all): nothing exists upstream, nothing is billed.
            self._ledger.delete_task(local_id)
            self._watcher.notify(local_id)
            raise
        except anyio.get_cancelled_exc_class():
            # The server is stopping with the request queued or in flight. Still queued: nothing was sent,
            # the row goes. In flight: a task may exist, so the reconciler looks for it (here or in the
            # next process) instead of the row staying SUBMITTING.
            if sent:
                self._unknown(submit, "The server stopped before DashScope answered this submit.")
            else:
                self.withdraw(submit)
            raise
        except Exception:
            if not sent:  # recording "sending" failed (the ledger is away): nothing went; best effort
                with contextlib.suppress(Exception):
                    self.withdraw(submit)
            raise
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        task_id = output.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            self._evidence.write_json(pending / "submit.json", body)
            self._unknown(submit, "accepted without a task_id")
            raise SubmitOutcomeUnknownError(
                f"DashScope accepted the submit but returned no task_id; the answer is saved in {pending}. "
                f"It is recorded as {local_id}; do NOT submit again before task_status {local_id} resolves it."
            )
        status = str(output.get("task_status") or "PENDING")
        request_id = body.get("request_id")
        task_dir = self._evidence.task_path(submit.family, task_id)
        # The task id goes to the ledger first: if moving the evidence fails, the task is still followed.
        adopted = self._ledger.get_task(task_id)
        if adopted is not None and adopted.task_id == task_id:
            # Someone asked for this task id (and the watcher adopted it) while the answer was on its way.
            self._ledger.merge_submit(local_id, task_id)
        else:
            self._ledger.resolve_submit(
                local_id,
                task_id=task_id,
                status=status,
                request_id=str(request_id) if request_id else None,
                evidence_dir=str(task_dir),
            )
        self._watcher.watch(task_id)
        self._watcher.notify(local_id)  # whoever waits by the local id sees the real task now
        try:
            task_dir.mkdir(parents=True, exist_ok=True)
            for item in pending.iterdir():
                os.replace(item, task_dir / item.name)
            pending.rmdir()
            self._evidence.write_json(task_dir / "submit.json", body)
        except OSError as exc:
            logger.warning("task %s: evidence left in %s (%s)", task_id, pending, exc)
        return Submitted(
            sandbox=self._settings.sandbox,
            task_id=task_id,
            task_status=status,
            model=model,
            request_id=str(request_id) if request_id else None,
            output_size=submit.output_size,
            evidence_dir=str(task_dir),
            next_step=NEXT_STEP,
        )

    async def join(self, joining: InFlight, seconds: float | None) -> Submitted | None:
        """Wait (bounded) for the identical submit in flight to be answered, and answer as it did
        (`deduplicated`). None when its row went (a clear refusal: nothing exists, the caller may send its
        own); still unanswered, or its outcome unknown, the usual refusal to send a second one."""
        local_id = joining.record.task_id
        bound = JOIN_SECONDS if seconds is None else min(JOIN_SECONDS, seconds)
        record: TaskRecord | None = joining.record
        with anyio.move_on_after(bound):
            while record is not None and record.status == SUBMITTING:
                await anyio.sleep(JOIN_POLL)
                record = self._ledger.get_task(local_id)
        await anyio.lowlevel.checkpoint()
        if record is None:
            return None
        return self._reuse(record, joining.output_size)

    def _unknown(self, submit: PendingSubmit, why: str) -> None:
        """No answer: the row waits for `server.jobs.reconcile` (an identical submit is refused meanwhile)."""
        self._evidence.write_json(submit.folder / "outcome-unknown.json", {"error": why, "local_id": submit.local_id})
        self._ledger.update_task(submit.local_id, status=SUBMIT_UNKNOWN, message=why)
        self._watcher.reconciler.look_again()
        self._watcher.notify(submit.local_id)

    def _reuse(self, record: TaskRecord, output_size: str) -> Submitted:
        if record.status in LOCAL_STATUSES:
            raise DuplicateSubmitError(
                f"An identical {record.model} request ({record.task_id}) was sent and its outcome is not known "
                "yet: a task may exist and may be billed, so nothing was sent. The server is looking for it in "
                f"DashScope's task list; call task_status with task_id {record.task_id}. To create a second, "
                "separately billed task anyway, call again with allow_duplicate: true."
            )
        return Submitted(
            sandbox=self._settings.sandbox,
            task_id=record.task_id,
            task_status=record.status,
            model=record.model,
            request_id=record.request_id,
            output_size=output_size,
            evidence_dir=record.evidence_dir,
            next_step=NEXT_STEP,
            deduplicated=True,
            note=(
                f"Not submitted again: an identical {record.model} request already has this task "
                f"({record.status}), so nothing new was billed. Pass allow_duplicate: true to force a new, "
                "separately billed task."
            ),
        )
