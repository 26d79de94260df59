"""A real OAuth issuer on loopback, for tests: discovery metadata, a JWKS, and tokens signed by its keys.

The verifier under test speaks real HTTP to it, as it would to an identity provider, so discovery,
key rotation, an issuer that is down or slow, and the JWKS fetches a burst of tokens causes are all
observable (`requests`, `jwks_fetches`). Keys are generated per issuer (RSA 2048; EC P-256 and
Ed25519 on first use). `token` signs whatever it is told to, including what a real issuer never
would (`alg: none`, HS256 keyed with the public key PEM, a foreign key under the issuer's kid), since
those are the attacks the verifier must refuse.

Use it as a context manager, or as the `local_issuer` fixture:

    from tests.issuer import LocalIssuer, local_issuer  # noqa: F401 (the fixture)
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

__all__ = ["DEFAULT_AUDIENCE", "KID", "KeyKind", "LocalIssuer", "PrivateKey", "local_issuer"]

DEFAULT_AUDIENCE = "https://mcp.example.test/mcp"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KeyKind = Literal["RSA", "EC", "OKP"]
Discovery = Literal["openid", "oauth", "both"]

_FAMILY: dict[str, KeyKind] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    "ES256": "EC",
    "EdDSA": "OKP",
}


class KID(enum.Enum):
    """`token(kid=KID.SIGNING)`: the kid of the issuer's current key of the alg's family (the default)."""

    SIGNING = enum.auto()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def new_key(kind: KeyKind = "RSA") -> PrivateKey:
    """A fresh private key: RSA 2048, EC P-256 or Ed25519."""
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public JWK of a private key (no kid)."""
    jwk: Any
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return dict(jwk)


def sign(header: Mapping[str, Any], claims: Mapping[str, Any], key: PrivateKey | bytes | None) -> str:
    """A compact JWS of exactly this header and these claims, signed by `header["alg"]` with `key`.

    Built by hand rather than by `jwt.encode`, which (rightly) refuses `none` with a key, an HMAC
    secret that is a PEM, and a header without the kid it would add.
    """
    signing_input = f"{_segment(header)}.{_segment(claims)}".encode("ascii")
    alg = header.get("alg")
    if alg == "none" or key is None:
        signature = b""
    elif isinstance(key, bytes):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[str(alg)]
        signature = hmac.new(key, signing_input, digest).digest()
    else:
        signature = get_default_algorithms()[str(alg)].sign(signing_input, key)
    return f"{signing_input.decode('ascii')}.{_b64(signature)}"


class LocalIssuer:
    """An OAuth 2.1 / OpenID Connect issuer on 127.0.0.1 (a free port), in a background thread.

    `path` makes an issuer with a path (`http://127.0.0.1:PORT/tenants/a`). `discovery` says which
    metadata documents are served: OpenID Connect's appended form, RFC 8414's inserted form, or both.
    `status` forces an HTTP status for a path (e.g. 500 on `jwks_path`), `delay` holds every answer
    back that many seconds, and `metadata_overrides` are merged into the metadata (an `issuer` of
    another name, say). Counters: `requests` by path, and `jwks_fetches`.
    """

    def __init__(
        self,
        *,
        audience: str = DEFAULT_AUDIENCE,
        path: str = "",
        discovery: Discovery = "openid",
        publish_alg: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.path = path.rstrip("/")
        self.discovery = discovery
        self.publish_alg = publish_alg
        self.clock = clock
        self.status: dict[str, int] = {}
        self.delay = 0.0
        self.metadata_overrides: dict[str, Any] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._keys: dict[str, PrivateKey] = {}
        self._published: list[str] = []
        self._signing: dict[KeyKind, str] = {}
        self._kids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self.add_key("RSA")

    # ------------------------------------------------------------------ serving

    def start(self) -> LocalIssuer:
        """Listen on a free loopback port (the same one again after a `stop`, when it is still free)."""
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the tests read `requests`, not stderr."""

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._released.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: connections to the port are refused until `start` again."""
        self._released.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalIssuer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        if not self._port:
            raise RuntimeError("the issuer is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """The issuer identifier, exactly as tokens carry it in `iss`."""
        return self.origin + self.path

    @property
    def jwks_path(self) -> str:
        return self.path + "/jwks.json"

    @property
    def jwks_uri(self) -> str:
        return self.origin + self.jwks_path

    @property
    def jwks_fetches(self) -> int:
        with self._lock:
            return self.requests[self.jwks_path]

    def metadata_paths(self) -> list[str]:
        paths = []
        if self.discovery in ("openid", "both"):
            paths.append(self.path + "/.well-known/openid-configuration")
        if self.discovery in ("oauth", "both"):
            paths.append("/.well-known/oauth-authorization-server" + self.path)
        return paths

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            **self.metadata_overrides,
        }

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            published = [(kid, self._keys[kid]) for kid in self._published]
        keys = []
        for kid, key in published:
            jwk = {**public_jwk(key), "kid": kid, "use": "sig"}
            if self.publish_alg:
                jwk["alg"] = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}[jwk["kty"]]
            keys.append(jwk)
        return {"keys": keys}

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        path = urlsplit(request.path).path
        with self._lock:
            self.requests[path] += 1
            forced = self.status.get(path)
            delay = self.delay
        if delay:
            self._released.wait(delay)
        body: Any = None
        if forced is not None:
            status = forced
        elif path in self.metadata_paths():
            status, body = 200, self.metadata()
        elif path == self.jwks_path:
            status, body = 200, self.jwks()
        else:
            status = 404
        data = json.dumps(body if body is not None else {"error": "not here"}).encode("utf-8")
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except ConnectionError:
            pass  # the client gave up waiting (a timeout test): nothing to tell it

    # ------------------------------------------------------------------ keys

    def add_key(
        self, kind: KeyKind = "RSA", *, publish: bool = True, signing: bool | None = None, key: PrivateKey | None = None
    ) -> str:
        """A new key of `kind` (or `key` itself, e.g. a weak one); published in the JWKS unless told not
        to, and made the signing key of its kind when asked (or when it is the first of its kind).
        Returns its kid."""
        key = key if key is not None else new_key(kind)
        with self._lock:
            kid = f"{kind.lower()}-{next(self._kids)}"
            self._keys[kid] = key
            if publish:
                self._published.append(kid)
            if signing or (signing is None and kind not in self._signing):
                self._signing[kind] = kid
        return kid

    def rotate(self, *, drop_old: bool = False, kind: KeyKind = "RSA") -> str:
        """Key rotation: a new signing key of `kind`, published; the old one stays published unless
        `drop_old`. Returns the new kid."""
        with self._lock:
            old = self._signing.get(kind)
        kid = self.add_key(kind, signing=True)
        if drop_old and old is not None:
            with self._lock:
                self._published.remove(old)
        return kid

    def signing_kid(self, kind: KeyKind = "RSA") -> str:
        """The kid of the current signing key of `kind` (one is made on first need for EC and OKP)."""
        with self._lock:
            kid = self._signing.get(kind)
        return kid if kid is not None else self.add_key(kind, signing=True)

    def key(self, kid: str) -> PrivateKey:
        with self._lock:
            return self._keys[kid]

    def public_pem(self, kid: str | None = None) -> bytes:
        """The PEM of a public key (the signing RSA key's by default): the HMAC "secret" of the
        algorithm-confusion attack."""
        key = self.key(kid or self.signing_kid("RSA"))
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # ------------------------------------------------------------------ tokens

    def claims(self, claims: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An access token's claims: iss, aud, sub, iat and exp (five minutes on) by default, then
        `claims` over them; a claim given as None is left out."""
        now = int(self.clock())
        merged: dict[str, Any] = {"iss": self.url, "aud": self.audience, "sub": "user-1", "iat": now, "exp": now + 300}
        merged.update(claims or {})
        return {name: value for name, value in merged.items() if value is not None}

    def token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        kid: str | KID | None = KID.SIGNING,
        alg: str = "RS256",
        headers: Mapping[str, Any] | None = None,
        key: PrivateKey | bytes | None = None,
    ) -> str:
        """A signed token with `self.claims(claims)`.

        `kid`: the current signing key's of the alg's family by default, a given kid, or None for no
        kid header. `key`: sign with this private key (or HMAC secret) instead of the issuer's key of
        `kid` (or, for a kid the issuer has no key of, its signing key of the alg's family).
        `alg="none"` makes an unsigned token. `headers` go over the JOSE header; a header given as
        None is left out.
        """
        header: dict[str, Any] = {"alg": alg, "typ": "at+jwt"}
        if isinstance(kid, KID):
            family = _FAMILY.get(alg)
            kid = self.signing_kid(family) if family is not None else None
        if kid is not None:
            header["kid"] = kid
        header.update(headers or {})
        header = {name: value for name, value in header.items() if value is not None}
        if key is None and alg != "none" and not alg.startswith("HS"):
            with self._lock:
                key = self._keys.get(kid) if kid is not None else None
            if key is None:
                family = _FAMILY.get(alg)
                if family is None:
                    raise ValueError(f"no key of this issuer signs {alg}")
                key = self.key(self.signing_kid(family))
        return sign(header, self.claims(claims), key)


@pytest.fixture
def local_issuer() -> Iterator[LocalIssuer]:
    """A started `LocalIssuer` with the default settings, stopped after the test."""
    with LocalIssuer() as issuer:
        yield issuer
