"""Make a tool's root argument object strict.

MCP SDK 2.3 builds the root arguments model without `extra="forbid"`, so an unknown top-level
argument is silently dropped and the published schema lacks `additionalProperties: false`. We
rebuild the model as a forbidding subclass and republish the schema; a test checks that the
published schema and the runtime behaviour agree, because this touches semi-internal fields.
The published input and output schemas also lose their derived titles (see `untitled`), and an
optional output field is published with its plain type (see `optional_fields_omitted`).
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
        tool.fn_metadata.output_schema = optional_fields_omitted(untitled(tool.fn_metadata.output_schema))
    return tool


def untitled(schema: Any) -> Any:
    """Drop the titles pydantic derives from names ("Video Sha256"): every agent pays for them in
    tokens on every turn and they say nothing the property name does not (about 12% of tools/list)."""
    if isinstance(schema, list):
        return [untitled(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: untitled(value) for key, value in schema.items() if key != "title" or not isinstance(value, str)}


def optional_fields_omitted(schema: Any) -> Any:
    """An optional output field without a value is left out of a result (`tools.results`), never
    sent as null: publish it with its plain type and no `"default": null`. Required fields keep
    their `anyOf` with null (the Inspector's portability lint flags `"type": [..., "null"]`)."""
    if isinstance(schema, list):
        return [optional_fields_omitted(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: optional_fields_omitted(value) for key, value in schema.items()}
    properties = out.get("properties")
    if isinstance(properties, dict):
        required = set(out.get("required", ()))
        out["properties"] = {
            name: field if name in required else _without_null(field) for name, field in properties.items()
        }
    return out


def _without_null(field: Any) -> Any:
    if not isinstance(field, dict):
        return field
    field = {key: value for key, value in field.items() if not (key == "default" and value is None)}
    branches = field.get("anyOf")
    if isinstance(branches, list) and {"type": "null"} in branches:
        kept = [branch for branch in branches if branch != {"type": "null"}]
        field.pop("anyOf")
        field = {**kept[0], **field} if len(kept) == 1 and isinstance(kept[0], dict) else {**field, "anyOf": kept}
    return field
