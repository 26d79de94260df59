"""Opening and closing the domain layer: one place that builds a `Service` and its resources.

Both the MCP lifespan and the command line use it, so they share one HTTP client, one ledger
connection and the same rules.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2

from server.config import Settings
from server.dashscope import DEFAULT_TIMEOUT, DashScopeClient
from server.evidence import Evidence
from server.ledger import Ledger
from server.service import Service

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_service(settings: Settings, http: httpx2.AsyncClient | None = None) -> AsyncIterator[Service]:
    """Yield a ready `Service`; an injected `http` client is borrowed, otherwise one is built lazily and closed."""
    ledger = Ledger(settings.state_dir)
    owned: list[httpx2.AsyncClient] = []

    def build_http() -> httpx2.AsyncClient:
        # Built on the first upstream call, not at start-up (see dashscope.HttpFactory).
        owned.append(httpx2.AsyncClient(timeout=DEFAULT_TIMEOUT, follow_redirects=True))
        return owned[-1]

    try:
        client = DashScopeClient(http or build_http, settings.base_url, settings.api_key)
        evidence = Evidence(settings.output_dir, settings.api_key)
        logger.info(
            "service open: base_url=%s output_dir=%s key_source=%s sandbox=%s",
            settings.base_url,
            settings.output_dir,
            settings.key_source,
            settings.sandbox,
        )
        yield Service(settings, client, ledger, evidence)
    finally:
        for built in owned:
            await built.aclose()
        ledger.close()
