"""Money rules applied before a paid submit: the per-task ceiling and the confirmation threshold.

`EMO_MCP_MAX_COST_CNY` refuses a job whose estimate is above it. Above `EMO_MCP_CONFIRM_ABOVE_CNY`
the user must confirm (the tools ask through MCP elicitation); a client that cannot ask gets a
refusal naming the setting, never a silent spend. Both are unset by default.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from server.config import Settings
from server.errors import BudgetRefusedError, CeilingRefusedError, CostRefusedError, ModelNotAllowedError
from server.pricing import Estimate
from server.store.ledger import Ledger
from server.store.spend import spent_since

MAX_VARIABLE = "EMO_MCP_MAX_COST_CNY"
CONFIRM_VARIABLE = "EMO_MCP_CONFIRM_ABOVE_CNY"

# What the user said: asked and confirmed / declined / cancelled; the client could not be asked;
# or nobody asked (no threshold, a dry run, or a caller outside MCP such as the CLI).
Approval = Literal["confirmed", "declined", "cancelled", "no-elicitation", "no-back-channel", "not-asked"]


def over_ceiling(settings: Settings, estimate: Estimate) -> bool:
    return settings.max_cost_cny is not None and estimate.cny > settings.max_cost_cny


def needs_confirmation(settings: Settings, estimate: Estimate) -> bool:
    return settings.confirm_above_cny is not None and estimate.cny > settings.confirm_above_cny


def confirmation_question(model: str, estimate: Estimate, settings: Settings) -> str:
    return (
        f"Submit a paid {model} job? Estimated cost {estimate.cny:.4f} CNY ({estimate.basis}); this is above "
        f"{CONFIRM_VARIABLE}={settings.confirm_above_cny:g}. Confirm to spend it."
    )


def check_budget(settings: Settings, estimate: Estimate, approval: Approval) -> None:
    """Raise `CostRefusedError` unless this estimate may be spent now."""
    if over_ceiling(settings, estimate):
        ceiling = f"{MAX_VARIABLE}={settings.max_cost_cny:g}"
        if settings.tenant is not None:
            ceiling = f"the per-job ceiling of {settings.max_cost_cny:g} CNY (the stricter of {MAX_VARIABLE} and "
            ceiling += f"tenant {settings.tenant}'s max_cost_cny)"
        raise CeilingRefusedError(
            f"Refused: the estimated cost {estimate.cny:.4f} CNY ({estimate.basis}) is above {ceiling}. Nothing "
            f"was submitted. Use shorter audio or the 1:1 ratio, or raise the ceiling in the server's configuration."
        )
    if not needs_confirmation(settings, estimate) or approval == "confirmed":
        return
    head = f"The estimated cost {estimate.cny:.4f} CNY ({estimate.basis}) is above {CONFIRM_VARIABLE}="
    head += f"{settings.confirm_above_cny:g}"
    if approval in ("declined", "cancelled"):
        raise CostRefusedError(
            f"{head}, and the user {approval} the spend. Nothing was submitted; do not retry unless the user asks."
        )
    if approval == "no-elicitation":
        raise CostRefusedError(
            f"{head}, which needs the user's confirmation, but this MCP client cannot ask the user "
            f"(it does not support elicitation). Nothing was submitted. Ask the user yourself; to allow such "
            f"jobs without a question, raise {CONFIRM_VARIABLE} in the server's configuration, or use a client "
            "that supports elicitation."
        )
    if approval == "no-back-channel":
        raise CostRefusedError(
            f"{head}, which needs the user's confirmation, but this client's protocol (before 2026-07-28) over "
            "stateless HTTP cannot be asked in the middle of a call. Nothing was submitted. Ask the user yourself; "
            f"to allow such jobs without a question, raise {CONFIRM_VARIABLE} in the server's configuration, or "
            "connect with a client that speaks MCP 2026-07-28."
        )
    raise CostRefusedError(
        f"{head}, which needs the user's confirmation, and none was given. Nothing was submitted. Call "
        f"through an MCP client that supports elicitation, or raise {CONFIRM_VARIABLE}."
    )


def utc_day_start(now: float) -> float:
    """The start of the UTC day of `now`: a tenant's daily budget counts from here."""
    return float(int(now // 86400) * 86400)


def check_daily_budget(settings: Settings, estimate: Estimate, spent: float, now: float) -> None:
    """Raise `BudgetRefusedError` when this job would take the tenant's day over its budget."""
    budget = settings.daily_budget_cny
    if budget is None or spent + estimate.cny <= budget + 1e-9:
        return
    resets = _iso(utc_day_start(now) + 86400)
    raise BudgetRefusedError(
        f"Refused: this job's estimated cost {estimate.cny:.4f} CNY ({estimate.basis}) would take tenant "
        f"{settings.tenant}'s spend today to {spent + estimate.cny:.4f} CNY, over its daily budget of {budget:g} CNY "
        f"(spent so far today, UTC: {spent:.4f} CNY). Nothing was submitted. The budget resets at {resets}; "
        "until then only jobs that fit in what is left can run (shorter audio, the 1:1 ratio)."
    )


def check_model(settings: Settings, model: str, official: str) -> None:
    """Raise `ModelNotAllowedError` when the tenant's `models` list leaves this model out."""
    allowed = settings.allowed_models
    if allowed is None or official in allowed:
        return
    raise ModelNotAllowedError(
        f"Refused: tenant {settings.tenant} may not use {model} (its allowed generate models: "
        f"{', '.join(sorted(allowed)) or 'none'}). Nothing was uploaded or submitted; ask the server's operator."
    )


def budget_view(settings: Settings, ledger: Ledger, now: float | None = None) -> dict[str, Any]:
    """A tenant's limits and its UTC day's spend, as `spend://today` and `doctor` report them."""
    now = time.time() if now is None else now
    spent = spent_since(ledger, settings.prices, utc_day_start(now))
    budget = settings.daily_budget_cny
    return {
        "day_utc": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"),
        "spent_today_utc_cny": round(spent, 4),
        "daily_budget_cny": budget,
        "left_today_cny": round(max(0.0, budget - spent), 4) if budget is not None else None,
        "resets_at": _iso(utc_day_start(now) + 86400),
        "max_cost_cny": settings.max_cost_cny,
        "models": sorted(settings.allowed_models) if settings.allowed_models is not None else None,
    }


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")
