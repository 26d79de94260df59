"""What the audit trail (`EMO_MCP_AUDIT_LOG`, server/tenancy/audit.py) records of each paid tool call:
one line per detect or generate sent, and one per refusal of one, with the reason's kind.

Here, at the tools, because only here are the tool's name and the request id known together with the
outcome; the domain below raises one error class per kind of refusal, so the kind is read off the class.
"""

from __future__ import annotations

from typing import Any

from server.domain.service import Service
from server.errors import (
    BudgetRefusedError,
    CeilingRefusedError,
    CostRefusedError,
    DuplicateSubmitError,
    EmoMcpError,
    ModelNotAllowedError,
    PreflightError,
    ProvenanceError,
    RefusedInputError,
)
from server.jobs.task_views import IMPLICIT_TENANT
from server.results import _Result

# Most specific first: the first class an error is an instance of names its kind.
REFUSALS: tuple[tuple[type[EmoMcpError], str], ...] = (
    (ProvenanceError, "provenance"),
    (BudgetRefusedError, "budget"),
    (CeilingRefusedError, "ceiling"),
    (CostRefusedError, "confirmation"),
    (ModelNotAllowedError, "model"),
    (PreflightError, "preflight"),
    (DuplicateSubmitError, "duplicate"),
    (RefusedInputError, "input"),
)


def _tenant(service: Service) -> str:
    return service.settings.tenant or IMPLICIT_TENANT


def audit_call(service: Service, tool: str, result: _Result, request_id: Any) -> None:
    """A paid call that went through (a dry run is not one: nothing was sent)."""
    if getattr(result, "dry_run", False):
        return
    outcome = "deduplicated" if getattr(result, "deduplicated", False) else "sent"
    service.audit.record(
        tenant=_tenant(service),
        tool=tool,
        outcome=outcome,
        task_id=getattr(result, "task_id", None),
        estimate_cny=getattr(result, "estimated_cost_cny", None),
        request_id=None if request_id is None else str(request_id),
        status=getattr(result, "task_status", None),
    )


def audit_refusal(service: Service, tool: str, error: EmoMcpError, request_id: Any) -> None:
    """A paid call refused before anything was sent (its kind), or one that failed upstream."""
    kind = next((name for cls, name in REFUSALS if isinstance(error, cls)), None)
    service.audit.record(
        tenant=_tenant(service),
        tool=tool,
        outcome="refused" if kind is not None else "failed",
        reason=kind or type(error).__name__,
        request_id=None if request_id is None else str(request_id),
        message=str(error)[:500],
    )


def audit_foreign_task(services: list[Service], asking: Service, task_id: str, request_id: Any) -> None:
    """A tenant asked about (or tried to cancel) a task id that is another tenant's: answered as an id
    that does not exist, and recorded here as a cross-tenant attempt (an indexed lookup per tenant, made
    only on this refusal's path)."""
    if not any(other is not asking and other.ledger.get_task(task_id) is not None for other in services):
        return
    asking.audit.record(
        tenant=_tenant(asking),
        tool="task",
        outcome="refused",
        reason="cross-tenant",
        task_id=task_id,
        request_id=None if request_id is None else str(request_id),
    )
