"""The async DashScope client: the only module that speaks HTTP to the service.

Rules from the contract that live here and nowhere else:
- detect is synchronous and never sends `X-DashScope-Async`; a submit always does;
- task reads are retried (429 / 5xx / transport) with capped, jittered backoff honouring
  `Retry-After`; a submit is never retried once it may have reached the service;
- every call waits for its slot in `server.upstream.limits` (task queries per process, detect/submit per
  model), and a 429 pauses that whole limiter, not just the one request;
- the result URL is fetched without the API key (it is a signed storage URL on another host),
  streamed (on a worker thread, see `server/upstream/streaming.py`) to a per-process temporary file with its
  sha256 computed on the way, checked against Content-Length and flushed to disk, then renamed: a
  `.mp4` is always complete.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2

from server.errors import (
    MissingApiKeyError,
    ServiceError,
    SubmitOutcomeUnknownError,
    UpstreamError,
    UpstreamUnavailableError,
    upstream_error,
)
from server.upstream.limits import Limits, RateLimiter
from server.upstream.streaming import download_to_file

logger = logging.getLogger(__name__)

DETECT_PATH = "/services/aigc/image2video/face-detect"
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"

UPLOADS_PATH = "/uploads"

DEFAULT_TIMEOUT = httpx2.Timeout(30.0, connect=10.0)
UPLOAD_TIMEOUT = httpx2.Timeout(120.0, connect=10.0)
# A submit that outlives this is "outcome unknown" (kept apart so tests can shorten it alone).
SUBMIT_TIMEOUT = DEFAULT_TIMEOUT
DETECT_TIMEOUT = httpx2.Timeout(60.0, connect=10.0)
DOWNLOAD_TIMEOUT = httpx2.Timeout(60.0, connect=10.0)
MAX_READ_RETRIES = 4
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0

Sleep = Callable[[float], Awaitable[None]]
# Building an httpx2 client imports its transport and a TLS context (~80 ms): too slow for start-up.
HttpFactory = Callable[[], httpx2.AsyncClient]


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    seconds: float = 0.0  # the successful attempt, request to rename (recorded in video.json)


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


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After wins (capped)."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * (2**attempt)))


def _error_from_response(response: httpx2.Response) -> UpstreamError:
    code, message, request_id = f"HTTP{response.status_code}", "", None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        code = str(body.get("code") or code)
        message = str(body.get("message") or "")
        request_id = body.get("request_id")
    elif response.text:
        message = response.text[:200]
    return upstream_error(
        response.status_code,
        code,
        message,
        str(request_id) if request_id else None,
        parse_retry_after(response.headers.get("retry-after")),
    )


def _json_body(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServiceError(response.status_code, "BadResponse", "DashScope answered with non-JSON") from exc
    if not isinstance(body, dict):
        raise ServiceError(response.status_code, "BadResponse", "DashScope answered with a non-object")
    return body


class DashScopeClient:
    """Thin, typed wrapper over the endpoints this server uses."""

    def __init__(
        self,
        http: httpx2.AsyncClient | HttpFactory,
        base_url: str,
        api_key: str | None,
        *,
        sleep: Sleep = anyio.sleep,
        limits: Limits | None = None,
    ) -> None:
        self._http_or_factory = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._sleep = sleep
        self.limits = limits or Limits()

    @property
    def _http(self) -> httpx2.AsyncClient:
        """The HTTP client, built on first use when a factory was given."""
        if not isinstance(self._http_or_factory, httpx2.AsyncClient):
            self._http_or_factory = self._http_or_factory()
        return self._http_or_factory

    def _headers(self, *, asynchronous: bool = False, oss: bool = False) -> dict[str, str]:
        if not self._api_key:
            raise MissingApiKeyError()
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        if asynchronous:
            headers["X-DashScope-Async"] = "enable"
        if oss:
            headers["X-DashScope-OssResourceResolve"] = "enable"
        return headers

    async def detect(self, model: str, image_url: str, ratio: str | None) -> dict[str, Any]:
        """POST face-detect. Billed per call, so only a 429 (refused, not billed) is retried."""
        payload: dict[str, Any] = {"model": model, "input": {"image_url": image_url}}
        if ratio is not None:
            payload["parameters"] = {"ratio": ratio}
        headers = self._headers(oss=image_url.startswith("oss://"))
        limiter = self.limits.model(model)
        for attempt in range(MAX_READ_RETRIES + 1):
            await limiter.acquire()
            try:
                response = await self._http.post(
                    self._base_url + DETECT_PATH, json=payload, headers=headers, timeout=DETECT_TIMEOUT
                )
            except httpx2.TransportError as exc:
                raise UpstreamUnavailableError(
                    f"DashScope could not be reached for detection ({type(exc).__name__}). "
                    "Check the network and DASHSCOPE_HTTP_BASE_URL, then call again."
                ) from exc
            if response.status_code == 429 and attempt < MAX_READ_RETRIES:
                error = _error_from_response(response)
                await self._throttled(limiter, attempt, error.retry_after)
                continue
            if response.status_code >= 400:
                raise _error_from_response(response)
            return _json_body(response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST video-synthesis once. Anything but a clear answer means "outcome unknown"."""
        uses_oss = "oss://" in json.dumps(payload.get("input", {}))
        headers = self._headers(asynchronous=True, oss=uses_oss)
        limiter = self.limits.model(str(payload.get("model")))
        await limiter.acquire()
        try:
            response = await self._http.post(
                self._base_url + SUBMIT_PATH, json=payload, headers=headers, timeout=SUBMIT_TIMEOUT
            )
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            # The connection was never made (or never got a pooled one), so nothing reached the service.
            raise UpstreamUnavailableError(
                f"DashScope could not be reached ({type(exc).__name__}); nothing was submitted. "
                "Check the network and DASHSCOPE_HTTP_BASE_URL, then call again."
            ) from exc
        except httpx2.TransportError as exc:
            raise SubmitOutcomeUnknownError(
                f"The submit was sent but no answer came back ({type(exc).__name__})."
            ) from exc
        if response.status_code >= 500:
            error = _error_from_response(response)
            raise SubmitOutcomeUnknownError(str(error)) from error
        if response.status_code >= 400:
            error = _error_from_response(response)
            if response.status_code == 429:
                limiter.pause(backoff_delay(0, error.retry_after))
            raise error
        try:
            return _json_body(response)
        except ServiceError as exc:
            # Accepted (2xx) but unreadable: a task may well exist, so this is not a refusal.
            raise SubmitOutcomeUnknownError(
                f"DashScope accepted the submit but its answer was unreadable ({exc})."
            ) from exc

    async def _throttled(self, limiter: RateLimiter, attempt: int, retry_after: float | None) -> float:
        """A 429: pause every caller of this limiter, then wait (the caller retries)."""
        delay = backoff_delay(attempt, retry_after)
        limiter.pause(delay)
        await self._sleep(delay)
        return delay

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """GET /tasks/{id}, retried: a read is safe to repeat."""
        return await self._read(f"{self._base_url}/tasks/{task_id}", None, "task query")

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
        while True:
            await self.limits.queries.acquire()
            try:
                response = await self._http.post(
                    f"{self._base_url}/tasks/{task_id}/cancel", headers=headers, timeout=DEFAULT_TIMEOUT
                )
            except httpx2.TransportError as exc:
                raise UpstreamUnavailableError(
                    f"DashScope did not answer the cancel ({type(exc).__name__}); call task_status to see "
                    "whether the task was canceled, then task_cancel again if it is still PENDING."
                ) from exc
            if response.status_code == 429:
                error = _error_from_response(response)
                self.limits.queries.pause(backoff_delay(0, error.retry_after))
                raise error
            if response.status_code >= 400:
                raise _error_from_response(response)
            return _json_body(response) if response.content else {}

    async def _read(self, url: str, params: dict[str, str] | None, what: str) -> dict[str, Any]:
        headers = {"Authorization": self._headers()["Authorization"]}
        last: Exception | None = None
        for attempt in range(MAX_READ_RETRIES + 1):
            await self.limits.queries.acquire()
            retry_after: float | None = None
            try:
                response = await self._http.get(url, params=params, headers=headers, timeout=DEFAULT_TIMEOUT)
            except httpx2.TransportError as exc:
                last = exc
            else:
                if response.status_code < 400:
                    return _json_body(response)
                error = _error_from_response(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise error
                last, retry_after = error, error.retry_after
                if response.status_code == 429:
                    # Everyone waits, not just this request: the account is throttled.
                    self.limits.queries.pause(backoff_delay(attempt, retry_after))
            if attempt < MAX_READ_RETRIES:
                delay = backoff_delay(attempt, retry_after)
                logger.info("%s retry %d in %.2fs after %s", what, attempt + 1, delay, type(last).__name__)
                await self._sleep(delay)
        if isinstance(last, UpstreamError):
            raise last
        raise UpstreamUnavailableError(
            f"DashScope did not answer the {what} after {MAX_READ_RETRIES + 1} tries "
            f"({type(last).__name__}). The task is safe; call task_status again later."
        ) from last

    async def download(self, url: str, destination: Path) -> Downloaded:
        """Stream `url` to `destination` via a `.part` file; a broken stream restarts from scratch."""
        last: Exception | None = None
        for attempt in range(MAX_READ_RETRIES + 1):
            try:
                return await self._download_once(url, destination)
            except (httpx2.TransportError, _ShortDownloadError) as exc:
                last = exc
            except UpstreamError as exc:
                if exc.status_code != 429 and exc.status_code < 500:
                    raise
                last = exc
            if attempt < MAX_READ_RETRIES:
                await self._sleep(backoff_delay(attempt, getattr(last, "retry_after", None)))
        raise UpstreamUnavailableError(
            f"The video could not be downloaded ({type(last).__name__}); the task is recorded and "
            "the server keeps trying in the background (the URL stays valid for 24 h after the task ends)."
        ) from last

    @property
    def http(self) -> httpx2.AsyncClient:
        """The shared HTTP client (pre-flight fetches reuse its connection pool)."""
        return self._http

    async def upload_policy(self, model: str) -> dict[str, Any]:
        """GET /uploads?action=getPolicy: a form policy for `model`'s temporary storage (free)."""
        headers = {"Authorization": self._headers()["Authorization"]}
        params = {"action": "getPolicy", "model": model}
        try:
            response = await self._http.get(
                self._base_url + UPLOADS_PATH, params=params, headers=headers, timeout=DEFAULT_TIMEOUT
            )
        except httpx2.TransportError as exc:
            raise UpstreamUnavailableError(
                f"DashScope could not be reached for an upload policy ({type(exc).__name__}); nothing was "
                "submitted. Check the network, then call again."
            ) from exc
        if response.status_code >= 400:
            raise _error_from_response(response)
        data = _json_body(response).get("data")
        if not isinstance(data, dict):
            raise ServiceError(response.status_code, "BadResponse", "The upload policy answer has no data object")
        return data

    async def upload_form(self, host: str, fields: dict[str, str], filename: str, content: bytes) -> None:
        """Multipart POST to the storage host; the policy authorises it, so the API key is not sent."""
        try:
            response = await self._http.post(
                host, data=fields, files={"file": (filename, content)}, timeout=UPLOAD_TIMEOUT
            )
        except httpx2.TransportError as exc:
            raise UpstreamUnavailableError(
                f"The upload to DashScope's temporary storage failed ({type(exc).__name__}); nothing was "
                "submitted. Call again."
            ) from exc
        if response.status_code != 200:
            raise upstream_error(
                response.status_code, "UploadFailed", f"temporary storage answered: {response.text[:200]}", None
            )

    async def _download_once(self, url: str, destination: Path) -> Downloaded:
        part = part_path(destination)
        started = time.monotonic()
        try:
            # The hash is computed while streaming (never by a second read of a large file).
            fetched = await download_to_file(url, part, DOWNLOAD_TIMEOUT)
            if fetched.response.status_code >= 400:
                raise _error_from_response(fetched.response)
            expected = fetched.response.headers.get("content-length")
            if expected is not None and expected.isdigit() and int(expected) != fetched.size:
                raise _ShortDownloadError(f"expected {expected} bytes, got {fetched.size}")
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, destination)
        return Downloaded(destination, fetched.size, fetched.sha256, time.monotonic() - started)


def part_path(destination: Path) -> Path:
    """Per-process temporary name, so two servers sharing OUTPUT_DIR never write the same file."""
    return destination.with_name(f"{destination.name}.{os.getpid()}.part")


class _ShortDownloadError(Exception):
    """The stream ended before Content-Length bytes arrived, or the disk disagrees with the stream."""
