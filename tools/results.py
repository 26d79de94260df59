"""Turning domain results and errors into MCP tool results.

Every result leaves through here, so here its text and its structured content pass
`server.redaction` (an upstream error echoing the key, a header quoted in a message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcp_types import CallToolResult, ContentBlock, ResourceLink, TextContent

from server.redaction import needs_redaction, redact, redact_data
from server.results import _Result


def structured(result: _Result) -> CallToolResult:
    """One summary line for people, then the same data as compact JSON, plus structuredContent.

    A downloaded video also comes as a `resource_link` (file:// on the server's disk), so clients
    can offer to open it, and on an HTTP server with links on, as a second one at its signed link.
    """
    data = result_data(result)
    text = f"{result.summary()}\n{_compact(data)}"
    # One look at the text says whether anything inside needs redacting (nearly never): only then
    # is every string of the data walked, and the text built again from the redacted data.
    if needs_redaction(text):
        data = redact_data(data)
        text = redact(f"{result.summary()}\n{_compact(data)}")
    content: list[ContentBlock] = [TextContent(type="text", text=text)]
    link = video_link(result)
    if link is not None:
        content.append(link)
    signed = getattr(result, "video_link", None)
    if link is not None and isinstance(signed, str) and signed:
        # Beside the file:// one: a person on the other side of a chat opens this one.
        content.append(link.model_copy(update={"uri": signed}))
    return CallToolResult(content=content, structured_content=data)


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def result_data(result: _Result) -> dict[str, Any]:
    """The result as JSON, without its optional fields that have no value (null or an empty list):
    every agent pays for each byte on every call. The published output schema says so
    (`tools.strict.optional_fields_omitted`); required fields are always sent."""
    data: dict[str, Any] = result.model_dump(mode="json")
    for name in _optional_fields(type(result)):
        if data[name] is None or data[name] == []:
            del data[name]
    return data


_OPTIONAL: dict[type[_Result], tuple[str, ...]] = {}


def _optional_fields(kind: type[_Result]) -> tuple[str, ...]:
    """A result model's optional fields, found once per model."""
    names = _OPTIONAL.get(kind)
    if names is None:
        names = _OPTIONAL[kind] = tuple(name for name, field in kind.model_fields.items() if not field.is_required())
    return names


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
