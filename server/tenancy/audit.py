"""The audit trail of paid calls (issue 15): who spent what, and who was refused, one JSON line each.

When many people share one server, the operator must be able to answer "who ran this bill up?" from
a record that does not depend on the ledger (which a bug could rewrite) and that holds no secret (it
is read with ordinary tools and shipped to log stores). So: a plain append-only file
(`EMO_MCP_AUDIT_LOG`), one line per paid call (detect or generate) and per refusal of one, every
string through the project's one redaction, rotated by size so it never fills the disk.

Several worker processes on one host append to the same file. Each line is one `os.write` on an
`O_APPEND` descriptor, made while holding an exclusive `flock` on a sidecar lock file; under that lock
a writer re-checks the live file's size, rotates it when the line would not fit, and reopens its own
descriptor if another process rotated the file away from under it. Lines are therefore never torn,
interleaved or written into a file that rotation is about to drop.

The trail must never cost a paid call: a failing disk is logged once per burst of failures and
counted in `failures`, and `record` returns as if all went well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from server.redaction import redact

if sys.platform != "win32":
    import fcntl

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
# Below PIPE_BUF (4096 on Linux): one write of a line this size is atomic even where O_APPEND alone
# is relied on (a reader tailing the file, a filesystem where flock is advisory only).
MAX_LINE_BYTES = 4000

Value = str | float | int | bool | None
_FIELDS = ("time", "tenant", "tool", "outcome", "task_id", "estimate_cny", "cost_cny", "request_id", "reason")
_ELLIPSIS = "…"


class Audit(Protocol):
    """What the tools call: an `AuditLog` in tenant mode, a `NoAudit` for one user over stdio."""

    def record(
        self,
        *,
        tenant: str,
        tool: str,
        outcome: str,
        task_id: str | None = None,
        estimate_cny: float | None = None,
        cost_cny: float | None = None,
        request_id: str | None = None,
        reason: str | None = None,
        **extra: Value,
    ) -> None: ...

    def close(self) -> None: ...


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Value) -> Value:
    """A value as it may be written: strings redacted, NaN and infinities as text (JSON has neither)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _dumps(fields: dict[str, Value]) -> bytes:
    return (json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def _fit(fields: dict[str, Value]) -> bytes:
    """The line, cut below MAX_LINE_BYTES: the reason first (the only long text expected), then the
    longest other strings, then the extra fields; a cut line says `"truncated":true`."""
    line = _dumps(fields)
    if len(line) < MAX_LINE_BYTES:
        return line
    fields["truncated"] = True
    while len(line := _dumps(fields)) >= MAX_LINE_BYTES:
        texts = [key for key, value in fields.items() if isinstance(value, str) and value and key != "time"]
        if not texts:
            break
        key = "reason" if "reason" in texts else max(texts, key=lambda name: len(str(fields[name])))
        text = str(fields[key])
        # Cut in proportion to the bytes the text takes in the line (escapes included), leaving room for the
        # mark; a pass that misjudges only leaves the next one less to do, as every pass shortens a string.
        size = len(_dumps({key: text})) - len(_dumps({key: ""}))
        room = size - (len(line) - MAX_LINE_BYTES + 1) - len(_ELLIPSIS.encode())
        keep = min(len(text) - 1, len(text) * room // size)
        fields[key] = text[:keep] + _ELLIPSIS if keep > 0 else ""
    if len(line) >= MAX_LINE_BYTES:  # thousands of numeric extras: keep what says who, what and why
        line = _dumps({key: value for key, value in fields.items() if key in _FIELDS or key == "truncated"})
    return line


class AuditLog:
    """Appends audit lines to `path`, rotating `path` -> `path.1` -> ... `path.<backups>` by size."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"max_bytes must be positive and backups not negative, got {max_bytes}, {backups}")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.failures = 0
        self._clock = clock
        self._lock_path = path.with_name(path.name + ".lock")
        # One thread at a time per process: flock excludes other open files, not threads sharing this one.
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        self._failing = False
        try:
            self._make_folder()
        except OSError as exc:
            # Not fatal here either: `record` tries again (and counts its lost lines), so a folder mounted late works.
            self._failed(exc, lost=False)

    def record(
        self,
        *,
        tenant: str,
        tool: str,
        outcome: str,
        task_id: str | None = None,
        estimate_cny: float | None = None,
        cost_cny: float | None = None,
        request_id: str | None = None,
        reason: str | None = None,
        **extra: Value,
    ) -> None:
        """Append one line; fields that are None are left out, every string is redacted.

        An extra field named like a fixed one is written as `extra.<name>`: it may not overwrite them."""
        fields: dict[str, Value] = {
            "time": _timestamp(self._clock()),
            "tenant": tenant,
            "tool": tool,
            "outcome": outcome,
            "task_id": task_id,
            "estimate_cny": estimate_cny,
            "cost_cny": cost_cny,
            "request_id": request_id,
            "reason": reason,
        }
        for key, value in extra.items():
            fields[f"extra.{key}" if key in _FIELDS else key] = value
        line = _fit({key: _clean(value) for key, value in fields.items() if value is not None})
        with self._mutex:
            try:
                self._append(line)
            except OSError as exc:
                self._close_files()  # reopened next time: the folder may be back, the disk freed
                self._failed(exc)
                return
        if self._failing:
            self._failing = False
            logger.warning("The audit log %s is written again (after %d failed lines in all)", self.path, self.failures)

    def close(self) -> None:
        """Close the files; a later `record` opens them again (so closing at shutdown loses nothing)."""
        with self._mutex:
            self._close_files()

    def _append(self, line: bytes) -> None:
        if self._pid != os.getpid():
            # A forked child shares the parent's open files, and with them the parent's flock: open its own.
            self._close_files()
            self._pid = os.getpid()
        if self._lock_fd is None:
            self._make_folder()
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock(True)
        try:
            try:
                live = os.stat(self.path)
            except FileNotFoundError:
                live = None
            if live is not None and live.st_size > 0 and live.st_size + len(line) > self.max_bytes:
                self._rotate()
                live = None
            if self._fd is not None and live is not None:
                mine = os.fstat(self._fd)
                if (mine.st_dev, mine.st_ino) != (live.st_dev, live.st_ino):
                    self._close_fd()  # another process rotated: this descriptor writes into a backup
            elif self._fd is not None:
                self._close_fd()
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes (the disk is full?)")
        finally:
            self._lock(False)

    def _rotate(self) -> None:
        """Shift the backups up by one (the oldest drops off), then move the live file to `.1`."""
        if self.backups == 0:
            os.unlink(self.path)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            try:
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            except FileNotFoundError:
                continue
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _lock(self, exclusive: bool) -> None:
        if sys.platform != "win32" and self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_UN)

    def _make_folder(self) -> None:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _close_files(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None

    def _failed(self, exc: OSError, *, lost: bool = True) -> None:
        self.failures += lost
        if not self._failing:
            self._failing = True
            logger.error(
                "The audit log %s cannot be written (%s); paid calls go on, and their lines are lost until it can",
                self.path,
                exc,
            )


class NoAudit:
    """The audit of one user over stdio: nothing to keep apart, so nothing is written."""

    failures = 0

    def record(
        self,
        *,
        tenant: str,
        tool: str,
        outcome: str,
        task_id: str | None = None,
        estimate_cny: float | None = None,
        cost_cny: float | None = None,
        request_id: str | None = None,
        reason: str | None = None,
        **extra: Value,
    ) -> None:
        """Nothing: stdio serves one person, whose own ledger already says what they spent."""

    def close(self) -> None:
        """Nothing to close."""
