"""The domain layer: detect, generate and follow tasks, shared by the MCP tools and the CLI.

Tools validate arguments (schemas did most of it) and shape results; every business rule —
provenance, wire mapping, evidence, ledger — lives here or below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.config import Settings
from server.dashscope import DashScopeClient
from server.errors import CannotCancelError, InvalidInputError, MissingApiKeyError, RefusedInputError
from server.evidence import Evidence
from server.ledger import Ledger
from server.models import (
    EMO_DETECT,
    EMO_GENERATE,
    EMOJI_DETECT,
    EMOJI_GENERATE,
    EMOJI_OUTPUT_SIZE,
    OUTPUT_SIZE,
    Family,
    template_ids,
)
from server.provenance import require_detection
from server.results import EmoDetection, EmojiDetection, Submitted, TaskStatus
from server.submits import NEXT_STEP, Submitter
from server.tasks import Progress, TaskTracker
from server.watcher import Watcher

__all__ = ["NEXT_STEP", "Service"]


def _box(value: Any) -> list[int] | None:
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    return None


class Service:
    def __init__(self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.evidence = evidence
        # The watcher owns every upstream task query and download; runtime.open_service runs it.
        self.watcher = Watcher(settings, client, ledger, evidence)
        self.tasks = TaskTracker(settings, ledger, self.watcher)
        self.submitter = Submitter(settings, client, ledger, evidence, self.watcher)

    def resolve_model(self, official: str, requested: str | None) -> str:
        """The wire model name: the official one, or a deployment name configured for it.

        Every entry point calls this first, so it is also where a missing key is reported.
        """
        if not self.settings.api_key:
            raise MissingApiKeyError()
        if requested is None or requested == official:
            return official
        if requested in self.settings.model_aliases.get(official, ()):
            return requested
        allowed = [official, *self.settings.model_aliases.get(official, ())]
        raise RefusedInputError(f"model {requested!r} is not allowed here; use one of {allowed}.")

    # detection --------------------------------------------------------------

    async def emo_detect(self, image_url: str, ratio: str = "1:1", model: str | None = None) -> EmoDetection:
        wire_model = self.resolve_model(EMO_DETECT, model)
        folder = self.evidence.new_detection_dir("emo")
        request = {"model": wire_model, "input": {"image_url": image_url}, "parameters": {"ratio": ratio}}
        self.evidence.write_json(folder / "request.json", request)
        body, failure = await self._detect_call(folder, wire_model, image_url, ratio)
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        face, ext = _box(output.get("face_bbox")), _box(output.get("ext_bbox"))
        check_pass = failure is None and output.get("check_pass") is True and face is not None and ext is not None
        code = failure.code if failure else (None if check_pass else str(output.get("code") or "CheckFailed"))
        message = failure.upstream_message if failure else output.get("message")
        request_id = failure.request_id if failure else body.get("request_id")
        self.ledger.add_detection(
            family="emo",
            model=wire_model,
            image_url=image_url,
            ratio=ratio,
            check_pass=check_pass,
            face_bbox=face if check_pass else None,
            ext_bbox=ext if check_pass else None,
            code=code,
            message=str(message) if message is not None else None,
            request_id=str(request_id) if request_id else None,
            evidence_dir=str(folder),
        )
        humanoid = output.get("humanoid")
        return EmoDetection(
            sandbox=self.settings.sandbox,
            check_pass=check_pass,
            image_url=image_url,
            ratio=ratio,
            output_size=OUTPUT_SIZE[ratio],
            face_bbox=face if check_pass else None,
            ext_bbox=ext if check_pass else None,
            humanoid=humanoid if isinstance(humanoid, bool) else None,
            code=code,
            message=str(message) if message is not None else None,
            request_id=str(request_id) if request_id else None,
            model=wire_model,
            evidence_dir=str(folder),
        )

    async def emoji_detect(self, image_url: str, model: str | None = None) -> EmojiDetection:
        wire_model = self.resolve_model(EMOJI_DETECT, model)
        folder = self.evidence.new_detection_dir("emoji")
        # The contract's emoji-detect example sends ratio 1:1; emoji output is always square.
        request = {"model": wire_model, "input": {"image_url": image_url}, "parameters": {"ratio": "1:1"}}
        self.evidence.write_json(folder / "request.json", request)
        body, failure = await self._detect_call(folder, wire_model, image_url, "1:1")
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        face, ext = _box(output.get("bbox_face")), _box(output.get("ext_bbox_face"))
        check_pass = failure is None and not output.get("code") and face is not None and ext is not None
        code = failure.code if failure else (None if check_pass else str(output.get("code") or "CheckFailed"))
        message = failure.upstream_message if failure else output.get("message")
        request_id = failure.request_id if failure else body.get("request_id")
        self.ledger.add_detection(
            family="emoji",
            model=wire_model,
            image_url=image_url,
            ratio="1:1",
            check_pass=check_pass,
            face_bbox=face if check_pass else None,
            ext_bbox=ext if check_pass else None,
            code=code,
            message=str(message) if message is not None else None,
            request_id=str(request_id) if request_id else None,
            evidence_dir=str(folder),
        )
        return EmojiDetection(
            sandbox=self.settings.sandbox,
            check_pass=check_pass,
            image_url=image_url,
            output_size=EMOJI_OUTPUT_SIZE,
            face_bbox=face if check_pass else None,
            ext_bbox_face=ext if check_pass else None,
            code=code,
            message=str(message) if message is not None else None,
            request_id=str(request_id) if request_id else None,
            model=wire_model,
            evidence_dir=str(folder),
        )

    async def _detect_call(
        self, folder: Path, model: str, image_url: str, ratio: str
    ) -> tuple[dict[str, Any], InvalidInputError | None]:
        """A portrait refused with `InvalidFile.*` is a failed check (a result), not a tool error."""
        try:
            body = await self.client.detect(model, image_url, ratio)
        except InvalidInputError as exc:
            if not exc.code.startswith("InvalidFile"):
                raise
            self.evidence.write_json(
                folder / "response.json",
                {
                    "http_status": exc.status_code,
                    "code": exc.code,
                    "message": exc.upstream_message,
                    "request_id": exc.request_id,
                },
            )
            return {}, exc
        self.evidence.write_json(folder / "response.json", body)
        return body, None

    # generation -------------------------------------------------------------

    async def emo_generate(
        self,
        image_url: str,
        audio_url: str,
        face_bbox: list[int],
        ext_bbox: list[int],
        style_level: str = "normal",
        model: str | None = None,
        allow_duplicate: bool = False,
    ) -> Submitted:
        wire_model = self.resolve_model(EMO_GENERATE, model)
        detection = require_detection(self.ledger, "emo", image_url, face_bbox, ext_bbox)
        ratio = detection.ratio or "1:1"
        payload = {
            "model": wire_model,
            "input": {"image_url": image_url, "audio_url": audio_url, "face_bbox": face_bbox, "ext_bbox": ext_bbox},
            "parameters": {"style_level": style_level},
        }
        return await self._submit("emo", payload, ratio, OUTPUT_SIZE.get(ratio, "512x512"), allow_duplicate)

    async def emoji_generate(
        self,
        image_url: str,
        face_bbox: list[int],
        ext_bbox_face: list[int],
        template_id: str,
        model: str | None = None,
        allow_duplicate: bool = False,
    ) -> Submitted:
        wire_model = self.resolve_model(EMOJI_GENERATE, model)
        if template_id not in template_ids():
            raise RefusedInputError(
                f"template_id {template_id!r} is not an official Emoji template; "
                f"use one of: {', '.join(template_ids())}."
            )
        require_detection(self.ledger, "emoji", image_url, face_bbox, ext_bbox_face)
        # Wire names differ from the tool's: driven_id, ext_bbox, and no parameters object.
        payload = {
            "model": wire_model,
            "input": {
                "image_url": image_url,
                "driven_id": template_id,
                "face_bbox": face_bbox,
                "ext_bbox": ext_bbox_face,
            },
        }
        return await self._submit("emoji", payload, "standard", EMOJI_OUTPUT_SIZE, allow_duplicate)

    async def _submit(
        self, family: Family, payload: dict[str, Any], ratio: str, output_size: str, allow_duplicate: bool = False
    ) -> Submitted:
        return await self.submitter.submit(family, payload, ratio, output_size, allow_duplicate=allow_duplicate)

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
