"""Streamable HTTP transport, served safely.

The SDK turns DNS-rebinding protection on only for a loopback bind and silently off for anything
else, and has no notion of "this server is now reachable from the network". So the rules live
here: loopback by default; any other bind needs an access token (`EMO_MCP_HTTP_TOKEN`, checked as
`Authorization: Bearer`) and an explicit Host allowlist, or the server refuses to start. The
DashScope key stays the server's own: nothing from a client's request reaches DashScope's headers,
and the token is registered with `server.redaction`, so no result or log line carries it.

uvicorn bounds how long an idle keep-alive connection stays open, but not how long a client may take
to send a request's headers (h11 has no such timer either): a client trickling header bytes holds a
connection forever, and enough of them exhaust the server (slowloris). `HeaderTimeoutProtocol`
closes a connection whose request headers are not complete `HEADER_TIMEOUT_SECONDS` after its first
byte (or after the connection opened, for the first request).

Operations (issue 14): `/healthz` says whether the ledger database answers (a load balancer takes a
worker cut off from it out of rotation), `/metrics` serves `server.metrics` in the Prometheus text
format, behind the token like /mcp. Both reach the ledger through `LedgerProbe`: on a worker thread,
bounded by `PROBE_TIMEOUT_SECONDS`, one probe at a time, so a hung database can neither hang these
endpoints nor pile up threads. A worker on a shared PostgreSQL ledger that is reachable from the
network must share a request-state key ring (`check_cluster`), or a cost confirmation answered on
another worker would fail.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import h11
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import DATABASE_URL_ENV, REQUEST_STATE_KEYS_ENV, TENANTS_FILE_ENV, Settings, is_unfilled
from server.config import DEFAULT_HOST as DEFAULT_HOST
from server.config import DEFAULT_PORT as DEFAULT_PORT
from server.errors import ConfigError
from server.media.addresses import is_loopback
from server.metrics import PrometheusMetrics
from server.redaction import register_secret
from server.tenancy.current import install_tenant_log_filter
from server.tenancy.links import VIDEO_PREFIX
from server.tenancy.tokens import TenantTokenVerifier
from server.transport.tenants import (
    METRICS_TOKEN_ENV,
    PROTECTED_RESOURCE_PREFIX,
    TenantGate,
    challenge,
    metadata_url,
    oauth_config,
    open_tenants,
    resource_url,
    send_json,
    video_route,
)

if TYPE_CHECKING:
    from server.runtime import Services

logger = logging.getLogger(__name__)

TOKEN_ENV = "EMO_MCP_HTTP_TOKEN"  # noqa: S105 (a variable name, not a secret)
HOSTS_ENV = "EMO_MCP_ALLOWED_HOSTS"
ORIGINS_ENV = "EMO_MCP_ALLOWED_ORIGINS"
MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
# How long /healthz and /metrics wait for the ledger before saying it is down.
PROBE_TIMEOUT_SECONDS = 2.0
# A read that touches the ledger's data: SQLite answers `SELECT 1` without opening a read transaction,
# so it would say "ok" while the file is locked or gone; this one is valid on PostgreSQL too.
PROBE_SQL = "SELECT 1 FROM tasks LIMIT 1"
# Indexed on both backends (tasks_by_status): an index-only scan, no table rows read.
TASK_COUNTS_SQL = "SELECT status, COUNT(*) FROM tasks GROUP BY status"
MIN_TOKEN_LENGTH = 16
# A client gets this long to send a request's headers (a browser or an SDK needs milliseconds).
HEADER_TIMEOUT_SECONDS = 10.0

LOOPBACK_ALLOWED_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ALLOWED_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")


@dataclass(frozen=True)
class HttpSecurity:
    """What guards the HTTP endpoint: an optional bearer token and the Host/Origin allowlists."""

    token: str | None = field(repr=False)
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]

    def transport_security(self) -> TransportSecuritySettings:
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=list(self.allowed_hosts),
            allowed_origins=list(self.allowed_origins),
        )


def _split(raw: str | None, variable: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in (raw or "").split(",") if item.strip())
    if "*" in items:
        raise ConfigError(
            f"{variable} may not contain '*': list the exact names clients use, such as "
            "'mcp.example.com' or 'mcp.example.com:*' (any port)."
        )
    return items


def http_security(host: str, env: Mapping[str, str]) -> HttpSecurity:
    """The guard for a bind address, or a `ConfigError` saying what is missing for a public bind."""
    token = (env.get(TOKEN_ENV) or "").strip() or None
    # First of all: it names the setting a cluster worker misses before the ledger's URL is even tried.
    check_cluster(host, _given(env, DATABASE_URL_ENV), _given(env, REQUEST_STATE_KEYS_ENV))
    hosts = _split(env.get(HOSTS_ENV), HOSTS_ENV)
    origins = _split(env.get(ORIGINS_ENV), ORIGINS_ENV)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{TOKEN_ENV} is too short ({len(token)} characters); use at least {MIN_TOKEN_LENGTH} random "
            "characters, for example the output of: openssl rand -hex 32"
        )
    if is_loopback(host):
        bound = host.strip("[]")
        # The bound address itself too, e.g. 127.0.0.2, which the usual loopback names do not cover.
        own_host = f"[{bound}]:*" if ":" in bound else f"{bound}:*"
        own_origin = f"http://{own_host}"
        return HttpSecurity(
            token=token,
            allowed_hosts=hosts or tuple(dict.fromkeys((*LOOPBACK_ALLOWED_HOSTS, own_host))),
            allowed_origins=origins or tuple(dict.fromkeys((*LOOPBACK_ALLOWED_ORIGINS, own_origin))),
        )
    missing = []
    # With a tenants file every request's token names its tenant: no shared token is needed (or used).
    if token is None and not _given(env, TENANTS_FILE_ENV):
        missing.append(f"{TOKEN_ENV} (an access token clients send as 'Authorization: Bearer <token>')")
    if not hosts:
        missing.append(f"{HOSTS_ENV} (the Host names clients use, e.g. 'mcp.example.com,mcp.example.com:*')")
    if missing:
        raise ConfigError(
            f"Refusing to serve HTTP on {host}, which is not a loopback address: set "
            + " and ".join(missing)
            + f". Browsers' cross-origin requests stay refused unless {ORIGINS_ENV} lists their origins. "
            "Or bind 127.0.0.1 (the default) and put an authenticating reverse proxy in front."
        )
    # Without an explicit Origin list, any request that carries an Origin header is refused.
    return HttpSecurity(token=token, allowed_hosts=hosts, allowed_origins=origins)


class BearerTokenMiddleware:
    """Require `Authorization: Bearer <token>` on everything but the health check.

    The SDK's `AuthSettings` route is built for OAuth (it needs an issuer URL); a shared static
    token only needs this. Tokens are compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token):
            await self.app(scope, receive, send)
            return
        # RFC 6750: no error code when no credentials were sent, invalid_token when they were wrong.
        error = "invalid_token" if header else None
        body = {"error": error or "unauthorized", "error_description": "Bearer token required"}
        await send_json(send, 401, body, (challenge(error, "The access token is not valid"),))


T = TypeVar("T")


class LedgerUnanswered(Exception):
    """The ledger did not answer a probe in time (or a probe before it is still stuck)."""


class LedgerProbe:
    """The ledger as the operational routes see it: the open service's, asked within a time bound.

    A blocking ledger (SQLite) is asked on a worker thread, an async one (PostgreSQL) on the loop; either
    way `asyncio.wait_for` bounds the wait. A thread cannot be cancelled, so while one probe is still
    stuck the next one fails at once instead of starting another thread behind it.
    """

    def __init__(self, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self.services: Services | None = None
        self._stuck: asyncio.Future[Any] | None = None

    def bind(self, services: Services | None) -> None:
        self.services = services

    async def ask(self, question: Callable[[Any], T]) -> list[T]:
        """`question(ledger)` of every open service's ledger (one per tenant) within the bound; raises
        `LedgerUnanswered` or whatever a ledger raised."""
        if self.services is None or not self.services.all():
            raise LedgerUnanswered("the service is not open")
        if self._stuck is not None and not self._stuck.done():
            raise LedgerUnanswered("an earlier probe has not returned")
        ledgers = [service.ledger for service in self.services.all()]
        pending: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.to_thread(lambda: [question(ledger) for ledger in ledgers])
        )
        self._stuck = pending
        try:
            results = await asyncio.wait_for(asyncio.shield(pending), self.timeout)
            for index, result in enumerate(results):
                if inspect.isawaitable(result):  # an async ledger: the call made a coroutine, awaited here
                    results[index] = await asyncio.wait_for(result, self.timeout)
        except TimeoutError as exc:
            raise LedgerUnanswered(f"no answer within {self.timeout:g}s") from exc
        return results  # type: ignore[no-any-return]

    async def healthy(self) -> bool:
        """The ledger's own `ping()` when it has one (it raises when the database is unreachable), then a
        read through its query API that touches its data."""

        def ping(ledger: Any) -> object:
            method = getattr(ledger, "ping", None)
            if callable(method):
                method()  # a backend's own check (PostgreSQL: a round trip, LedgerUnavailable when away)
            # And always a read of the data: a ping of `SELECT 1` is answered by SQLite without the file.
            return ledger.query(PROBE_SQL)

        try:
            await self.ask(ping)
        except Exception as exc:  # any failure of the ledger is "down", and said in the log once per probe
            logger.warning("health check: the ledger did not answer (%s)", exc)
            return False
        return True

    async def task_counts(self) -> dict[str, int] | None:
        """Tasks by status across the ledger (every worker's), or None when it did not answer in time."""
        try:
            answers = await self.ask(lambda ledger: ledger.query(TASK_COUNTS_SQL))
        except Exception as exc:
            logger.warning("metrics: the ledger did not answer the task count (%s)", exc)
            return None
        counts: dict[str, int] = {}
        for rows in answers:
            for row in rows:
                counts[str(row[0])] = counts.get(str(row[0]), 0) + int(row[1])
        return counts


def health_route(probe: LedgerProbe) -> Callable[[Request], Any]:
    async def healthz(_: Request) -> Response:
        """Liveness and readiness for supervisors and load balancers: the process answers, and so does its
        ledger. No version, paths, settings or key state."""
        if await probe.healthy():
            return JSONResponse({"status": "ok", "database": "ok"})
        return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)

    return healthz


def metrics_route(probe: LedgerProbe, metrics: PrometheusMetrics) -> Callable[[Request], Any]:
    async def scrape(_: Request) -> Response:
        """The Prometheus text format; the task counts are read from the ledger now, the rest is counted
        in memory as it happens (so a scrape never waits longer than one bounded ledger read)."""
        metrics.set_task_counts(await probe.task_counts())
        body, content_type = metrics.render()
        return Response(body, headers={"content-type": content_type})

    return scrape


def _given(env: Mapping[str, str], name: str) -> bool:
    value = (env.get(name) or "").strip()
    return bool(value) and not is_unfilled(value)


def check_cluster(host: str, on_database: bool, has_keys: bool) -> None:
    """Refuse a network-reachable worker on a shared (PostgreSQL) ledger without a shared key ring:
    any request may land on any worker, and a confirmation's follow-up sealed by another worker's own
    key would fail. A loopback worker (one machine, one process behind nothing) may keep the SDK's.

    Checked twice: by `http_security` from the environment (before settings are read or the database is
    tried, so the message is this one), and by `serve_http` from the settings it is really given."""
    if on_database and not has_keys and not is_loopback(host):
        raise ConfigError(
            f"Refusing to serve HTTP on {host} with {DATABASE_URL_ENV} set but no {REQUEST_STATE_KEYS_ENV}: "
            "every worker of a cluster needs the same request-state key ring, or a cost confirmation answered "
            f"on another worker fails. Set {REQUEST_STATE_KEYS_ENV} to the same value on every worker (each key "
            "at least 32 random bytes as hex or base64url, e.g. the output of: openssl rand -hex 32)."
        )


def build_http_app(
    settings: Settings,
    security: HttpSecurity,
    *,
    env: Mapping[str, str] | None = None,
) -> ASGIApp:
    """The ASGI app: stateless Streamable HTTP at /mcp (so several workers can serve), plus /healthz and
    /metrics (each app counts into its own registry); with a tenants file, each request's token names its
    tenant (`server.transport.tenants`); with links on, /videos serves signed links."""
    from server.app import create_app

    env = os.environ if env is None else env
    tenants = open_tenants(settings, env)
    probe = LedgerProbe()
    metrics = PrometheusMetrics()
    server = create_app(settings, metrics=metrics, on_service=probe.bind, tenants=tenants)
    server.custom_route(HEALTH_PATH, methods=["GET"], include_in_schema=False)(health_route(probe))
    server.custom_route(METRICS_PATH, methods=["GET"], include_in_schema=False)(metrics_route(probe, metrics))
    if settings.links_on:
        server.custom_route(
            f"{VIDEO_PREFIX}{{tenant}}/{{task_id}}/{{filename}}", methods=["GET", "HEAD"], include_in_schema=False
        )(video_route(settings, lambda: probe.services))
    pointer = metadata_url(settings)
    if pointer is not None:
        from mcp.server.auth.routes import create_protected_resource_routes
        from pydantic import AnyHttpUrl

        resource = resource_url(settings)
        assert resource is not None and settings.oauth_issuer is not None
        for route in create_protected_resource_routes(AnyHttpUrl(resource), [AnyHttpUrl(settings.oauth_issuer)]):
            # RFC 9728's path (the prefix inserted before /mcp), and the bare prefix some clients try first.
            for path in dict.fromkeys((route.path, PROTECTED_RESOURCE_PREFIX)):
                server.custom_route(path, methods=["GET", "OPTIONS"], include_in_schema=False)(route.endpoint)
    app: ASGIApp = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        transport_security=security.transport_security(),
    )
    if tenants is not None:
        install_tenant_log_filter()
        metrics_token = (env.get(METRICS_TOKEN_ENV) or "").strip() or None
        if metrics_token is not None:
            register_secret(metrics_token)
        verifier = TenantTokenVerifier(
            lambda: tenants.hashes, lambda: tenants.tenants.keys(), oauth=oauth_config(settings)
        )
        return TenantGate(
            app, verifier, resource_metadata=pointer, metrics_token=metrics_token, open_paths=(HEALTH_PATH,)
        )
    if security.token is not None:
        register_secret(security.token)
        app = BearerTokenMiddleware(app, security.token)
    return app


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers (see the module docstring)."""

    header_timeout: float = HEADER_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request (after a keep-alive pause) starts its clock
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in: the request is the app's from here on

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closed the connection of %s: no complete request headers in %g s", client, self.header_timeout)
            self.transport.close()


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_SECONDS) -> type[HeaderTimeoutProtocol]:
    """The protocol class uvicorn instantiates per connection, with its header deadline."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def uvicorn_config(
    app: ASGIApp, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT_SECONDS, **options: Any
) -> uvicorn.Config:
    # log_config=None: uvicorn logs through the root logger, so to stderr like the rest of the server.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        server_header=False,
        ws="none",
        http=header_timeout_protocol(header_timeout),
        **options,
    )


async def serve_http(settings: Settings, host: str, port: int, security: HttpSecurity) -> None:
    check_cluster(host, settings.database_url is not None, bool(settings.request_state_keys))
    app = build_http_app(settings, security)
    logger.info(
        "serving Streamable HTTP at http://%s:%s%s (token %s, allowed hosts %s)",
        f"[{host}]" if ":" in host else host,
        port,
        MCP_PATH,
        "required" if security.token else "not required",
        ",".join(security.allowed_hosts),
    )
    await uvicorn.Server(uvicorn_config(app, host, port)).serve()
