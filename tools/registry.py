"""How a handler becomes a published tool: a strict schema and honest annotations, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations

from tools.strict import harden

# Read-only (nothing is created upstream), but every call is billed: not idempotent.
DETECT = ToolAnnotations(read_only_hint=True, idempotent_hint=False, open_world_hint=True)
# Creates a paid task; calling twice can bill twice (unless deduplicated): not idempotent.
GENERATE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True)
STATUS = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=True)
# Ends a queued job for good (destructive); a second call changes nothing (idempotent).
CANCEL = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True)


def publish(
    fn: Callable[..., Any],
    *,
    title: str,
    description: str,
    annotations: ToolAnnotations,
    meta: dict[str, Any] | None = None,
) -> Tool:
    return harden(Tool.from_function(fn, title=title, description=description, annotations=annotations, meta=meta))
