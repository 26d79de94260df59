"""Signed, expiring links to finished videos (issue 15, HTTP mode).

In HTTP mode a finished video is not a file on the agent's disk: the server's workers serve it at
`<EMO_MCP_PUBLIC_URL>/videos/<tenant>/<task_id>/<filename>?exp=<unix seconds>&sig=<HMAC>`. The link is
a capability: whoever holds it may download that one video until `exp`, and nobody can make one for
another tenant's video, or stretch its lifetime, without the secret. Every worker holds the same
secret (`EMO_MCP_LINK_SECRET`), so a link handed out by one is honoured by all; older secrets may be
kept for verifying only, so the secret can be rotated without breaking links already handed out.

The signature covers a length-prefixed encoding of the parts, so no two different (tenant, task,
filename, exp) spell the same signed bytes; parts that could climb out of a tenant's folder are refused
whatever the signature says, so a bug elsewhere cannot turn a valid link into a path traversal.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, urlsplit

# The secret is read and judged by server/config.py (`parse_link_secret`), like the request-state keys.
from server.config import DEFAULT_LINK_TTL, LINK_SECRET_ENV, LINK_SECRET_HELP, MIN_KEY_BYTES, PUBLIC_URL_ENV
from server.errors import ConfigError
from server.redaction import register_secret

VIDEO_PREFIX = "/videos/"
MIN_SECRET_BYTES = MIN_KEY_BYTES
__all__ = ["DEFAULT_LINK_TTL", "VIDEO_PREFIX", "LinkProblem", "LinkSigner"]

LINK_TTL_ENV = "EMO_MCP_LINK_TTL"
# Ten years: `exp` then stays within MAX_EXP_DIGITS for millennia, and no sane policy asks for more.
MAX_LINK_TTL = 10 * 365 * 86400.0
# Twelve digits reach the year 33658; a longer `exp` is someone probing the parser, not a link of ours.
MAX_EXP_DIGITS = 12
# Longer than any tenant id, task id or file name this server makes; bounds the work of a forged request.
MAX_PART_LENGTH = 255

# Domain separation: a MAC of this key over these bytes can mean nothing but a video link, version 1.
_CONTEXT = b"emo-mcp video link v1\n"
_EXP = re.compile(rf"0|[1-9][0-9]{{0,{MAX_EXP_DIGITS - 1}}}")
# HMAC-SHA256 is 32 bytes: 43 base64url characters without padding.
_SIG = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class LinkProblem:
    """Why a link was refused: `expired` (genuine but old: ask for a fresh one) or `invalid` (anything else).

    An invalid link never says which part failed, so a forger learns nothing from the refusal."""

    reason: Literal["expired", "invalid"]
    message: str


def _text_forms(secret: bytes) -> tuple[str, ...]:
    """Every way the secret is usually written: whichever one an operator pasted is redacted."""
    b64 = base64.urlsafe_b64encode(secret).decode("ascii")
    std = base64.b64encode(secret).decode("ascii")
    return (secret.hex(), secret.hex().upper(), b64, b64.rstrip("="), std, std.rstrip("="))


def _part_ok(part: str) -> bool:
    """A path segment that names one thing inside one folder: no separator, no climbing, no control bytes."""
    if not part or len(part) > MAX_PART_LENGTH or part in (".", ".."):
        return False
    if "/" in part or "\\" in part or ".." in part:
        return False
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in part):
        return False
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no URL spells it, and it cannot be signed canonically
        return False
    return True


def _message(parts: Sequence[str]) -> bytes:
    """The signed bytes: each part as `<byte length>:<bytes>`, so no choice of parts collides with another."""
    encoded = [part.encode("utf-8") for part in parts]
    return _CONTEXT + b"".join(b"%d:%s\n" % (len(item), item) for item in encoded)


def _public_base(public_url: str) -> str:
    """The base URL without its trailing slash, refused unless it is an absolute http(s) URL without a query.

    A path prefix is kept (`https://example.com/emo`): a reverse proxy may mount the server below one."""
    parts = urlsplit(public_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"{PUBLIC_URL_ENV} must be the absolute http(s) URL the videos are reached at, without a query or "
            f"fragment (for example https://mcp.example.com or https://example.com/emo), got {public_url!r}"
        )
    return public_url.strip().rstrip("/")


class LinkSigner:
    """Makes and checks the links of one deployment: signs with `secret`, verifies with it and `previous`."""

    def __init__(
        self,
        secret: bytes,
        public_url: str,
        ttl: float = DEFAULT_LINK_TTL,
        *,
        previous: Sequence[bytes] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        for key in (secret, *previous):
            if len(key) < MIN_SECRET_BYTES:
                raise ConfigError(f"{LINK_SECRET_ENV} (or an older secret kept for rotation): {LINK_SECRET_HELP}")
        if not (math.isfinite(ttl) and 1 <= ttl <= MAX_LINK_TTL):
            raise ConfigError(f"{LINK_TTL_ENV} must be a number of seconds from 1 to {MAX_LINK_TTL:.0f}, got {ttl:g}")
        self._secret = secret
        self._keys = (secret, *(key for key in previous if key != secret))
        self._base = _public_base(public_url)
        self._ttl = ttl
        self._clock = clock
        # However the signer was built (from the environment or from bytes), its secrets stay out of logs.
        register_secret(*(form for key in self._keys for form in _text_forms(key)))

    @property
    def ttl(self) -> float:
        return self._ttl

    def path_of(self, tenant: str, task_id: str, filename: str) -> str:
        """The link's path as the workers serve it (`/videos/<tenant>/<task>/<file>`, each part URL-quoted).

        Without the public URL's prefix: a proxy that mounts the server below a prefix strips it."""
        parts = (tenant, task_id, filename)
        if not all(_part_ok(part) for part in parts):
            # A bug of the caller (ids and names come from this server): never sign a path that climbs.
            raise ValueError(f"not a safe video path: {parts!r}")
        return VIDEO_PREFIX + "/".join(quote(part, safe="") for part in parts)

    def link(self, tenant: str, task_id: str, filename: str) -> str:
        """A link valid for `ttl` seconds from now (rounded up to the next whole second, never less)."""
        path = self.path_of(tenant, task_id, filename)
        exp = str(math.ceil(self._clock() + self._ttl))
        sig = self._sign(self._secret, tenant, task_id, filename, exp)
        return f"{self._base}{path}?exp={exp}&sig={sig}"

    def verify(self, tenant: str, task_id: str, filename: str, exp: str | None, sig: str | None) -> LinkProblem | None:
        """None when the link is genuine and current; else why not.

        The signature is checked before the expiry, so `expired` is said only of links this deployment
        made: a forged link is `invalid` whatever its `exp`. Every key of the ring is compared (in constant
        time) even after a match, so the time taken does not tell which secret signed it."""
        parts = (tenant, task_id, filename)
        if (
            not all(_part_ok(part) for part in parts)
            or exp is None
            or sig is None
            or not _EXP.fullmatch(exp)
            or not _SIG.fullmatch(sig)
        ):
            return _invalid()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(self._sign(key, tenant, task_id, filename, exp), sig)
        if not matched:
            return _invalid()
        expires = int(exp)
        if self._clock() >= expires:
            when = datetime.fromtimestamp(expires, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return LinkProblem(
                reason="expired",
                message=(
                    f"This video link expired at {when}. Ask for the task's result again (task_status) "
                    "for a fresh link."
                ),
            )
        return None

    @staticmethod
    def _sign(key: bytes, tenant: str, task_id: str, filename: str, exp: str) -> str:
        digest = hmac.new(key, _message((tenant, task_id, filename, exp)), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _invalid() -> LinkProblem:
    return LinkProblem(
        reason="invalid",
        message=(
            "This video link is not valid: it was altered, cut short, or signed by another deployment. "
            "Ask for the task's result again (task_status) for a working link."
        ),
    )
