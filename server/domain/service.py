"""The domain layer's one entry point: detect, generate and follow tasks, for the tools and the CLI.

Tools validate arguments (schemas did most of it) and shape results; every business rule —
provenance, wire mapping, evidence, ledger — lives in this package or below. `Service` composes
the stages (`detection.py`, `generation.py`, the jobs' watcher and tracker) and answers for tasks.
"""

from __future__ import annotations

from server.config import Settings
from server.domain.budget import Approval
from server.domain.detection import Detector
from server.domain.generation import Generator, Plan
from server.domain.inputs import Inputs
from server.domain.uploads import Uploads
from server.errors import CannotCancelError, InvalidInputError, MissingApiKeyError, RefusedInputError
from server.jobs.submits import NEXT_STEP, Submitter
from server.jobs.tasks import Progress, TaskTracker
from server.jobs.watcher import Watcher
from server.media.preflight import Preflight
from server.results import Submitted, TaskStatus
from server.store.evidence import Evidence
from server.store.ledger import Ledger
from server.upstream.client import DashScopeClient

__all__ = ["NEXT_STEP", "Plan", "Service"]


class Service:
    def __init__(
        self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence, *, recover: bool = True
    ) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.evidence = evidence
        # The watcher owns every upstream task query and download; runtime.open_service runs it.
        self.watcher = Watcher(settings, client, ledger, evidence, recover=recover)
        self.tasks = TaskTracker(settings, ledger, self.watcher)
        self.submitter = Submitter(settings, client, ledger, evidence, self.watcher)
        self.uploads = Uploads(client, ledger)
        self.preflight = Preflight(lambda: client.http, remote=settings.preflight_remote)
        self.inputs = Inputs(settings, ledger, evidence, self.uploads, self.preflight)
        self.detector = Detector(settings, client, ledger, evidence, self.inputs)
        self.generator = Generator(settings, ledger, evidence, self.inputs, self.submitter)
        # The stages' entry points, published as the service's own (tools and CLI call these).
        self.emo_detect = self.detector.emo_detect
        self.emoji_detect = self.detector.emoji_detect
        self.plan_emo = self.generator.plan_emo
        self.plan_emoji = self.generator.plan_emoji
        self.carry_out = self.generator.carry_out

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
    ) -> Submitted:
        plan = await self.plan_emo(image_url, audio_url, face_bbox, ext_bbox, style_level, model)
        return await self.carry_out(plan, dry_run=dry_run, approval=approval, allow_duplicate=allow_duplicate)

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
    ) -> Submitted:
        plan = await self.plan_emoji(image_url, face_bbox, ext_bbox_face, template_id, model)
        return await self.carry_out(plan, dry_run=dry_run, approval=approval, allow_duplicate=allow_duplicate)

    # tasks ------------------------------------------------------------------

    async def task_status(self, task_id: str, wait_seconds: float = 0, progress: Progress | None = None) -> TaskStatus:
        if not self.settings.api_key:
            raise MissingApiKeyError()
        return await self.tasks.status(task_id, wait_seconds, progress)

    async def task_cancel(self, task_id: str) -> TaskStatus:
        """Cancel a PENDING task upstream; anything else gets the reason it cannot be cancelled."""
        if not self.settings.api_key:
            raise MissingApiKeyError()
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
        try:
            await self.client.cancel_task(record.task_id if record else task_id)
        except InvalidInputError as exc:
            if exc.code == "InvalidParameter" and record is None:
                raise RefusedInputError(
                    f"DashScope does not know task {task_id} (wrong id, or older than 24 hours); nothing was cancelled."
                ) from exc
            # Refused: the task is no longer PENDING. Say what it is now.
            current = await self.tasks.status(record.task_id if record else task_id, 0)
            state = current.task_status
            why = (
                "it is already RUNNING and will finish (and be billed) as normal"
                if state == "RUNNING"
                else f"it is {state}"
            )
            raise CannotCancelError(
                f"Task {current.task_id} cannot be cancelled: {why}; DashScope cancels only PENDING tasks. [{exc.code}]"
            ) from exc
        if record is None:
            return await self.tasks.status(task_id, 0)
        self.ledger.update_task(
            record.task_id, status="CANCELED", code="Canceled", message="Cancelled with task_cancel before it started."
        )
        self.watcher.notify(record.task_id)
        return await self.tasks.status(record.task_id, 0)
