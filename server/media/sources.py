"""Where a media argument points: a public http(s) URL, or a local file inside the allowed roots.

A local path (or `file://` URI) is accepted only when, after resolving symlinks, it is a regular
file under one of `EMO_MCP_ALLOWED_ROOTS` (default: the working directory). Everything else — a
path outside, a `..` escape, a symlink leading out, a device, a directory, a file larger than
DashScope accepts — is refused with a message naming the roots, before anything is read or sent.

The file is then opened once, from its root, one component at a time and never through a link
(`open_confined`), and read once, bounded: a path swapped for a link after the check cannot lead
outside the roots, and every later use (hash, pre-flight, upload, viewer) gets those same bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.errors import ConfigError, RefusedInputError

ROOTS_VARIABLE = "EMO_MCP_ALLOWED_ROOTS"
HASH_CHUNK = 1024 * 1024
MB = 1024 * 1024
# The temporary storage's per-file limit (its upload policy's `max_file_size_mb`): no local file
# larger than this can reach DashScope, so none is read. Callers pass tighter per-kind limits.
MAX_LOCAL_BYTES = 100 * MB


@dataclass(frozen=True)
class MediaRef:
    """One resolved `image_url` / `audio_url` argument."""

    original: str  # exactly what the caller passed (shown back in results)
    url: str | None = None  # the http(s) URL, for remote media
    path: Path | None = None  # the resolved regular file, for local media
    sha256: str | None = None  # content hash of a local file
    size: int | None = None
    # A local file's content, read once when it was confined: nothing reads the path again.
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

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
        if parts.query or parts.fragment:
            raise ValueError("a file:// URI cannot carry a query or a fragment ('?' and '#' are written %3F, %23)")
        try:
            return Path(unquote(parts.path, errors="strict"))
        except UnicodeDecodeError as exc:
            raise ValueError("its percent-escapes are not UTF-8") from exc
    return Path(value).expanduser()


class ChangedWhileOpeningError(OSError):
    """A component of a checked path became a link (or another kind of file) before it was opened."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in a file's place must not block the open
_WALKS = os.open in os.supports_dir_fd and bool(_NOFOLLOW and _DIRECTORY)


def open_confined(path: Path, root: Path, expected: os.stat_result | None = None) -> int:
    """A read-only descriptor of `path` (fully resolved, inside the resolved `root`), opened one
    component at a time from `root` without following any link, so a path swapped after it was
    checked cannot lead the open outside `root`. With `expected` (the checked file's stat), the
    opened file must be that same file. Raises `ChangedWhileOpeningError` otherwise."""
    parts = path.relative_to(root).parts
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    # Without openat() the path is opened whole; the identity check below is then what catches a swap.
    fd = _walk_open(parts, root, path) if _WALKS else os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    if expected is not None:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
            os.close(fd)
            raise ChangedWhileOpeningError(errno.ESTALE, "another file took its place", str(path))
    return fd


def _walk_open(parts: tuple[str, ...], root: Path, path: Path) -> int:
    fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise ChangedWhileOpeningError(exc.errno, "a link or another file took its place", str(path)) from exc
        raise
    finally:
        os.close(fd)


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd` (a file that grows after its size was checked stays bounded)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0 and (chunk := os.read(fd, min(left, HASH_CHUNK))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def resolve_local(
    field: str,
    value: str,
    roots: tuple[Path, ...],
    *,
    max_bytes: int = MAX_LOCAL_BYTES,
    before_open: Callable[[Path], None] | None = None,
) -> MediaRef:
    """Confine a local path to the roots, after symlinks, and read it once: the bytes hashed here are
    the ones pre-flight checks, the upload sends and the viewer shows. Nothing is read from a file
    larger than `max_bytes`. `before_open` runs between the check and the open (tests swap the file
    there, to prove a swap cannot lead outside the roots)."""
    if not roots:
        raise _refuse(field, value, "is a local file but no allowed roots are configured", roots)
    try:
        candidate = local_path_of(value)
    except ValueError as exc:
        raise _refuse(field, value, f"is not usable: {exc}", roots) from exc
    if "\x00" in value or "\x00" in str(candidate):
        raise _refuse(field, value, "contains a NUL character", roots)
    # Relative paths are taken from the first root (the working directory by default).
    joined = candidate if candidate.is_absolute() else roots[0] / candidate
    if ".." in joined.parts:
        raise _refuse(field, value, "contains '..' (path traversal is not allowed)", roots)
    try:
        real = joined.resolve(strict=True)
    except FileNotFoundError as exc:
        raise _refuse(field, value, f"is not an http(s) URL and no file exists at {joined}", roots) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise _refuse(field, value, f"cannot be resolved ({exc})", roots) from exc
    root = next((root for root in roots if real.is_relative_to(root)), None)
    if root is None:
        shown = f"resolves to {real}, which is" if real != joined else "is"
        raise _refuse(field, value, f"{shown} outside the allowed roots", roots)
    try:
        checked = real.stat()
        _check_kind(field, value, roots, checked)  # devices are refused before any open
        if before_open is not None:
            before_open(real)
        fd = open_confined(real, root, checked)
    except ChangedWhileOpeningError as exc:
        raise _refuse(
            field,
            value,
            "changed while it was being opened (a link or another file took its place); nothing was read",
            roots,
        ) from exc
    except IsADirectoryError as exc:
        raise _refuse(field, value, "is a directory, not a file", roots) from exc
    except OSError as exc:
        raise _refuse(field, value, f"cannot be read ({exc.strerror or exc})", roots) from exc
    try:
        info = os.fstat(fd)
        _check_kind(field, value, roots, info)
        if info.st_size > max_bytes:
            raise _too_large(field, value, info.st_size, max_bytes)
        data = read_at_most(fd, max_bytes + 1)
    except OSError as exc:
        raise _refuse(field, value, f"cannot be read ({exc.strerror or exc})", roots) from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _too_large(field, value, len(data), max_bytes, at_least=True)
    return MediaRef(original=value, path=real, sha256=hashlib.sha256(data).hexdigest(), size=len(data), data=data)


def _check_kind(field: str, value: str, roots: tuple[Path, ...], info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise _refuse(field, value, "is a directory, not a file", roots)
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(field, value, "is not a regular file (devices, pipes and sockets are refused)", roots)


def _too_large(field: str, value: str, size: int, limit: int, *, at_least: bool = False) -> RefusedInputError:
    # `at_least`: the file grew past the limit while it was read (only limit + 1 bytes were).
    amount = f"more than {limit / MB:.1f}" if at_least else f"{size / MB:.1f}"
    unread = "" if at_least else "; the file was not read"
    return RefusedInputError(
        f"{field} {value!r} is {amount} MB, over the {limit / MB:g} MB this server accepts for it "
        f"(DashScope's own limit). Use a smaller file (re-encode or resize it). Nothing was sent{unread}."
    )


def resolve_media(field: str, value: str, roots: tuple[Path, ...], *, max_bytes: int = MAX_LOCAL_BYTES) -> MediaRef:
    """A remote URL passes through unchanged; anything else must be a confined local file."""
    if is_remote(value):
        return MediaRef(original=value, url=value)
    return resolve_local(field, value, roots, max_bytes=max_bytes)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (local media, and a recovered video)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
