"""How a tool handler reaches the domain layer, and the one place errors become tool results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult

from server.domain.service import Service
from server.errors import EmoMcpError, TaskNotFoundError
from server.results import _Result
from tools.results import error_result, structured


@dataclass
class AppContext:
    """Lifespan state: built once per server run, shared by every call."""

    service: Service


def service_of(ctx: Context[Any, Any]) -> Service:
    state = ctx.request_context.lifespan_context
    assert isinstance(state, AppContext)
    return state.service


async def run(ctx: Context[Any, Any], call: Callable[[Service], Awaitable[_Result]]) -> CallToolResult:
    """Run a domain call; anticipated failures come back as `isError` text the model can act on."""
    try:
        result = await call(service_of(ctx))
    except TaskNotFoundError as exc:
        return error_result(str(exc), {"task_status": "UNKNOWN", "message": str(exc)})
    except EmoMcpError as exc:
        return error_result(str(exc))
    return structured(result)
