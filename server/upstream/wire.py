"""The HTTP session DashScope's API calls travel on: aiohttp, imported on the first call, never at start-up.

Why aiohttp and not the httpx2 the SDK brings: a task query is this server's hottest path (a cluster
asks hundreds of times a second), and on a small host httpx2's pure-Python stack cost ~1 ms of CPU
per request against ~0.12 ms for aiohttp's C parser, measured side by side against one loopback
server (50 requests in flight): the watcher's CPU per query was mostly the HTTP client's. Downloads
(a sync transport on a worker thread, `server/upstream/streaming.py`) and pre-flight fetches stay on
httpx2: they are rare and need its pinned-address transport.

`exchange` sends one request and reads its answer the way `server/upstream/answers.py` says answers
are read: redirects never followed, the body streamed under a byte budget counted after
decompression (done here, `auto_decompress=False`, so a gzip bomb inflates at most the budget), an
overall deadline besides the per-read timeout, and every failure of the stack sorted into `NotSent`,
`NoAnswer` or an `Answer` with its `problem`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import anyio
import httpx2
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from server.upstream.answers import MAX_ANSWER_BYTES, Answer, NoAnswer, NotSent

# Connections kept to the upstream: what the query limit can have in flight at once on a fast link.
POOL_SIZE = 100
# Only what `_Inflater` can undo; the API answers small JSON, compressed or not.
ACCEPT_ENCODING = "gzip, deflate"
# Failures before a byte of the request can have left this machine, named for the agent's message.
_NOT_SENT: tuple[tuple[type[Exception], str], ...] = (
    (aiohttp.ConnectionTimeoutError, "ConnectTimeout"),
    (aiohttp.ClientConnectorDNSError, "DNS lookup failed"),
    (aiohttp.ClientConnectorCertificateError, "TLS certificate not trusted"),
    (aiohttp.ClientProxyConnectionError, "ProxyError"),
    (aiohttp.ClientHttpProxyError, "ProxyError"),
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.InvalidURL, "InvalidURL"),
)
NOT_SENT_ERRORS = tuple(kind for kind, _ in _NOT_SENT)


async def start_session() -> aiohttp.ClientSession:
    """`open_session` with its TLS context built on a worker thread (it reads the system's trust store,
    tens of milliseconds the event loop keeps for a handshake that may be under way)."""
    return open_session(await anyio.to_thread.run_sync(httpx2.create_ssl_context))


def open_session(tls: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """The API session: the system's trust store (httpx2's own TLS context, so certificates are trusted
    as before), no cookies kept. The environment's proxy settings
    are read once per host (`_proxy`), not by aiohttp's `trust_env`, which reads them and `~/.netrc`
    again for every request (a file lookup per task query)."""
    connector = aiohttp.TCPConnector(limit=POOL_SIZE, ssl=tls or httpx2.create_ssl_context())
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )


@functools.lru_cache(maxsize=64)
def _proxy(scheme: str, host: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` name for this host, if any (read once per host)."""
    try:
        return get_env_proxy_for_url(URL.build(scheme=scheme, host=host))
    except LookupError:
        return None, None


def deadline_of(timeout: httpx2.Timeout) -> float:
    """A whole exchange may take the connect timeout plus two read timeouts, and no more."""
    return (timeout.connect or 10.0) + 2 * (timeout.read or 30.0)


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    http_timeout: httpx2.Timeout,
    budget: int = MAX_ANSWER_BYTES,
    headers: Mapping[str, str] | None = None,
    on_sent: Callable[[], None] | None = None,
    **request: Any,
) -> Answer:
    """Send one request and read its answer within `budget` bytes; never follows a redirect.

    `on_sent` (which must not raise) is called at the event loop's next turn: on a pooled connection the
    request has been handed to the socket by then (aiohttp writes it before it first waits), on a new one
    the connection is being made. Not a trace hook: aiohttp's tracing costs every request its signals."""
    deadline = deadline_of(http_timeout)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=http_timeout.connect, sock_read=http_timeout.read, ceil_threshold=3600
    )
    response: aiohttp.ClientResponse | None = None
    sent = {"Accept-Encoding": ACCEPT_ENCODING, **(headers or {})}
    target = URL(url)
    proxy, proxy_auth = _proxy(target.scheme, target.host or "")
    try:
        with anyio.fail_after(deadline):
            if on_sent is not None:
                asyncio.get_running_loop().call_soon(on_sent)
            try:
                response = await session.request(
                    method, target, headers=sent, timeout=timeout, allow_redirects=False, proxy=proxy,
                    proxy_auth=proxy_auth, **request,
                )  # fmt: skip
            except NOT_SENT_ERRORS as exc:
                raise NotSent(_name(exc)) from exc
            except aiohttp.ServerTimeoutError as exc:
                raise NoAnswer("ReadTimeout") from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise NoAnswer(_name(exc)) from exc
            body, problem = await read_capped(response, budget)
    except TimeoutError as exc:
        if response is None:
            raise NoAnswer(f"no answer within {deadline:.0f}s") from exc
        response.close()
        return Answer(response.status, response.headers, b"", f"its body did not arrive within {deadline:.0f}s")
    except BaseException:
        if response is not None:
            response.close()  # cancelled mid-body: the connection is dropped, never reused half-read
        raise
    if problem is None:
        response.release()
    else:
        response.close()
    return Answer(response.status, response.headers, body, problem)


async def read_capped(response: aiohttp.ClientResponse, budget: int) -> tuple[bytes, str | None]:
    """The decoded body, or what came of it and why the rest was not read."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    encoded = encoding not in ("", "identity")
    declared = response.headers.get("content-length", "")
    if not encoded and declared.isdigit() and int(declared) > budget:
        return b"", f"its body would be {int(declared)} bytes, more than the {budget} this server reads"
    inflater = _Inflater(encoding) if encoded else None
    parts: list[bytes] = []
    size = 0
    try:
        async for raw in response.content.iter_any():
            overflow = False
            try:
                piece, overflow = inflater.feed(raw, budget - size + 1) if inflater is not None else (raw, False)
            except _BadEncoding:
                return b"".join(parts), f"its body is not valid {encoding!r} data although its Content-Encoding says so"
            size += len(piece)
            if overflow or size > budget:
                after = " once decompressed" if encoded else ""
                return b"".join(parts), f"its body is larger than the {budget} bytes this server reads{after}"
            parts.append(piece)
        if inflater is not None:
            try:
                parts.append(inflater.finish())
            except _BadEncoding:
                return b"".join(parts), f"its body is not valid {encoding!r} data although its Content-Encoding says so"
    except aiohttp.ServerTimeoutError:
        return b"".join(parts), "its body stopped arriving (no byte within the read timeout)"
    except (aiohttp.ClientError, OSError) as exc:
        return b"".join(parts), f"the connection broke while its body was read ({_name(exc)})"
    return b"".join(parts), None


class _BadEncoding(Exception):
    """The body does not decode as its Content-Encoding says (or names one this server did not ask for)."""


class _Inflater:
    """gzip or deflate undone piece by piece, never producing more than asked for per piece: the
    budget bounds memory, whatever the compression ratio."""

    def __init__(self, encoding: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise _BadEncoding(encoding)
        self._deflate = encoding == "deflate"
        # gzip: its header; deflate: a zlib stream (what RFC 9110 means), a raw one tried if that fails.
        self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 16 if not self._deflate else zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, most: int) -> tuple[bytes, bool]:
        """At most `most` bytes of output, and whether input was left over (more output than that)."""
        try:
            out = self._inflate.decompress(data, most)
        except zlib.error as exc:
            if not (self._deflate and not self._started):
                raise _BadEncoding(str(exc)) from exc
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # a raw deflate stream
            try:
                out = self._inflate.decompress(data, most)
            except zlib.error as raw_exc:
                raise _BadEncoding(str(raw_exc)) from raw_exc
        self._started = True
        return out, bool(self._inflate.unconsumed_tail)

    def finish(self) -> bytes:
        if not self._inflate.eof and self._started:
            raise _BadEncoding("the compressed stream ends early")
        return self._inflate.flush()


def _name(exc: BaseException) -> str:
    for kind, name in _NOT_SENT:
        if isinstance(exc, kind):
            return name
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "RemoteProtocolError: the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "RemoteProtocolError: the body ended before it was complete"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"RemoteProtocolError: {exc.message}"[:160]
    return type(exc).__name__
