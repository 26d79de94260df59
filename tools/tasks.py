"""task_status and task_cancel: follow an emo-v1 / emoji-v1 task to its end, or cancel it while PENDING."""

from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult
from pydantic import Field

from server.results import TaskStatus
from server.viewer import viewer_meta
from tools import schemas
from tools.context import run
from tools.registry import CANCEL, STATUS, publish
from tools.schemas import MAX_WAIT_SECONDS, TaskId, WaitSeconds

DESCRIPTION = f"""Get the status of a task from emo_generate or emoji_generate; download the video when done.
wait_seconds (default 0) keeps polling inside this call until the task ends or the wait runs out; it is \
capped at {MAX_WAIT_SECONDS} s so one call stays inside common MCP client timeouts: call again to wait longer.
Statuses: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED, UNKNOWN (wrong id, or older than 24 h).
On SUCCEEDED the MP4 is already saved: video_path is its absolute path (video_url expires after 24 h). \
On FAILED: code and message. Free to call.
The server follows every task in the background (and downloads its video) whether or not you call this; \
queue_ahead says how many of this server's earlier tasks of the same model run first (one at a time)."""

CANCEL_DESCRIPTION = """Cancel a task that is still PENDING (queued, not started) upstream; nothing is billed for it.
A RUNNING or finished task cannot be cancelled: the error says which state it is in (a running task \
finishes and is billed as normal). Returns the task's status, CANCELED on success."""


def build() -> list[Tool]:
    async def task_status(
        task_id: Annotated[TaskId, Field(description="task_id returned by emo_generate or emoji_generate.")],
        ctx: Context[Any, Any],
        wait_seconds: Annotated[
            WaitSeconds, Field(description=f"Seconds to wait for the task to end (capped at {MAX_WAIT_SECONDS}).")
        ] = 0,
    ) -> Annotated[CallToolResult, TaskStatus]:
        async def progress(done: float, total: float, message: str) -> None:
            await ctx.report_progress(done, total, message)

        wait = min(wait_seconds, schemas.MAX_WAIT_SECONDS)
        return await run(ctx, lambda service: service.task_status(task_id, wait, progress))

    async def task_cancel(
        task_id: Annotated[TaskId, Field(description="task_id returned by emo_generate or emoji_generate.")],
        ctx: Context[Any, Any],
    ) -> Annotated[CallToolResult, TaskStatus]:
        return await run(ctx, lambda service: service.task_cancel(task_id))

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
