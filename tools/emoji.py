"""emoji_detect and emoji_generate: portrait + official template → short expression clip (emoji-v1)."""

from typing import Annotated, Any

from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult
from pydantic import Field

from server.config import Settings
from server.models import EMOJI_DETECT, EMOJI_GENERATE, templates
from server.results import EmojiDetection, Submitted
from server.viewer import viewer_meta
from tools.confirm import ConfirmSpend, NoQuestion, approval_of, ask_if_needed
from tools.context import run
from tools.registry import DETECT, GENERATE, publish
from tools.schemas import AllowDuplicate, Box, DryRun, MediaSource, choice

DETECT_DESCRIPTION = """Check a portrait for Emoji (emoji-detect-v1) and get the boxes emoji_generate needs.
Call this first: emoji_generate only accepts face_bbox/ext_bbox_face returned by a passing emoji_detect \
of the same image_url (boxes from emo_detect do not count).
Image: public http(s) URL or a local file (path or file:// URI inside the server's allowed roots), \
JPG/PNG/BMP/WEBP, 400-7000 px each side, at most 10 MB, one front-facing, unoccluded person.
Cost: about 0.004 CNY per call (unconfirmed), billed even when the check fails.
Returns check_pass, face_bbox, ext_bbox_face, request_id; on a failed check code and message."""

GENERATE_DESCRIPTION = """Start an Emoji expression clip (emoji-v1): 512x512, silent, about 5 s or less. Paid.
Requires a passing emoji_detect of the same image_url: pass its face_bbox and ext_bbox_face unchanged.
template_id must be one of the official templates (the enum); series: mengwa (cute kid), \
dagong (office worker), jingdian (classic).
Cost: about 0.08 CNY per output second (unconfirmed); the result carries estimated_cost_cny. dry_run=true \
returns the exact request and the estimate and submits nothing. Runs 1-5 minutes.
An identical request whose task is alive or succeeded returns that task (deduplicated: true) \
instead of billing a new one; allow_duplicate: true forces a new task.
Returns task_id and task_status; then call task_status (the video is downloaded when it succeeds)."""


def build(settings: Settings) -> list[Tool]:
    detect_models = choice((EMOJI_DETECT, *settings.model_aliases.get(EMOJI_DETECT, ())))
    generate_models = choice((EMOJI_GENERATE, *settings.model_aliases.get(EMOJI_GENERATE, ())))
    template_ids = choice(tuple(t.id for t in templates()))
    template_help = "; ".join(f"{t.id} ({t.meaning})" for t in templates())

    async def emoji_detect(
        image_url: Annotated[MediaSource, Field(description="Public http(s) URL or local path of the portrait.")],
        ctx: Context[Any, Any],
        model: Annotated[detect_models | None, Field(description="Defaults to emoji-detect-v1.")] = None,  # type: ignore[valid-type]
    ) -> Annotated[CallToolResult, EmojiDetection]:
        return await run(ctx, lambda service: service.emoji_detect(image_url, model))

    async def confirm_emoji(
        ctx: Context[Any, Any],
        image_url: str,
        face_bbox: list[int],
        ext_bbox_face: list[int],
        template_id: str,
        model: str | None,
        dry_run: bool,
    ) -> NoQuestion | Elicit[ConfirmSpend]:
        return await ask_if_needed(
            ctx, dry_run, lambda service: service.plan_emoji(image_url, face_bbox, ext_bbox_face, template_id, model)
        )

    async def emoji_generate(
        image_url: Annotated[MediaSource, Field(description="The same image_url given to emoji_detect.")],
        face_bbox: Annotated[Box, Field(description="face_bbox from emoji_detect, unchanged.")],
        ext_bbox_face: Annotated[Box, Field(description="ext_bbox_face from emoji_detect, unchanged.")],
        template_id: Annotated[template_ids, Field(description=f"Official template: {template_help}.")],  # type: ignore[valid-type]
        ctx: Context[Any, Any],
        confirmation: Annotated[ElicitationResult[ConfirmSpend], Resolve(confirm_emoji)],
        model: Annotated[generate_models | None, Field(description="Defaults to emoji-v1.")] = None,  # type: ignore[valid-type]
        dry_run: DryRun = False,
        allow_duplicate: AllowDuplicate = False,
    ) -> Annotated[CallToolResult, Submitted]:
        approval = approval_of(confirmation)
        return await run(
            ctx,
            lambda service: service.emoji_generate(
                image_url,
                face_bbox,
                ext_bbox_face,
                template_id,
                model,
                dry_run=dry_run,
                approval=approval,
                allow_duplicate=allow_duplicate,
            ),
        )

    return [
        publish(
            emoji_detect,
            title="Detect a portrait for Emoji",
            description=DETECT_DESCRIPTION,
            annotations=DETECT,
            meta=viewer_meta(),
        ),
        publish(
            emoji_generate,
            title="Generate an Emoji expression clip",
            description=GENERATE_DESCRIPTION,
            annotations=GENERATE,
        ),
    ]
