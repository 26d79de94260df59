"""Opening and closing the domain layer: one place that builds a `Service` and its resources.

Both the MCP lifespan and the command line use it, so they share one HTTP client, one ledger
connection, one set of rate limits, the same rules, and the background task watcher (started here,
stopped when the service closes).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2

from server.config import Settings
from server.domain.service import Service
from server.metrics import NO_METRICS, Metrics
from server.store.evidence import Evidence
from server.store.ledger import Ledger
from server.store.rates import SharedRates
from server.upstream.client import DEFAULT_TIMEOUT, DashScopeClient
from server.upstream.limits import Limits

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_service(
    settings: Settings,
    http: httpx2.AsyncClient | None = None,
    *,
    recover: bool = True,
    metrics: Metrics = NO_METRICS,
) -> AsyncIterator[Service]:
    """Yield a ready `Service`; an injected `http` client is borrowed, otherwise one is built lazily and closed.

    `recover=False` (the CLI's `status` and `doctor`) skips start-up recovery: they look, they do not repair.
    `metrics` (the HTTP transport's) counts upstream calls, leases, downloads and ledger latency.
    """
    ledger = Ledger.open(settings)
    metrics.time_ledger(ledger)
    owned: list[httpx2.AsyncClient] = []

    def build_http() -> httpx2.AsyncClient:
        # Built on the first upstream call, not at start-up (see HttpFactory in server/upstream/client.py).
        owned.append(httpx2.AsyncClient(timeout=DEFAULT_TIMEOUT, follow_redirects=True))
        return owned[-1]

    try:
        # The limits are the account's, so every worker on this ledger counts its starts in one shared window.
        limits = Limits(settings.max_query_qps, settings.model_aliases, settings.model_qps, shared=SharedRates(ledger))
        client = DashScopeClient(
            http or build_http, settings.base_url, settings.api_key, limits=limits, metrics=metrics
        )
        evidence = Evidence(settings.output_dir, settings.api_key)
        logger.info(
            "service open: base_url=%s output_dir=%s key_source=%s sandbox=%s",
            settings.base_url,
            settings.output_dir,
            settings.key_source,
            settings.sandbox,
        )
        service = Service(settings, client, ledger, evidence, recover=recover)
        # The caller's own exception is re-raised as itself after the watcher stops, not wrapped in an
        # ExceptionGroup by the task group (callers such as the CLI catch `EmoMcpError`).
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            try:
                yield service
            except BaseException as exc:
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
    finally:
        for built in owned:
            await built.aclose()
        ledger.close()
