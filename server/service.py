"""The domain layer: detect, generate and follow tasks, shared by the MCP tools and the CLI.

Tools validate arguments (schemas did most of it) and shape results; every business rule —
provenance, wire mapping, evidence, ledger — lives here or below.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from server.budget import Approval, check_budget, over_ceiling
from server.config import Settings
from server.dashscope import DashScopeClient
from server.errors import (
    CannotCancelError,
    InvalidInputError,
    MissingApiKeyError,
    ProvenanceError,
    RefusedInputError,
)
from server.evidence import Evidence
from server.ledger import Detection, Ledger
from server.media import MediaRef, is_remote, resolve_media
from server.models import (
    EMO_DETECT,
    EMO_GENERATE,
    EMOJI_DETECT,
    EMOJI_GENERATE,
    EMOJI_OUTPUT_SIZE,
    OUTPUT_SIZE,
    Family,
    template_ids,
    template_max_seconds,
)
from server.preflight import Checked, Preflight
from server.pricing import Estimate, estimate_emo, estimate_emoji
from server.provenance import require_detection
from server.results import EmoDetection, EmojiDetection, Submitted, TaskStatus
from server.spend import record_estimate
from server.submits import NEXT_STEP, Submitter
from server.tasks import Progress, TaskTracker
from server.uploads import Uploads
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
        self.uploads = Uploads(client, ledger)
        self.preflight = Preflight(lambda: client.http, remote=settings.preflight_remote)

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
        found = await self._detect("emo", self.resolve_model(EMO_DETECT, model), image_url, ratio)
        humanoid = found.output.get("humanoid")
        return EmoDetection(
            sandbox=self.settings.sandbox,
            check_pass=found.check_pass,
            image_url=found.image.shown,
            ratio=ratio,
            output_size=OUTPUT_SIZE[ratio],
            face_bbox=found.face,
            ext_bbox=found.ext,
            humanoid=humanoid if isinstance(humanoid, bool) else None,
            code=found.code,
            message=found.message,
            request_id=found.request_id,
            model=found.model,
            evidence_dir=str(found.folder),
            warnings=found.warnings,
        )

    async def emoji_detect(self, image_url: str, model: str | None = None) -> EmojiDetection:
        # The contract's emoji-detect example sends ratio 1:1; emoji output is always square.
        found = await self._detect("emoji", self.resolve_model(EMOJI_DETECT, model), image_url, "1:1")
        return EmojiDetection(
            sandbox=self.settings.sandbox,
            check_pass=found.check_pass,
            image_url=found.image.shown,
            output_size=EMOJI_OUTPUT_SIZE,
            face_bbox=found.face,
            ext_bbox_face=found.ext,
            code=found.code,
            message=found.message,
            request_id=found.request_id,
            model=found.model,
            evidence_dir=str(found.folder),
            warnings=found.warnings,
        )

    async def _detect(self, family: Family, wire_model: str, image_url: str, ratio: str) -> Found:
        """Check, upload if local, call detect, keep evidence and record the outcome for provenance."""
        image, checked = await self._checked_image(image_url, family)
        wire_url = await self.wire_url(image, wire_model)
        folder = self.evidence.new_detection_dir(family)
        request = {"model": wire_model, "input": {"image_url": wire_url}, "parameters": {"ratio": ratio}}
        self.evidence.write_json(folder / "request.json", request)
        self._note_local(folder, image)
        body, failure = await self._detect_call(folder, wire_model, wire_url, ratio)
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        # Wire names differ: emo answers face_bbox/ext_bbox plus check_pass; emoji answers
        # bbox_face/ext_bbox_face and signals a failed check only by output.code.
        face_key, ext_key = ("face_bbox", "ext_bbox") if family == "emo" else ("bbox_face", "ext_bbox_face")
        face, ext = _box(output.get(face_key)), _box(output.get(ext_key))
        said_pass = output.get("check_pass") is True if family == "emo" else not output.get("code")
        check_pass = failure is None and said_pass and face is not None and ext is not None
        code = failure.code if failure else (None if check_pass else str(output.get("code") or "CheckFailed"))
        message = failure.upstream_message if failure else output.get("message")
        request_id = failure.request_id if failure else body.get("request_id")
        found = Found(
            model=wire_model,
            image=image,
            folder=folder,
            output=output,
            check_pass=check_pass,
            face=face if check_pass else None,
            ext=ext if check_pass else None,
            code=code,
            message=str(message) if message is not None else None,
            request_id=str(request_id) if request_id else None,
            warnings=checked.warnings,
        )
        self.ledger.add_detection(
            family=family,
            model=wire_model,
            image_url=image.identity,
            ratio=ratio,
            check_pass=check_pass,
            face_bbox=found.face,
            ext_bbox=found.ext,
            code=found.code,
            message=found.message,
            request_id=found.request_id,
            evidence_dir=str(folder),
        )
        return found

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

    async def plan_emo(
        self,
        image_url: str,
        audio_url: str,
        face_bbox: list[int],
        ext_bbox: list[int],
        style_level: str = "normal",
        model: str | None = None,
    ) -> Plan:
        """Everything checkable before money is involved: model, files, provenance, audio, estimate."""
        wire_model = self.resolve_model(EMO_GENERATE, model)
        image = await self._media("image_url", image_url)
        detection = self._provenance("emo", image, face_bbox, ext_bbox)
        ratio = detection.ratio or "1:1"
        audio = await self._media("audio_url", audio_url)
        checked = Checked()
        await self.preflight.audio(audio, "audio_url", checked)
        seconds = checked.audio.seconds if checked.audio is not None else None
        payload = {
            "model": wire_model,
            "input": {"image_url": image, "audio_url": audio, "face_bbox": face_bbox, "ext_bbox": ext_bbox},
            "parameters": {"style_level": style_level},
        }
        estimate = estimate_emo(self.settings.prices, ratio, seconds)
        return Plan("emo", payload, ratio, OUTPUT_SIZE.get(ratio, "512x512"), estimate, checked.warnings)

    async def plan_emoji(
        self,
        image_url: str,
        face_bbox: list[int],
        ext_bbox_face: list[int],
        template_id: str,
        model: str | None = None,
    ) -> Plan:
        wire_model = self.resolve_model(EMOJI_GENERATE, model)
        if template_id not in template_ids():
            raise RefusedInputError(
                f"template_id {template_id!r} is not an official Emoji template; "
                f"use one of: {', '.join(template_ids())}."
            )
        image = await self._media("image_url", image_url)
        self._provenance("emoji", image, face_bbox, ext_bbox_face)
        # Wire names differ from the tool's: driven_id, ext_bbox, and no parameters object.
        payload = {
            "model": wire_model,
            "input": {"image_url": image, "driven_id": template_id, "face_bbox": face_bbox, "ext_bbox": ext_bbox_face},
        }
        estimate = estimate_emoji(self.settings.prices, float(template_max_seconds()))
        return Plan("emoji", payload, "standard", EMOJI_OUTPUT_SIZE, estimate)

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

    async def carry_out(
        self, plan: Plan, *, dry_run: bool, approval: Approval, allow_duplicate: bool = False
    ) -> Submitted:
        """A dry run writes the request and stops; a real run passes the budget, uploads, then submits."""
        if dry_run:
            return self._dry_run(plan)
        check_budget(self.settings, plan.estimate, approval)
        model = str(plan.payload["model"])
        wire_input = {
            name: await self.wire_url(value, model) if isinstance(value, MediaRef) else value
            for name, value in plan.payload["input"].items()
        }
        submitted = await self._submit(
            plan.family, {**plan.payload, "input": wire_input}, plan.ratio, plan.output_size, allow_duplicate
        )
        assert submitted.task_id is not None
        record_estimate(self.ledger, submitted.task_id, plan.family, plan.estimate.cny, plan.estimate.basis)
        local = plan.inputs()
        if local:  # the evidence names the files behind the opaque oss:// keys
            self.evidence.write_json(Path(submitted.evidence_dir) / "local-files.json", local)
        return submitted.model_copy(
            update={
                "estimated_cost_cny": plan.estimate.cny,
                "estimate_basis": plan.estimate.basis,
                "warnings": plan.warnings,
                "inputs": local,
            }
        )

    def _dry_run(self, plan: Plan) -> Submitted:
        payload = plan.shown_payload()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder = self.evidence.family_dir(plan.family) / "dry-runs" / f"{stamp}-{uuid.uuid4().hex[:8]}"
        self.evidence.write_json(folder / "request.json", payload)
        estimate = {"estimated_cost_cny": plan.estimate.cny, "basis": plan.estimate.basis}
        self.evidence.write_json(folder / "estimate.json", estimate)
        notes = ["Dry run: nothing was uploaded or submitted."]
        if any(isinstance(v, MediaRef) and v.is_local for v in plan.payload["input"].values()):
            notes.append("Local files (file:// here) are uploaded to DashScope temporary storage at submit.")
        if over_ceiling(self.settings, plan.estimate):
            notes.append(f"A real submit would be refused: above EMO_MCP_MAX_COST_CNY={self.settings.max_cost_cny:g}.")
        notes.append("Call again without dry_run to submit.")
        return Submitted(
            sandbox=self.settings.sandbox,
            task_id=None,
            task_status="DRY_RUN",
            model=str(plan.payload["model"]),
            output_size=plan.output_size,
            evidence_dir=str(folder),
            next_step=" ".join(notes),
            dry_run=True,
            payload=payload,
            estimated_cost_cny=plan.estimate.cny,
            estimate_basis=plan.estimate.basis,
            warnings=plan.warnings,
            inputs=plan.inputs(),
        )

    # media ------------------------------------------------------------------

    async def _media(self, name: str, value: str) -> MediaRef:
        roots = self.settings.allowed_roots
        if is_remote(value):  # nothing to read from disk: no worker-thread hop
            return resolve_media(name, value, roots)
        return await anyio.to_thread.run_sync(lambda: resolve_media(name, value, roots))

    async def _checked_image(self, image_url: str, family: Family) -> tuple[MediaRef, Checked]:
        image = await self._media("image_url", image_url)
        checked = Checked()
        await self.preflight.image(image, family, "image_url", checked)
        return image, checked

    def _note_local(self, folder: Path, image: MediaRef) -> None:
        if image.path is not None:
            self.evidence.write_json(
                folder / "local-files.json", {"image_url": str(image.path), "sha256": image.sha256}
            )

    async def wire_url(self, ref: MediaRef, model: str) -> str:
        """What DashScope receives: the URL itself, or the local file's oss:// upload for `model`."""
        if ref.url is not None:
            return ref.url
        return await self.uploads.url_for(ref, model)

    def _provenance(self, family: Family, image: MediaRef, face: list[int], ext: list[int]) -> Detection:
        try:
            return require_detection(self.ledger, family, image.identity, face, ext)
        except ProvenanceError as exc:
            if not image.is_local:
                raise
            raise ProvenanceError(
                f"{exc} (The local file {image.shown} is matched by its content: if it changed since it was "
                "detected, detect it again.)"
            ) from exc

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


@dataclass(frozen=True)
class Found:
    """One detection's outcome, before it is shaped into the family's result."""

    model: str
    image: MediaRef
    folder: Path
    output: dict[str, Any]
    check_pass: bool
    face: list[int] | None
    ext: list[int] | None
    code: str | None
    message: str | None
    request_id: str | None
    warnings: list[str]


@dataclass(frozen=True)
class Plan:
    """A checked generate request: the payload (media still as references), its estimate, warnings."""

    family: Family
    payload: dict[str, Any]
    ratio: str
    output_size: str
    estimate: Estimate
    warnings: list[str] = field(default_factory=list)

    def media(self) -> dict[str, MediaRef]:
        return {name: v for name, v in self.payload["input"].items() if isinstance(v, MediaRef)}

    def inputs(self) -> dict[str, str] | None:
        """The local media files behind the oss:// keys sent; a URL is not echoed back (the caller has it)."""
        local = {name: ref.shown for name, ref in self.media().items() if ref.is_local}
        return local or None

    def shown_payload(self) -> dict[str, Any]:
        """The payload as it would be sent, local files shown as file:// URIs (uploaded at submit)."""
        shown = {name: _shown(v) if isinstance(v, MediaRef) else v for name, v in self.payload["input"].items()}
        return {**self.payload, "input": shown}


def _shown(ref: MediaRef) -> str:
    if ref.url is not None:
        return ref.url
    return ref.path.as_uri() if ref.path is not None else ref.original
