"""MCP resources: the template catalogue and the ledger's view of tasks, browsable without tools.

Reading a resource never calls DashScope and never costs anything: it reads the catalogue shipped
with the package, or the SQLite ledger under the configured state folder (its own short-lived
connection, so it also works while tools run; the ledger is in WAL mode for exactly that).

A resource that does not exist (an unknown URI, a task not in the ledger) is answered with the
resource-not-found code of the negotiated protocol (`not_found_error`), not the SDK's -32603.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, LATEST_PROTOCOL_VERSION, Annotations
from mcp_types.version import is_version_at_least

from server.domain.budget import budget_view
from server.domain.service import Service
from server.errors import EmoMcpError
from server.jobs.task_views import RECENT_LIMIT, recent_views, task_view
from server.models import EMOJI_OUTPUT_SIZE, template_catalogue
from server.store.spend import SPEND_URI, spend_today
from tools.context import OpenServices

JSON = "application/json"
# Resource not found: -32002 up to the 2025-11-25 revision; -32602 from 2026-07-28 on (SEP-2164, a MUST).
LEGACY_RESOURCE_NOT_FOUND = -32002
SEP_2164_VERSION = "2026-07-28"


def resource_not_found_code(protocol_version: str | None) -> int:
    """The code the negotiated revision defines for a missing resource (the newest when unknown)."""
    if is_version_at_least(protocol_version or LATEST_PROTOCOL_VERSION, SEP_2164_VERSION):
        return INVALID_PARAMS
    return LEGACY_RESOURCE_NOT_FOUND


def not_found_error(uri: str, exc: ResourceNotFoundError, protocol_version: str | None) -> MCPError:
    """The JSON-RPC error for a missing resource: the revision's code, the reason, and the URI as data."""
    return MCPError(resource_not_found_code(protocol_version), str(exc), data={"uri": uri})


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def templates_document() -> dict[str, Any]:
    return {
        "model": "emoji-v1",
        "output_size": EMOJI_OUTPUT_SIZE,
        "note": "template_id of emoji_generate takes exactly these ids (wire name driven_id).",
        "templates": template_catalogue(),
    }


def register_resources(app: MCPServer[Any], opened: OpenServices) -> None:
    """The catalogue and the ledger's tasks: each read is of the asking tenant's own ledger."""

    @app.resource(
        "emoji://templates",
        name="emoji_templates",
        title="Official Emoji templates",
        description="The 20 official emoji-v1 templates (id, series, meaning, typical length): the values "
        "emoji_generate's template_id accepts.",
        mime_type=JSON,
        annotations=Annotations(audience=["user", "assistant"], priority=0.5),
    )
    def emoji_templates() -> str:
        return _json(templates_document())

    @app.resource(
        "tasks://recent",
        name="recent_tasks",
        title="Recent tasks",
        description=f"The newest {RECENT_LIMIT} tasks in this server's ledger: status, billed seconds, cost, "
        "local video path and evidence folder. Read from the local ledger; DashScope is not asked.",
        mime_type=JSON,
    )
    async def recent_tasks() -> str:
        service = await _service(opened)
        return _json({"tasks": recent_views(service.ledger, service.settings.prices, service.tasks.links)})

    @app.resource(
        "tasks://{task_id}",
        name="task",
        title="One task",
        description="One task from this server's ledger (as in tasks://recent). Local only: call task_status "
        "to refresh an unfinished task or download its video.",
        mime_type=JSON,
    )
    async def task(task_id: str) -> str:
        service = await _service(opened)
        record = service.ledger.get_task(task_id)
        if record is None:
            raise ResourceNotFoundError(
                f"Task {task_id} is not in this server's ledger; list known tasks with tasks://recent, "
                "or call task_status for a task another server submitted."
            )
        return _json(task_view(record, service.ledger, service.settings.prices, service.tasks.links))


async def _service(opened: OpenServices) -> Service:
    try:
        return await opened.current()
    except EmoMcpError as exc:
        raise ResourceError(str(exc)) from exc


def register_spend_resource(app: MCPServer[Any], opened: OpenServices) -> None:
    """`spend://today`: read from the ledger at each read, so it sees other processes' work too; in tenant
    mode, the asking tenant's, with its daily budget."""

    @app.resource(
        SPEND_URI,
        name="spend-today",
        title="Spend today (CNY)",
        description="Today's estimated and actual DashScope spend of this server's ledger, in CNY.",
        mime_type="application/json",
    )
    async def spend() -> str:
        service = await _service(opened)
        summary = spend_today(service.ledger, service.settings.prices)
        document: dict[str, Any] = {**summary.as_dict(), "summary": summary.line()}
        if service.settings.tenant is not None:
            document["tenant"] = service.settings.tenant
            document["budget"] = budget_view(service.settings, service.ledger)
        return json.dumps(document, indent=2)
