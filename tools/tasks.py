"""task_status and task_cancel: follow an emo-v1 / emoji-v1 task to its end, or cancel it while PENDING."""

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult
from pydantic import Field

from server.results import TaskStatus
from server.viewer.extension import viewer_meta
from tools import schemas
from tools.context import run
from tools.registry import CANCEL, STATUS, publish
from tools.schemas import MAX_WAIT_SECONDS, TaskId, WaitSeconds

DESCRIPTION = """Status of a task from emo_generate or emoji_generate. Free to call.
Statuses: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED, UNKNOWN (wrong id, or older than 24 h); a submit \
with no answer: SUBMITTING, SUBMIT_OUTCOME_UNKNOWN (being looked up), NOT_FOUND (likely never created).
On SUCCEEDED the MP4 is already saved at video_path (video_url expires 24 h after the end); on FAILED, code and \
message.
The server follows every task and downloads its video in the background, whether or not you call this; \
queue_ahead counts this server's earlier tasks of the same model that run first (one at a time)."""

WAIT = (
    f"Poll in this call until the task ends, up to this many seconds; capped at {MAX_WAIT_SECONDS} to stay "
    "inside client timeouts: call again to wait longer."
)

CANCEL_DESCRIPTION = """Cancel a task still PENDING (queued, not started); nothing is billed for it.
A RUNNING or finished task cannot be cancelled (a running one finishes and is billed as normal); the error \
says its state. Returns the task's status, CANCELED on success."""


def build() -> list[Tool]:
    async def task_status(
        task_id: Annotated[TaskId, Field(description="From emo_generate or emoji_generate.")],
        ctx: Context[Any, Any],
        wait_seconds: Annotated[WaitSeconds, Field(description=WAIT)] = 0,
    ) -> Annotated[CallToolResult, TaskStatus]:
        async def progress(done: float, total: float, message: str) -> None:
            await ctx.report_progress(done, total, message)

        wait = min(wait_seconds, schemas.MAX_WAIT_SECONDS)
        return await run(ctx, lambda service, within: service.task_status(task_id, wait, progress, within=within))

    async def task_cancel(
        task_id: Annotated[TaskId, Field(description="From emo_generate or emoji_generate.")],
        ctx: Context[Any, Any],
    ) -> Annotated[CallToolResult, TaskStatus]:
        return await run(ctx, lambda service, within: service.task_cancel(task_id, within=within))

    return [
        publish(task_cancel, title="Cancel a pending task", description=CANCEL_DESCRIPTION, annotations=CANCEL),
        publish(
            task_status,
            title="Task status and video download",
            description=DESCRIPTION,
            annotations=STATUS,
            meta=viewer_meta(),
        ),
    ]
