"""The tenant a piece of work is done for, as a context variable, and the log lines that name it.

Why a context variable: the HTTP layer learns the tenant from the request's token, far above the tool
handler that needs it, and every task spawned for the request (a background job, a submit outliving its
call) inherits it; each tenant's watcher sets its own. Log lines then name the tenant (never its key:
keys pass through `server.redaction` like every secret).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

current_tenant: ContextVar[str | None] = ContextVar("emo_mcp_tenant", default=None)


class TenantLogFilter(logging.Filter):
    """Prefixes `tenant=<name>` to the message of a record made on a tenant's behalf."""

    def filter(self, record: logging.LogRecord) -> bool:
        tenant = current_tenant.get()
        if tenant is not None and not getattr(record, "emo_tenant_named", False):
            record.msg, record.args = f"tenant={tenant} {record.getMessage()}", None
            record.emo_tenant_named = True
        return True


def install_tenant_log_filter() -> None:
    """Put one `TenantLogFilter` on the root logger's handlers (before their redaction runs, it only adds)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, TenantLogFilter) for existing in handler.filters):
            handler.filters.insert(0, TenantLogFilter())
