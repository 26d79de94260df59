"""Where a media argument points: a public http(s) URL, or a local file inside the allowed roots.

A local path (or `file://` URI) is accepted only when, after resolving symlinks, it is a regular
file under one of `EMO_MCP_ALLOWED_ROOTS` (default: the working directory). Everything else — a
path outside, a `..` escape, a symlink leading out, a device, a directory — is refused with a
message naming the roots, before anything is read or sent.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.errors import ConfigError, RefusedInputError

ROOTS_VARIABLE = "EMO_MCP_ALLOWED_ROOTS"
HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class MediaRef:
    """One resolved `image_url` / `audio_url` argument."""

    original: str  # exactly what the caller passed (shown back in results)
    url: str | None = None  # the http(s) URL, for remote media
    path: Path | None = None  # the resolved regular file, for local media
    sha256: str | None = None  # content hash of a local file
    size: int | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def identity(self) -> str:
        """What provenance keys on: the URL itself, or a local file's content."""
        return f"sha256:{self.sha256}" if self.sha256 is not None else (self.url or self.original)

    @property
    def shown(self) -> str:
        """What results show: the local path (never only an opaque oss:// key) or the URL."""
        return str(self.path) if self.path is not None else (self.url or self.original)


def parse_roots(env: Mapping[str, str], cwd: Path) -> tuple[Path, ...]:
    """`EMO_MCP_ALLOWED_ROOTS` (os.pathsep-separated; relative entries are taken from `cwd`)."""
    raw = env.get(ROOTS_VARIABLE, "")
    entries = [part.strip() for part in raw.split(os.pathsep) if part.strip()]
    roots: list[Path] = []
    for entry in entries or [str(cwd)]:
        root = (cwd / Path(entry).expanduser()).resolve()
        if not root.is_dir():
            raise ConfigError(f"{ROOTS_VARIABLE} entry {entry!r} is not an existing folder ({root}).")
        roots.append(root)
    return tuple(dict.fromkeys(roots))


def is_remote(value: str) -> bool:
    return urlsplit(value).scheme.lower() in {"http", "https"}


def _roots_text(roots: tuple[Path, ...]) -> str:
    return ", ".join(str(root) for root in roots)


def _refuse(field: str, value: str, why: str, roots: tuple[Path, ...]) -> RefusedInputError:
    return RefusedInputError(
        f"{field} {value!r} {why}. Pass a public http(s) URL, or a local file inside the allowed roots "
        f"({_roots_text(roots)}; set {ROOTS_VARIABLE} to change them)."
    )


def local_path_of(value: str) -> Path:
    """The filesystem path named by a `file://` URI or a plain path (not yet resolved)."""
    parts = urlsplit(value)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("a file:// URI must name a local file (file:///path)")
        return Path(unquote(parts.path))
    return Path(value).expanduser()


def resolve_local(field: str, value: str, roots: tuple[Path, ...]) -> MediaRef:
    """Confine a local path to the roots, after symlinks, and hash its content."""
    if not roots:
        raise _refuse(field, value, "is a local file but no allowed roots are configured", roots)
    try:
        candidate = local_path_of(value)
    except ValueError as exc:
        raise _refuse(field, value, f"is not usable: {exc}", roots) from exc
    if "\x00" in value:
        raise _refuse(field, value, "contains a NUL character", roots)
    # Relative paths are taken from the first root (the working directory by default).
    joined = candidate if candidate.is_absolute() else roots[0] / candidate
    if ".." in joined.parts:
        raise _refuse(field, value, "contains '..' (path traversal is not allowed)", roots)
    try:
        real = joined.resolve(strict=True)
    except FileNotFoundError as exc:
        raise _refuse(field, value, f"is not an http(s) URL and no file exists at {joined}", roots) from exc
    except (OSError, RuntimeError) as exc:
        raise _refuse(field, value, f"cannot be resolved ({exc})", roots) from exc
    if not any(real.is_relative_to(root) for root in roots):
        shown = f"resolves to {real}, which is" if real != joined else "is"
        raise _refuse(field, value, f"{shown} outside the allowed roots", roots)
    try:
        info = real.stat()
    except OSError as exc:
        raise _refuse(field, value, f"cannot be read ({exc.strerror or exc})", roots) from exc
    if stat.S_ISDIR(info.st_mode):
        raise _refuse(field, value, "is a directory, not a file", roots)
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(field, value, "is not a regular file (devices, pipes and sockets are refused)", roots)
    try:
        digest = file_sha256(real)
    except OSError as exc:
        raise _refuse(field, value, f"cannot be read ({exc.strerror or exc})", roots) from exc
    return MediaRef(original=value, path=real, sha256=digest, size=info.st_size)


def resolve_media(field: str, value: str, roots: tuple[Path, ...]) -> MediaRef:
    """A remote URL passes through unchanged; anything else must be a confined local file."""
    if is_remote(value):
        return MediaRef(original=value, url=value)
    return resolve_local(field, value, roots)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (local media, and a recovered video)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
