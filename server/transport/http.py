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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx2
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import DEFAULT_HOST as DEFAULT_HOST
from server.config import DEFAULT_PORT as DEFAULT_PORT
from server.config import Settings
from server.errors import ConfigError
from server.media.addresses import is_loopback
from server.redaction import register_secret

logger = logging.getLogger(__name__)

TOKEN_ENV = "EMO_MCP_HTTP_TOKEN"  # noqa: S105 (a variable name, not a secret)
HOSTS_ENV = "EMO_MCP_ALLOWED_HOSTS"
ORIGINS_ENV = "EMO_MCP_ALLOWED_ORIGINS"
MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
MIN_TOKEN_LENGTH = 16
# A client gets this long to send a request's headers (a browser or an SDK needs milliseconds).
HEADER_TIMEOUT_SECONDS = 10.0
REALM = "dashscope-emo-mcp"

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
    if token is None:
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
        challenge = f'Bearer realm="{REALM}"'
        if header:
            challenge += ', error="invalid_token", error_description="The access token is not valid"'
        body = json.dumps(
            {"error": "invalid_token" if header else "unauthorized", "error_description": "Bearer token required"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def healthz(_: Request) -> Response:
    """Liveness for process supervisors: no version, paths, settings or key state."""
    return JSONResponse({"status": "ok"})


def build_http_app(settings: Settings, security: HttpSecurity, http: httpx2.AsyncClient | None = None) -> ASGIApp:
    """The ASGI app: stateless Streamable HTTP at /mcp (so several workers can serve), plus /healthz."""
    from server.app import create_app

    server = create_app(settings, http)
    server.custom_route(HEALTH_PATH, methods=["GET"], include_in_schema=False)(healthz)
    app: ASGIApp = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        transport_security=security.transport_security(),
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
