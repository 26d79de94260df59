"""Generation: a checked plan first (free), then the budget, the uploads and one submit (paid).

Planning is separate from carrying out so a cost confirmation can be asked between the two
(`tools/confirm.py`) and a dry run can stop before anything is uploaded or sent. Carrying out is
bounded by the caller's deadline, but the submit itself is not: it runs in the background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import Settings
from server.domain.budget import Approval, check_budget, check_daily_budget, check_model, over_ceiling, utc_day_start
from server.domain.inputs import Inputs, resolve_model
from server.errors import (
    BudgetRefusedError,
    EmoMcpError,
    RefusedInputError,
    SubmitOutcomeUnknownError,
    UpstreamError,
    UpstreamUnavailableError,
)
from server.jobs.submits import InFlight, PendingSubmit, Submitter
from server.jobs.tasks import Background, Deadline, Job
from server.media.preflight import Checked
from server.media.sources import MediaRef
from server.models import (
    EMO_GENERATE,
    EMOJI_GENERATE,
    EMOJI_OUTPUT_SIZE,
    OUTPUT_SIZE,
    Family,
    template_ids,
    template_max_seconds,
)
from server.pricing import Estimate, estimate_emo, estimate_emoji
from server.results import Submitted
from server.store.evidence import Evidence
from server.store.ledger import SUBMITTING, Ledger
from server.store.spend import drop_estimate, record_estimate, spent_since

# How long the refusal of a submit handed off to the background is remembered for its local id.
HANDED_OFF_KEEP_SECONDS = 24 * 3600.0


# The official generate model of each family (a deployment alias counts as its model for `models`).
GENERATE_MODEL: dict[Family, str] = {"emo": EMO_GENERATE, "emoji": EMOJI_GENERATE}


class Generator:
    """`emo_generate` and `emoji_generate`: plan, then dry run or budget, uploads and submit."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        evidence: Evidence,
        inputs: Inputs,
        submitter: Submitter,
        background: Background,
    ):
        self.settings = settings
        self.ledger = ledger
        self.evidence = evidence
        self.inputs = inputs
        self.submitter = submitter
        self.background = background
        # Submits whose caller left before DashScope answered: a refusal deletes the row, so it is told here.
        self._handed_off: dict[str, Job[Submitted]] = {}

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
        wire_model = resolve_model(self.settings, EMO_GENERATE, model)
        image = await self.inputs.media("image_url", image_url)
        detection = self.inputs.provenance("emo", image, face_bbox, ext_bbox)
        ratio = detection.ratio or "1:1"
        audio = await self.inputs.media("audio_url", audio_url)
        checked = Checked()
        await self.inputs.preflight.audio(audio, "audio_url", checked)
        seconds = checked.audio.seconds if checked.audio is not None else None
        payload = {
            "model": wire_model,
            "input": {"image_url": image, "audio_url": audio, "face_bbox": face_bbox, "ext_bbox": ext_bbox},
            "parameters": {"style_level": style_level},
        }
        estimate = estimate_emo(self.settings.prices, ratio, seconds)
        return Plan("emo", payload, ratio, OUTPUT_SIZE.get(ratio, "512x512"), estimate, checked.warnings, seconds)

    async def plan_emoji(
        self,
        image_url: str,
        face_bbox: list[int],
        ext_bbox_face: list[int],
        template_id: str,
        model: str | None = None,
    ) -> Plan:
        wire_model = resolve_model(self.settings, EMOJI_GENERATE, model)
        if template_id not in template_ids():
            raise RefusedInputError(
                f"template_id {template_id!r} is not an official Emoji template; "
                f"use one of: {', '.join(template_ids())}."
            )
        image = await self.inputs.media("image_url", image_url)
        self.inputs.provenance("emoji", image, face_bbox, ext_bbox_face)
        # Wire names differ from the tool's: driven_id, ext_bbox, and no parameters object.
        payload = {
            "model": wire_model,
            "input": {"image_url": image, "driven_id": template_id, "face_bbox": face_bbox, "ext_bbox": ext_bbox_face},
        }
        estimate = estimate_emoji(self.settings.prices, float(template_max_seconds()))
        return Plan("emoji", payload, "standard", EMOJI_OUTPUT_SIZE, estimate, [], float(template_max_seconds()))

    async def carry_out(
        self,
        plan: Plan,
        *,
        dry_run: bool,
        approval: Approval,
        allow_duplicate: bool = False,
        deadline: Deadline | None = None,
    ) -> Submitted:
        """A dry run writes the request and stops; a real run passes the budget, uploads, then submits.

        The uploads and the submit run as background jobs, waited for until `deadline`: out of time
        (or cancelled by the client), the submit still ends as the real task or SUBMIT_OUTCOME_UNKNOWN.
        """
        model = str(plan.payload["model"])
        check_model(self.settings, model, GENERATE_MODEL[plan.family])
        if dry_run:
            return self._dry_run(plan)
        check_budget(self.settings, plan.estimate, approval)
        self._check_day(plan)  # before the uploads (free, but sent); checked again with the row (_hold_budget)
        deadline = deadline or Deadline()
        # Free, and cached in the ledger once done: an upload slower than the call serves the next call.
        uploads = self.background.start(lambda: self._wire_input(plan, model))
        if not await uploads.wait(deadline.left()):
            raise UpstreamUnavailableError(
                f"Uploading the local files to DashScope's temporary storage took longer than {deadline.said()}. "
                f"Nothing was submitted and nothing is billed. The upload goes on in the background: call "
                f"{plan.family}_generate again in a moment (a finished upload is reused)."
            )
        # An identical submit in flight (on this worker or another) is joined: its answer is this call's
        # too (`deduplicated`). Should its row go (refused outright), this call sends its own, once.
        for attempt in range(2):
            started = self.submitter.begin(
                plan.family,
                {**plan.payload, "input": uploads.result()},
                plan.ratio,
                plan.output_size,
                allow_duplicate=allow_duplicate,
            )
            if not isinstance(started, InFlight):
                break
            joined = await self.submitter.join(started, deadline.left())
            if joined is not None:
                return self._finish(joined, plan)
            if attempt:
                raise UpstreamUnavailableError(
                    f"Identical {model} requests sent at the same moment were refused twice by DashScope; this call "
                    "sent nothing and nothing is billed for it. Call again (the refusal's reason is in the other "
                    "call's answer)."
                )
        assert not isinstance(started, InFlight)
        if isinstance(started, Submitted):  # deduplicated: nothing to send
            return self._finish(started, plan)
        self._hold_budget(started, plan)
        # From the row on, the submit is the background's: it records its outcome whatever the caller does.
        submit = self.background.start(lambda: self._send(started, plan))
        if await submit.wait(deadline.left()):
            return submit.result()
        self._handed_off[started.local_id] = submit
        return self._in_progress(started, plan, deadline)

    def refusal(self, local_id: str) -> EmoMcpError | None:
        """Why a submit answered only by its local id was refused after its caller left (its row is gone)."""
        now = time.monotonic()
        for old in [k for k, j in self._handed_off.items() if now - (j.finished_at or now) > HANDED_OFF_KEEP_SECONDS]:
            del self._handed_off[old]
        job = self._handed_off.get(local_id)
        if job is None or not job.done:
            return None
        try:
            job.result()
        except UpstreamError as exc:
            return type(exc)(
                exc.status_code,
                exc.code,
                f"the submit under local id {local_id} was refused, so no task was created and nothing is "
                f"billed: {exc.upstream_message or exc.code}",
                exc.request_id,
            )
        except UpstreamUnavailableError as exc:
            return UpstreamUnavailableError(
                f"The submit under local id {local_id} never reached DashScope ({exc}); no task was created "
                "and nothing is billed."
            )
        except SubmitOutcomeUnknownError:
            return None  # an unknown outcome: its row is in the ledger, followed as usual
        except Exception as exc:
            # Its row went without an answer from DashScope: the request was never sent (recording that it
            # was about to leave failed, say), so the caller is told that, not that the id is unknown.
            return UpstreamUnavailableError(
                f"The submit under local id {local_id} was not sent ({exc}); no task was created and nothing "
                "is billed. Call the generate tool again."
            )
        return None

    async def _wire_input(self, plan: Plan, model: str) -> dict[str, Any]:
        return {
            name: await self.inputs.wire_url(value, model) if isinstance(value, MediaRef) else value
            for name, value in plan.payload["input"].items()
        }

    async def _send(self, started: PendingSubmit, plan: Plan) -> Submitted:
        held = self.settings.daily_budget_cny is not None
        try:
            submitted = await self.submitter.send(started)
        except SubmitOutcomeUnknownError:
            raise  # the row stays, maybe billed: its held estimate keeps counting against the day's budget
        except BaseException:
            if held:
                drop_estimate(self.ledger, started.local_id)  # refused or never sent: the row is gone
            raise
        try:
            return self._finish(submitted, plan)
        finally:
            if held and submitted.task_id != started.local_id:
                drop_estimate(self.ledger, started.local_id)  # the task's own estimate is recorded now

    def _check_day(self, plan: Plan) -> None:
        """The tenant's daily budget (none for a single-user server unless configured per tenant)."""
        if self.settings.daily_budget_cny is None:
            return
        now = time.time()
        check_daily_budget(
            self.settings, plan.estimate, spent_since(self.ledger, self.settings.prices, utc_day_start(now)), now
        )

    def _hold_budget(self, started: PendingSubmit, plan: Plan) -> None:
        """With a daily budget: the new row's estimate goes into the ledger at once (under its local id), and
        the day is summed again with it counted. Every worker's rows count in every worker's sums, so two
        calls racing for the last of a budget can never both go: the later sum of each sees the other's row
        (at worst both see both and both are refused, and nothing is overspent)."""
        if self.settings.daily_budget_cny is None:
            return
        record_estimate(self.ledger, started.local_id, plan.family, plan.estimate.cny, plan.estimate.basis)
        now = time.time()
        spent = spent_since(self.ledger, self.settings.prices, utc_day_start(now))
        try:
            check_daily_budget(self.settings, plan.estimate, spent - plan.estimate.cny, now)
        except BudgetRefusedError:
            self.submitter.withdraw(started)
            drop_estimate(self.ledger, started.local_id)
            raise

    def _finish(self, submitted: Submitted, plan: Plan) -> Submitted:
        assert submitted.task_id is not None
        if not submitted.deduplicated:
            self.submitter.expect(submitted.task_id, plan.output_seconds)
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

    def _in_progress(self, started: PendingSubmit, plan: Plan, deadline: Deadline) -> Submitted:
        """DashScope has not answered the submit in time: the call says where to follow it."""
        local_id = started.local_id
        return Submitted(
            sandbox=self.settings.sandbox,
            task_id=local_id,
            task_status=SUBMITTING,
            model=started.model,
            output_size=started.output_size,
            evidence_dir=str(started.folder),
            next_step=(
                f"DashScope has not answered the submit within {deadline.said()}; it is still in progress in the "
                f"background under local id {local_id}. Call task_status with task_id {local_id} (wait_seconds up "
                "to 50): it turns into the real task id once the answer arrives, and the video is downloaded when "
                "the task succeeds. Do NOT submit again: a task may exist and be billed, and an identical "
                "generate is refused until this one is resolved."
            ),
            estimated_cost_cny=plan.estimate.cny,
            estimate_basis=plan.estimate.basis,
            warnings=plan.warnings,
            inputs=plan.inputs(),
        )

    def _dry_run(self, plan: Plan) -> Submitted:
        payload = plan.shown_payload()
        folder = self.evidence.stamped_dir(plan.family, "dry-runs")
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


@dataclass(frozen=True)
class Plan:
    """A checked generate request: the payload (media still as references), its estimate, warnings."""

    family: Family
    payload: dict[str, Any]
    ratio: str
    output_size: str
    estimate: Estimate
    warnings: list[str] = field(default_factory=list)
    # The output length the task is expected to have (EMO: the audio's; Emoji: its template's), if known:
    # the watcher's schedule estimates the task's end from it.
    output_seconds: float | None = None

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
