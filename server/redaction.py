"""One redaction for every way text leaves the server: results, the ledger, evidence and logs.

An upstream may echo what it was sent (the `Authorization` header, the key inside a message), and a
local message may quote a header by mistake; whatever the route, the text passes `redact` first.
Removed are the secrets registered here (the DashScope key in use, the HTTP bearer token), any
`Authorization:` value, any `Bearer <token>`, and anything shaped like a DashScope key (`sk-...`).
Standard library only, so every layer may import it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
# Shorter values would match ordinary words; no real key or token is this short.
MIN_SECRET_LENGTH = 8

_PATTERN = re.compile(
    # "Authorization: Bearer x", "authorization=x", '"Authorization": "Bearer x"': the whole value.
    r"(?P<header>authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?[^\s\"',;}]+"
    r"|(?P<bearer>\bbearer\s+)[A-Za-z0-9._~+/=-]+"
    # DashScope keys are "sk-" and 32 hex digits; workspace keys and test keys carry dashes.
    r"|\bsk-[A-Za-z0-9_-]{10,}",
    re.IGNORECASE,
)
# Cheap test first: most strings (ids, paths, numbers) hold none of these and skip the pattern.
_MARKERS = ("sk-", "bearer", "authorization")


def _replace(match: re.Match[str]) -> str:
    return (match.group("header") or match.group("bearer") or "") + REDACTED


_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secret(*values: str | None) -> None:
    """Redact these exact values from now on, in this process (longest first, so none leaks a tail).

    A value with a character JSON escapes (a quote, a backslash, a control character) is registered
    in its escaped form too, so it is also found inside JSON text (evidence files, result texts)."""
    global _secrets
    fresh = {value.strip() for value in values if value and len(value.strip()) >= MIN_SECRET_LENGTH}
    fresh |= {json.dumps(value, ensure_ascii=False)[1:-1] for value in fresh}
    with _lock:
        _secrets = tuple(sorted(set(_secrets) | fresh, key=len, reverse=True))


def redact(text: str) -> str:
    """`text` without any registered secret, Authorization value, bearer token or sk- key."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()
    if any(marker in lowered for marker in _MARKERS):
        text = _PATTERN.sub(_replace, text)
    return text


def needs_redaction(text: str) -> bool:
    """Whether `redact` could change `text`, or any string JSON-encoded into it (`ensure_ascii=False`):
    without a registered secret or a marker in the text, no string inside it holds one either (JSON
    escapes no character of a marker, and secrets are registered escaped as well)."""
    if any(secret in text for secret in _secrets):
        return True
    lowered = text.lower()
    return any(marker in lowered for marker in _MARKERS)


def redact_data(value: Any) -> Any:
    """`redact` applied to every string inside JSON-like data (dict keys and values, lists)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(key): redact_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_data(item) for item in value]
    return value


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments merged in), traceback and stack through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction(*secrets: str | None, handlers: Iterable[logging.Handler] | None = None) -> RedactingFilter:
    """Register `secrets` and put one `RedactingFilter` on `handlers` (default: the root logger's).

    A filter on a handler sees every record that handler emits, whichever logger it came from (a
    logger's own filters do not see records propagated from its children). Call it once logging is
    configured; secrets registered later (the key, the HTTP token) are redacted too.
    """
    register_secret(*secrets)
    targets = list(logging.getLogger().handlers if handlers is None else handlers)
    for handler in targets:
        for existing in handler.filters:
            if isinstance(existing, RedactingFilter):
                break
        else:
            handler.addFilter(_FILTER)
    return _FILTER


_FILTER = RedactingFilter()
