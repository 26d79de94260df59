"""Fetching a large result to a file on a worker thread, hashed (sha256) on the way.

Streaming through the shared async client cost about 4.5 ms of CPU per MB (64 KiB reads through
anyio and h11, then a hash and a write per chunk) and reached a third of `curl`'s rate. A blocking
`httpx2.Client` on a worker thread does the same work for about 2.5 ms per MB and keeps the event
loop free; hashlib and file writes release the GIL. See bench/RESULTS.md for the figures.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2


@dataclass(frozen=True)
class Fetched:
    """The response (its body read only for an error status) and what was written."""

    response: httpx2.Response
    size: int
    sha256: str


class FetchStoppedError(Exception):
    """The awaiting task was cancelled, so the abandoned worker thread stopped early."""


def fetch_to_file(url: str, path: Path, timeout: httpx2.Timeout, stop: threading.Event) -> Fetched:
    """Blocking: GET `url` and write a successful body to `path` (truncated first)."""
    # A client per download: result URLs are one-off signed links on a storage host, so nothing
    # is lost by not pooling, and the loop's shared client is never touched from this thread.
    with (
        httpx2.Client(timeout=timeout, follow_redirects=True) as http,
        http.stream("GET", url) as response,
    ):
        if response.status_code >= 400:
            response.read()
            return Fetched(response, 0, "")
        digest = hashlib.sha256()
        size = 0
        with path.open("wb") as sink:
            for chunk in response.iter_bytes():
                if stop.is_set():
                    raise FetchStoppedError(url)
                digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
            # On disk before the caller renames it into place: a crash never leaves a short ".mp4".
            sink.flush()
            os.fsync(sink.fileno())
    return Fetched(response, size, digest.hexdigest())


async def download_to_file(url: str, path: Path, http_timeout: httpx2.Timeout) -> Fetched:
    """`fetch_to_file` on a worker thread; cancelling the caller stops the thread at its next chunk."""
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(fetch_to_file, url, path, http_timeout, stop, abandon_on_cancel=True)
    finally:
        stop.set()
