"""Money rules applied before a paid submit: the per-task ceiling and the confirmation threshold.

`EMO_MCP_MAX_COST_CNY` refuses a job whose estimate is above it. Above `EMO_MCP_CONFIRM_ABOVE_CNY`
the user must confirm (the tools ask through MCP elicitation); a client that cannot ask gets a
refusal naming the setting, never a silent spend. Both are unset by default.
"""

from __future__ import annotations

from typing import Literal

from server.config import Settings
from server.errors import CostRefusedError
from server.pricing import Estimate

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
        raise CostRefusedError(
            f"Refused: the estimated cost {estimate.cny:.4f} CNY ({estimate.basis}) is above "
            f"{MAX_VARIABLE}={settings.max_cost_cny:g}. Nothing was submitted. Use shorter audio or the 1:1 "
            f"ratio, or raise {MAX_VARIABLE} in the server's configuration."
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
