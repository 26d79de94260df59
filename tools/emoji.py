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
from server.viewer.extension import viewer_meta
from tools.confirm import ConfirmSpend, NoQuestion, approval_of, ask_if_needed, began_of
from tools.context import run
from tools.registry import DETECT, GENERATE, publish
from tools.schemas import AllowDuplicate, Box, DryRun, MediaSource, choice

DETECT_DESCRIPTION = """Check a portrait for Emoji (emoji-detect-v1) and get the boxes emoji_generate needs.
Call this first: emoji_generate only accepts face_bbox/ext_bbox_face from a passing emoji_detect of the same \
image_url (boxes from emo_detect do not count).
Image: public http(s) URL or local file (path or file:// URI inside the server's allowed roots), \
JPG/PNG/BMP/WEBP, each side 400-7000 px, at most 10 MB, one front-facing, unoccluded person.
Cost: about 0.004 CNY per call (unconfirmed), billed even when the check fails.
Returns check_pass and the boxes; on a failed check, code and message."""

GENERATE_DESCRIPTION = """Start an Emoji expression clip (emoji-v1): 512x512, silent, about 5 s or less. Paid.
Requires a passing emoji_detect of the same image_url: pass its face_bbox and ext_bbox_face unchanged.
Cost: about 0.08 CNY per output second (unconfirmed; estimated_cost_cny in the result). Runs 1-5 minutes.
An identical request returns its alive or succeeded task (deduplicated: true) instead of billing again.
Then follow task_id with task_status (the video is downloaded when the task succeeds)."""


def build(settings: Settings) -> list[Tool]:
    detect_models = choice((EMOJI_DETECT, *settings.model_aliases.get(EMOJI_DETECT, ())))
    generate_models = choice((EMOJI_GENERATE, *settings.model_aliases.get(EMOJI_GENERATE, ())))
    template_ids = choice(tuple(t.id for t in templates()))
    template_help = f"Official template; ids are series_name. {template_summary()}."

    async def emoji_detect(
        image_url: Annotated[MediaSource, Field(description="Portrait URL or local path.")],
        ctx: Context[Any, Any],
        model: Annotated[detect_models | None, Field(description="Defaults to emoji-detect-v1.")] = None,  # type: ignore[valid-type]
    ) -> Annotated[CallToolResult, EmojiDetection]:
        return await run(
            ctx,
            audit="emoji_detect",
            call=lambda service, within: service.emoji_detect(image_url, model, within=within),
        )

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
        face_bbox: Annotated[Box, Field(description="From emoji_detect.")],
        ext_bbox_face: Annotated[Box, Field(description="From emoji_detect.")],
        template_id: Annotated[template_ids, Field(description=template_help)],  # type: ignore[valid-type]
        ctx: Context[Any, Any],
        confirmation: Annotated[ElicitationResult[ConfirmSpend], Resolve(confirm_emoji)],
        model: Annotated[generate_models | None, Field(description="Defaults to emoji-v1.")] = None,  # type: ignore[valid-type]
        dry_run: DryRun = False,
        allow_duplicate: AllowDuplicate = False,
    ) -> Annotated[CallToolResult, Submitted]:
        approval = approval_of(confirmation)
        return await run(
            ctx,
            lambda service, within: service.emoji_generate(
                image_url,
                face_bbox,
                ext_bbox_face,
                template_id,
                model,
                dry_run=dry_run,
                approval=approval,
                allow_duplicate=allow_duplicate,
                within=within,
            ),
            began=began_of(confirmation),
            audit="emoji_generate",
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


def template_summary() -> str:
    """The catalogue in few tokens: "mengwa (cute kid): kaixin=happy, ...; dagong (office worker): ..."."""
    series: dict[tuple[str, str], list[str]] = {}
    for t in templates():
        series.setdefault((t.series, t.series_meaning), []).append(f"{t.id.removeprefix(t.series + '_')}={t.meaning}")
    return "; ".join(f"{name} ({meaning}): {', '.join(items)}" for (name, meaning), items in series.items())
