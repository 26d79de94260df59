"""Bearer tokens to tenants (server/tenancy/tokens.py), against a real issuer on loopback.

Nothing of PyJWT or the HTTP client is mocked: the verifier discovers the `LocalIssuer`'s metadata,
fetches its JWKS over HTTP and verifies real signatures. The attacks are real tokens too (unsigned,
HS256 keyed with the public key, a foreign key under the issuer's kid, keys embedded in the header).
Time is an injected clock, so leeway and cache lifetimes are tested without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import jwt
import pytest

from server.tenancy.tokens import (
    MAX_VERIFIED,
    OAuthConfig,
    TenantTokenVerifier,
    discovery_urls,
)
from tests.issuer import DEFAULT_AUDIENCE, LocalIssuer, new_key, public_jwk, sign

pytestmark = pytest.mark.anyio

START = 1_900_000_000.0


class Clock:
    """The verifier's and the issuer's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Tenancy:
    """What the tenants file says, as the caller would hot-reload it."""

    tenants: set[str] = field(default_factory=lambda: {"acme", "globex"})
    hashes: dict[str, str] = field(default_factory=dict)

    def add_static(self, token: str, tenant: str) -> None:
        self.hashes[hashlib.sha256(token.encode()).hexdigest()] = tenant


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tenancy() -> Tenancy:
    return Tenancy()


@pytest.fixture
def issuer(clock: Clock) -> Iterator[LocalIssuer]:
    with LocalIssuer(clock=clock) as local:
        yield local


Make = Callable[..., TenantTokenVerifier]


@pytest.fixture
async def make(clock: Clock, tenancy: Tenancy, issuer: LocalIssuer) -> AsyncIterator[Make]:
    """Builds verifiers (of `issuer` unless told otherwise) and closes them after the test."""
    made: list[TenantTokenVerifier] = []

    def build(oauth: OAuthConfig | str | None = "default", **kwargs: Any) -> TenantTokenVerifier:
        config = OAuthConfig(issuer.url, DEFAULT_AUDIENCE) if oauth == "default" else oauth
        assert not isinstance(config, str)
        verifier = TenantTokenVerifier(lambda: tenancy.hashes, lambda: tenancy.tenants, config, clock=clock, **kwargs)
        made.append(verifier)
        return verifier

    yield build
    for verifier in made:
        await verifier.aclose()


@pytest.fixture
async def verifier(make: Make) -> TenantTokenVerifier:
    return make()


async def verdict(verifier: TenantTokenVerifier, token: str) -> tuple[str, str | None]:
    check = await verifier.check(token)
    assert not token or token not in check.reason
    return check.verdict, check.tenant


async def test_a_valid_token_names_its_tenant(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    token = issuer.token({"tenant": "acme", "sub": "alice"})
    check = await verifier.check(token)
    assert (check.verdict, check.tenant, check.subject) == ("ok", "acme", "alice")
    assert check.expires_at == int(START) + 300
    assert issuer.requests[issuer.path + "/.well-known/openid-configuration"] == 1
    assert issuer.jwks_fetches == 1


async def test_expiry_allows_the_leeway_and_no_more(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock
) -> None:
    now = int(clock())
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": now - 30})) == ("ok", "acme")
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": now - 61})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": None})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": str(now + 300)})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": True})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": 10**400})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "exp": now + 0.5})) == ("ok", "acme")


async def test_a_token_expires_while_cached(verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock) -> None:
    token = issuer.token({"tenant": "acme", "exp": int(clock()) + 100})
    assert await verdict(verifier, token) == ("ok", "acme")
    clock.advance(100 + 61)
    check = await verifier.check(token)
    assert (check.verdict, check.reason) == ("invalid", "JWT expired")


async def test_not_before_in_the_future(verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock) -> None:
    now = int(clock())
    assert await verdict(verifier, issuer.token({"tenant": "acme", "nbf": now + 120})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "iat": now + 120})) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "nbf": now + 30})) == ("ok", "acme")


async def test_a_smaller_leeway_is_honoured(make: Make, issuer: LocalIssuer, clock: Clock) -> None:
    strict = make(OAuthConfig(issuer.url, DEFAULT_AUDIENCE, leeway=0))
    assert await verdict(strict, issuer.token({"tenant": "acme", "exp": int(clock()) - 1})) == ("invalid", None)


@pytest.mark.parametrize("leeway", [60.5, 600.0, -1.0, float("nan"), float("inf")])
def test_a_leeway_beyond_a_minute_is_refused(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        OAuthConfig("https://id.example.com", DEFAULT_AUDIENCE, leeway=leeway)


def test_the_issuer_must_be_https_unless_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        OAuthConfig("http://id.example.com", DEFAULT_AUDIENCE)
    with pytest.raises(ValueError, match="query"):
        OAuthConfig("https://id.example.com/?tenant=a", DEFAULT_AUDIENCE)
    OAuthConfig("http://127.0.0.1:9/realm", DEFAULT_AUDIENCE)
    OAuthConfig("https://id.example.com/realms/main", DEFAULT_AUDIENCE)


async def test_the_audience_must_be_this_server(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    other = issuer.token({"tenant": "acme", "aud": "https://other.example.test/mcp"})
    assert await verdict(verifier, other) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme", "aud": None})) == ("invalid", None)
    several = issuer.token({"tenant": "acme", "aud": ["https://other.example.test", DEFAULT_AUDIENCE]})
    assert await verdict(verifier, several) == ("ok", "acme")


async def test_the_issuer_is_compared_exactly(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    for iss in (issuer.url + "/", issuer.url + "/other", "https://evil.example.test", None):
        assert await verdict(verifier, issuer.token({"tenant": "acme", "iss": iss})) == ("invalid", None)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_an_unsigned_token_is_refused(verifier: TenantTokenVerifier, issuer: LocalIssuer, alg: str) -> None:
    header = {"alg": alg, "typ": "JWT", "kid": issuer.signing_kid()}
    token = sign(header, issuer.claims({"tenant": "acme"}), None)
    assert token.endswith(".")
    check = await verifier.check(token)
    assert check.verdict == "invalid"
    assert issuer.jwks_fetches == 0  # refused before any key is looked at


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_signed_with_the_public_key_is_refused(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, alg: str
) -> None:
    """Algorithm confusion: a verifier that let the token pick HS256 would take the RSA public key
    (which anyone can fetch) as the HMAC secret, and this forgery would verify."""
    pem = issuer.public_pem()
    token = issuer.token({"tenant": "acme"}, alg=alg, key=pem)
    assert await verdict(verifier, token) == ("invalid", None)
    jwk_as_secret = json.dumps(issuer.jwks()["keys"][0]).encode()
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg=alg, key=jwk_as_secret)) == ("invalid", None)


async def test_a_key_the_issuer_does_not_publish_is_refused(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    foreign = new_key("RSA")
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, key=foreign)) == ("invalid", None)
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, key=foreign, kid="made-up")) == ("invalid", None)
    unpublished = issuer.add_key("RSA", publish=False)
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, kid=unpublished)) == ("invalid", None)


async def test_keys_embedded_in_the_header_are_ignored(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    attacker = new_key("RSA")
    elsewhere = "/attacker/jwks.json"
    headers = {
        "jwk": {**public_jwk(attacker), "kid": "attacker"},
        "jku": issuer.origin + elsewhere,
        "x5u": issuer.origin + "/attacker/cert.pem",
    }
    for kid in ("attacker", issuer.signing_kid()):
        token = issuer.token({"tenant": "acme"}, key=attacker, kid=kid, headers=headers)
        assert await verdict(verifier, token) == ("invalid", None)
    assert issuer.requests[elsewhere] == 0
    assert issuer.requests["/attacker/cert.pem"] == 0
    # On a genuine token those headers change nothing either.
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, headers=headers)) == ("ok", "acme")


async def test_the_algorithm_must_fit_the_key(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    ec_kid = issuer.signing_kid("EC")
    issuer.signing_kid("OKP")  # all keys made before the first fetch
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg="ES256")) == ("ok", "acme")
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg="EdDSA")) == ("ok", "acme")
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg="PS256")) == ("ok", "acme")
    # An RSA kid named in an ES256 token, an EC kid in an RS256 one, ES384 on a P-256 key.
    rsa_as_ec = issuer.token({"tenant": "acme"}, alg="ES256", kid=issuer.signing_kid("RSA"), key=issuer.key(ec_kid))
    assert await verdict(verifier, rsa_as_ec) == ("invalid", None)
    ec_as_rsa = issuer.token({"tenant": "acme"}, alg="RS256", kid=ec_kid, key=issuer.key(issuer.signing_kid("RSA")))
    assert await verdict(verifier, ec_as_rsa) == ("invalid", None)
    wrong_curve = issuer.token({"tenant": "acme"}, alg="ES384", kid=ec_kid, key=issuer.key(ec_kid))
    assert await verdict(verifier, wrong_curve) == ("invalid", None)


async def test_the_jwk_alg_narrows_what_a_key_verifies(make: Make, clock: Clock) -> None:
    with LocalIssuer(clock=clock, publish_alg=True) as issuer:
        verifier = make(OAuthConfig(issuer.url, DEFAULT_AUDIENCE))
        assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg="RS256")) == ("ok", "acme")
        assert await verdict(verifier, issuer.token({"tenant": "acme"}, alg="PS256")) == ("invalid", None)


async def test_a_weak_rsa_key_is_refused(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = issuer.add_key("RSA", key=rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505 (the weak key the verifier must refuse)
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, kid=weak)) == ("invalid", None)


async def test_a_token_without_kid(make: Make, issuer: LocalIssuer) -> None:
    assert await verdict(make(), issuer.token({"tenant": "acme"}, kid=None)) == ("ok", "acme")
    issuer.rotate()
    check = await make().check(issuer.token({"tenant": "acme"}, kid=None))
    assert (check.verdict, check.reason) == (
        "invalid",
        "JWT without kid while the identity provider publishes several keys",
    )


async def test_a_rotated_key_works_after_one_refresh(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock
) -> None:
    old = issuer.token({"tenant": "acme"})
    assert await verdict(verifier, old) == ("ok", "acme")
    assert issuer.jwks_fetches == 1
    new_kid = issuer.rotate()
    clock.advance(2.0)
    tokens = [issuer.token({"tenant": "acme", "jti": str(n)}) for n in range(20)]
    assert {jwt.get_unverified_header(token)["kid"] for token in tokens} == {new_kid}
    results: list[tuple[str, str | None]] = []

    async def one(token: str) -> None:
        results.append(await verdict(verifier, token))

    async with anyio.create_task_group() as group:
        for token in tokens:
            group.start_soon(one, token)
    assert results == [("ok", "acme")] * 20
    assert issuer.jwks_fetches == 2  # one fetch for the whole burst
    assert await verdict(verifier, old) == ("ok", "acme")  # the old key is still published


async def test_a_burst_of_first_requests_discovers_once(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    results: list[tuple[str, str | None]] = []

    async def one(n: int) -> None:
        results.append(await verdict(verifier, issuer.token({"tenant": "globex", "jti": str(n)})))

    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(one, n)
    assert results == [("ok", "globex")] * 20
    assert sum(issuer.requests.values()) == 2  # the metadata and the JWKS, once each


async def test_unknown_kids_refresh_at_most_once_per_interval(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock
) -> None:
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
    for n in range(5):
        assert await verdict(verifier, issuer.token({"tenant": "acme"}, kid=f"made-up-{n}")) == ("invalid", None)
    # The first unknown kid fetches once (a key rotated in just after the routine fetch must work at once);
    # the others within refresh_every of that fetch fetch nothing.
    assert issuer.jwks_fetches == 2
    new_kid = issuer.rotate()
    fresh = issuer.token({"tenant": "acme"})
    assert await verdict(verifier, fresh) == ("invalid", None)  # an unknown-kid fetch less than refresh_every ago
    assert issuer.jwks_fetches == 2
    clock.advance(2.0)
    assert await verdict(verifier, fresh) == ("ok", "acme")  # the refusal was not remembered
    assert issuer.jwks_fetches == 3
    clock.advance(2.0)
    for n in range(5):
        assert await verdict(verifier, issuer.token({"tenant": "acme"}, kid=f"made-up-{n}")) == ("invalid", None)
    assert issuer.jwks_fetches == 4  # a stream of made-up kids: one fetch per interval
    assert await verdict(verifier, issuer.token({"tenant": "acme"}, kid=new_kid)) == ("ok", "acme")


async def test_a_withdrawn_key_stops_working(verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock) -> None:
    old = issuer.token({"tenant": "acme", "exp": int(clock()) + 3600})
    assert await verdict(verifier, old) == ("ok", "acme")
    issuer.rotate(drop_old=True)
    clock.advance(2.0)
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
    assert await verdict(verifier, old) == ("invalid", None)  # not served from the cache either


async def test_the_jwks_is_fetched_again_when_old(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock
) -> None:
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
    clock.advance(901)
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
    assert issuer.jwks_fetches == 2
    # An issuer that cannot be reached then: the keys it last published go on working.
    issuer.status[issuer.jwks_path] = 500
    clock.advance(901)
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
    assert issuer.jwks_fetches == 3
    # ... but not for ever: after a day without a successful fetch they are dropped.
    clock.advance(86_400)
    check = await verifier.check(issuer.token({"tenant": "acme"}))
    assert (check.verdict, check.reason) == ("invalid", "the identity provider's keys are not available")


async def test_claims_that_name_no_tenant(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    unknown = await verifier.check(issuer.token({"tenant": "initech"}))
    assert (unknown.verdict, unknown.tenant, unknown.subject) == ("no-tenant", None, "user-1")
    assert await verdict(verifier, issuer.token({})) == ("no-tenant", None)
    assert await verdict(verifier, issuer.token({"tenant": ["acme"]})) == ("no-tenant", None)
    assert await verdict(verifier, issuer.token({"tenant": 7})) == ("no-tenant", None)
    assert await verifier.verify_token(issuer.token({"tenant": "initech"})) is None


async def test_the_tenant_claim_is_configurable(make: Make, issuer: LocalIssuer) -> None:
    verifier = make(OAuthConfig(issuer.url, DEFAULT_AUDIENCE, tenant_claim="org"))
    assert await verdict(verifier, issuer.token({"org": "globex", "tenant": "acme"})) == ("ok", "globex")
    assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("no-tenant", None)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per signature check PyJWT makes (what the verifier's cache saves)."""
    made: list[None] = []
    real_decode = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(None)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return made


async def test_the_tenant_is_checked_on_every_call(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, tenancy: Tenancy, decodes: list[None]
) -> None:
    token = issuer.token({"tenant": "acme"})
    for _ in range(3):
        assert await verdict(verifier, token) == ("ok", "acme")
    assert len(decodes) == 1  # verified once, then remembered
    tenancy.tenants.discard("acme")
    assert await verdict(verifier, token) == ("no-tenant", None)  # revoked at once despite the cache
    tenancy.tenants.add("acme")
    assert await verdict(verifier, token) == ("ok", "acme")
    assert len(decodes) == 1


async def test_the_cache_forgets_after_five_minutes(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, clock: Clock, decodes: list[None]
) -> None:
    token = issuer.token({"tenant": "acme", "exp": int(clock()) + 3600})
    assert await verdict(verifier, token) == ("ok", "acme")
    clock.advance(299)
    assert await verdict(verifier, token) == ("ok", "acme")
    assert len(decodes) == 1
    clock.advance(2)
    assert await verdict(verifier, token) == ("ok", "acme")
    assert len(decodes) == 2


async def test_the_cache_is_bounded(
    verifier: TenantTokenVerifier, issuer: LocalIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.tenancy.tokens as tokens

    monkeypatch.setattr(tokens, "MAX_VERIFIED", 5)
    assert MAX_VERIFIED == 10_000
    for n in range(12):
        assert await verdict(verifier, issuer.token({"tenant": "acme", "jti": str(n)})) == ("ok", "acme")
    assert len(verifier._verified) == 5


async def test_static_tokens(make: Make, tenancy: Tenancy, issuer: LocalIssuer) -> None:
    tenancy.add_static("static-token-of-acme-0123456789", "acme")
    tenancy.add_static("static-token-of-gone-0123456789", "gone")
    for verifier in (make(), make(None)):
        assert await verdict(verifier, "static-token-of-acme-0123456789") == ("ok", "acme")
        assert await verdict(verifier, "static-token-of-gone-0123456789") == ("invalid", None)
        assert await verdict(verifier, "static-token-of-none-0123456789") == ("invalid", None)
        access = await verifier.verify_token("static-token-of-acme-0123456789")
        assert access is not None
        assert (access.client_id, access.expires_at, access.subject) == ("acme", None, None)
    tenancy.tenants.discard("acme")
    assert await verdict(make(), "static-token-of-acme-0123456789") == ("invalid", None)
    assert issuer.jwks_fetches == 0  # static tokens never need the issuer


async def test_a_jwt_without_oauth_configured_is_invalid(make: Make, issuer: LocalIssuer) -> None:
    assert await verdict(make(None), issuer.token({"tenant": "acme"})) == ("invalid", None)
    assert issuer.jwks_fetches == 0


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "a.b", "..", "a.b.c.d.e", "eyJhbGciOiJSUzI1NiJ9.e30.", "x" * 20_000, "\ud800.\udfff.x"],
)
async def test_garbage_is_invalid(verifier: TenantTokenVerifier, token: str) -> None:
    assert await verdict(verifier, token) == ("invalid", None)


async def test_an_issuer_that_is_down(
    make: Make, issuer: LocalIssuer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.token({"tenant": "acme"})
    issuer.stop()
    verifier = make()
    with caplog.at_level(logging.WARNING, logger="server.tenancy.tokens"):
        for _ in range(3):
            check = await verifier.check(token)
            assert (check.verdict, check.reason) == ("invalid", "the identity provider's keys are not available")
            clock.advance(2.0)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per run of failures, not per request
    assert token not in caplog.text
    issuer.start()
    assert await verdict(verifier, token) == ("ok", "acme")
    assert await verifier.verify_token(token) is not None


async def test_an_issuer_that_is_too_slow(make: Make, issuer: LocalIssuer) -> None:
    issuer.delay = 5.0
    async with httpx2.AsyncClient(timeout=0.2) as http:
        verifier = make(http=http)
        with anyio.fail_after(3):
            assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("invalid", None)


@pytest.mark.parametrize(
    ("discovery", "found_at"),
    [
        ("oauth", "/.well-known/oauth-authorization-server/realms/main"),
        ("openid", "/realms/main/.well-known/openid-configuration"),
    ],
)
async def test_an_issuer_with_a_path(make: Make, clock: Clock, discovery: Any, found_at: str) -> None:
    with LocalIssuer(clock=clock, path="/realms/main", discovery=discovery) as issuer:
        verifier = make(OAuthConfig(issuer.url, DEFAULT_AUDIENCE))
        assert await verdict(verifier, issuer.token({"tenant": "acme"})) == ("ok", "acme")
        assert issuer.requests[found_at] == 1


def test_discovery_urls() -> None:
    assert discovery_urls("https://id.example.com") == [
        "https://id.example.com/.well-known/openid-configuration",
        "https://id.example.com/.well-known/oauth-authorization-server",
    ]
    assert discovery_urls("https://id.example.com/realms/a/") == [
        "https://id.example.com/realms/a/.well-known/openid-configuration",
        "https://id.example.com/.well-known/oauth-authorization-server/realms/a",
        "https://id.example.com/.well-known/openid-configuration/realms/a",
        "https://id.example.com/realms/a/.well-known/oauth-authorization-server",
    ]


async def test_metadata_of_another_issuer_is_not_used(make: Make, issuer: LocalIssuer) -> None:
    issuer.metadata_overrides["issuer"] = "https://evil.example.test"
    assert await verdict(make(), issuer.token({"tenant": "acme"})) == ("invalid", None)
    assert issuer.jwks_fetches == 0
    issuer.metadata_overrides["issuer"] = issuer.url + "/"
    assert await verdict(make(), issuer.token({"tenant": "acme"})) == ("invalid", None)
    issuer.metadata_overrides.clear()
    issuer.metadata_overrides["jwks_uri"] = "http://keys.example.test/jwks.json"  # plain HTTP off this machine
    assert await verdict(make(), issuer.token({"tenant": "acme"})) == ("invalid", None)


async def test_verify_token_answers_for_the_sdk(verifier: TenantTokenVerifier, issuer: LocalIssuer) -> None:
    token = issuer.token({"tenant": "globex", "sub": "bob"})
    access = await verifier.verify_token(token)
    assert access is not None
    assert (access.token, access.client_id, access.scopes, access.subject) == (token, "globex", [], "bob")
    assert access.expires_at == int(START) + 300
    assert access.resource == DEFAULT_AUDIENCE
    assert access.claims is not None
    assert access.claims["iss"] == issuer.url
    assert await verifier.verify_token("garbage") is None
    assert await verifier.verify_token(issuer.token({"tenant": "acme"}, alg="HS256", key=issuer.public_pem())) is None
