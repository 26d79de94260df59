"""MCP prompts that walk a model through each chain, in the order the server enforces.

Arguments are checked here (style level, template id) so a wrong value fails when the prompt is
fetched, with the allowed values, instead of later inside a paid call.
"""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from pydantic import Field

from server.models import template_catalogue, template_ids
from tools.schemas import MAX_WAIT_SECONDS

STYLE_LEVELS = ("normal", "calm", "active")

_FOLLOW = (
    f"Then call task_status with that task_id and wait_seconds {MAX_WAIT_SECONDS}; repeat while finished is false "
    "(one call waits at most that long, to stay inside client timeouts). When it is SUCCEEDED the MP4 is already "
    "saved: report video_path. If it is FAILED, report code and message and do not resubmit without asking me."
)


def _invalid(message: str) -> MCPError:
    # The SDK hides any other exception's text behind "Error rendering prompt"; MCPError reaches the client.
    return MCPError(INVALID_PARAMS, message)


def talking_head(
    image_url: Annotated[str, Field(description="Public http(s) URL of the portrait.")],
    audio_url: Annotated[str, Field(description="Public http(s) URL of WAV/MP3 speech (< 60 s, < 15 MB).")],
    style_level: Annotated[str, Field(description="normal (default), calm or active.")] = "normal",
) -> str:
    if style_level not in STYLE_LEVELS:
        raise _invalid(f"style_level must be one of {', '.join(STYLE_LEVELS)} (got {style_level!r})")
    return (
        "Make a talking-head video with EMO from this portrait and speech.\n"
        f"- portrait: {image_url}\n- speech: {audio_url}\n- style_level: {style_level}\n\n"
        f'1. Call emo_detect with image_url "{image_url}" and ratio "1:1" (head shot, 512x512; use "3:4" for a '
        "half-body portrait, 512x704). It costs about 0.004 CNY. If check_pass is false, stop and tell me its "
        "code and message: generation would be refused.\n"
        f'2. Call emo_generate with the same image_url, audio_url "{audio_url}", style_level "{style_level}", and '
        "face_bbox and ext_bbox copied unchanged from step 1. This is paid: 0.08 CNY per output second at 1:1, "
        "0.16 at 3:4; the video is as long as the audio. It returns a task_id.\n"
        f"3. {_FOLLOW}"
    )


def emoji_clip(
    image_url: Annotated[str, Field(description="Public http(s) URL of the portrait.")],
    template_id: Annotated[str, Field(description="An official template id; see the emoji://templates resource.")],
) -> str:
    if template_id not in template_ids():
        raise _invalid(f"template_id must be an official template: {', '.join(template_ids())} (got {template_id!r})")
    meaning = next(f"{t['series_meaning']}, {t['meaning']}" for t in template_catalogue() if t["id"] == template_id)
    return (
        f"Make a short Emoji expression clip from this portrait with template {template_id} ({meaning}).\n\n"
        f'1. Call emoji_detect with image_url "{image_url}". If check_pass is false, stop and tell me its code '
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
