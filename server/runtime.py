"""Opening and closing the domain layer: one place that builds a `Service` and its resources.

Both the MCP lifespan and the command line use it, so they share one API session, one ledger
connection, one set of rate limits, the same rules, and the background task watcher (started here,
stopped when the service closes).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from server.config import Settings
from server.domain.service import Service
from server.errors import TenantRequiredError
from server.metrics import NO_METRICS, Metrics
from server.store.evidence import Evidence
from server.store.ledger import Ledger
from server.store.rates import SharedRates
from server.tenancy.audit import AuditLog, NoAudit
from server.tenancy.tenants import Tenant, TenantsFile, tenant_policy, tenant_settings
from server.upstream.client import DashScopeClient, new_session
from server.upstream.limits import Limits

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)


@asynccontextmanager
async def open_service(
    settings: Settings,
    session: aiohttp.ClientSession | None = None,
    *,
    recover: bool = True,
    metrics: Metrics = NO_METRICS,
) -> AsyncIterator[Service]:
    """Yield a ready `Service`; an injected API `session` is borrowed, otherwise one is built lazily and closed.

    `recover=False` (the CLI's `status` and `doctor`) skips start-up recovery: they look, they do not repair.
    `metrics` (the HTTP transport's) counts upstream calls, leases, downloads and ledger latency.
    """
    async with _Opened(session, metrics, settings.audit_log) as opened, _running() as tg:
        service = opened.service(settings, recover=recover)
        await tg.start(service.run)
        yield service


@asynccontextmanager
async def _running() -> AsyncIterator[TaskGroup]:
    """A task group for services' lives, cancelled when the body ends. The body's own exception is
    re-raised as itself once they stopped, not wrapped in an ExceptionGroup by the task group (callers
    such as the CLI catch `EmoMcpError`)."""
    failure: BaseException | None = None
    async with anyio.create_task_group() as tg:
        try:
            yield tg
        except BaseException as exc:
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


class _Opened:
    """What services opened together share and close together: the API session (built lazily, one for
    all: the upstream is the same host), their ledgers, and one set of limits per DashScope key."""

    def __init__(self, session: aiohttp.ClientSession | None, metrics: Metrics, audit: Path | None = None) -> None:
        self._session = session
        self.audit: AuditLog | NoAudit = AuditLog(audit) if audit is not None else NoAudit()
        self._metrics = metrics
        self._owned: aiohttp.ClientSession | None = None
        self._building = anyio.Lock()  # services' first calls together build one session
        self._ledgers: list[Ledger] = []
        self._limits: dict[str, Limits] = {}
        self.rates_ledger: Ledger | None = None  # where tenants' shared windows are counted (tenant mode)

    async def __aenter__(self) -> _Opened:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._owned is not None:
            await self._owned.close()
        for ledger in reversed(self._ledgers):
            ledger.close()
        if self.rates_ledger is not None:
            self.rates_ledger.close()
        self.audit.close()

    async def _build_session(self) -> aiohttp.ClientSession:
        # Built on the first upstream call, not at start-up (see SessionFactory in server/upstream/client.py).
        async with self._building:
            if self._owned is None:
                self._owned = await new_session()
        return self._owned

    def service(self, settings: Settings, *, recover: bool = True, key_id: str | None = None) -> Service:
        """A service on its own ledger. `key_id` (tenant mode): the limits are those of the tenant's
        DashScope key, shared with every tenant on the same key, in this process and across workers."""
        ledger = Ledger.open(settings)
        self._ledgers.append(ledger)
        self._metrics.time_ledger(ledger)
        if key_id is None:
            # The limits are the account's, so every worker on this ledger counts its starts in one shared window.
            shared = SharedRates(ledger)
            limits = Limits(settings.max_query_qps, settings.model_aliases, settings.model_qps, shared=shared)
        else:
            assert self.rates_ledger is not None
            limits = self._limits.get(key_id) or self._limits.setdefault(
                key_id,
                Limits(
                    settings.max_query_qps,
                    settings.model_aliases,
                    settings.model_qps,
                    shared=SharedRates(self.rates_ledger, scope=f"key-{key_id}"),
                ),
            )
        client = DashScopeClient(
            self._session or self._build_session,
            settings.base_url,
            settings.api_key,
            limits=limits,
            metrics=self._metrics,
            party=settings.tenant or "",
        )
        evidence = Evidence(settings.output_dir, settings.api_key)
        logger.info(
            "service open: %sbase_url=%s output_dir=%s key_source=%s sandbox=%s",
            f"tenant={settings.tenant} " if settings.tenant else "",
            settings.base_url,
            settings.output_dir,
            settings.key_source,
            settings.sandbox,
        )
        service = Service(settings, client, ledger, evidence, recover=recover)
        service.audit = self.audit
        return service


class Services:
    """The services of one server run: the one implicit tenant's, or one per tenant of the tenants file.

    Tool calls reach theirs through `get(tenant)`, with the tenant the HTTP layer found for the request's
    token. A tenant added to the file while the server runs gets its service on its first request; one
    removed keeps its service (its open tasks are still followed and downloaded), unreachable by tokens."""

    def __init__(
        self,
        single: Service | None,
        tenants: TenantsFile | None = None,
        *,
        opened: _Opened | None = None,
        base: Settings | None = None,
        tg: TaskGroup | None = None,
    ) -> None:
        """`single`: the one implicit tenant's service. Or `tenants`, with what opens theirs: `opened` (the
        shared client, ledgers and limits), the server's `base` settings and the task group `tg` they run in."""
        self.single = single
        self.tenants = tenants
        self._by_name: dict[str, Service] = {}
        self._opened = opened
        self._base = base
        self._tg = tg
        self._lock = anyio.Lock()

    @property
    def tenant_mode(self) -> bool:
        return self.tenants is not None

    def all(self) -> list[Service]:
        return [self.single] if self.single is not None else list(self._by_name.values())

    def known(self, tenant: str) -> Service | None:
        return self._by_name.get(tenant)

    async def get(self, tenant: str | None) -> Service:
        """The service of `tenant` (None: the implicit one); a tenant of the file not yet open is opened."""
        if self.tenants is None:
            assert self.single is not None
            return self.single
        if tenant is None:
            raise TenantRequiredError("this server serves tenants: the request carries no tenant's token")
        service = self._by_name.get(tenant)
        if service is not None:
            return service
        async with self._lock:
            if tenant in self._by_name:
                return self._by_name[tenant]
            found = self.tenants.tenants.get(tenant)
            if found is None:
                raise TenantRequiredError(f"tenant {tenant!r} is not in the tenants file")
            return await self._open(found)

    async def _open(self, tenant: Tenant) -> Service:
        assert self._opened is not None and self._base is not None and self._tg is not None
        service = self._opened.service(tenant_settings(self._base, tenant), key_id=tenant.key_id)
        await self._tg.start(service.run)
        self._by_name[tenant.name] = service
        return service

    async def _watch_file(self) -> None:
        """Re-read the tenants file when it changes; a new tenant's policy applies to its open service."""
        assert self.tenants is not None and self._base is not None
        while True:
            await anyio.sleep(TENANTS_CHECK_SECONDS)
            if await anyio.to_thread.run_sync(self.tenants.refresh):
                for name, tenant in self.tenants.tenants.items():
                    service = self._by_name.get(name)
                    if service is not None:
                        service.apply_policy(tenant_policy(self._base, service.settings, tenant))


TENANTS_CHECK_SECONDS = 1.0


@asynccontextmanager
async def open_services(
    settings: Settings,
    session: aiohttp.ClientSession | None = None,
    *,
    tenants: TenantsFile | None = None,
    metrics: Metrics = NO_METRICS,
) -> AsyncIterator[Services]:
    """Without a tenants file: the one service, as `open_service`. With one: a service per tenant, each on
    its own ledger, folders and key, started together (their watchers follow their open tasks at once)."""
    if tenants is None:
        async with open_service(settings, session, metrics=metrics) as service:
            yield Services(service)
        return
    async with _Opened(session, metrics, settings.audit_log) as opened, _running() as tg:
        # The shared rate windows of every key live in the server's own ledger, beside no tenant's data.
        opened.rates_ledger = Ledger.open(settings)
        services = Services(None, tenants, opened=opened, base=settings, tg=tg)
        for tenant in tenants.tenants.values():
            await services._open(tenant)
        tg.start_soon(services._watch_file)
        yield services
