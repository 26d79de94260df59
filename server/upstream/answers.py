"""Reading DashScope's answers without believing them: bounded bodies, redirects refused, errors sorted.

Every API call goes through `exchange`. The API never redirects, so a 3xx is an answer to report,
not a hop to follow. The body is read as a stream with a byte budget counted after decompression
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
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

from server.errors import UpstreamError, upstream_error

# No DashScope answer this server reads comes near this (a task list of 100 entries is ~30 KB).
MAX_ANSWER_BYTES = 1024 * 1024
# Failures of the HTTP stack that happen before a byte of the request can have left this machine.
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.UnsupportedProtocol,
    httpx2.InvalidURL,
    httpx2.ProxyError,
)
# Everything else the HTTP stack raises once a request may be on its way (decoding, protocol and
# redirect errors are not TransportErrors, and used to escape the callers' handlers).
HTTP_STACK_ERRORS: tuple[type[Exception], ...] = (httpx2.HTTPError, httpx2.StreamError, httpx2.InvalidURL)


class NotSent(Exception):
    """No connection was made: nothing reached the service."""


class NoAnswer(Exception):
    """The request may have reached the service, but no answer came back."""


class Unreadable(Exception):
    """An answer arrived whose body cannot be read or has the wrong shape."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx2.Headers
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


def refusal(status: int, headers: httpx2.Headers, body: bytes) -> UpstreamError:
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


def deadline_of(timeout: httpx2.Timeout) -> float:
    """A whole exchange may take the connect timeout plus two read timeouts, and no more."""
    return (timeout.connect or 10.0) + 2 * (timeout.read or 30.0)


async def exchange(
    http: httpx2.AsyncClient,
    method: str,
    url: str,
    *,
    http_timeout: httpx2.Timeout,
    budget: int = MAX_ANSWER_BYTES,
    **request: Any,
) -> Answer:
    """Send one request and read its answer within `budget` bytes; never follows a redirect."""
    deadline = deadline_of(http_timeout)
    response: httpx2.Response | None = None
    try:
        with anyio.fail_after(deadline):
            built = http.build_request(method, url, timeout=http_timeout, **request)
            response = await http.send(built, stream=True, follow_redirects=False)
            try:
                body, problem = await read_capped(response, budget)
            finally:
                with anyio.CancelScope(shield=True):  # the connection is closed even when the deadline struck
                    await response.aclose()
    except TimeoutError as exc:
        if response is None:
            raise NoAnswer(f"no answer within {deadline:.0f}s") from exc
        return Answer(response.status_code, response.headers, b"", f"its body did not arrive within {deadline:.0f}s")
    except NOT_SENT_ERRORS as exc:
        raise NotSent(type(exc).__name__) from exc
    except HTTP_STACK_ERRORS as exc:
        raise NoAnswer(type(exc).__name__) from exc
    return Answer(response.status_code, response.headers, body, problem)


async def read_capped(response: httpx2.Response, budget: int) -> tuple[bytes, str | None]:
    """The decoded body, or what came of it and why the rest was not read."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    encoded = encoding not in ("", "identity")
    declared = response.headers.get("content-length", "")
    if not encoded and declared.isdigit() and int(declared) > budget:
        return b"", f"its body would be {int(declared)} bytes, more than the {budget} this server reads"
    parts: list[bytes] = []
    size = 0
    try:
        # httpx2 inflates a compressed body in pieces of at most 1 MiB, so the budget bounds memory.
        async for piece in response.aiter_bytes():
            size += len(piece)
            if size > budget:
                after = " once decompressed" if encoded else ""
                return b"".join(parts), f"its body is larger than the {budget} bytes this server reads{after}"
            parts.append(piece)
    except httpx2.DecodingError:
        return b"".join(parts), f"its body is not valid {encoding!r} data although its Content-Encoding says so"
    except httpx2.TimeoutException:
        return b"".join(parts), "its body stopped arriving (no byte within the read timeout)"
    except HTTP_STACK_ERRORS as exc:
        return b"".join(parts), f"the connection broke while its body was read ({type(exc).__name__})"
    return b"".join(parts), None
