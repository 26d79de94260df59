"""Asking the user before a costly submit: the MCP elicitation resolver of the generate tools.

The resolver runs before the tool body (SDK `Resolve` pattern). It plans the job, and only when
the estimate is above `EMO_MCP_CONFIRM_ABOVE_CNY` (and under the ceiling, and not a dry run) does
it return an `Elicit` question. A client without elicitation is not asked (the SDK would answer
with a protocol error the model never reads); the body then refuses with a message naming the
setting. Any planning failure is left to the body, which reports it as a normal tool error.
A call that asks nothing is bounded as a whole (`tools.context.CALL_BOUND`), this planning included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Elicit
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field

from server.domain.budget import Approval, confirmation_question, needs_confirmation, over_ceiling
from server.domain.service import Plan, Service
from server.errors import EmoMcpError
from tools import context
from tools.context import service_of


class ConfirmSpend(BaseModel):
    """The form the user sees."""

    confirm: bool = Field(description="Spend this amount and submit the job?")


class NoQuestion(BaseModel):
    """What the resolver returns when it did not ask (the reason becomes the body's approval)."""

    approval: Approval
    # When the call began (monotonic clock): a call that asks nothing is bounded as a whole, this
    # resolver's planning included (`tools.context.CALL_BOUND`).
    began: float | None = None


def can_elicit(ctx: Context[Any, Any]) -> bool:
    """Form elicitation declared by the client (the SDK's own rule: bare `elicitation: {}` counts)."""
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


# From this protocol version on, a question is a result (InputRequiredResult) the client answers with
# a new request, which any worker can take; before it, a question is a request sent back mid-call.
QUESTION_AS_RESULT = "2026-07-28"


def can_ask_now(ctx: Context[Any, Any]) -> bool:
    """Whether a question can reach the client: always on 2026-07-28 and later; on older protocols only
    over a transport with a back-channel (stateless HTTP has none: the reply would have nowhere to land,
    and the SDK would fail the call with an error the model never reads)."""
    version = ctx.protocol_version
    modern = version is not None and is_version_at_least(version, QUESTION_AS_RESULT)
    return modern or ctx.request_context.session.can_send_request


async def ask_if_needed(
    ctx: Context[Any, Any], dry_run: bool, plan: Callable[[Service], Awaitable[Plan]]
) -> NoQuestion | Elicit[ConfirmSpend]:
    began = time.monotonic()
    service = await service_of(ctx)
    settings = service.settings
    if dry_run or settings.confirm_above_cny is None:
        return NoQuestion(approval="not-asked", began=began)
    planned = None
    # A planning failure is the body's to report (it plans again and raises the same error).
    with anyio.move_on_after(context.CALL_BOUND), contextlib.suppress(EmoMcpError):
        planned = await plan(service)
    if planned is None:
        # Failed, or out of time: the body plans again in the time left, and refuses a spend that
        # needed a question ("not-asked" is never a confirmation).
        return NoQuestion(approval="not-asked", began=began)
    estimate = planned.estimate
    if over_ceiling(settings, estimate) or not needs_confirmation(settings, estimate):
        return NoQuestion(approval="not-asked", began=began)
    if not can_ask_now(ctx):  # first: over stateless HTTP an older client's capabilities are not even known
        return NoQuestion(approval="no-back-channel", began=began)
    if not can_elicit(ctx):
        return NoQuestion(approval="no-elicitation", began=began)
    return Elicit(confirmation_question(str(planned.payload["model"]), estimate, settings), ConfirmSpend)


def began_of(outcome: ElicitationResult[ConfirmSpend]) -> float | None:
    """When a call that asked nothing began; None after a question (the user's answer time is not ours)."""
    if isinstance(outcome, AcceptedElicitation) and isinstance(outcome.data, NoQuestion):
        return outcome.data.began
    return None


def approval_of(outcome: ElicitationResult[ConfirmSpend]) -> Approval:
    """Fold the resolver's outcome into the service's `Approval`."""
    if isinstance(outcome, AcceptedElicitation):
        data: Any = outcome.data
        if isinstance(data, NoQuestion):
            return data.approval
        if isinstance(data, ConfirmSpend):
            return "confirmed" if data.confirm else "declined"
        return "not-asked"
    return "declined" if outcome.action == "decline" else "cancelled"
