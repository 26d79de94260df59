"""Fetching a large result to a file on worker threads, hashed (sha256) and checked on the way.

Streaming through the shared async client cost about 4.5 ms of CPU per MB (64 KiB reads through
anyio and h11, then a hash and a write per chunk) and reached a third of `curl`'s rate. A blocking
`httpx2.Client` on a worker thread receives; a second thread hashes and writes what it received
(hashlib and file writes release the GIL, so the two overlap on two cores), and asks the kernel to
start writing back every few megabytes so the closing `fsync` has little left to wait for.
See bench/RESULTS.md for the figures.

What is saved is what the storage sent, or nothing: the body must start like an MP4 (an `ftyp`
box at offset 4, so an HTML error page answered with 200 is never saved as a video), its length
must match `Content-Length`, and its MD5 the `Content-MD5` header OSS sends. One hop is fetched
per call (redirects are the caller's to vet), within a size cap, a stall limit (the read timeout)
and an overall deadline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import queue
import threading
import time
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
# No portrait video comes near this (60 s of 512x704 H.264 is a few tens of MB).
MAX_VIDEO_BYTES = 1024 * 1024 * 1024
# A video is not compressible: a body that inflates beyond this many times what was received is a bomb.
MAX_INFLATION = 4
# The body of a redirect or an error answer is read only this far (for the message).
MAX_ERROR_BODY = 64 * 1024
MP4_MAGIC = b"ftyp"


@dataclass(frozen=True)
class Fetched:
    """One hop's answer: a redirect or an error (status, headers, the start of its body), or a saved file."""

    status: int
    headers: httpx2.Headers
    body: bytes = b""
    size: int = 0
    sha256: str = ""


# What httpx2 raises once a download's request may be on its way (decoding, protocol and redirect
# errors are not TransportErrors, and used to escape the callers' handlers).
HTTP_STACK_ERRORS: tuple[type[Exception], ...] = (httpx2.HTTPError, httpx2.StreamError, httpx2.InvalidURL)


class FetchStoppedError(Exception):
    """The awaiting task was cancelled, so the abandoned worker thread stopped early."""


class BadVideoError(Exception):
    """What arrived is not the whole video the storage declared (the caller retries)."""


class HashingWriter:
    """Hashes and writes the pieces it is given on a thread of its own, then fsyncs on `finish`.

    A write error is kept and raised to the receiving side at its next `put` or at `finish`;
    the thread keeps draining the queue until told to stop, so `put` can never block forever.
    """

    def __init__(self, path: Path, *, md5: bool = False) -> None:
        # Owner-only, whatever the umask (the video is the user's; PEP 446: not inherited).
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(self._fd, 0o600)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._digest = hashlib.sha256()
        # Only when the storage sent a Content-MD5 to check against (MD5 costs ~1.5 ms per MB).
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
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
                if self._md5 is not None:
                    self._md5.update(piece)
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

    def md5(self) -> bytes | None:
        return self._md5.digest() if self._md5 is not None else None

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


def _declared_md5(headers: httpx2.Headers) -> bytes | None:
    value = headers.get("content-md5")
    if not value:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None  # a malformed header cannot be checked against
    return digest if len(digest) == 16 else None


def fetch_to_file(
    url: str,
    path: Path,
    timeout: httpx2.Timeout,
    stop: threading.Event,
    *,
    deadline: float | None = None,
    max_bytes: int = MAX_VIDEO_BYTES,
    transport: httpx2.BaseTransport | None = None,
) -> Fetched:
    """Blocking: GET `url` (one hop) and write a verified successful body to `path` (truncated first).

    `deadline` is a `time.monotonic()` moment; the read timeout of `timeout` is the stall limit.
    `transport` is the pinned one of `server.media.addresses`: it connects only to the addresses it
    vetted for the name, so a name that changes its answer after the check cannot reach another host.
    """
    # A client per download: result URLs are one-off signed links on a storage host, so nothing
    # is lost by not pooling, and the loop's shared client is never touched from this thread.
    headers = {"Accept-Encoding": "identity"}  # a video is not compressible; never ask for a bomb
    with (
        httpx2.Client(timeout=timeout, follow_redirects=False, transport=transport) as http,
        http.stream("GET", url, headers=headers) as response,
    ):
        if not 200 <= response.status_code < 300:
            body = b""
            for piece in response.iter_bytes():
                body += piece
                if len(body) >= MAX_ERROR_BODY:
                    break
            return Fetched(response.status_code, response.headers, body[:MAX_ERROR_BODY])
        return _save(response, path, stop, deadline, max_bytes)


def _save(response: httpx2.Response, path: Path, stop: threading.Event, deadline: float | None, cap: int) -> Fetched:
    encoding = response.headers.get("content-encoding", "").strip().lower()
    encoded = encoding not in ("", "identity")
    declared = response.headers.get("content-length", "").strip()
    expected = int(declared) if declared.isdigit() else None
    if expected is not None and expected > cap:
        raise BadVideoError(f"the storage declares {expected} bytes, more than the {cap} this server saves")
    md5 = None if encoded else _declared_md5(response.headers)
    received = 0
    pending = bytearray()  # handed to the writer in pieces of PIECE_BYTES
    with HashingWriter(path, md5=md5 is not None) as sink:
        # Network-sized chunks, so the deadline and the stop flag are checked even on a dripping body.
        for chunk in response.iter_bytes():
            if stop.is_set():
                raise FetchStoppedError(str(response.url))
            if deadline is not None and time.monotonic() > deadline:
                raise BadVideoError("the download took longer than its deadline")
            if received < 8 <= received + len(chunk):  # once, as the first 8 bytes complete
                _check_mp4(bytes(pending) + chunk, response.headers)
            received += len(chunk)
            if received > cap or (encoded and received > MAX_INFLATION * response.num_bytes_downloaded + PIECE_BYTES):
                raise BadVideoError(f"the body grew past {received} bytes (Content-Encoding {encoding or 'none'})")
            pending += chunk
            if len(pending) >= PIECE_BYTES:
                sink.put(bytes(pending))
                pending.clear()
        if received < 8:
            _check_mp4(bytes(pending), response.headers)
        if pending:
            sink.put(bytes(pending))
        sha256 = sink.finish()
        if expected is not None and response.num_bytes_downloaded != expected:
            raise BadVideoError(f"expected {expected} bytes, got {response.num_bytes_downloaded}")
        if md5 is not None and sink.md5() != md5:
            raise BadVideoError("the body does not match the Content-MD5 the storage sent")
        return Fetched(response.status_code, response.headers, b"", sink.size, sha256)


def _check_mp4(head: bytes, headers: httpx2.Headers) -> None:
    if head[4:8] != MP4_MAGIC:
        kind = headers.get("content-type", "no Content-Type")
        raise BadVideoError(f"the body is not an MP4 (no ftyp box at offset 4; {kind}: {head[:16]!r})")


async def download_to_file(
    url: str,
    path: Path,
    http_timeout: httpx2.Timeout,
    *,
    deadline: float | None = None,
    transport: httpx2.BaseTransport | None = None,
) -> Fetched:
    """`fetch_to_file` on a worker thread; cancelling the caller stops the thread at its next chunk."""
    stop = threading.Event()

    def fetch() -> Fetched:
        return fetch_to_file(url, path, http_timeout, stop, deadline=deadline, transport=transport)

    try:
        return await anyio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    finally:
        stop.set()
