"""Detection: one paid detect call per portrait, kept as evidence and recorded for provenance.

A failed check is a result the agent acts on (pick another portrait), not a tool error; what
the check returned is recorded either way, because generation accepts only the boxes of a
passing detection of the same image. An answer that is neither a clear pass nor a clear failure
(a pass without readable boxes, no `output`) is an upstream error that says so: nothing is
recorded, and the portrait is not blamed for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings
from server.domain.inputs import Inputs, resolve_model
from server.errors import InvalidInputError, UnreadableAnswerError
from server.media.sources import MediaRef
from server.models import EMO_DETECT, EMOJI_DETECT, EMOJI_OUTPUT_SIZE, OUTPUT_SIZE, Family
from server.results import EmoDetection, EmojiDetection
from server.store.evidence import Evidence, Opened, encode
from server.store.ledger import Ledger
from server.upstream.client import DashScopeClient

logger = logging.getLogger(__name__)


def _box(value: Any) -> list[int] | None:
    """`[x1, y1, x2, y2]` of non-negative integers with x1 < x2 and y1 < y2, or None."""
    if not (isinstance(value, list) and len(value) == 4):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    x1, y1, x2, y2 = value
    return [x1, y1, x2, y2] if x1 < x2 and y1 < y2 else None


def _billed(body: dict[str, Any]) -> str:
    usage = body.get("usage")
    count = usage.get("image_count") if isinstance(usage, dict) else None
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return f"It was billed (usage: {count} image)."
    return "It may have been billed (one detection)."


def _read_answer(family: Family, body: dict[str, Any]) -> tuple[bool, list[int] | None, list[int] | None]:
    """(check passed, face box, ext box) from a 200 answer, or a `ValueError` saying why it cannot be read."""
    output = body.get("output")
    if not isinstance(output, dict):
        raise ValueError("it has no output object")
    # Wire names differ: emo answers face_bbox/ext_bbox plus check_pass; emoji answers
    # bbox_face/ext_bbox_face and signals a failed check only by output.code.
    face_key, ext_key = ("face_bbox", "ext_bbox") if family == "emo" else ("bbox_face", "ext_bbox_face")
    if family == "emo":
        said = output.get("check_pass")
        if not isinstance(said, bool):
            raise ValueError(f"its check_pass is {said!r}, not true or false")
        passed = said
    else:
        code = output.get("code")
        if code is not None and not isinstance(code, str):
            raise ValueError(f"its code is {code!r}")
        passed = not code
    if not passed:
        return False, None, None
    face, ext = _box(output.get(face_key)), _box(output.get(ext_key))
    for key, box in ((face_key, face), (ext_key, ext)):
        if box is None:
            raise ValueError(f"it passed the check but its {key} is {str(output.get(key))[:60]}, not a box")
    return True, face, ext


class Detector:
    """`emo_detect` and `emoji_detect`: the two families differ only in wire names."""

    def __init__(self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence, inputs: Inputs):
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.evidence = evidence
        self.inputs = inputs

    async def emo_detect(self, image_url: str, ratio: str = "1:1", model: str | None = None) -> EmoDetection:
        found = await self._detect("emo", resolve_model(self.settings, EMO_DETECT, model), image_url, ratio)
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
        found = await self._detect("emoji", resolve_model(self.settings, EMOJI_DETECT, model), image_url, "1:1")
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
        image, checked = await self.inputs.checked_image(image_url, family)
        wire_url = await self.inputs.wire_url(image, wire_model)
        request = {"model": wire_model, "input": {"image_url": wire_url}, "parameters": {"ratio": ratio}}
        # The folder, request.json (and local-files.json) and an empty response.json (new inodes: the
        # costly part of evidence) are made while the request is in flight, on the loop, once it is on
        # the wire; the answer then only fills and renames a file.
        files: dict[str, Any] = {"request.json": request}
        local = self.inputs.local_note(image)
        if local is not None:
            files["local-files.json"] = local
        # A detect is billed and is worthless unrecorded (provenance), so the ledger must answer first:
        # free when a statement succeeded within the last second, else one `SELECT 1`; while the database
        # is away it raises at once (`LedgerUnavailable`: nothing was sent).
        self.ledger.ping()
        opening = _Opening(self.evidence, family, files)
        try:
            body, failure = await self._detect_call(wire_model, wire_url, ratio, on_sent=opening)
        except BaseException:
            opening.close()  # the request is kept; there is no answer to keep
            raise
        opened = opening.result()
        folder = opened.folder
        opened.fill(body if failure is None else _refusal_evidence(failure))
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        check_pass, face, ext = False, None, None
        if failure is None:
            try:
                check_pass, face, ext = _read_answer(family, body)
            except ValueError as exc:
                # Not a verdict on the portrait: nothing is recorded, and the agent is told so.
                raise UnreadableAnswerError(
                    f"DashScope's {wire_model} answer could not be read ({exc}). {_billed(body)} This says nothing "
                    f"about the portrait, which may well be fine: call {family}_detect again (at most one more "
                    f"detection is billed). The answer is saved in {folder / 'response.json'}."
                ) from exc
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
        self, model: str, image_url: str, ratio: str, *, on_sent: Callable[[], None]
    ) -> tuple[dict[str, Any], InvalidInputError | None]:
        """A portrait refused with `InvalidFile.*` is a failed check (a result), not a tool error."""
        try:
            return await self.client.detect(model, image_url, ratio, on_sent=on_sent), None
        except InvalidInputError as exc:
            if not exc.code.startswith("InvalidFile"):
                raise
            return {}, exc


class _Opening:
    """A detection's evidence folder, opened when the request is on the wire (`__call__`, from the
    client) or, if it never got there, when `result` is first asked for. A failure beside the call is
    logged and tried once more by `result`, whose failure is the call's error (as any evidence write's)."""

    def __init__(self, evidence: Evidence, family: Family, files: dict[str, Any]) -> None:
        self._evidence = evidence
        self._family = family
        self._files = files
        self._opened: Opened | None = None
        self._tried = False

    def _open(self) -> Opened:
        files = {name: encode(data) for name, data in self._files.items()}
        return self._evidence.open_detection(self._family, files, "response.json")

    def __call__(self) -> None:
        if self._tried:
            return
        self._tried = True
        try:
            self._opened = self._open()
        except Exception:  # never into the HTTP stack: `result` tries again and reports
            logger.exception("the detection's evidence folder could not be made while the request was in flight")

    def result(self) -> Opened:
        if self._opened is None:
            self._tried = True
            self._opened = self._open()
        return self._opened

    def close(self) -> None:
        """No answer to keep (the call failed): the request's evidence stays, the empty answer file goes."""
        try:
            self.result().drop()
        except Exception:  # the call's own error is the one to report
            logger.exception("the evidence of a failed detection could not be written")


def _refusal_evidence(exc: InvalidInputError) -> dict[str, Any]:
    return {
        "http_status": exc.status_code,
        "code": exc.code,
        "message": exc.upstream_message,
        "request_id": exc.request_id,
    }


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
