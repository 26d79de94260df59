"""emo_detect and emo_generate: portrait + speech → talking-head video (emo-v1)."""

from typing import Annotated, Any

from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult
from pydantic import Field

from server.config import Settings
from server.models import EMO_DETECT, EMO_GENERATE
from server.results import EmoDetection, Submitted
from server.viewer.extension import viewer_meta
from tools.confirm import ConfirmSpend, NoQuestion, approval_of, ask_if_needed, began_of
from tools.context import run
from tools.registry import DETECT, GENERATE, publish
from tools.schemas import AllowDuplicate, Box, DryRun, MediaSource, Ratio, StyleLevel, choice

DETECT_DESCRIPTION = """Check a portrait for EMO (emo-detect-v1) and get the boxes emo_generate needs.
Call this first: emo_generate only accepts face_bbox/ext_bbox from a passing emo_detect of the same image_url.
Image: public http(s) URL or local file (path or file:// URI inside the server's allowed roots; uploaded to \
DashScope temporary storage), JPG/PNG/BMP/WEBP, each side 400-7000 px, one clear front-facing person.
Cost: about 0.004 CNY per call, billed even when the check fails.
Returns check_pass and the boxes; on a failed check, code and message."""

GENERATE_DESCRIPTION = """Start an EMO talking-head video (emo-v1) from a portrait and speech. Paid.
Requires a passing emo_detect of the same image_url: pass its face_bbox and ext_bbox unchanged (other boxes \
are refused before anything is sent).
Audio: WAV or MP3, under 15 MB and 60 s, a clear voice; the video is as long as the audio. Local files are \
checked here first, for free.
Cost: 0.08 CNY per output second at 1:1, 0.16 at 3:4 (estimated_cost_cny in the result). The server may \
refuse a job above its cost ceiling, or ask the user to confirm it.
An identical request returns its alive or succeeded task (deduplicated: true) instead of billing again.
Then follow task_id with task_status (the video is downloaded when the task succeeds)."""


def build(settings: Settings) -> list[Tool]:
    detect_models = choice((EMO_DETECT, *settings.model_aliases.get(EMO_DETECT, ())))
    generate_models = choice((EMO_GENERATE, *settings.model_aliases.get(EMO_GENERATE, ())))

    async def emo_detect(
        image_url: Annotated[MediaSource, Field(description="Portrait URL or local path.")],
        ctx: Context[Any, Any],
        ratio: Annotated[
            Ratio, Field(description='"1:1" head shot (512x512 video) or "3:4" half body (512x704).')
        ] = "1:1",
        model: Annotated[detect_models | None, Field(description="Defaults to emo-detect-v1.")] = None,  # type: ignore[valid-type]
    ) -> Annotated[CallToolResult, EmoDetection]:
        return await run(
            ctx,
            audit="emo_detect",
            call=lambda service, within: service.emo_detect(image_url, ratio, model, within=within),
        )

    async def confirm_emo(
        ctx: Context[Any, Any],
        image_url: str,
        audio_url: str,
        face_bbox: list[int],
        ext_bbox: list[int],
        style_level: str,
        model: str | None,
        dry_run: bool,
    ) -> NoQuestion | Elicit[ConfirmSpend]:
        return await ask_if_needed(
            ctx,
            dry_run,
            lambda service: service.plan_emo(image_url, audio_url, face_bbox, ext_bbox, style_level, model),
        )

    async def emo_generate(
        image_url: Annotated[MediaSource, Field(description="The same image_url given to emo_detect.")],
        audio_url: Annotated[MediaSource, Field(description="Speech URL or local path.")],
        face_bbox: Annotated[Box, Field(description="From emo_detect.")],
        ext_bbox: Annotated[Box, Field(description="From emo_detect.")],
        ctx: Context[Any, Any],
        confirmation: Annotated[ElicitationResult[ConfirmSpend], Resolve(confirm_emo)],
        style_level: Annotated[StyleLevel, Field(description="Motion style.")] = "normal",
        model: Annotated[generate_models | None, Field(description="Defaults to emo-v1.")] = None,  # type: ignore[valid-type]
        dry_run: DryRun = False,
        allow_duplicate: AllowDuplicate = False,
    ) -> Annotated[CallToolResult, Submitted]:
        approval = approval_of(confirmation)
        return await run(
            ctx,
            lambda service, within: service.emo_generate(
                image_url,
                audio_url,
                face_bbox,
                ext_bbox,
                style_level,
                model,
                dry_run=dry_run,
                approval=approval,
                allow_duplicate=allow_duplicate,
                within=within,
            ),
            began=began_of(confirmation),
            audit="emo_generate",
        )

    return [
        publish(
            emo_detect,
            title="Detect a portrait for EMO",
            description=DETECT_DESCRIPTION,
            annotations=DETECT,
            meta=viewer_meta(),
        ),
        publish(
            emo_generate,
            title="Generate an EMO talking-head video",
            description=GENERATE_DESCRIPTION,
            annotations=GENERATE,
        ),
    ]
