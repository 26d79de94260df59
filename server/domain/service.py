"""The domain layer's one entry point: detect, generate and follow tasks, for the tools and the CLI.

Tools validate arguments (schemas did most of it) and shape results; every business rule —
provenance, wire mapping, evidence, ledger — lives in this package or below. `Service` composes
the stages (`detection.py`, `generation.py`, the jobs' watcher and tracker) and answers for tasks.

Each entry point takes `within`: the seconds its caller can wait (a tool call's bound; `None` for
the CLI, which waits as long as it takes). Out of time, it answers with what is known and what to
do next, and the work it started (a detection, a submit, a query, a cancel) goes on in the
background (`server.jobs.tasks.Background`) and is recorded there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus as StartStatus

from server.config import Settings
from server.domain.budget import Approval
from server.domain.detection import Detector
from server.domain.generation import Generator, Plan
from server.domain.inputs import Inputs
from server.domain.uploads import Uploads
from server.errors import (
    CannotCancelError,
    EmoMcpError,
    InvalidInputError,
    MissingApiKeyError,
    RefusedInputError,
    ServiceError,
    UpstreamUnavailableError,
)
from server.jobs.submits import NEXT_STEP, Submitter
from server.jobs.tasks import Background, Deadline, Job, Progress, TaskTracker
from server.jobs.watcher import Watcher, unknown_task
from server.media.preflight import Preflight
from server.models import Family
from server.results import EmoDetection, EmojiDetection, Submitted, TaskStatus
from server.store.evidence import Evidence
from server.store.ledger import Ledger, TaskRecord
from server.tenancy.audit import AuditLog, NoAudit
from server.tenancy.current import current_tenant
from server.upstream.client import DashScopeClient

__all__ = ["NEXT_STEP", "Plan", "Service"]

logger = logging.getLogger(__name__)

R = TypeVar("R")

# An answer of a detection whose caller ran out of time waits this long for the repeat call.
DETECT_KEEP_SECONDS = 900.0
CANCELED_MESSAGE = "Cancelled with task_cancel before it started."


class Service:
    def __init__(
        self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence, *, recover: bool = True
    ) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.evidence = evidence
        self.background = Background()
        # The audit trail of paid calls (server/tenancy/audit.py): shared by a server's tenants, set by
        # server/runtime.py when EMO_MCP_AUDIT_LOG (or tenant mode) asks for one.
        self.audit: AuditLog | NoAudit = NoAudit()
        # The watcher owns every upstream task query and download; `run` (started by runtime.open_service)
        # runs it beside the background jobs.
        self.watcher = Watcher(settings, client, ledger, evidence, recover=recover)
        self.tasks = TaskTracker(settings, ledger, self.watcher, self.background)
        self.submitter = Submitter(settings, client, ledger, evidence, self.watcher)
        self.uploads = Uploads(client, ledger)
        self.preflight = Preflight(remote=settings.preflight_remote)
        self.inputs = Inputs(settings, ledger, evidence, self.uploads, self.preflight)
        self.detector = Detector(settings, client, ledger, evidence, self.inputs)
        self.generator = Generator(settings, ledger, evidence, self.inputs, self.submitter, self.background)
        # The stages' entry points, published as the service's own (tools and CLI call these).
        self.plan_emo = self.generator.plan_emo
        self.plan_emoji = self.generator.plan_emoji
        self.carry_out = self.generator.carry_out
        # Detections in flight (or answered after their caller left), by their arguments.
        self._detects: dict[tuple[str | None, ...], Job[Any]] = {}
        # Cancels sent whose answer is not known: the ledger may be stale for these tasks.
        self._cancels: dict[str, Job[None]] = {}

    def apply_policy(self, settings: Settings) -> None:
        """A re-read tenants file's limits for this tenant (ceiling, daily budget, models), from the next
        call on. Only these: the key, folders and ledger a service was opened with stay until it stops."""

        def renewed(old: Settings) -> Settings:
            return replace(
                old,
                max_cost_cny=settings.max_cost_cny,
                daily_budget_cny=settings.daily_budget_cny,
                allowed_models=settings.allowed_models,
            )

        self.settings = renewed(self.settings)
        self.generator.settings = renewed(self.generator.settings)

    async def run(self, *, task_status: StartStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The service's life: its background jobs, and the watcher inside them (ready once it is).
        A tenant's watcher and jobs log under its name (this task's context, inherited by theirs)."""
        if self.settings.tenant is not None:
            current_tenant.set(self.settings.tenant)
        async with self.background.hosting():
            await self.watcher.run(task_status=task_status)
            await anyio.sleep_forever()  # without a key nothing is watched, but jobs run until the service closes

    # detection: one paid call per portrait, shared by repeat calls -------------

    async def emo_detect(
        self, image_url: str, ratio: str = "1:1", model: str | None = None, *, within: float | None = None
    ) -> EmoDetection:
        return await self._detect(
            "emo", (image_url, ratio, model), lambda: self.detector.emo_detect(image_url, ratio, model), within
        )

    async def emoji_detect(
        self, image_url: str, model: str | None = None, *, within: float | None = None
    ) -> EmojiDetection:
        return await self._detect(
            "emoji", (image_url, model), lambda: self.detector.emoji_detect(image_url, model), within
        )

    async def _detect(
        self, family: Family, arguments: tuple[str | None, ...], work: Callable[[], Awaitable[R]], within: float | None
    ) -> R:
        """Join the detection of the same arguments still in flight (or answered after its caller left),
        else start one; a caller out of time leaves it running, so calling again never pays twice."""
        now = time.monotonic()
        for stale in [
            k for k, j in self._detects.items() if j.done and now - (j.finished_at or now) > DETECT_KEEP_SECONDS
        ]:
            del self._detects[stale]
        key = (family, *arguments)
        job = self._detects.get(key)
        if job is None:
            job = self._detects[key] = self.background.start(work)
        deadline = Deadline(within)
        if not await job.wait(deadline.left()):
            price = self.settings.prices.detect(family).cny
            raise UpstreamUnavailableError(
                f"DashScope did not answer the {family}_detect of {arguments[0]} within {deadline.said()}. "
                f"The detection may or may not have been billed (about {price:g} CNY, at most once): it goes on "
                f"in the background, and calling {family}_detect again with the same arguments picks up its "
                "answer instead of paying for a second one."
            )
        if self._detects.get(key) is job:
            del self._detects[key]
        result: R = job.result()
        return result

    # generation: a plan and its carrying out, in one call ---------------------

    async def emo_generate(
        self,
        image_url: str,
        audio_url: str,
        face_bbox: list[int],
        ext_bbox: list[int],
        style_level: str = "normal",
        model: str | None = None,
        *,
        dry_run: bool = False,
        approval: Approval = "not-asked",
        allow_duplicate: bool = False,
        within: float | None = None,
    ) -> Submitted:
        deadline = Deadline(within)
        plan = await self._plan(
            deadline, "emo", self.plan_emo(image_url, audio_url, face_bbox, ext_bbox, style_level, model)
        )
        return await self.carry_out(
            plan, dry_run=dry_run, approval=approval, allow_duplicate=allow_duplicate, deadline=deadline
        )

    async def emoji_generate(
        self,
        image_url: str,
        face_bbox: list[int],
        ext_bbox_face: list[int],
        template_id: str,
        model: str | None = None,
        *,
        dry_run: bool = False,
        approval: Approval = "not-asked",
        allow_duplicate: bool = False,
        within: float | None = None,
    ) -> Submitted:
        deadline = Deadline(within)
        plan = await self._plan(
            deadline, "emoji", self.plan_emoji(image_url, face_bbox, ext_bbox_face, template_id, model)
        )
        return await self.carry_out(
            plan, dry_run=dry_run, approval=approval, allow_duplicate=allow_duplicate, deadline=deadline
        )

    @staticmethod
    async def _plan(deadline: Deadline, family: Family, planning: Awaitable[Plan]) -> Plan:
        """The free checks, cut off at the deadline: nothing is uploaded or sent before they pass."""
        with deadline.scope():
            return await planning
        raise UpstreamUnavailableError(
            f"The free checks of the inputs (a remote file fetched for its pre-flight?) took longer than "
            f"{deadline.said()}. Nothing was uploaded, submitted or billed; call {family}_generate again."
        )

    # tasks ------------------------------------------------------------------

    async def task_status(
        self,
        task_id: str,
        wait_seconds: float = 0,
        progress: Progress | None = None,
        *,
        within: float | None = None,
    ) -> TaskStatus:
        if not self.settings.api_key:
            raise MissingApiKeyError()
        deadline = Deadline(within)
        note = None
        record = self.ledger.get_task(task_id)
        refused = self.generator.refusal(task_id) if record is None else None
        if refused is not None:
            raise refused
        if record is not None and record.task_id in self._cancels:
            # A cancel's answer was lost: the ledger's PENDING may be stale, so DashScope answers first.
            seen = await self._confirm(record, deadline)
            if seen is None:
                note = (
                    f"A task_cancel of this task got no answer, and DashScope did not answer a query within "
                    f"{deadline.said()} either: whether it was cancelled is not known yet. Call task_status again."
                )
            elif seen == "PENDING" and record.task_id in self._cancels:
                note = "A task_cancel of this task has no answer yet; DashScope still shows it PENDING."
        return await self.tasks.status(task_id, wait_seconds, progress, deadline=deadline, note=note)

    async def task_cancel(self, task_id: str, *, within: float | None = None) -> TaskStatus:
        """Cancel a PENDING task upstream; anything else gets the reason it cannot be cancelled."""
        if not self.settings.api_key:
            raise MissingApiKeyError()
        deadline = Deadline(within)
        record = self.ledger.get_task(task_id)
        if record is None and self.settings.tenant is not None:
            raise unknown_task(task_id)  # maybe another tenant's (on the same key): never sent, as task_status
        if record is not None and record.task_id in self._cancels:
            # An earlier cancel got no answer: whether it took effect is DashScope's to say, not the ledger's.
            if await self._confirm(record, deadline) == "CANCELED":
                return self._status_of(record.task_id, task_id)
            record = self.ledger.get_task(task_id)
        if record is not None and record.finished:
            raise CannotCancelError(
                f"Task {record.task_id} is already {record.status}; only a PENDING task can be cancelled."
            )
        if record is not None and record.status in {"SUBMITTING", "SUBMIT_OUTCOME_UNKNOWN"}:
            raise CannotCancelError(
                f"{record.task_id} has no upstream task id yet (its submit's answer was lost); call task_status "
                "with it until it is found, then cancel the task id it shows."
            )
        upstream_id = record.task_id if record else task_id
        cancel = self._send_cancel(upstream_id)
        if not await cancel.wait(deadline.left()):
            raise UpstreamUnavailableError(
                f"DashScope has not answered the cancel of task {upstream_id} within {deadline.said()}; it may or "
                "may not take effect (nothing is billed for a task cancelled while PENDING). Call task_status with "
                "it: the server asks DashScope before answering."
            )
        try:
            cancel.result()
        except InvalidInputError as exc:
            if exc.code == "InvalidParameter" and record is None:
                raise RefusedInputError(
                    f"DashScope does not know task {task_id} (wrong id, or older than 24 hours); nothing was cancelled."
                ) from exc
            # Refused: the task is no longer PENDING, whatever the ledger heard last. Say what it is now.
            state = await self._confirm(record, deadline) if record is not None else None
            if state is None:
                state = (await self.tasks.status(upstream_id, 0, deadline=deadline)).task_status
            why = (
                "it is already RUNNING and will finish (and be billed) as normal"
                if state == "RUNNING"
                else f"it is {state}"
            )
            raise CannotCancelError(
                f"Task {upstream_id} cannot be cancelled: {why}; DashScope cancels only PENDING tasks. [{exc.code}]"
            ) from exc
        except (UpstreamUnavailableError, ServiceError) as exc:
            # Sent, but the answer was lost or unreadable: it may have taken effect. Ask while time is left.
            if record is not None and await self._confirm(record, deadline) == "CANCELED":
                return self._status_of(upstream_id, task_id)
            raise UpstreamUnavailableError(
                f"The cancel of task {upstream_id} was sent but its answer was lost ({exc}); it may or may not "
                "have taken effect. Call task_status with it: the server asks DashScope before answering, then "
                "task_cancel again if it is still PENDING."
            ) from exc
        if record is None:
            return await self.tasks.status(task_id, 0, deadline=deadline)
        return self._status_of(upstream_id, task_id)

    def _status_of(self, task_id: str, asked: str) -> TaskStatus:
        record = self.ledger.get_task(task_id)
        assert record is not None
        return self.tasks.to_result(record, asked=asked)

    def _send_cancel(self, task_id: str) -> Job[None]:
        """The cancel request as a background job: its answer is recorded even after the caller left."""

        async def cancel() -> None:
            try:
                await self.client.cancel_task(task_id)
            except (UpstreamUnavailableError, ServiceError):
                raise  # no readable answer: the task stays marked, so the next call asks DashScope first
            except BaseException:
                self._cancels.pop(task_id, None)  # a clear refusal (or the server stopping): nothing changed
                raise
            self._cancels.pop(task_id, None)
            if self.ledger.get_task(task_id) is not None:
                self.ledger.update_task(task_id, status="CANCELED", code="Canceled", message=CANCELED_MESSAGE)
                self.watcher.notify(task_id)

        job = self.background.start(cancel)
        self._cancels[task_id] = job
        return job

    async def _confirm(self, record: TaskRecord, deadline: Deadline) -> str | None:
        """The task's status by a query made now (None if DashScope did not answer in time)."""
        job = self.background.start(lambda: self._query_now(record.task_id))
        if not await job.wait(deadline.left()):
            return None
        try:
            status: str = job.result()
        except EmoMcpError as exc:
            logger.warning("task %s: checking its status after a cancel failed: %s", record.task_id, exc)
            return None
        return status

    async def _query_now(self, task_id: str) -> str:
        """Query the task now and record what settles its cancel (PENDING, RUNNING or CANCELED).

        The watcher's next poll may be a whole interval away and cannot be moved forward from here,
        so this one query is the service's own; anything else it shows (a video, a failure) is left to
        the watcher, which is asked to look at the task at once.
        """
        body = await self.client.get_task(task_id)
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        status = str(output.get("task_status") or "UNKNOWN")
        record = self.ledger.get_task(task_id)
        if record is not None:
            self.evidence.write_poll(Path(record.evidence_dir), record.polls + 1, status, body)
            fields: dict[str, Any] = {"polls": record.polls + 1}
            for name in ("submit_time", "scheduled_time", "end_time"):
                if output.get(name):
                    fields[name] = str(output[name])
            if status in {"PENDING", "RUNNING"} and not record.finished:
                fields["status"] = status
            elif status == "CANCELED":
                fields.update(
                    status=status,
                    code=str(output.get("code") or "Canceled"),
                    message=str(output.get("message") or CANCELED_MESSAGE),
                )
            self.ledger.update_task(task_id, **fields)
            self.watcher.watch(task_id)
            self.watcher.notify(task_id)
        cancel = self._cancels.get(task_id)
        if status != "PENDING" or (cancel is not None and cancel.done):
            self._cancels.pop(task_id, None)  # the cancel's outcome is known now
        return status
