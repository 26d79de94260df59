"""Fetching a large result to a file on worker threads, hashed (sha256) on the way.

Streaming through the shared async client cost about 4.5 ms of CPU per MB (64 KiB reads through
anyio and h11, then a hash and a write per chunk) and reached a third of `curl`'s rate. A blocking
`httpx2.Client` on a worker thread receives; a second thread hashes and writes what it received
(hashlib and file writes release the GIL, so the two overlap on two cores), and asks the kernel to
start writing back every few megabytes so the closing `fsync` has little left to wait for.
See bench/RESULTS.md for the figures.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio
import httpx2

# Received data is handed over in pieces of this size; at most QUEUE_DEPTH of them wait, so a
# download holds about (QUEUE_DEPTH + 2) MiB however large the video is.
PIECE_BYTES = 1024 * 1024
QUEUE_DEPTH = 2
# Start the kernel's write-back of what is written every this many bytes (and drop it from the
# page cache: a 200 MB video need not push the user's other files out of memory).
WRITEBACK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Fetched:
    """The response (its body read only for an error status) and what was written."""

    response: httpx2.Response
    size: int
    sha256: str


class FetchStoppedError(Exception):
    """The awaiting task was cancelled, so the abandoned worker thread stopped early."""


class HashingWriter:
    """Hashes and writes the pieces it is given on a thread of its own, then fsyncs on `finish`.

    A write error is kept and raised to the receiving side at its next `put` or at `finish`;
    the thread keeps draining the queue until told to stop, so `put` can never block forever.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # not inherited (PEP 446)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self.size = 0
        self._thread = threading.Thread(target=self._run, name="video-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        flushed = 0
        while (piece := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the receiver learns of the error at its next put
            try:
                self._digest.update(piece)
                view = memoryview(piece)
                while view:
                    view = view[os.write(self._fd, view) :]
                self.size += len(piece)
                if self.size - flushed >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fd, flushed, self.size - flushed, os.POSIX_FADV_DONTNEED)
                    flushed = self.size
            except BaseException as exc:  # handed to the receiving thread, which raises it
                self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, piece: bytes) -> None:
        self._raise_error()
        self._queue.put(piece)

    def finish(self) -> str:
        """Wait for every piece, fsync (on disk before the caller renames it), return the sha256."""
        self._stop()
        self._raise_error()
        os.fsync(self._fd)
        return self._digest.hexdigest()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop()
        os.close(self._fd)


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
        with HashingWriter(path) as sink:
            for piece in response.iter_bytes(PIECE_BYTES):
                if stop.is_set():
                    raise FetchStoppedError(url)
                sink.put(piece)
            sha256 = sink.finish()
            return Fetched(response, sink.size, sha256)


async def download_to_file(url: str, path: Path, http_timeout: httpx2.Timeout) -> Fetched:
    """`fetch_to_file` on a worker thread; cancelling the caller stops the thread at its next chunk."""
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(fetch_to_file, url, path, http_timeout, stop, abandon_on_cancel=True)
    finally:
        stop.set()
