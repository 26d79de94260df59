"""Bounded media for the viewer: the portrait fetched by the server, the finished video read from disk.

A host renders the viewer in a sandboxed frame with no network, so the server hands it the bytes
through the MCP bridge. Both paths are bounded, because every byte travels base64-encoded inside
JSON-RPC messages between the server, the host and the frame:
- a portrait: http(s) only, at most `MAX_IMAGE_BYTES` (DashScope's own limit for a portrait),
  `IMAGE_DEADLINE` seconds in all, and only bytes that start like a PNG, JPEG, BMP or WEBP file;
- a video: a file inside OUTPUT_DIR of at most `MAX_VIDEO_BYTES`, opened without following links;
  a larger one is refused with its path, and the viewer shows that path instead of a player;
- a local portrait: the bytes `server.media.sources` read when it confined the file (never a
  second read of the path).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2

from server.errors import EmoMcpError
from server.media.addresses import (
    AddressPolicy,
    BlockedAddressError,
    Resolver,
    check_url,
    pinned_transport,
    system_resolver,
)
from server.media.sources import MediaRef, open_confined, read_at_most

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_VIDEO_BYTES = 16 * 1024 * 1024
IMAGE_TIMEOUT = httpx2.Timeout(10.0, connect=5.0)
IMAGE_DEADLINE = 20.0
IMAGE_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class PreviewUnavailableError(EmoMcpError):
    """The viewer cannot get this media; the message says why and where the original is."""


@dataclass(frozen=True)
class Media:
    data: bytes
    mime_type: str


def image_mime_type(head: bytes) -> str | None:
    """The portrait formats DashScope accepts, recognised by their first bytes (never by headers)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


async def fetch_image(
    url: str,
    *,
    limit: int = MAX_IMAGE_BYTES,
    deadline: float = IMAGE_DEADLINE,
    transport: httpx2.AsyncBaseTransport | None = None,
    guard: Callable[[str], Awaitable[None]] | None = None,
    policy: AddressPolicy | None = None,
    resolve: Resolver = system_resolver,
) -> Media:
    """GET a portrait for the viewer, refusing anything that is not a bounded image over http(s).

    With a `policy` (the viewer passes the pre-flight one: no private, loopback or link-local
    hosts) every connection, redirects included, goes to an address the policy accepted from one
    lookup (the pinned transport), so a recorded detection cannot turn the viewer into a way to read
    the user's own network, not even through a name that answers differently the second time.
    `guard` still vets each request's URL first, for an early and clear refusal.
    """

    async def vet(request: httpx2.Request) -> None:
        if policy is not None:
            check_url(str(request.url), policy)
        if guard is not None:
            await guard(str(request.url))

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PreviewUnavailableError(
            "The viewer can only show portraits given as http(s) URLs; this image_url is not one."
        )
    if transport is None and policy is not None:
        transport = pinned_transport(resolve, policy)
    received = bytearray()
    try:
        with anyio.fail_after(deadline):
            async with (
                httpx2.AsyncClient(
                    timeout=IMAGE_TIMEOUT,
                    follow_redirects=True,
                    max_redirects=IMAGE_MAX_REDIRECTS,
                    transport=transport,
                    event_hooks={"request": [vet]},
                    trust_env=policy is None,
                ) as http,
                http.stream("GET", url) as response,
            ):
                if response.status_code >= 400:
                    raise PreviewUnavailableError(
                        f"The portrait could not be fetched for the viewer (HTTP {response.status_code})."
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise PreviewUnavailableError(_too_large(int(declared), limit))
                async for chunk in response.aiter_bytes(_CHUNK):
                    received += chunk
                    if len(received) > limit:
                        raise PreviewUnavailableError(_too_large(len(received), limit, at_least=True))
    except TimeoutError as exc:
        raise PreviewUnavailableError(
            f"The portrait took longer than {deadline:.0f} s to fetch for the viewer."
        ) from exc
    except httpx2.HTTPError as exc:
        raise PreviewUnavailableError(
            f"The portrait could not be fetched for the viewer ({type(exc).__name__})."
        ) from exc
    except BlockedAddressError as exc:
        raise PreviewUnavailableError(f"The viewer does not fetch from non-public addresses: {exc}.") from exc
    mime_type = image_mime_type(bytes(received[:12]))
    if mime_type is None:
        raise PreviewUnavailableError("The image_url did not return a PNG, JPEG, BMP or WEBP image.")
    return Media(bytes(received), mime_type)


def local_image(ref: MediaRef, *, limit: int = MAX_IMAGE_BYTES) -> Media:
    """A local portrait: the bytes read (and hashed) when `server.media.sources` confined it, bounded
    like a fetch. The path is not read again, so what is shown is what the detection matched."""
    if ref.data is None:
        raise PreviewUnavailableError("The local portrait was not read; ask for it again.")
    if len(ref.data) > limit:
        raise PreviewUnavailableError(_too_large(len(ref.data), limit))
    mime_type = image_mime_type(ref.data[:12])
    if mime_type is None:
        raise PreviewUnavailableError("The local portrait is not a PNG, JPEG, BMP or WEBP image.")
    return Media(ref.data, mime_type)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> str:
    amount = f"more than {_megabytes(limit)}" if at_least else _megabytes(size)
    return f"The portrait is {amount}, over the viewer's {_megabytes(limit)} limit."


async def read_video(path: Path, root: Path, *, limit: int = MAX_VIDEO_BYTES) -> Media:
    """The downloaded MP4 of a task, if it lies inside `root` and is small enough to send whole.

    Opened once from `root` without following links (`open_confined`) and read from that descriptor,
    so a video swapped for a link after the check cannot send another file.
    """
    return await anyio.to_thread.run_sync(_read_video, path, root, limit)


def _read_video(path: Path, root: Path, limit: int) -> Media:
    missing = PreviewUnavailableError(
        f"The video file {path} is missing (or outside OUTPUT_DIR); call task_status to download it again."
    )
    try:
        resolved, real_root = path.resolve(strict=True), root.resolve(strict=True)
        if not resolved.is_relative_to(real_root):
            raise missing
        fd = open_confined(resolved, real_root)
    except (OSError, RuntimeError) as exc:
        raise missing from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise missing
        if info.st_size > limit:
            raise PreviewUnavailableError(
                f"The video is {_megabytes(info.st_size)}, over the {_megabytes(limit)} the viewer sends through "
                f"the chat host; open it from {path}."
            )
        data = read_at_most(fd, limit + 1)
    except OSError as exc:
        raise missing from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise PreviewUnavailableError(
            f"The video is more than {_megabytes(limit)}, over what the viewer sends through the chat host; "
            f"open it from {path}."
        )
    return Media(data, "video/mp4")
