"""Pre-flight checks: catch an input the service would refuse here, for free, before a paid call.

Limits from the contract: images JPEG/PNG/BMP/WEBP by content, each side 400..7000 px, at most
10 MB for Emoji; audio WAV or MP3 by content, under 15 MB and under 60 s. Local files are always
checked. Remote URLs are checked only with `EMO_MCP_PREFLIGHT=remote`, fetched with bounded bytes
and time through a guard that refuses private, loopback and link-local addresses; a URL that cannot
be fetched from here only earns a warning (DashScope may still reach it).

Pillow and mutagen are imported inside the functions so server start-up does not pay for them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import anyio
import httpx2

from server.errors import ConfigError, PreflightError
from server.media.addresses import BlockedAddressError, Resolver, guard_url, system_resolver
from server.media.sources import MediaRef

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
    http: httpx2.AsyncClient, url: str, max_bytes: int, resolve: Resolver = system_resolver
) -> tuple[bytes, int | None]:
    """GET at most `max_bytes` (each redirect re-guarded); returns the bytes and the declared length."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            await guard_url(current, resolve)
        except BlockedAddressError as exc:
            raise FetchFailedError(str(exc)) from exc
        try:
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
        except httpx2.HTTPError as exc:
            raise FetchFailedError(f"{type(exc).__name__}") from exc
    raise FetchFailedError(f"more than {MAX_REDIRECTS} redirects")


class Preflight:
    """Runs the checks for one call; remote checks only when enabled."""

    def __init__(
        self,
        http: httpx2.AsyncClient | Callable[[], httpx2.AsyncClient],
        *,
        remote: bool,
        resolve: Resolver = system_resolver,
    ) -> None:
        # A provider keeps start-up free of the HTTP transport (it is built on the first upstream call).
        self._http_source = http
        self._remote = remote
        self._resolve = resolve

    async def image(self, ref: MediaRef, family: str, name: str, checked: Checked) -> None:
        if ref.path is not None:
            size = ref.size if ref.size is not None else ref.path.stat().st_size
            path = ref.path
            checked.image = await anyio.to_thread.run_sync(lambda: check_image(path, size, family, name, ref.shown))
            return
        data = await self._fetch(ref, name, REMOTE_IMAGE_BYTES, checked)
        if data is None:
            return
        body, size = data  # a truncated body still holds the header, which is all the checks read
        checked.image = await anyio.to_thread.run_sync(lambda: check_image(body, size, family, name, ref.shown))

    async def audio(self, ref: MediaRef, name: str, checked: Checked) -> None:
        if ref.path is not None:
            size = ref.size if ref.size is not None else ref.path.stat().st_size
            path = ref.path
            checked.audio = await anyio.to_thread.run_sync(lambda: check_audio(path, size, name, ref.shown))
            return
        data = await self._fetch(ref, name, REMOTE_AUDIO_BYTES, checked)
        if data is None:
            return
        body, size = data
        checked.audio = await anyio.to_thread.run_sync(lambda: check_audio(body, size, name, ref.shown))

    async def _fetch(self, ref: MediaRef, name: str, max_bytes: int, checked: Checked) -> tuple[bytes, int] | None:
        """The remote bytes (and the full size, when known), or None with a warning."""
        if not self._remote or ref.url is None:
            return None
        try:
            with anyio.fail_after(REMOTE_TIMEOUT_SECONDS):
                http = self._http_source if isinstance(self._http_source, httpx2.AsyncClient) else self._http_source()
                body, declared = await fetch_bounded(http, ref.url, max_bytes, self._resolve)
        except (FetchFailedError, TimeoutError) as exc:
            reason = str(exc) or "timed out"
            checked.warnings.append(
                f"{name} could not be fetched from here for a pre-flight check ({reason}); it was not "
                "checked, and DashScope may still reach it."
            )
            return None
        size = max(declared or 0, len(body))
        return body, size
