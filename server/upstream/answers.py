"""Reading DashScope's answers without believing them: bounded bodies, redirects refused, errors sorted.

Every API call goes through `server.upstream.wire.exchange`. The API never redirects, so a 3xx is
an answer to report, not a hop to follow. The body is read as a stream with a byte budget counted after decompression
(read whole, a 260 KB gzip bomb inflates to 500 MB), under an overall deadline as well as the
per-read timeouts (a body that drips one byte a minute never ends otherwise). Whatever the HTTP
stack raises becomes one of three outcomes, which each endpoint turns into the agent's words:

- `NotSent`: no connection was made, so nothing reached the service;
- `NoAnswer`: the request may have reached it, but no answer came back;
- an `Answer` whose `problem` says why its body could not be read (its status and headers hold).
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.errors import UpstreamError, upstream_error

# No DashScope answer this server reads comes near this (a task list of 100 entries is ~30 KB).
MAX_ANSWER_BYTES = 1024 * 1024


class NotSent(Exception):
    """No connection was made: nothing reached the service."""


class NoAnswer(Exception):
    """The request may have reached the service, but no answer came back."""


class Unreadable(Exception):
    """An answer arrived whose body cannot be read or has the wrong shape."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    problem: str | None = None  # why the body is incomplete or unreadable

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def data(self) -> dict[str, Any]:
        """The body as a JSON object, or `Unreadable` saying why it is not one."""
        if self.problem is not None:
            raise Unreadable(self.problem)
        return parse_object(self.body, self.headers.get("content-type", ""))

    def refusal(self) -> UpstreamError:
        """The error of a 4xx/5xx answer, from DashScope's envelope when it sent one."""
        return refusal(self.status, self.headers, self.body if self.problem is None else b"")


def parse_object(body: bytes, content_type: str = "") -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        kind = f" ({content_type.split(';')[0].strip()})" if content_type else ""
        if not body.strip():
            raise Unreadable("its body is empty") from exc
        raise Unreadable(f"its body is not JSON{kind}: {snippet(body)!r}") from exc
    if not isinstance(value, dict):
        raise Unreadable(f"its body is JSON but not an object: {snippet(body)!r}")
    return value


def snippet(body: bytes | str, limit: int = 80) -> str:
    """A short printable excerpt of a body or value for a message (never the whole of it)."""
    text = body[: limit * 4].decode("utf-8", "replace") if isinstance(body, bytes) else body[: limit * 4]
    text = re.sub(r"\s+", " ", "".join(c if c.isprintable() or c.isspace() else "?" for c in text)).strip()
    return text[:limit] + ("..." if len(text) > limit else "")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def refusal(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    """An error answer as an `UpstreamError`: DashScope's JSON envelope, OSS's XML one, or a snippet."""
    code, message, request_id = f"HTTP{status}", "", None
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        code = _text(parsed.get("code")) or code
        message = _text(parsed.get("message"))
        request_id = _text(parsed.get("request_id")) or None
    elif body:
        xml_code = re.search(rb"<Code>([^<]{1,100})</Code>", body)
        xml_message = re.search(rb"<Message>([^<]{1,300})</Message>", body)
        if xml_code:
            code = xml_code.group(1).decode("utf-8", "replace")
        message = xml_message.group(1).decode("utf-8", "replace") if xml_message else snippet(body, 200)
    return upstream_error(status, code, message, request_id, parse_retry_after(headers.get("retry-after")))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
