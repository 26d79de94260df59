"""Who a request's bearer token names: a static token of a tenant, or an identity provider's JWT.

A static token is known by its sha256 alone (the tenants file lists hashes, never tokens), so the
lookup is a dict lookup on a hash: nothing about the token's bytes can leak through its timing.
Static tokens are looked up first and work whether or not OAuth is configured.

Any other token is tried as an OAuth 2.1 access token (a JWT) of the one configured issuer. PyJWT
checks the signature, `iss`, `aud` and the required claims; what it is given is decided here and
never by the token:
- the key comes only from the issuer's JWKS, found through its discovered metadata (whose `issuer`
  must be the configured one); the `jku` / `x5u` / `jwk` / `x5c` headers a token may carry are
  ignored, so an attacker cannot bring a key of their own;
- the algorithms allowed for a key follow from its key type (RSA: RS*/PS*, EC: the ES* of its curve,
  OKP: EdDSA), narrowed by the JWK's own `alg`; `none` and every HMAC algorithm are refused before
  any key is looked at, which is what stops HS256 "signed" with the RSA public key as the secret;
- a token without `kid` is accepted only while the JWKS holds a single key.
`exp` / `nbf` / `iat` are checked here against the injected clock (PyJWT reads the wall clock
itself), with a leeway of at most a minute.

Keys rotate: a token whose `kid` is not in the cached JWKS makes the JWKS be fetched again, one
fetch for a whole burst of such tokens (the refresh is coalesced under a lock) and at most one per
`refresh_every` seconds (a stream of made-up kids cannot turn the server into a load generator
against the issuer). The cached JWKS is also re-fetched after `KEYS_MAX_AGE`, so a key the issuer
withdrew stops working; if the issuer cannot be reached then, the cached keys go on working for up
to `KEYS_STALE_LIMIT` (an identity provider's outage is not ours). An issuer never reached answers
"invalid", with one warning per run of failures, and nothing raises out of `check`.

A verified JWT is remembered by its hash (bounded, for at most `VERIFIED_TTL` seconds and never past
its `exp`) so that the requests of a session do not each pay for an RSA verification. The tenant it
names is looked up in `tenants()` on every call all the same: removing a tenant revokes at once.
Failures are never remembered, so a token signed by a newly rotated key works after one refresh.

No token, signature or exception text derived from one is ever logged or put in a `Check.reason`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx2
import jwt
from mcp.server.auth.provider import AccessToken, TokenVerifier

from server.media.addresses import is_loopback

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "MAX_LEEWAY",
    "Check",
    "OAuthConfig",
    "TenantTokenVerifier",
    "Verdict",
    "discovery_urls",
]

logger = logging.getLogger(__name__)

# The most clock skew tolerated between this server and the identity provider (RFC 9068 §4 leaves it
# to the resource server; more than a minute makes an expired token live on noticeably).
MAX_LEEWAY = 60.0
# Signatures by a key pair only: a verifier holding a shared HMAC secret could mint tokens itself,
# and allowing HS* next to RS* with one key is the classic algorithm-confusion hole.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# ECDSA binds the hash to the curve (RFC 7518 §3.4); EdDSA here is Ed25519 (PyJWK knows no Ed448).
_CURVE_ALGORITHMS = {("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384", ("EC", "P-521"): "ES512"}
_OKP_CURVES = frozenset({"Ed25519"})
# The private members of a JWK: a JWKS that publishes them is broken, and its key is not used.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# How long a verified JWT is remembered (its `exp` bounds this further), and how many are.
VERIFIED_TTL = 300.0
MAX_VERIFIED = 10_000
# The JWKS is re-fetched when older than this (a withdrawn key stops working within it) ...
KEYS_MAX_AGE = 900.0
# ... and cached keys are dropped when no fetch has succeeded for this long.
KEYS_STALE_LIMIT = 86_400.0
# A bearer token longer than this is not worth decoding (identity providers' JWTs are a few KB).
MAX_JWT_CHARS = 16 * 1024
# A discovery document or JWKS is a few KB; the cap is on the bytes after decompression.
MAX_DOCUMENT_BYTES = 512 * 1024
# One refresh (discovery and JWKS together), however slowly the issuer drips its answers.
REFRESH_DEADLINE = 10.0
# The own HTTP client's per-operation limits: a request waits on a refresh, so it must be short.
HTTP_TIMEOUT = httpx2.Timeout(5.0, connect=3.0)

_HTTP_FAILURES: tuple[type[Exception], ...] = (httpx2.HTTPError, httpx2.StreamError, httpx2.InvalidURL, OSError)

Verdict = Literal["ok", "invalid", "no-tenant"]


@dataclass(frozen=True)
class OAuthConfig:
    """The identity provider whose access tokens this server accepts.

    `issuer` is compared exactly (no trailing-slash tolerance) with the token's `iss` and with the
    discovered metadata's `issuer`, as RFC 8414 §3.3 and RFC 9068 §4 require: a looser comparison is
    how a token of another issuer on the same host gets in.
    """

    issuer: str
    audience: str
    tenant_claim: str = "tenant"
    leeway: float = MAX_LEEWAY

    def __post_init__(self) -> None:
        _check_url(self.issuer, "the OAuth issuer")
        split = urlsplit(self.issuer)
        if split.query or split.fragment:
            raise ValueError("the OAuth issuer must not have a query or fragment (RFC 8414 §2)")
        if not self.audience:
            raise ValueError("the OAuth audience must not be empty")
        if not self.tenant_claim:
            raise ValueError("the OAuth tenant claim must not be empty")
        # Refused rather than clamped: a configured leeway of ten minutes is a mistake to hear about,
        # not one to correct silently. NaN fails the comparison too.
        if not 0.0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"the OAuth clock-skew leeway must be between 0 and {MAX_LEEWAY:g} seconds")


@dataclass(frozen=True)
class Check:
    """What a token is: `ok` (with its tenant), `invalid` (401), or `no-tenant` (a valid token of the
    identity provider that names no current tenant: 403, since authenticating again will not help)."""

    verdict: Verdict
    tenant: str | None
    reason: str
    expires_at: int | None = None
    subject: str | None = None


def _check_url(url: str, what: str) -> None:
    """Keys and metadata are trust anchors: they come over TLS, or from this very machine (tests, a
    sidecar). Plain HTTP to anywhere else would let the network hand us its own keys."""
    split = urlsplit(url)
    host = split.hostname or ""
    if not host:
        raise ValueError(f"{what} must be an absolute URL")
    if split.scheme == "https" or (split.scheme == "http" and is_loopback(host)):
        return
    raise ValueError(f"{what} must be an https URL (http only on a loopback host)")


def _digest(token: str) -> str:
    # surrogatepass: a header decoded oddly must still hash (and fail), never raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def discovery_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the order tried.

    OpenID Connect Discovery appends its well-known path to the issuer; RFC 8414 inserts its own
    between the host and the issuer's path (for an issuer without a path both read alike), and many
    servers answer the appended form of either. Duplicates are dropped, order kept.
    """
    split = urlsplit(issuer)
    base = issuer.rstrip("/")
    origin = f"{split.scheme}://{split.netloc}"
    path = split.path.rstrip("/")
    candidates = [f"{base}/.well-known/openid-configuration"]
    if path:
        candidates += [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}/.well-known/openid-configuration{path}",
        ]
    candidates.append(f"{base}/.well-known/oauth-authorization-server")
    return list(dict.fromkeys(candidates))


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a public JWK may verify, from its key type and curve, narrowed by its `alg`.

    Empty for a key that must not be used: a symmetric (`oct`) or private key, an encryption key, a
    key whose `alg` is not an asymmetric signature algorithm or does not fit its type.
    """
    kty = jwk.get("kty")
    if _PRIVATE_MEMBERS.intersection(jwk):
        return frozenset()
    if jwk.get("use", "sig") != "sig":
        return frozenset()
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return frozenset()
    if kty == "RSA":
        allowed = _RSA_ALGORITHMS
    elif kty == "EC":
        curve = _CURVE_ALGORITHMS.get(("EC", str(jwk.get("crv"))))
        allowed = frozenset({curve}) if curve else frozenset()
    elif kty == "OKP":
        allowed = frozenset({"EdDSA"}) if jwk.get("crv") in _OKP_CURVES else frozenset()
    else:
        return frozenset()
    alg = jwk.get("alg")
    if alg is None:
        return allowed
    return allowed & {alg} if isinstance(alg, str) else frozenset()


@dataclass(frozen=True)
class _Key:
    """One usable JWK: its key parsed once per algorithm it may verify (a PyJWK is bound to one)."""

    kid: str | None
    by_algorithm: Mapping[str, jwt.PyJWK]


@dataclass(frozen=True)
class _KeySet:
    keys: tuple[_Key, ...]
    fetched_at: float

    def kids(self) -> set[str | None]:
        return {key.kid for key in self.keys}


def _parse_jwks(document: Any) -> tuple[_Key, ...]:
    """The usable signature keys of a JWKS document; unusable members are skipped, not fatal (an
    issuer publishing an encryption key beside its signing keys is normal)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS is not an object with a 'keys' list")
    keys: list[_Key] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        by_algorithm: dict[str, jwt.PyJWK] = {}
        for algorithm in sorted(_algorithms_for(entry)):
            try:
                by_algorithm[algorithm] = jwt.PyJWK(entry, algorithm)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                break  # the key material itself is unreadable: no algorithm will read it either
        if by_algorithm:
            keys.append(_Key(kid, by_algorithm))
    if not keys:
        raise ValueError("the JWKS holds no usable signature key")
    return tuple(keys)


class _Unreachable(Exception):
    """The issuer could not be asked at all (no connection, timeout): other URLs on it will fail too."""


class _BadDocument(Exception):
    """The issuer answered, but not with a usable document (status, size, JSON, shape)."""


@dataclass
class _Verified:
    """A JWT whose signature and claims were verified; the tenant it names is re-checked per call."""

    claim: object
    expires_at: int
    subject: str | None
    claims: dict[str, Any]
    valid_until: float


@dataclass
class _Refresh:
    """Bookkeeping of key fetches: how many attempts completed and when the last one did."""

    attempts: int = 0
    last: float | None = None
    last_for_kid: float | None = None
    failing: bool = False
    jwks_uri: str | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class TenantTokenVerifier(TokenVerifier):
    """Maps a bearer token to the tenant it names (see the module docstring for the rules).

    `static_hashes` and `tenants` are called on every check, so the caller's hot reload of the
    tenants file takes effect on the next request. `http` is used for discovery and the JWKS when
    given (the caller owns it); otherwise one is built on first need, with short timeouts, and
    closed by `aclose`.
    """

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
        if not (math.isfinite(refresh_every) and refresh_every >= 0):
            raise ValueError("refresh_every must be a finite number of seconds, not negative")
        self._static_hashes = static_hashes
        self._tenants = tenants
        self._oauth = oauth
        self._http = http
        self._own_http: httpx2.AsyncClient | None = None
        self._refresh_every = refresh_every
        self._clock = clock
        self._keys: _KeySet | None = None
        self._refresh = _Refresh()
        self._verified: dict[str, _Verified] = {}

    # ------------------------------------------------------------------ the protocol

    async def check(self, token: str) -> Check:
        """The verdict on one bearer token. Raises only what `static_hashes` / `tenants` raise."""
        check, _ = await self._assess(token)
        return check

    async def verify_token(self, token: str) -> AccessToken | None:
        """The MCP SDK's `TokenVerifier`: the tenant as `client_id`, or None for anything not "ok".

        A "no-tenant" token is None here as well; an HTTP layer that answers 403 for it calls `check`.
        """
        check, claims = await self._assess(token)
        if check.verdict != "ok" or check.tenant is None:
            return None
        return AccessToken(
            token=token,
            client_id=check.tenant,
            scopes=[],
            expires_at=check.expires_at,
            # The audience was verified to be this server's, which is what the SDK's resource check asks.
            resource=self._oauth.audience if claims is not None and self._oauth is not None else None,
            subject=check.subject,
            claims=dict(claims) if claims is not None else None,
        )

    async def aclose(self) -> None:
        """Close the HTTP client this verifier built (never an injected one) and forget what it cached."""
        self._verified.clear()
        self._keys = None
        if self._own_http is not None:
            client, self._own_http = self._own_http, None
            await client.aclose()

    # ------------------------------------------------------------------ the rules

    async def _assess(self, token: str) -> tuple[Check, dict[str, Any] | None]:
        digest = _digest(token)
        tenant = self._static_hashes().get(digest)
        if tenant is not None:
            if tenant in self._tenants():
                return Check("ok", tenant, "static token"), None
            return Check("invalid", None, "static token of a tenant that no longer exists"), None
        if self._oauth is None:
            return Check("invalid", None, "unknown token"), None
        if not _looks_like_jwt(token):
            return Check("invalid", None, "unknown token (neither a static token nor a JWT)"), None

        now = self._clock()
        verified = self._verified.get(digest)
        if verified is not None and now >= verified.valid_until:
            del self._verified[digest]
            verified = None
        if verified is None:
            try:
                result = await self._verify_jwt(token, now)
            except Exception as exc:  # a check answers; an unforeseen failure is a refusal, and logged
                logger.warning("unexpected %s while verifying an access token", type(exc).__name__)
                return Check("invalid", None, "token could not be verified"), None
            if isinstance(result, Check):
                return result, None
            verified = result
            self._remember(digest, verified, now)
        return self._tenant_of(verified, self._oauth.tenant_claim), verified.claims

    def _tenant_of(self, verified: _Verified, claim_name: str) -> Check:
        claim = verified.claim
        if not isinstance(claim, str):
            why = f"the token has no {claim_name!r} claim" if claim is None else f"its {claim_name!r} is not a string"
            return Check("no-tenant", None, why, verified.expires_at, verified.subject)
        if claim not in self._tenants():
            return Check("no-tenant", None, "the token names no current tenant", verified.expires_at, verified.subject)
        return Check("ok", claim, "access token", verified.expires_at, verified.subject)

    def _remember(self, digest: str, verified: _Verified, now: float) -> None:
        if verified.valid_until <= now:
            return  # accepted within the leeway after its exp: nothing left to remember
        while len(self._verified) >= MAX_VERIFIED:
            # Insertion order is close to expiry order (every entry lives at most VERIFIED_TTL).
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = verified

    async def _verify_jwt(self, token: str, now: float) -> _Verified | Check:
        assert self._oauth is not None
        oauth = self._oauth
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _invalid("malformed JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            # `none`, HS*, anything unknown: decided before a key is even looked at.
            return _invalid("JWT algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return _invalid("JWT kid is not a string")

        keys = await self._current_keys(now)
        if keys is None:
            return _invalid("the identity provider's keys are not available")
        if kid is not None and kid not in keys.kids():
            # Perhaps a key the issuer has rotated in since the last fetch.
            keys = await self._refreshed_keys(seen=self._refresh.attempts, for_kid=True) or keys
            if kid not in keys.kids():
                return _invalid("JWT signed by a key the identity provider does not publish")
        key = _pick(keys, kid, alg)
        if isinstance(key, str):
            return _invalid(key)

        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=oauth.audience,
                issuer=oauth.issuer,
                options={
                    "require": ["exp", "iss", "aud"],
                    # Checked below against the injected clock; PyJWT would read the wall clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.PyJWTError as exc:
            return _invalid(_why(exc))
        timing = _check_times(claims, self._clock(), oauth.leeway)
        if timing is not None:
            return _invalid(timing)
        expires_at = int(claims["exp"])
        subject = claims.get("sub")
        return _Verified(
            claim=claims.get(oauth.tenant_claim),
            expires_at=expires_at,
            subject=subject if isinstance(subject, str) else None,
            claims=claims,
            valid_until=min(float(claims["exp"]), now + VERIFIED_TTL),
        )

    # ------------------------------------------------------------------ the issuer's keys

    async def _current_keys(self, now: float) -> _KeySet | None:
        """The cached keys, fetched first when there are none or they are older than `KEYS_MAX_AGE`
        (or from the future: the clock was set back). A failed fetch keeps the old keys in use, up to
        `KEYS_STALE_LIMIT`."""
        keys = self._keys
        if keys is not None and 0 <= now - keys.fetched_at < KEYS_MAX_AGE:
            return keys
        await self._refreshed_keys(seen=self._refresh.attempts)
        keys = self._keys
        if keys is not None and now - keys.fetched_at >= KEYS_STALE_LIMIT:
            logger.warning("dropping the OAuth issuer's keys: no fetch of them has succeeded for a day")
            self._keys = keys = None
            self._verified.clear()
        return keys

    async def _refreshed_keys(self, *, seen: int, for_kid: bool = False) -> _KeySet | None:
        """Fetch the JWKS again unless another task did so while this one waited for the lock (`seen`
        is the attempt count it saw), or an attempt of the same kind completed less than `refresh_every`
        ago. `for_kid`: asked for by a token naming an unknown key; such fetches are spaced apart on their
        own, so the first token signed by a key rotated in just after a routine fetch is not refused.
        Returns the keys as they then are (None if never fetched)."""
        refresh = self._refresh
        async with refresh.lock:
            if refresh.attempts != seen:
                return self._keys
            last = refresh.last_for_kid if for_kid else refresh.last
            if last is not None and 0 <= self._clock() - last < self._refresh_every:
                return self._keys
            if for_kid:
                refresh.last_for_kid = self._clock()
            try:
                with anyio.fail_after(REFRESH_DEADLINE):
                    keys = await self._fetch_keys()
            except (_Unreachable, _BadDocument, TimeoutError) as exc:
                # Counted only once complete: a fetch cancelled with its request leaves the next
                # waiter free to try at once.
                refresh.attempts += 1
                refresh.last = self._clock()
                refresh.jwks_uri = None  # the metadata may have moved: discover again next time
                if not refresh.failing:
                    refresh.failing = True
                    reason = str(exc) or "no answer in time"
                    logger.warning("the OAuth issuer's keys could not be fetched (%s); its tokens are refused", reason)
                return self._keys
            refresh.attempts += 1
            refresh.last = self._clock()
            if refresh.failing:
                refresh.failing = False
                logger.info("the OAuth issuer's keys are fetched again")
            old = self._keys
            if old is not None and not old.kids() <= keys.kids():
                # A key was withdrawn: what it verified must not outlive it in the cache.
                self._verified.clear()
            self._keys = keys
            return keys

    async def _fetch_keys(self) -> _KeySet:
        refresh = self._refresh
        if refresh.jwks_uri is None:
            refresh.jwks_uri = await self._discover()
        document = await self._get_json(refresh.jwks_uri)
        try:
            keys = _parse_jwks(document)
        except ValueError as exc:
            raise _BadDocument(str(exc)) from None
        return _KeySet(keys, fetched_at=self._clock())

    async def _discover(self) -> str:
        assert self._oauth is not None
        issuer = self._oauth.issuer
        problems: list[str] = []
        for url in discovery_urls(issuer):
            try:
                metadata = await self._get_json(url)
            except _BadDocument as exc:
                problems.append(f"{url}: {exc}")
                continue
            if not isinstance(metadata, dict):
                problems.append(f"{url}: not a JSON object")
                continue
            if metadata.get("issuer") != issuer:
                # RFC 8414 §3.3: metadata naming another issuer must not be used.
                problems.append(f"{url}: names another issuer")
                continue
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                problems.append(f"{url}: no jwks_uri")
                continue
            try:
                _check_url(jwks_uri, "jwks_uri")
            except ValueError as exc:
                problems.append(f"{url}: {exc}")
                continue
            return jwks_uri
        raise _BadDocument("no usable metadata: " + "; ".join(problems))

    def _client(self) -> httpx2.AsyncClient:
        if self._http is not None:
            return self._http
        if self._own_http is None:
            # Built on first need (an httpx2 client costs ~80 ms to build), with timeouts short enough
            # for a request that waits on a refresh; redirects are not followed (metadata and keys live
            # where the issuer says).
            self._own_http = httpx2.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)
        return self._own_http

    async def _get_json(self, url: str) -> Any:
        """GET a JSON document of bounded size; `_Unreachable` when no answer came at all."""
        body = bytearray()
        try:
            async with self._client().stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise _BadDocument(f"HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _BadDocument("answer too large")
        except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.ProxyError, OSError) as exc:
            raise _Unreachable(f"{type(exc).__name__} on {url}") from None
        except _HTTP_FAILURES as exc:
            raise _BadDocument(f"{type(exc).__name__} on {url}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise _BadDocument("not JSON") from None


def _invalid(reason: str) -> Check:
    return Check("invalid", None, reason)


def _looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts, the first two non-empty, and not absurdly long: worth decoding."""
    if len(token) > MAX_JWT_CHARS:
        return False
    parts = token.split(".")
    return len(parts) == 3 and bool(parts[0]) and bool(parts[1])


def _pick(keys: _KeySet, kid: str | None, alg: str) -> jwt.PyJWK | str:
    """The key to verify with, pinned to the header's alg only if the key allows it; else why not."""
    candidates: tuple[_Key, ...]
    if kid is None:
        if len(keys.keys) != 1:
            return "JWT without kid while the identity provider publishes several keys"
        candidates = keys.keys
    else:
        candidates = tuple(key for key in keys.keys if key.kid == kid)
    for key in candidates:
        found = key.by_algorithm.get(alg)
        if found is not None:
            return found
    return "JWT algorithm does not match its key"


def _number(value: object) -> float | None:
    """A NumericDate (RFC 7519 §2): an int or float, finite; a bool or a string is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of 400 digits is valid JSON
        return None
    return number if math.isfinite(number) else None


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> str | None:
    """Why the token is not valid at `now` (±`leeway`), or None: the same rules as PyJWT's."""
    exp = _number(claims.get("exp"))
    if exp is None:
        return "JWT exp is not a number"
    if exp <= now - leeway:
        return "JWT expired"
    for name in ("nbf", "iat"):
        if name not in claims:
            continue
        value = _number(claims[name])
        if value is None:
            return f"JWT {name} is not a number"
        if value > now + leeway:
            return f"JWT not valid yet ({name} in the future)"
    return None


# PyJWT's exception types, in the words of a log line (their messages are not used: some quote input).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "JWT signature does not verify"),
    (jwt.InvalidAudienceError, "JWT is for another audience"),
    (jwt.InvalidIssuerError, "JWT is from another issuer"),
    (jwt.InvalidAlgorithmError, "JWT algorithm not allowed"),
    (jwt.InvalidKeyError, "the identity provider's key is not acceptable"),
    (jwt.DecodeError, "malformed JWT"),
)


def _why(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"JWT has no {exc.claim} claim"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return f"JWT refused ({type(exc).__name__})"
