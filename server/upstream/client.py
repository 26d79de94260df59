"""The async DashScope client: the only module that speaks HTTP to the service.

Rules from the contract that live here and nowhere else:
- detect is synchronous and never sends `X-DashScope-Async`; a submit always does;
- task reads are retried (429 / 5xx / transport / an unreadable answer) with capped, jittered
  backoff honouring `Retry-After`; a submit is never retried once it may have reached the service;
- every call waits for its slot in `server.upstream.limits` (task queries per process, detect/submit per
  model), and a 429 pauses that whole limiter, not just the one request;
- an answer is read through `server.upstream.answers` (bounded, redirects not followed), and
  whatever goes wrong is said in terms of the call: billed or not, done or not, safe to repeat or not;
- the result URL is fetched without the API key (it is a signed storage URL on another host),
  each redirect hop vetted by the private-address guard, streamed (on a worker thread, see
  `server/upstream/streaming.py`) to a per-process temporary file, verified (MP4 start,
  Content-Length, Content-MD5) and flushed to disk, then renamed: a `.mp4` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx2

from server.errors import (
    MissingApiKeyError,
    SubmitOutcomeUnknownError,
    UnreadableAnswerError,
    UpstreamError,
    UpstreamUnavailableError,
    upstream_error,
)
from server.media.addresses import BlockedAddressError, check_url, is_loopback, pinned_sync_transport, public_only
from server.metrics import NO_METRICS, Metrics
from server.upstream.answers import (
    Answer,
    NoAnswer,
    NotSent,
    Unreadable,
    parse_retry_after,
    refusal,
    snippet,
)
from server.upstream.limits import Limits, RateLimiter
from server.upstream.streaming import HTTP_STACK_ERRORS, BadVideoError, download_to_file

if TYPE_CHECKING:
    import aiohttp

__all__ = ["DashScopeClient", "Downloaded", "backoff_delay", "parse_retry_after", "part_path"]

logger = logging.getLogger(__name__)

DETECT_PATH = "/services/aigc/image2video/face-detect"
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"

UPLOADS_PATH = "/uploads"

DEFAULT_TIMEOUT = httpx2.Timeout(30.0, connect=10.0)
UPLOAD_TIMEOUT = httpx2.Timeout(120.0, connect=10.0)
# A submit that outlives this is "outcome unknown" (kept apart so tests can shorten it alone).
SUBMIT_TIMEOUT = DEFAULT_TIMEOUT
DETECT_TIMEOUT = httpx2.Timeout(60.0, connect=10.0)
# The read timeout is the download's stall limit (no byte for this long); the deadline bounds an attempt.
DOWNLOAD_TIMEOUT = httpx2.Timeout(60.0, connect=10.0)
DOWNLOAD_DEADLINE = 900.0
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_READ_RETRIES = 4
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0
UPLOAD_ANSWER_BYTES = 64 * 1024
UPLOAD_POLICY_QPS = 100.0
# The metrics' endpoint label of each read (`_read`'s `what`).
_ENDPOINTS = {"task query": "task_query", "task list": "task_list", "upload policy request": "upload_policy"}

Sleep = Callable[[float], Awaitable[None]]
# The API session (`server.upstream.wire`) is built on first use: importing aiohttp and building a TLS
# context take ~100 ms, too slow for start-up.
SessionFactory = Callable[[], Awaitable["aiohttp.ClientSession"]]


async def new_session() -> aiohttp.ClientSession:
    """A new API session, aiohttp imported on a worker thread: the first query of a server with open tasks
    comes at once, while a client's handshake may still be waiting for the event loop."""
    import importlib

    wire = await anyio.to_thread.run_sync(importlib.import_module, "server.upstream.wire")
    session: aiohttp.ClientSession = await wire.start_session()
    return session


DETECT_NOT_SENT = (
    "DashScope could not be reached for detection ({why}); nothing was sent and nothing billed. "
    "Check the network and DASHSCOPE_HTTP_BASE_URL, then call again."
)
DETECT_UNREADABLE = (
    "DashScope {what} ({why}). {billed} This says nothing about the portrait, which may well be fine: "
    "call the detect tool again (safe; at most one more detection is billed)."
)
CANCEL_UNKNOWN = (
    "DashScope {what} ({why}), so whether task {task_id} was cancelled is not known{likely}. Call task_status "
    "to see whether it is CANCELED; calling task_cancel again is safe (it costs nothing and cancels only a "
    "PENDING task)."
)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    seconds: float = 0.0  # the successful attempt, request to rename (recorded in video.json)


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After wins (capped)."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * (2**attempt)))


def _not_a_verdict(answer: Answer) -> str:
    """Why a non-error answer without a readable body (a redirect, an odd status) is not an answer."""
    if answer.status in REDIRECT_STATUSES:
        where = answer.headers.get("location", "nowhere")
        return f"HTTP {answer.status}, a redirect to {snippet(where, 120)} that this server does not follow"
    return f"HTTP {answer.status}"


class _DownloadProblem(Exception):
    """One attempt at the video failed in a way another attempt may not (the message says how)."""


class DashScopeClient:
    """Thin, typed wrapper over the endpoints this server uses."""

    def __init__(
        self,
        session: aiohttp.ClientSession | SessionFactory | None,
        base_url: str,
        api_key: str | None,
        *,
        sleep: Sleep = anyio.sleep,
        limits: Limits | None = None,
        metrics: Metrics = NO_METRICS,
        party: str = "",
    ) -> None:
        # None: a session of its own, built on first use and closed by `aclose` (tests, benches, the CLI).
        self._session: aiohttp.ClientSession | None = None
        self._factory: SessionFactory = session if callable(session) else new_session
        self._building = anyio.Lock()
        self._owns_session = session is None
        if session is not None and not callable(session):
            self._session = session
        self._base_url = base_url.rstrip("/")
        self._upstream_host = urlsplit(self._base_url).hostname or ""
        self._api_key = api_key
        self._sleep = sleep
        self.limits = limits or Limits()
        # Whose calls these are among the clients sharing `limits` (tenants on one key): turns go round them.
        self._party = party
        # Counts every request sent (`_exchange`, the download hops); the watcher reports its leases here too.
        self.metrics = metrics
        # Policy calls have their own limit (100 QPS per account and model), not the task queries'.
        self._policies = RateLimiter(UPLOAD_POLICY_QPS)

    async def _api(self) -> aiohttp.ClientSession:
        """The API session, built on first use (once, however many calls come first together)."""
        if self._session is None:
            async with self._building:
                if self._session is None:
                    self._session = await self._factory()
        return self._session

    async def aclose(self) -> None:
        """Close the session this client built for itself (a shared one is its owner's to close)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> DashScopeClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    def _headers(self, *, asynchronous: bool = False, oss: bool = False) -> dict[str, str]:
        if not self._api_key:
            raise MissingApiKeyError()
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        if asynchronous:
            headers["X-DashScope-Async"] = "enable"
        if oss:
            headers["X-DashScope-OssResourceResolve"] = "enable"
        return headers

    # ------------------------------------------------------------------ paid calls

    async def detect(
        self, model: str, image_url: str, ratio: str | None, *, on_sent: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """POST face-detect. Billed per call, so only a 429 (refused, not billed) is retried.

        `on_sent` (which must not raise) is called on the event loop once a request is on the wire and
        its answer is awaited: work the caller can do during the upstream's time (each attempt calls it).
        """
        payload: dict[str, Any] = {"model": model, "input": {"image_url": image_url}}
        if ratio is not None:
            payload["parameters"] = {"ratio": ratio}
        headers = self._headers(oss=image_url.startswith("oss://"))
        limiter = self.limits.model(model)
        for attempt in range(MAX_READ_RETRIES + 1):
            await self._slot(limiter)
            try:
                answer = await self._exchange(
                    "detect", "POST", self._base_url + DETECT_PATH, json=payload, headers=headers,
                    http_timeout=DETECT_TIMEOUT, on_sent=on_sent,
                )  # fmt: skip
            except NotSent as exc:
                raise UpstreamUnavailableError(DETECT_NOT_SENT.format(why=exc)) from exc
            except NoAnswer as exc:
                raise UnreadableAnswerError(
                    DETECT_UNREADABLE.format(
                        what="did not answer the detection",
                        why=exc,
                        billed="It may or may not have been billed (one detection).",
                    )
                ) from exc
            if answer.status == 429 and attempt < MAX_READ_RETRIES:
                await self._throttled(limiter, attempt, answer.refusal().retry_after)
                continue
            if answer.status >= 400:
                raise answer.refusal()
            try:
                if not answer.ok:
                    raise Unreadable(_not_a_verdict(answer))
                return answer.data()
            except Unreadable as exc:
                billed = "It was probably billed (one detection)." if answer.ok else "It was probably not billed."
                raise UnreadableAnswerError(
                    DETECT_UNREADABLE.format(
                        what=f"answered the detection with HTTP {answer.status} but the answer was unreadable",
                        why=exc,
                        billed=billed,
                    )
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(self, payload: dict[str, Any], *, sending: Callable[[], None] | None = None) -> dict[str, Any]:
        """POST video-synthesis once. Anything but a clear answer means "outcome unknown".

        `sending` is called once the rate limit lets the request go, just before it is sent (the ledger
        records that a task may exist from now on); if it raises, nothing is sent."""
        uses_oss = "oss://" in json.dumps(payload.get("input", {}))
        headers = self._headers(asynchronous=True, oss=uses_oss)
        limiter = self.limits.model(str(payload.get("model")))
        await self._slot(limiter)
        if sending is not None:
            sending()
        try:
            answer = await self._exchange(
                "submit", "POST", self._base_url + SUBMIT_PATH, json=payload, headers=headers,
                http_timeout=SUBMIT_TIMEOUT,
            )  # fmt: skip
        except NotSent as exc:
            # The connection was never made (or never got a pooled one), so nothing reached the service.
            raise UpstreamUnavailableError(
                f"DashScope could not be reached ({exc}); nothing was submitted. "
                "Check the network and DASHSCOPE_HTTP_BASE_URL, then call again."
            ) from exc
        except NoAnswer as exc:
            raise SubmitOutcomeUnknownError(f"The submit was sent but no answer came back ({exc}).") from exc
        if answer.status >= 500:
            error = answer.refusal()
            raise SubmitOutcomeUnknownError(str(error)) from error
        if answer.status >= 400:
            error = answer.refusal()
            if answer.status == 429:
                limiter.pause(backoff_delay(0, error.retry_after))
            raise error
        try:
            if not answer.ok:
                raise Unreadable(_not_a_verdict(answer))
            return answer.data()
        except Unreadable as exc:
            # Accepted (2xx), or bounced somewhere on the way: a task may well exist, so this is not a refusal.
            raise SubmitOutcomeUnknownError(
                f"DashScope answered the submit with HTTP {answer.status} but the answer was unreadable ({exc})."
            ) from exc

    async def _slot(self, limiter: RateLimiter) -> None:
        """Wait for a start slot with the API session already built: built lazily after the slot, the first
        call reached DashScope ~60 ms later than its start, close enough to the next calls to put one more
        than the rate in one second at the upstream (seen at 2/s in tests/test_operations.py)."""
        await self._api()
        await limiter.acquire(self._party)

    async def _exchange(self, endpoint: str, method: str, url: str, **options: Any) -> Answer:
        """`exchange`, counted by endpoint (a request that may have left counts; one never sent does not)."""
        session = await self._api()
        from server.upstream.wire import exchange  # after `_api()`: aiohttp is loaded by then

        try:
            answer = await exchange(session, method, url, **options)
        except NoAnswer:
            self.metrics.upstream_call(endpoint, None)
            raise
        self.metrics.upstream_call(endpoint, answer.status)
        return answer

    async def _throttled(self, limiter: RateLimiter, attempt: int, retry_after: float | None) -> float:
        """A 429: pause every caller of this limiter, then wait (the caller retries)."""
        delay = backoff_delay(attempt, retry_after)
        limiter.pause(delay)
        await self._sleep(delay)
        return delay

    # ------------------------------------------------------------------ tasks

    def expect_queries(self, count: int) -> None:
        """`count` task queries are about to start together (a watcher tick's batch): the query limiter
        reserves shared slots for them all at once (see `RateLimiter.expect`)."""
        self.limits.queries.expect(count)

    async def get_task(self, task_id: str, *, started: Callable[[], object] | None = None) -> dict[str, Any]:
        """GET /tasks/{id}, retried: a read is safe to repeat. `started` is called whenever the limiter lets
        an attempt go (the watcher schedules the next query from that moment, not from its wait)."""
        return await self._read(f"{self._base_url}/tasks/{task_id}", None, "task query", started=started)

    async def list_tasks(self, model: str, start_time: str, end_time: str, *, page_size: int = 100) -> dict[str, Any]:
        """GET /tasks with a model and a window (`YYYYMMDDhhmmss`, Beijing time): finds lost submits."""
        params = {
            "model_name": model,
            "start_time": start_time,
            "end_time": end_time,
            "page_no": "1",
            "page_size": str(page_size),
        }
        return await self._read(f"{self._base_url}/tasks", params, "task list")

    async def cancel_task(self, task_id: str) -> dict[str, Any]:
        """POST /tasks/{id}/cancel once; the service refuses it unless the task is PENDING."""
        headers = {"Authorization": self._headers()["Authorization"]}
        await self._slot(self.limits.queries)
        try:
            answer = await self._exchange(
                "task_cancel", "POST", f"{self._base_url}/tasks/{task_id}/cancel", headers=headers,
                http_timeout=DEFAULT_TIMEOUT,
            )  # fmt: skip
        except NotSent as exc:
            raise UpstreamUnavailableError(
                f"DashScope could not be reached for the cancel ({exc}); task {task_id} was not cancelled. "
                "Check the network, then call task_cancel again."
            ) from exc
        except NoAnswer as exc:
            raise UpstreamUnavailableError(
                CANCEL_UNKNOWN.format(what="did not answer the cancel", why=exc, task_id=task_id, likely="")
            ) from exc
        if answer.status == 429:
            error = answer.refusal()
            self.limits.queries.pause(backoff_delay(0, error.retry_after))
            raise error
        if 400 <= answer.status < 500:
            raise answer.refusal()  # a refusal: the service says why (not PENDING, no such task)
        if answer.status >= 500 or not answer.ok:
            why = str(answer.refusal()) if answer.status >= 500 else _not_a_verdict(answer)
            raise UpstreamUnavailableError(
                CANCEL_UNKNOWN.format(
                    what=f"answered the cancel with HTTP {answer.status}", why=why, task_id=task_id, likely=""
                )
            )
        if answer.problem is None and not answer.body.strip():
            return {}
        try:
            return answer.data()
        except Unreadable as exc:
            raise UnreadableAnswerError(
                CANCEL_UNKNOWN.format(
                    what=f"accepted the cancel (HTTP {answer.status}) but its answer was unreadable",
                    why=exc,
                    task_id=task_id,
                    likely=" for sure (most likely it was: a cancelled PENDING task is not billed)",
                )
            ) from exc

    async def _read(
        self,
        url: str,
        params: dict[str, str] | None,
        what: str,
        limiter: RateLimiter | None = None,
        *,
        started: Callable[[], object] | None = None,
    ) -> dict[str, Any]:
        """GET a JSON object, retried on anything but a clear refusal (a read is safe to repeat)."""
        limiter = limiter or self.limits.queries
        headers = {"Authorization": self._headers()["Authorization"]}
        last: Exception | None = None
        for attempt in range(MAX_READ_RETRIES + 1):
            await self._slot(limiter)
            if started is not None:
                started()
            retry_after: float | None = None
            try:
                answer = await self._exchange(
                    _ENDPOINTS.get(what, what), "GET", url, params=params, headers=headers, http_timeout=DEFAULT_TIMEOUT
                )
            except (NotSent, NoAnswer) as exc:
                last = exc
            else:
                if answer.ok:
                    try:
                        return answer.data()
                    except Unreadable as exc:
                        last = exc
                elif answer.status == 429 or answer.status >= 500:
                    error = answer.refusal()
                    last, retry_after = error, error.retry_after
                    if answer.status == 429:
                        # Everyone waits, not just this request: the account is throttled.
                        limiter.pause(backoff_delay(attempt, retry_after))
                elif answer.status >= 400:
                    raise answer.refusal()
                else:
                    last = Unreadable(_not_a_verdict(answer))
            if attempt < MAX_READ_RETRIES:
                delay = backoff_delay(attempt, retry_after)
                logger.info("%s retry %d in %.2fs after %s", what, attempt + 1, delay, last)
                await self._sleep(delay)
        if isinstance(last, UpstreamError):
            raise last
        if isinstance(last, Unreadable):
            raise UnreadableAnswerError(
                f"DashScope's answers to the {what} were unreadable after {MAX_READ_RETRIES + 1} tries ({last}); "
                "nothing was concluded from them. Nothing is lost: call again later."
            ) from last
        raise UpstreamUnavailableError(
            f"DashScope did not answer the {what} after {MAX_READ_RETRIES + 1} tries ({last}). Nothing is "
            "lost: call again later."
        ) from last

    # ------------------------------------------------------------------ temporary uploads

    async def upload_policy(self, model: str) -> dict[str, Any]:
        """GET /uploads?action=getPolicy: a form policy for `model`'s temporary storage (free, retried)."""
        params = {"action": "getPolicy", "model": model}
        try:
            body = await self._read(self._base_url + UPLOADS_PATH, params, "upload policy request", self._policies)
        except UpstreamUnavailableError as exc:
            raise type(exc)(f"{exc} Nothing was uploaded, submitted or billed.") from exc
        except UpstreamError as exc:
            raise upstream_error(
                exc.status_code,
                exc.code,
                f"{exc.upstream_message.rstrip('.')}; nothing was uploaded, submitted or billed",
                exc.request_id,
                exc.retry_after,
            ) from exc
        data = body.get("data")
        if not isinstance(data, dict):
            raise UnreadableAnswerError(
                "DashScope's upload policy answer has no data object; nothing was uploaded, submitted or billed. "
                "Call again."
            )
        return data

    async def upload_form(self, host: str, fields: dict[str, str], filename: str, content: bytes) -> None:
        """Multipart POST to the storage host; the policy authorises it, so the API key is not sent."""
        try:
            answer = await self._exchange(
                "upload", "POST", host, data=_form(fields, filename, content), http_timeout=UPLOAD_TIMEOUT,
                budget=UPLOAD_ANSWER_BYTES,
            )  # fmt: skip
        except (NotSent, NoAnswer) as exc:
            raise UpstreamUnavailableError(
                f"The upload to DashScope's temporary storage failed ({exc}); nothing was submitted or billed. "
                "Call again (a new upload is made)."
            ) from exc
        if answer.status != 200:
            text = answer.refusal().upstream_message if answer.status >= 400 else _not_a_verdict(answer)
            raise upstream_error(
                answer.status,
                "UploadFailed",
                f"temporary storage answered: {text}; nothing was submitted or billed",
                None,
            )

    # ------------------------------------------------------------------ the result video

    async def download(self, url: str, destination: Path) -> Downloaded:
        """Stream `url` to `destination` via a `.part` file; a failed attempt restarts from scratch."""
        last: Exception | None = None
        for attempt in range(MAX_READ_RETRIES + 1):
            retry_after: float | None = None
            try:
                return await self._download_once(url, destination)
            except UpstreamError as exc:
                if exc.status_code != 429 and exc.status_code < 500:
                    raise  # the storage refuses the signed URL (expired, gone): another try cannot help
                last, retry_after = exc, exc.retry_after
            except _DownloadProblem as exc:
                last = exc
            if attempt < MAX_READ_RETRIES:
                await self._sleep(backoff_delay(attempt, retry_after))
        raise UpstreamUnavailableError(
            f"The video could not be downloaded ({last}); the task is recorded and "
            "the server keeps trying in the background (the URL stays valid for 24 h after the task ends)."
        ) from last

    async def _download_once(self, url: str, destination: Path) -> Downloaded:
        part = part_path(destination)
        started = time.monotonic()
        current = url
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                self._vet_hop(current)
                try:
                    # The hash is computed while streaming (never by a second read of a large file).
                    fetched = await download_to_file(
                        current,
                        part,
                        DOWNLOAD_TIMEOUT,
                        deadline=started + DOWNLOAD_DEADLINE,
                        transport=pinned_sync_transport(policy=self._download_policy),
                    )
                except BadVideoError as exc:
                    self.metrics.upstream_call("download", None)
                    raise _DownloadProblem(str(exc)) from exc
                except BlockedAddressError as exc:  # the name changed its answer after the check
                    raise UpstreamUnavailableError(
                        f"The video's URL led to {snippet(current, 120)}, which now resolves to an address this "
                        f"server refuses to fetch ({exc}); nothing was sent there. The server tries again later."
                    ) from exc
                except HTTP_STACK_ERRORS as exc:
                    raise _DownloadProblem(f"{type(exc).__name__}: {exc}") from exc
                self.metrics.upstream_call("download", fetched.status)
                location = fetched.headers.get("location")
                if fetched.status in REDIRECT_STATUSES and location:
                    try:
                        current = str(httpx2.URL(current).join(location))
                    except (httpx2.InvalidURL, ValueError) as exc:
                        raise _DownloadProblem(f"a redirect to an invalid URL: {snippet(location)!r}") from exc
                    continue
                if fetched.status >= 400:
                    raise refusal(fetched.status, fetched.headers, fetched.body)
                if not 200 <= fetched.status < 300:
                    raise _DownloadProblem(f"HTTP {fetched.status}")
                break
            else:
                raise _DownloadProblem(f"more than {MAX_REDIRECTS} redirects (the last to {snippet(current)})")
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, destination)
        return Downloaded(destination, fetched.size, fetched.sha256, time.monotonic() - started)

    def _download_policy(self, host: str, address: str) -> str | None:
        """The addresses a download may connect to: public ones, and the configured upstream's own."""
        if host == self._upstream_host or (is_loopback(self._upstream_host) and is_loopback(host)):
            return None
        return public_only(host, address)

    def _vet_hop(self, url: str) -> None:
        """What can be refused of one download hop without a lookup (a literal private address, no
        http(s)); a name is vetted where it is resolved, by the pinned transport, on each connection."""
        try:
            check_url(url, self._download_policy)
        except BlockedAddressError as exc:
            raise UpstreamUnavailableError(
                f"The video's URL led to {snippet(url, 120)}, which this server refuses to fetch ({exc}); "
                "nothing was sent there. The task is recorded; the server tries the URL again later."
            ) from exc


def _form(fields: dict[str, str], filename: str, content: bytes) -> aiohttp.FormData:
    """The storage host's multipart form: the policy's fields first, the file last (OSS reads them in order)."""
    import io
    import mimetypes

    import aiohttp

    form = aiohttp.FormData(quote_fields=False)
    for name, value in fields.items():
        form.add_field(name, value)
    kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    # A file object, not bytes: aiohttp streams it in pieces (and warns that a large bytes body would
    # be written in one go from the event loop).
    form.add_field("file", io.BytesIO(content), filename=filename, content_type=kind)
    return form


def part_path(destination: Path) -> Path:
    """Per-process temporary name, so two servers sharing OUTPUT_DIR never write the same file."""
    return destination.with_name(f"{destination.name}.{os.getpid()}.part")
