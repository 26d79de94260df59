"""How a tool handler reaches the domain layer, and the one place errors become tool results."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult

from server.domain.service import Service
from server.errors import EmoMcpError, TaskNotFoundError, TenantRequiredError
from server.results import _Result
from server.runtime import Services
from server.tenancy.current import current_tenant
from tools.audit import audit_call, audit_foreign_task, audit_refusal
from tools.results import error_result, structured

logger = logging.getLogger(__name__)

# Seconds a tool call may take, whatever DashScope does (slow answers, 429 retries, a long Retry-After):
# common MCP clients give up after 60 s, and an answer after that is lost. task_status's wait counts
# inside it. Out of time, a call answers with what is known; its work goes on in the background.
CALL_BOUND = 50.0
# A last resort should a domain call overrun its own bound (a bug): the client still gets an answer.
BACKSTOP_SECONDS = 5.0


@dataclass
class AppContext:
    """Lifespan state: built once per server run, shared by every call (one service per tenant)."""

    services: Services


class OpenServices:
    """The running server's services, for what has no request context to reach them by (static
    resources): set by the lifespan while it runs."""

    services: Services | None = None

    async def current(self) -> Service:
        """The service of the current request's tenant (the context variable the HTTP layer set)."""
        if self.services is None:
            raise TenantRequiredError("the server is not running")
        return await self.services.get(current_tenant.get())


async def service_of(ctx: Context[Any, Any]) -> Service:
    """The service of the request's tenant (the HTTP layer set it from the token), or the only one."""
    state = ctx.request_context.lifespan_context
    assert isinstance(state, AppContext)
    return await state.services.get(current_tenant.get())


async def run(
    ctx: Context[Any, Any],
    call: Callable[[Service, float], Awaitable[_Result]],
    *,
    began: float | None = None,
    audit: str | None = None,
) -> CallToolResult:
    """Run a domain call within `CALL_BOUND` seconds of `began` (the call's start, if a resolver ran
    first); anticipated failures come back as `isError` text the model can act on. `audit`: the paid
    tool's name, whose every call and refusal goes to the audit trail."""
    bound = CALL_BOUND  # read per call, so a test (or an embedding host) can lower it
    if began is not None:
        bound = max(0.0, bound - (time.monotonic() - began))
    service: Service | None = None
    try:
        with anyio.move_on_after(bound + BACKSTOP_SECONDS) as backstop:
            service = await service_of(ctx)
            result = await call(service, bound)
    except TaskNotFoundError as exc:
        if service is not None and exc.task_id is not None and service.settings.tenant is not None:
            state = ctx.request_context.lifespan_context
            if isinstance(state, AppContext):
                audit_foreign_task(state.services.all(), service, exc.task_id, ctx.request_id)
        return error_result(str(exc), {"task_status": "UNKNOWN", "message": str(exc)})
    except EmoMcpError as exc:
        if audit is not None and service is not None:
            audit_refusal(service, audit, exc, ctx.request_id)
        return error_result(str(exc))
    if audit is not None and service is not None and not backstop.cancelled_caught:
        audit_call(service, audit, result, ctx.request_id)
    if backstop.cancelled_caught:  # pragma: no cover - every domain entry point answers by its own bound
        logger.error("a tool call overran its bound of %g s", bound)
        return error_result(
            f"The server did not finish this call within {bound + BACKSTOP_SECONDS:g} s. Work already sent to "
            "DashScope goes on in the background and is recorded: follow a generate with task_status, or call again."
        )
    return structured(result)
