"""Turning domain results and errors into MCP tool results."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent

from server.errors import EmoMcpError
from server.results import _Result


def structured(result: _Result) -> CallToolResult:
    """One summary line for people, then the same data as compact JSON, plus structuredContent."""
    data = result.model_dump(mode="json")
    text = f"{result.summary()}\n{result.model_dump_json(exclude_none=True)}"
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def error_result(message: str, data: dict[str, Any] | None = None) -> CallToolResult:
    """An `isError` result whose text reaches the model as written (no SDK prefix)."""
    return CallToolResult(content=[TextContent(type="text", text=message)], structured_content=data, is_error=True)


def as_tool_error(exc: EmoMcpError) -> ToolError:
    return ToolError(str(exc))
