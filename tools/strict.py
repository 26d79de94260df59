"""Make a tool's root argument object strict.

MCP SDK 2.3 builds the root arguments model without `extra="forbid"`, so an unknown top-level
argument is silently dropped and the published schema lacks `additionalProperties: false`. We
rebuild the model as a forbidding subclass and republish the schema; a test checks that the
published schema and the runtime behaviour agree, because this touches semi-internal fields.
The published input and output schemas also lose their derived titles (see `untitled`).
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver.tools import Tool
from pydantic import ConfigDict


def harden(tool: Tool) -> Tool:
    base = tool.fn_metadata.arg_model
    config = ConfigDict(**{**base.model_config, "extra": "forbid"})
    strict: Any = type(base.__name__, (base,), {"model_config": config, "__module__": base.__module__})
    tool.fn_metadata.arg_model = strict
    tool.parameters = untitled(strict.model_json_schema(by_alias=True))
    if tool.fn_metadata.output_schema is not None:
        tool.fn_metadata.output_schema = without_null_defaults(untitled(tool.fn_metadata.output_schema))
    return tool


def untitled(schema: Any) -> Any:
    """Drop the titles pydantic derives from names ("Video Sha256"): every agent pays for them in
    tokens on every turn and they say nothing the property name does not (about 12% of tools/list)."""
    if isinstance(schema, list):
        return [untitled(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: untitled(value) for key, value in schema.items() if key != "title" or not isinstance(value, str)}


def without_null_defaults(schema: Any) -> Any:
    """Drop `"default": null` from an output schema: the server always sends every field, so it says
    nothing. (Unions stay `anyOf`: the Inspector's portability lint flags `"type": [..., "null"]`.)"""
    if isinstance(schema, list):
        return [without_null_defaults(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: without_null_defaults(value) for key, value in schema.items() if not (key == "default" and value is None)
    }
