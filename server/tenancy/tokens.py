"""Placeholder of the token verifier while the JWT half is built (replaced by the full module)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import httpx2
from mcp.server.auth.provider import AccessToken, TokenVerifier


@dataclass(frozen=True)
class OAuthConfig:
    issuer: str
    audience: str
    tenant_claim: str = "tenant"
    leeway: float = 60.0


Verdict = Literal["ok", "invalid", "no-tenant"]


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    tenant: str | None
    reason: str
    expires_at: int | None = None
    subject: str | None = None


class TenantTokenVerifier(TokenVerifier):
    def __init__(
        self,
        static_hashes: Callable[[], Mapping[str, str]],
        tenants: Callable[[], Collection[str]],
        oauth: OAuthConfig | None = None,
        http: httpx2.AsyncClient | None = None,
        *,
        refresh_every: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._static = static_hashes
        self._tenants = tenants

    async def check(self, token: str) -> Check:
        name = self._static().get(hashlib.sha256(token.encode()).hexdigest())
        if name is not None and name in self._tenants():
            return Check("ok", name, "static token")
        return Check("invalid", None, "unknown token")

    async def verify_token(self, token: str) -> AccessToken | None:
        check = await self.check(token)
        if check.verdict != "ok" or check.tenant is None:
            return None
        return AccessToken(token=token, client_id=check.tenant, scopes=[])

    async def aclose(self) -> None:
        return None
