"""The command line's jobs: detect, generate, status, templates.

Each one opens the same domain layer the MCP tools use (`runtime.open_service` → `Service`), so
provenance, evidence, the ledger and downloads behave exactly as they do for an agent. Output is
for people by default; `--json` prints one JSON document on stdout for scripts. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from server.cli.terminal import ProgressBar, table
from server.config import Settings
from server.domain.service import Service
from server.errors import (
    ConfigError,
    EmoMcpError,
    LedgerUnavailable,
    RefusedInputError,
    SubmitOutcomeUnknownError,
    UpstreamError,
    UpstreamUnavailableError,
)
from server.jobs.task_views import recent_views
from server.models import EMOJI_OUTPUT_SIZE, template_catalogue
from server.results import EmoDetection, EmojiDetection, Submitted, TaskStatus
from server.runtime import open_service

# Exit codes (documented in README "Command line").
EXIT_OK = 0  # done: detection passed, task submitted or succeeded, doctor all green
EXIT_FAILURE = 1  # ran, but the answer is "no": check failed, task FAILED/CANCELED/UNKNOWN, doctor found a problem
EXIT_USAGE = 2  # could not run as asked: bad arguments, configuration, input refused before sending
EXIT_UPSTREAM = 3  # DashScope refused the call or could not be reached (nothing lost; see the message)
EXIT_PENDING = 4  # the task has not finished yet (call status again, or use --wait)
EXIT_INTERRUPTED = 130

# Long enough for any task: DashScope fails a task that is unfinished after 3 hours.
FOREVER_SECONDS = 3 * 3600


# ----------------------------------------------------------------------------- argument types


def url_arg(value: str) -> str:
    """Checked by the same type the MCP tools publish (http(s), host, length)."""
    from tools.schemas import HttpUrl

    try:
        return str(TypeAdapter(HttpUrl).validate_python(value))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from exc


def box_arg(value: str) -> list[int]:
    """`x1,y1,x2,y2` as printed by `detect`; checked by the tools' box type."""
    from tools.schemas import Box

    try:
        numbers = [int(part) for part in value.replace(" ", "").strip("[]").split(",")]
        return list(TypeAdapter(Box).validate_python(numbers))
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a box: give four integers x1,y1,x2,y2 with x1 < x2 and y1 < y2, "
            "exactly as `detect` printed them"
        ) from exc


def exit_code_for(error: EmoMcpError) -> int:
    # An unreachable ledger database is a configuration to fix (EMO_MCP_DATABASE_URL, or start the database).
    if isinstance(error, ConfigError | RefusedInputError | LedgerUnavailable):
        return EXIT_USAGE
    if isinstance(error, UpstreamError | UpstreamUnavailableError | SubmitOutcomeUnknownError):
        return EXIT_UPSTREAM
    return EXIT_FAILURE


# ----------------------------------------------------------------------------- output


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def emit_json(data: Any) -> None:
    say(json.dumps(data, indent=2, ensure_ascii=False))


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump(mode="json")


def _boxes_hint(result: EmoDetection | EmojiDetection) -> str:
    ext = result.ext_bbox if isinstance(result, EmoDetection) else result.ext_bbox_face
    face = ",".join(map(str, result.face_bbox or []))
    return f"  boxes for generate: --face-bbox {face} --ext-bbox {','.join(map(str, ext or []))}"


def show_detection(result: EmoDetection | EmojiDetection) -> None:
    say(("✓ " if result.check_pass else "✗ ") + result.summary())
    if result.check_pass:
        say(_boxes_hint(result))
    say(f"  evidence: {result.evidence_dir}")


def show_status(status: TaskStatus) -> None:
    mark = {"SUCCEEDED": "✓ ", "FAILED": "✗ ", "CANCELED": "✗ ", "UNKNOWN": "✗ "}.get(status.task_status, "… ")
    say(mark + status.summary())
    if status.video_path:
        say(f"  video: {status.video_path}")
    if status.usage and status.usage.get("video_duration") is not None:
        say(f"  billed seconds: {status.usage['video_duration']}")
    if status.evidence_dir:
        say(f"  evidence: {status.evidence_dir}")


def status_exit(status: TaskStatus) -> int:
    if status.task_status == "SUCCEEDED":
        return EXIT_OK if status.video_path else EXIT_FAILURE
    return EXIT_FAILURE if status.finished else EXIT_PENDING


# ----------------------------------------------------------------------------- commands


async def _follow(service: Service, task_id: str, wait: float) -> TaskStatus:
    """Wait inside one domain call; the bar is fed by the same progress hook the MCP tool uses."""
    if wait <= 0:
        return await service.task_status(task_id)
    bar = ProgressBar(sys.stderr, f"task {task_id}", bounded=wait < FOREVER_SECONDS)
    try:
        return await service.task_status(task_id, wait, bar.update)
    finally:
        bar.close()


async def detect(settings: Settings, args: argparse.Namespace) -> int:
    async with open_service(settings) as service:
        result: EmoDetection | EmojiDetection
        if args.family == "emo":
            result = await service.emo_detect(args.image_url, args.ratio, args.model)
        else:
            result = await service.emoji_detect(args.image_url, args.model)
    if args.json:
        emit_json(_dump(result))
    else:
        show_detection(result)
    return EXIT_OK if result.check_pass else EXIT_FAILURE


async def _detect_for_generate(service: Service, args: argparse.Namespace) -> EmoDetection | EmojiDetection:
    if not args.json:
        sys.stderr.write("No boxes given: detecting the portrait first (a detection is billed, about 0.004 CNY).\n")
    if args.family == "emo":
        return await service.emo_detect(args.image_url, args.ratio)
    return await service.emoji_detect(args.image_url)


async def generate(settings: Settings, args: argparse.Namespace) -> int:
    detection: EmoDetection | EmojiDetection | None = None
    status: TaskStatus | None = None
    # Refuse incomplete input before anything is billed (a detection included).
    if args.family == "emo" and args.audio_url is None:
        raise RefusedInputError("EMO needs speech: add --audio-url with a public WAV/MP3 URL (< 60 s, < 15 MB).")
    if args.family == "emoji" and args.template_id is None:
        raise RefusedInputError("Emoji needs --template-id; list them with: dashscope-emo-mcp templates")
    if (args.face_bbox is None) != (args.ext_bbox is None):
        raise RefusedInputError("Give both --face-bbox and --ext-bbox (from one detection), or neither.")
    async with open_service(settings) as service:
        face, ext = args.face_bbox, args.ext_bbox
        if face is None or ext is None:
            detection = await _detect_for_generate(service, args)
            if not detection.check_pass:
                if args.json:
                    emit_json({"detection": _dump(detection), "submitted": None, "status": None})
                else:
                    show_detection(detection)
                return EXIT_FAILURE
            face = detection.face_bbox
            ext = detection.ext_bbox if isinstance(detection, EmoDetection) else detection.ext_bbox_face
            if not args.json:
                show_detection(detection)
        submitted: Submitted
        if args.family == "emo":
            submitted = await service.emo_generate(
                args.image_url, args.audio_url, face, ext, args.style_level, args.model
            )
        else:
            submitted = await service.emoji_generate(args.image_url, face, ext, args.template_id, args.model)
        if not args.json:
            say("✓ " + submitted.summary().replace(submitted.next_step, "").rstrip())
            say(f"  evidence: {submitted.evidence_dir}")
        if args.wait is not None and submitted.task_id is not None:
            status = await _follow(service, submitted.task_id, args.wait)
        elif not args.json:
            say(f"  follow it with: dashscope-emo-mcp status {submitted.task_id} --wait")
    if args.json:
        emit_json({"detection": _dump(detection), "submitted": _dump(submitted), "status": _dump(status)})
    elif status is not None:
        show_status(status)
    return EXIT_OK if status is None else status_exit(status)


async def status(settings: Settings, args: argparse.Namespace) -> int:
    async with open_service(settings, recover=False) as service:
        if args.task_id is None:
            views = recent_views(service.ledger, service.settings.prices, limit=args.limit)
            if args.json:
                emit_json({"tasks": views})
            elif not views:
                say(f"No tasks in the ledger at {service.ledger.location} yet.")
            else:
                headers = ("task_id", "model", "status", "billed_s", "video_path")
                keys = ("task_id", "model", "status", "billed_seconds", "video_path")
                for line in table(headers, [[view[key] for key in keys] for view in views]):
                    say(line)
            return EXIT_OK
        result = await _follow(service, args.task_id, args.wait or 0)
    if args.json:
        emit_json(_dump(result))
    else:
        show_status(result)
    return status_exit(result)


def templates(args: argparse.Namespace) -> int:
    catalogue = template_catalogue()
    if args.json:
        emit_json({"output_size": EMOJI_OUTPUT_SIZE, "templates": catalogue})
        return EXIT_OK
    rows = [[t["id"], t["series"], t["series_meaning"], t["meaning"]] for t in catalogue]
    for line in table(("template_id", "series", "series meaning", "expression"), rows):
        say(line)
    seconds = catalogue[0]["typical_max_seconds"] if catalogue else "?"
    say(f"\nEmoji clips are {EMOJI_OUTPUT_SIZE}, silent, typically {seconds} s or less.")
    return EXIT_OK
