"""What every agent pays for on every turn: tools/list stays free of derived titles."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from tools.strict import untitled

pytestmark = pytest.mark.anyio


def _string_titles(schema: Any) -> list[str]:
    if isinstance(schema, list):
        return [title for item in schema for title in _string_titles(item)]
    if not isinstance(schema, dict):
        return []
    found = [schema["title"]] if isinstance(schema.get("title"), str) else []
    return found + [title for value in schema.values() for title in _string_titles(value)]


async def test_published_schemas_carry_no_derived_titles(client: Client) -> None:
    for tool in (await client.list_tools()).tools:
        assert _string_titles(tool.input_schema) == [], tool.name
        assert _string_titles(tool.output_schema) == [], tool.name
        assert tool.title, tool.name  # the tool's own title is kept


def test_untitled_keeps_a_property_named_title() -> None:
    schema = {"title": "Args", "properties": {"title": {"title": "Title", "type": "string"}}}
    assert untitled(schema) == {"properties": {"title": {"type": "string"}}}
