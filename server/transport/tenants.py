"""The HTTP side of hosting for many people (issue 15): who a request is for, and the signed video links.

- `TenantGate` answers every request but the open ones (`/healthz`, `/videos/…`, the protected-resource
  metadata) with 401 unless its bearer token names a tenant: a static token of the tenants file (by its
  SHA-256) or, with `EMO_MCP_OAUTH_ISSUER`, a JWT from the identity provider whose tenant claim names one
  (a valid JWT naming none gets 403). The tenant goes into `server.tenancy.current` (and the SDK's
  authenticated-user context, so `get_access_token()` works too) for the tool call's whole life.
- The protected-resource metadata (RFC 9728) comes from the SDK's own route builder, and the 401's
  `WWW-Authenticate` points at it (`resource_metadata`), as the MCP authorization spec asks.
- `/videos/<tenant>/<task>/<file>?exp=…&sig=…` serves a finished video to whoever holds its signed link,
  from the tenant's own ledger and folder only; Starlette's `FileResponse` answers `Range` requests.
- In tenant mode `/metrics` is the operator's: it needs `EMO_MCP_METRICS_TOKEN` (else it is not served),
  since the figures are the whole server's, every tenant's.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.jobs.task_views import IMPLICIT_TENANT
from server.tenancy.current import current_tenant
from server.tenancy.links import VIDEO_PREFIX, LinkSigner
from server.tenancy.tenants import TenantsFile
from server.tenancy.tokens import OAuthConfig, TenantTokenVerifier

if TYPE_CHECKING:
    from server.runtime import Services

logger = logging.getLogger(__name__)

METRICS_TOKEN_ENV = "EMO_MCP_METRICS_TOKEN"  # noqa: S105 (a variable name, not a secret)
PROTECTED_RESOURCE_PREFIX = "/.well-known/oauth-protected-resource"
REALM = "dashscope-emo-mcp"


def oauth_config(settings: Settings) -> OAuthConfig | None:
    if settings.oauth_issuer is None:
        return None
    assert settings.oauth_audience is not None  # config.py derives it or refuses to start
    return OAuthConfig(
        issuer=settings.oauth_issuer, audience=settings.oauth_audience, tenant_claim=settings.oauth_tenant_claim
    )


def resource_url(settings: Settings) -> str | None:
    """This server's MCP endpoint as a resource identifier (RFC 9728): the public address + /mcp."""
    if settings.public_url is not None:
        return f"{settings.public_url}/mcp"
    return settings.oauth_audience


def metadata_url(settings: Settings) -> str | None:
    """Where the protected-resource metadata is: the well-known prefix inserted before the resource path."""
    resource = resource_url(settings)
    if resource is None or settings.oauth_issuer is None:
        return None
    from mcp.server.auth.routes import build_resource_metadata_url
    from pydantic import AnyHttpUrl

    return str(build_resource_metadata_url(AnyHttpUrl(resource)))


def open_tenants(settings: Settings, env: Mapping[str, str] | None = None) -> TenantsFile | None:
    """The tenants file in force at start (a `ConfigError` naming the tenant and field stops the server)."""
    if settings.tenants_file is None:
        return None
    env = os.environ if env is None else env
    tenants = TenantsFile(settings.tenants_file, env, oauth=settings.oauth_issuer is not None)
    for name in ("EMO_MCP_HTTP_TOKEN", "DASHSCOPE_API_KEY"):
        if (env.get(name) or "").strip():
            logger.warning(
                "%s is set but not used for HTTP requests: with a tenants file, each request's token names its "
                "tenant, and each tenant's DashScope key is its own",
                name,
            )
    logger.info("tenant mode: %d tenant(s) from %s", len(tenants.tenants), settings.tenants_file)
    return tenants


class TenantGate:
    """Require a token that names a tenant (see the module docstring); the open paths pass through."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TenantTokenVerifier,
        *,
        resource_metadata: str | None,
        metrics_token: str | None,
        open_paths: tuple[str, ...],
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.resource_metadata = resource_metadata
        self._metrics_token = metrics_token.encode() if metrics_token else None
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path in self._open or path.startswith((VIDEO_PREFIX, PROTECTED_RESOURCE_PREFIX)):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        token = presented.strip() if scheme.lower() == "bearer" else ""
        if path == "/metrics":
            if self._metrics_token is not None and hmac.compare_digest(token.encode(), self._metrics_token):
                await self.app(scope, receive, send)
                return
            await send_json(
                send, 404, {"error": "not_found", "error_description": f"/metrics needs {METRICS_TOKEN_ENV}"}
            )
            return
        if not token:
            await self._refuse(send, 401, None, "Bearer token required")
            return
        check = await self.verifier.check(token)
        if check.verdict == "no-tenant":
            logger.info("refused a valid token that names no tenant of this server (%s)", check.reason)
            await self._refuse(send, 403, "insufficient_scope", "The token is valid but names no tenant of this server")
            return
        if check.verdict != "ok" or check.tenant is None:
            logger.info("refused a request: %s", check.reason)
            await self._refuse(send, 401, "invalid_token", "The access token is not valid")
            return
        access = AccessToken(
            token=token, client_id=check.tenant, scopes=[], expires_at=check.expires_at, subject=check.subject
        )
        user = AuthenticatedUser(access)
        scope["user"] = user
        scope.setdefault("state", {})["tenant"] = check.tenant
        tenant_reset = current_tenant.set(check.tenant)
        user_reset = auth_context_var.set(user)
        try:
            await self.app(scope, receive, send)
        finally:
            auth_context_var.reset(user_reset)
            current_tenant.reset(tenant_reset)

    async def _refuse(self, send: Send, status: int, error: str | None, description: str) -> None:
        body = {"error": error or "unauthorized", "error_description": description}
        await send_json(send, status, body, (challenge(error, description, self.resource_metadata),))


def challenge(error: str | None, description: str, resource_metadata: str | None = None) -> tuple[bytes, bytes]:
    """The `WWW-Authenticate` header of a refusal. RFC 6750: no error code when no credentials were sent;
    RFC 9728: where to learn how to get some."""
    parts = [f'realm="{REALM}"']
    if error is not None:
        parts += [f'error="{error}"', f'error_description="{description}"']
    if resource_metadata is not None:
        parts.append(f'resource_metadata="{resource_metadata}"')
    return (b"www-authenticate", ("Bearer " + ", ".join(parts)).encode())


async def send_json(
    send: Send, status: int, body: dict[str, str], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A small JSON answer straight from ASGI middleware (before any app ran)."""
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


def video_route(settings: Settings, services: Callable[[], Services | None]) -> Callable[[Request], Any]:
    """GET/HEAD `/videos/<tenant>/<task>/<file>`: the video of a signed, unexpired link, of that tenant only."""
    assert settings.public_url is not None and settings.link_secret is not None
    signer = LinkSigner(settings.link_secret, settings.public_url, settings.link_ttl)

    async def video(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        task_id = request.path_params["task_id"]
        filename = request.path_params["filename"]
        problem = signer.verify(
            tenant, task_id, filename, request.query_params.get("exp"), request.query_params.get("sig")
        )
        if problem is not None:
            status = 410 if problem.reason == "expired" else 403
            return JSONResponse({"error": problem.reason, "error_description": problem.message}, status_code=status)
        opened = services()
        service = None
        if opened is not None:
            service = opened.single if not opened.tenant_mode and tenant == IMPLICIT_TENANT else opened.known(tenant)
        record = service.ledger.get_task(task_id) if service is not None else None
        path = Path(record.video_path) if record is not None and record.video_path else None
        root = service.settings.output_dir.resolve() if service is not None else None
        if (
            path is None
            or root is None
            or path.name != filename
            or not path.resolve().is_relative_to(root)
            or not path.is_file()
        ):
            return JSONResponse(
                {"error": "not_found", "error_description": "This video is not on this server (any more)."},
                status_code=404,
            )
        return FileResponse(path, media_type="video/mp4", filename=None)

    return video
