"""Turning domain results and errors into MCP tool results.

Every result leaves through here, so here its text and its structured content pass
`server.redaction` (an upstream error echoing the key, a header quoted in a message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcp_types import CallToolResult, ContentBlock, ResourceLink, TextContent

from server.redaction import redact, redact_data
from server.results import _Result


def structured(result: _Result) -> CallToolResult:
    """One summary line for people, then the same data as compact JSON, plus structuredContent.

    A downloaded video also comes as a `resource_link` (file:// on the server's disk), so clients
    can offer to open it.
    """
    data = redact_data(result_data(result))
    text = redact(f"{result.summary()}\n{json.dumps(data, separators=(',', ':'), ensure_ascii=False)}")
    content: list[ContentBlock] = [TextContent(type="text", text=text)]
    link = video_link(result)
    if link is not None:
        content.append(link)
    return CallToolResult(content=content, structured_content=data)


def result_data(result: _Result) -> dict[str, Any]:
    """The result as JSON, without its optional fields that have no value (null or an empty list):
    every agent pays for each byte on every call. The published output schema says so
    (`tools.strict.optional_fields_omitted`); required fields are always sent."""
    fields = type(result).model_fields
    return {
        name: value
        for name, value in result.model_dump(mode="json").items()
        if fields[name].is_required() or value not in (None, [])
    }


def video_link(result: _Result) -> ResourceLink | None:
    video_path = getattr(result, "video_path", None)
    if not isinstance(video_path, str) or not video_path:
        return None
    path = Path(video_path)
    size = getattr(result, "video_bytes", None)
    return ResourceLink(
        type="resource_link",
        uri=path.as_uri(),
        name=path.name,
        mime_type="video/mp4",
        size=size if isinstance(size, int) else None,
    )


def error_result(message: str, data: dict[str, Any] | None = None) -> CallToolResult:
    """An `isError` result whose text reaches the model as written (no SDK prefix)."""
    return CallToolResult(
        content=[TextContent(type="text", text=redact(message))],
        structured_content=None if data is None else redact_data(data),
        is_error=True,
    )
