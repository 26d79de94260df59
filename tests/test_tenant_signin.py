"""Sign-in through an identity provider (issue 15): the server as an OAuth 2.1 resource server.

A local issuer on loopback (`tests/issuer.py`: keys made here, a JWKS and discovery documents served over
real HTTP) signs the tokens; the real HTTP app checks them. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server.config import load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.http import http_security
from tests.conftest import detect_emo, make_env
from tests.issuer import LocalIssuer
from tests.serving import serving
from tests.tenancy import KEYS, PUBLIC, TOKENS, sha

pytestmark = pytest.mark.anyio

AUDIENCE = f"{PUBLIC}/mcp"
METADATA = f"{PUBLIC}/.well-known/oauth-protected-resource/mcp"
ACCEPT = {"Accept": "application/json, text/event-stream"}
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer(audience=AUDIENCE) as running:
        yield running


@pytest.fixture
async def base(
    accounts: FakeDashScope, issuer: LocalIssuer, tmp_path: Path, database: str | None
) -> AsyncIterator[str]:
    key = tmp_path / "frank.key"
    key.write_text(KEYS["bob"])
    alice_key = tmp_path / "alice.key"
    alice_key.write_text(KEYS["alice"])
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[tenants.frank]\ndashscope_key_file = "{key}"\n\n'
        f'[tenants.alice]\ndashscope_key_file = "{alice_key}"\ntoken_sha256 = ["{sha(TOKENS["alice"])}"]\n'
    )
    env = make_env(
        accounts,
        tmp_path,
        EMO_MCP_TENANTS_FILE=str(tenants),
        EMO_MCP_PUBLIC_URL=PUBLIC,
        EMO_MCP_OAUTH_ISSUER=issuer.url,
    )
    if database is not None:
        env["EMO_MCP_DATABASE_URL"] = database
    settings = load_settings(env, cwd=tmp_path)
    async with serving(settings, http_security("127.0.0.1", {})) as served:
        yield served


async def status_of(base: str, token: str | None) -> httpx2.Response:
    headers = {**ACCEPT, **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    async with httpx2.AsyncClient(timeout=10) as raw:
        return await raw.post(f"{base}/mcp", headers=headers, json=LIST)


async def test_a_valid_token_of_the_identity_provider_reaches_its_tenant(base: str, issuer: LocalIssuer) -> None:
    token = issuer.token({"tenant": "frank"})
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client,
    ):
        detection = await detect_emo(client)
    assert detection["check_pass"] is True
    # Static tokens keep working beside the identity provider's.
    assert (await status_of(base, TOKENS["alice"])).status_code == 200


async def test_a_request_without_a_token_learns_where_to_sign_in(base: str, issuer: LocalIssuer) -> None:
    missing = await status_of(base, None)
    assert missing.status_code == 401
    assert f'resource_metadata="{METADATA}"' in missing.headers["www-authenticate"]
    async with httpx2.AsyncClient(timeout=10) as raw:
        document = (await raw.get(base + METADATA.removeprefix(PUBLIC))).json()
        bare = (await raw.get(f"{base}/.well-known/oauth-protected-resource")).json()
    assert bare == document
    assert document["resource"] == AUDIENCE
    assert [server.rstrip("/") for server in document["authorization_servers"]] == [issuer.url.rstrip("/")]


async def test_every_bad_token_is_refused(base: str, issuer: LocalIssuer) -> None:
    now = int(time.time())
    other = LocalIssuer(audience=AUDIENCE)
    bad = {
        "expired": issuer.token({"tenant": "frank", "exp": now - 120}),
        "not yet valid": issuer.token({"tenant": "frank", "nbf": now + 120}),
        "wrong audience": issuer.token({"tenant": "frank", "aud": "https://elsewhere.example.com/mcp"}),
        "wrong issuer": issuer.token({"tenant": "frank", "iss": "https://evil.example.com"}),
        "alg none": issuer.token({"tenant": "frank"}, alg="none"),
        "HS256 with the public key": issuer.token({"tenant": "frank"}, alg="HS256", key=issuer.public_pem()),
        "a key the issuer never published": issuer.token({"tenant": "frank"}, key=other.key(other.signing_kid())),
        "no exp": issuer.token({"tenant": "frank", "exp": None}),
        "garbage": "not.a.jwt",
    }
    for what, token in bad.items():
        answer = await status_of(base, token)
        assert answer.status_code == 401, what
        assert 'error="invalid_token"' in answer.headers["www-authenticate"], what
    # Within the leeway of 60 s an expired token still passes; a valid token naming no tenant gets 403.
    assert (await status_of(base, issuer.token({"tenant": "frank", "exp": now - 20}))).status_code == 200
    assert (await status_of(base, issuer.token({"tenant": "nobody"}))).status_code == 403
    assert (await status_of(base, issuer.token({"tenant": None}))).status_code == 403


async def test_a_rotated_key_is_fetched_when_a_token_names_it(base: str, issuer: LocalIssuer) -> None:
    assert (await status_of(base, issuer.token({"tenant": "frank"}))).status_code == 200
    fetched = issuer.jwks_fetches
    issuer.rotate(drop_old=True)
    assert (await status_of(base, issuer.token({"tenant": "frank"}))).status_code == 200
    assert issuer.jwks_fetches == fetched + 1
