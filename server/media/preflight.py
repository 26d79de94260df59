"""Pre-flight checks: catch an input the service would refuse here, for free, before a paid call.

Limits from the contract: images JPEG/PNG/BMP/WEBP by content, each side 400..7000 px, at most
10 MB for Emoji; audio WAV or MP3 by content, under 15 MB and under 60 s. Local files are always
checked, on the bytes read once when the file was confined. Remote URLs are checked only with
`EMO_MCP_PREFLIGHT=remote`, fetched with bounded bytes and time through the pinned transport
(`server.media.addresses`), which connects only to public addresses it resolved and vetted itself;
a URL that cannot be fetched from here only earns a warning (DashScope may still reach it).

Pillow and mutagen are imported inside the functions so server start-up does not pay for them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import anyio
import httpx2

from server.errors import ConfigError, PreflightError
from server.media.addresses import (
    AddressPolicy,
    BlockedAddressError,
    Resolver,
    check_url,
    pinned_transport,
    public_only,
    system_resolver,
)
from server.media.sources import MAX_LOCAL_BYTES, MediaRef

PREFLIGHT_VARIABLE = "EMO_MCP_PREFLIGHT"
MB = 1024 * 1024
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
MIN_SIDE, MAX_SIDE = 400, 7000
EMOJI_MAX_IMAGE_BYTES = 10 * MB
AUDIO_MAX_BYTES = 15 * MB
AUDIO_MAX_SECONDS = 60.0
# Remote pre-flight bounds: enough bytes for any file within the limits, and a short total time.
REMOTE_IMAGE_BYTES = 10 * MB + 1
REMOTE_AUDIO_BYTES = AUDIO_MAX_BYTES + 1
REMOTE_TIMEOUT_SECONDS = 15.0
REMOTE_HTTP_TIMEOUT = httpx2.Timeout(10.0, connect=5.0)
MAX_REDIRECTS = 3

Source = Path | bytes


def parse_preflight_mode(env: Mapping[str, str]) -> bool:
    """True when remote URLs are pre-flighted too (`EMO_MCP_PREFLIGHT=remote`)."""
    raw = (env.get(PREFLIGHT_VARIABLE) or "local").strip().lower()
    if raw not in {"local", "remote"}:
        raise ConfigError(f"{PREFLIGHT_VARIABLE} must be 'local' (default) or 'remote', got {raw!r}")
    return raw == "remote"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    size: int


@dataclass(frozen=True)
class AudioInfo:
    format: str
    seconds: float
    size: int


@dataclass
class Checked:
    """What pre-flight learned about one input (None when it was not checked) and any warnings."""

    image: ImageInfo | None = None
    audio: AudioInfo | None = None
    warnings: list[str] = field(default_factory=list)


def _open(source: Source) -> IO[bytes]:
    return source.open("rb") if isinstance(source, Path) else io.BytesIO(source)


def check_image(source: Source, size: int, family: str, name: str, shown: str) -> ImageInfo:
    """Identify the image by its content (not its name) and check its size limits."""
    from PIL import Image, UnidentifiedImageError

    if family == "emoji" and size > EMOJI_MAX_IMAGE_BYTES:
        raise PreflightError(
            f"{name} {shown!r} is {size / MB:.1f} MB; Emoji accepts images of at most 10 MB. "
            "Use a smaller (re-compressed) image. Nothing was sent."
        )
    try:
        with warnings.catch_warnings(), _open(source) as handle:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle, formats=list(IMAGE_FORMATS)) as image:
                fmt, (width, height) = str(image.format), image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise PreflightError(
            f"{name} {shown!r} is not a JPEG, PNG, BMP or WEBP image by its content "
            f"({type(exc).__name__}); the file name does not count. Convert it and try again. Nothing was sent."
        ) from exc
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise PreflightError(
                f"{name} {shown!r} is {width}x{height} px: its {side} must be between {MIN_SIDE} and "
                f"{MAX_SIDE} px on each side. Resize the image and try again. Nothing was sent."
            )
    return ImageInfo(fmt, width, height, size)


def _sniff_audio(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"
    return None


def check_audio(source: Source, size: int, name: str, shown: str) -> AudioInfo:
    """Identify WAV/MP3 by content, then check the size and the duration."""
    from mutagen import MutagenError
    from mutagen.mp3 import MP3
    from mutagen.wave import WAVE

    if size >= AUDIO_MAX_BYTES:
        raise PreflightError(
            f"{name} {shown!r} is {size / MB:.1f} MB; EMO accepts audio under 15 MB. "
            "Shorten or re-encode it (e.g. MP3) and try again. Nothing was sent."
        )
    with _open(source) as handle:
        head = handle.read(12)
        fmt = _sniff_audio(head)
        if fmt is None:
            raise PreflightError(
                f"{name} {shown!r} is not WAV or MP3 by its content; the file name does not count. "
                "Convert it to WAV or MP3 and try again. Nothing was sent."
            )
        handle.seek(0)
        try:
            parsed = (WAVE if fmt == "WAV" else MP3)(handle)
            seconds = float(getattr(parsed.info, "length", 0.0) or 0.0)
        except (MutagenError, OSError, ValueError) as exc:
            raise PreflightError(
                f"{name} {shown!r} looks like {fmt} but could not be read ({type(exc).__name__}); "
                "re-export it as WAV or MP3 and try again. Nothing was sent."
            ) from exc
    if not seconds > 0:
        raise PreflightError(f"{name} {shown!r} has no audio (0 s). Nothing was sent.")
    if seconds >= AUDIO_MAX_SECONDS:
        raise PreflightError(
            f"{name} {shown!r} lasts {seconds:.1f} s; EMO accepts audio under 60 s. "
            "Cut it shorter and try again. Nothing was sent."
        )
    return AudioInfo(fmt, seconds, size)


class FetchFailedError(Exception):
    """The remote file could not be fetched from here: a warning, not a refusal."""


async def fetch_bounded(
    url: str,
    max_bytes: int,
    resolve: Resolver = system_resolver,
    policy: AddressPolicy = public_only,
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> tuple[bytes, int | None]:
    """GET at most `max_bytes`, following at most MAX_REDIRECTS redirects; returns the bytes and the
    declared length. Every connection goes to an address vetted by `policy` from one lookup (the
    pinned transport); `transport` replaces it only in tests that serve from memory."""
    current = url
    async with httpx2.AsyncClient(
        transport=transport or pinned_transport(resolve, policy), timeout=REMOTE_HTTP_TIMEOUT, trust_env=False
    ) as http:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_url(current, policy)  # a literal address or a bad scheme is refused before any connection
                async with http.stream("GET", current, follow_redirects=False) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(current, response.headers["location"])
                        continue
                    if response.status_code >= 400:
                        raise FetchFailedError(f"HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    length = int(declared) if declared and declared.isdigit() else None
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) >= max_bytes:
                            break
                    return bytes(body[:max_bytes]), length
            except BlockedAddressError as exc:
                raise FetchFailedError(str(exc)) from exc
            except httpx2.HTTPError as exc:
                raise FetchFailedError(f"{type(exc).__name__}") from exc
    raise FetchFailedError(f"more than {MAX_REDIRECTS} redirects")


def local_limit(name: str) -> int:
    """The most a local file may weigh before it is read: audio under 15 MB, images what the
    temporary storage takes (Emoji's 10 MB is checked on the bytes, with its own message)."""
    return AUDIO_MAX_BYTES if name == "audio_url" else MAX_LOCAL_BYTES


class Preflight:
    """Runs the checks for one call; remote checks only when enabled.

    Local media are checked on the bytes read when they were confined (`MediaRef.data`), never by
    reading the path again. Remote fetches use a pinned client of their own (`fetch_bounded`).
    """

    def __init__(
        self,
        http: object = None,
        *,
        remote: bool,
        resolve: Resolver = system_resolver,
        policy: AddressPolicy = public_only,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        # `http` (the upstream's shared client) is no longer used: its transport resolves names itself,
        # so a fetch through it could reach an address the guard never saw. Kept so callers still work.
        del http
        self._remote = remote
        self._resolve = resolve
        self._policy = policy
        self._transport = transport

    async def image(self, ref: MediaRef, family: str, name: str, checked: Checked) -> None:
        if ref.path is not None:
            data = _local_bytes(ref)
            checked.image = await anyio.to_thread.run_sync(
                lambda: check_image(data, len(data), family, name, ref.shown)
            )
            return
        fetched = await self._fetch(ref, name, REMOTE_IMAGE_BYTES, checked)
        if fetched is None:
            return
        body, size = fetched  # a truncated body still holds the header, which is all the checks read
        checked.image = await anyio.to_thread.run_sync(lambda: check_image(body, size, family, name, ref.shown))

    async def audio(self, ref: MediaRef, name: str, checked: Checked) -> None:
        if ref.path is not None:
            data = _local_bytes(ref)
            checked.audio = await anyio.to_thread.run_sync(lambda: check_audio(data, len(data), name, ref.shown))
            return
        fetched = await self._fetch(ref, name, REMOTE_AUDIO_BYTES, checked)
        if fetched is None:
            return
        body, size = fetched
        checked.audio = await anyio.to_thread.run_sync(lambda: check_audio(body, size, name, ref.shown))

    async def _fetch(self, ref: MediaRef, name: str, max_bytes: int, checked: Checked) -> tuple[bytes, int] | None:
        """The remote bytes (and the full size, when known), or None with a warning."""
        if not self._remote or ref.url is None:
            return None
        try:
            with anyio.fail_after(REMOTE_TIMEOUT_SECONDS):
                body, declared = await fetch_bounded(
                    ref.url, max_bytes, self._resolve, self._policy, transport=self._transport
                )
        except (FetchFailedError, TimeoutError) as exc:
            reason = str(exc) or "timed out"
            checked.warnings.append(
                f"{name} could not be fetched from here for a pre-flight check ({reason}); it was not "
                "checked, and DashScope may still reach it."
            )
            return None
        size = max(declared or 0, len(body))
        return body, size


def _local_bytes(ref: MediaRef) -> bytes:
    if ref.data is None:  # a MediaRef is only built local by `resolve_local`, which reads the file
        raise PreflightError(f"{ref.shown!r} was not read when it was confined; resolve it again. Nothing was sent.")
    return ref.data
