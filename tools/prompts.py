"""MCP prompts that walk a model through each chain, in the order the server enforces.

Arguments are checked as the tools check them (a media argument is a `MediaSource`; style level and
template id are enums), so a wrong value fails when the prompt is fetched, with what is allowed,
instead of later inside a paid call. A wrong prompt name or argument set is refused the same way
(`check_prompt_request`), with -32602: the SDK would answer code 0 and hide why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, get_args

from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, Prompt
from pydantic import Field, TypeAdapter, ValidationError

from server.models import template_catalogue, template_ids
from tools.schemas import MAX_WAIT_SECONDS, MediaSource, StyleLevel

STYLE_LEVELS: tuple[str, ...] = get_args(StyleLevel)
_MEDIA: TypeAdapter[str] = TypeAdapter(MediaSource)

_FOLLOW = (
    f"Then call task_status with that task_id and wait_seconds {MAX_WAIT_SECONDS}; repeat while finished is false "
    "(one call waits at most that long, to stay inside client timeouts). When it is SUCCEEDED the MP4 is already "
    "saved: report video_path. If it is FAILED, report code and message and do not resubmit without asking me."
)


def _invalid(message: str) -> MCPError:
    # The SDK hides any other exception's text behind "Error rendering prompt"; MCPError reaches the client.
    return MCPError(INVALID_PARAMS, message)


def _media(name: str, value: str) -> str:
    """A media argument, checked exactly as the tools' `MediaSource` (returned JSON-quoted for the text)."""
    try:
        checked = _MEDIA.validate_python(value)
    except ValidationError as exc:
        reason = str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")
        raise _invalid(f"{name}: {reason}. Nothing was sent or billed.") from exc
    return json.dumps(checked, ensure_ascii=False)


def check_prompt_request(prompts: Sequence[Prompt], name: str, arguments: Mapping[str, str] | None) -> None:
    """Refuse an unknown prompt, a missing required argument or an unknown one, naming what is allowed."""
    prompt = next((p for p in prompts if p.name == name), None)
    if prompt is None:
        known = ", ".join(p.name for p in prompts)
        raise _invalid(f"Unknown prompt {name!r}; this server's prompts are: {known} (see prompts/list).")
    declared = {arg.name: bool(arg.required) for arg in prompt.arguments or []}
    given = set(arguments or {})
    missing = sorted(arg for arg, required in declared.items() if required and arg not in given)
    if missing:
        raise _invalid(f"Prompt {name} needs the argument(s) {', '.join(missing)}.")
    unknown = sorted(given - set(declared))
    if unknown:
        allowed = ", ".join(declared)
        raise _invalid(f"Prompt {name} takes no argument(s) {', '.join(unknown)}; its arguments are: {allowed}.")


def talking_head(
    image_url: Annotated[str, Field(description="Portrait: http(s) URL, or local path or file:// URI.")],
    audio_url: Annotated[
        str, Field(description="Speech, WAV/MP3 (< 60 s, < 15 MB): http(s) URL, or local path or file:// URI.")
    ],
    style_level: Annotated[str, Field(description="normal (default), calm or active.")] = "normal",
) -> str:
    image, audio = _media("image_url", image_url), _media("audio_url", audio_url)
    if style_level not in STYLE_LEVELS:
        raise _invalid(f"style_level must be one of {', '.join(STYLE_LEVELS)} (got {style_level!r})")
    return (
        "Make a talking-head video with EMO from this portrait and speech.\n"
        f"- portrait: {image}\n- speech: {audio}\n- style_level: {style_level}\n\n"
        f'1. Call emo_detect with image_url {image} and ratio "1:1" (head shot, 512x512; use "3:4" for a '
        "half-body portrait, 512x704). It costs about 0.004 CNY. If check_pass is false, stop and tell me its "
        "code and message: generation would be refused.\n"
        f'2. Call emo_generate with the same image_url, audio_url {audio}, style_level "{style_level}", and '
        "face_bbox and ext_bbox copied unchanged from step 1. This is paid: 0.08 CNY per output second at 1:1, "
        "0.16 at 3:4; the video is as long as the audio. It returns a task_id.\n"
        f"3. {_FOLLOW}"
    )


def emoji_clip(
    image_url: Annotated[str, Field(description="Portrait: http(s) URL, or local path or file:// URI.")],
    template_id: Annotated[str, Field(description="An official template id; see the emoji://templates resource.")],
) -> str:
    image = _media("image_url", image_url)
    if template_id not in template_ids():
        raise _invalid(f"template_id must be an official template: {', '.join(template_ids())} (got {template_id!r})")
    meaning = next(f"{t['series_meaning']}, {t['meaning']}" for t in template_catalogue() if t["id"] == template_id)
    return (
        f"Make a short Emoji expression clip from this portrait with template {template_id} ({meaning}).\n\n"
        f"1. Call emoji_detect with image_url {image}. If check_pass is false, stop and tell me its code "
        "and message.\n"
        f'2. Call emoji_generate with the same image_url, template_id "{template_id}", and face_bbox and '
        "ext_bbox_face copied unchanged from step 1 (boxes from emo_detect do not count). This is paid; the clip "
        "is 512x512, silent, about 5 s or less. It returns a task_id.\n"
        f"3. {_FOLLOW}"
    )


def register_prompts(app: MCPServer[Any]) -> None:
    app.prompt(
        name="talking_head",
        title="Talking head (EMO)",
        description="Portrait + speech → talking-head video: emo_detect → emo_generate → task_status.",
    )(talking_head)
    app.prompt(
        name="emoji_clip",
        title="Emoji expression clip",
        description="Portrait + official template → short expression clip: emoji_detect → emoji_generate → "
        "task_status.",
    )(emoji_clip)
