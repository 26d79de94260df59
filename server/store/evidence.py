"""Evidence on disk: what was sent, what came back, every poll, and the video.

Layout under OUTPUT_DIR (one folder per model family, named after the seed skills), sharded by
UTC day so no folder grows without bound (a day's work per folder, one folder per day):

    aliyun-emo/detect/<YYYYMMDD>/<UTC stamp>-<id>/request.json, response.json
    aliyun-emo/tasks/<YYYYMMDD>/<task_id>/request.json, submit.json, polls/0001-RUNNING.json,
                                          result.json, <task_id>.mp4

Every folder is recorded in the ledger (`evidence_dir`), and nothing is ever looked up by listing
folders, so older, flat folders (`tasks/<task_id>/`) stay valid as they are.

Files are written atomically (temp file + rename) so a crash never leaves half a JSON file, and
everything written passes `server.redaction.redact` (the API key, Authorization values, bearer
tokens), however it got there. Evidence holds signed URLs and what was sent: every folder made here
is 0700 and every file 0600, whatever the umask, and a folder something else made under OUTPUT_DIR
is narrowed to 0700 before a file is written into it (the video is downloaded into one).

Evidence is not flushed to disk (no fsync): the promise a call makes is its ledger row; the files are
in the page cache, visible to any reader, by the time the call answers. A detection costs few system
calls (it is on every detect's path): its day folder is walked once, then each detection makes one
folder and two files (open, write, close, rename each; no chmod where the umask cannot widen or
narrow the modes, which is read once).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from server.models import EVIDENCE_FOLDER, Family
from server.redaction import redact, register_secret

DIR_MODE = 0o700
PRIVATE_CACHE = 4096
FILE_MODE = 0o600
_UID = os.getuid() if hasattr(os, "getuid") else -1


def _read_umask() -> int:
    """The process umask, without changing it where the kernel reports it (Linux); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def private_dir(path: Path, base: Path) -> Path:
    """Make `path` and every missing folder between `base` and it with mode 0700 (not the umask's),
    and narrow to 0700 those below `base` that already exist wider (ours; `base` itself is left)."""
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return path
    current = base
    for part in parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            current.mkdir(mode=DIR_MODE)
        info = current.lstat()
        if stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) != DIR_MODE and info.st_uid == _UID:
            os.chmod(current, DIR_MODE)
    return path


class Evidence:
    def __init__(self, output_dir: Path, api_key: str | None) -> None:
        self.output_dir = output_dir
        register_secret(api_key)  # redacted everywhere from now on (results, ledger, logs) as well
        # Folders this process already made (or narrowed) to 0700: a write into one of them costs no
        # walk over its parents (every poll writes a file: this is the watcher's hot path).
        self._private: set[Path] = set()
        # With the umask read at start, whether mkdir(0700) and open(0600) give exactly those modes:
        # then no chmod is needed (a umask can only narrow them; one that would is rare, and chmod-ed).
        umask = _read_umask()
        self._exact_dirs = umask & DIR_MODE == 0
        self._exact_files = umask & FILE_MODE == 0

    def _private_dir(self, path: Path) -> Path:
        if path not in self._private:
            private_dir(path, self.output_dir)
            self._remember(path)
        return path

    def _remember(self, path: Path) -> None:
        if len(self._private) > PRIVATE_CACHE:
            self._private.clear()
        self._private.add(path)

    def family_dir(self, family: Family) -> Path:
        return self.output_dir / EVIDENCE_FOLDER[family]

    def new_detection_dir(self, family: Family) -> Path:
        return self.stamped_dir(family, "detect")

    def stamped_dir(self, family: Family, kind: str) -> Path:
        """A new folder `<kind>/<YYYYMMDD>/<UTC stamp>-<random>` (detections, submits, dry runs).

        The day folder is made (or narrowed) once per process and day; the new folder itself is one
        mkdir (its name is new: 32 random bits within the second)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = self._private_dir(self.family_dir(family) / kind / stamp[:8])
        path = day / f"{stamp}-{os.urandom(4).hex()}"
        try:
            os.mkdir(path, DIR_MODE)
        except FileNotFoundError:  # the day folder went away since it was made (removed by hand)
            self._private.discard(day)
            return self._private_dir(path)
        if not self._exact_dirs:
            os.chmod(path, DIR_MODE)
        self._remember(path)
        return path

    def task_path(self, family: Family, task_id: str) -> Path:
        """Where a task first seen now keeps its evidence (today's shard); the ledger remembers it."""
        day = time.strftime("%Y%m%d", time.gmtime())
        return self.family_dir(family) / "tasks" / day / _safe_name(task_id)

    def task_dir(self, family: Family, task_id: str) -> Path:
        """The task's folder, made (0700) if needed: the video is downloaded into it."""
        return self._private_dir(self.task_path(family, task_id))

    def pending_submit_dir(self, family: Family) -> Path:
        """Where a submit's request lives before a task id exists (kept if the outcome is unknown)."""
        return self.stamped_dir(family, "submits")

    def write_json(self, path: Path, data: Any) -> Path:
        return self.write_bytes(path, encode(data))

    def write_bytes(self, path: Path, data_bytes: bytes) -> Path:
        """Bytes from `encode` (already redacted) into `path`, atomically."""
        self._private_dir(path.parent)
        try:
            _atomic_write(path, data_bytes, exact=self._exact_files)
        except FileNotFoundError:  # the folder went away since it was made (removed by hand): make it again
            self._private.discard(path.parent)
            self._private_dir(path.parent)
            _atomic_write(path, data_bytes, exact=self._exact_files)
        return path

    def write_poll(self, task_dir: Path, number: int, status: str, data: Any) -> Path:
        return self.write_json(task_dir / "polls" / f"{number:04d}-{_safe_name(status)}.json", data)

    def open_detection(self, family: Family, files: dict[str, bytes], reserve: str) -> Opened:
        """A new detection folder with `files` (name -> bytes from `encode`) written, and the file
        `reserve` made but not yet filled (see `Opened`). Blocking: a detect runs this on a worker
        thread while its request is in flight, so creating the folder and files (the costly part of
        evidence: new inodes) costs the call nothing."""
        folder = self.new_detection_dir(family)
        for name, data in files.items():
            self.write_bytes(folder / name, data)
        tmp, fd = _create_temp(folder / reserve, exact=self._exact_files)
        return Opened(folder / reserve, tmp, fd)


class Opened:
    """A file created ahead of its content: `fill` writes it and renames it into place (a write, a
    close and a rename: no new inode on the caller's path); `drop` removes it unfilled."""

    def __init__(self, path: Path, tmp: str, fd: int) -> None:
        self.path = path
        self._tmp = tmp
        self._fd: int | None = fd

    @property
    def folder(self) -> Path:
        return self.path.parent

    def fill(self, data: Any) -> Path:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError(f"{self.path} was already filled or dropped")
        _finish(self._tmp, fd, self.path, encode(data))
        return self.path

    def drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            _discard(fd, self._tmp)


def encode(data: Any) -> bytes:
    """Evidence JSON as written: redacted, indented, sorted keys, UTF-8."""
    return redact(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True)).encode("utf-8")


def _safe_name(text: str) -> str:
    """Task ids are uuids upstream; anything else is reduced to a filename-safe form."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:128]
    return cleaned.strip(".") or "_"


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _atomic_write(path: Path, data: bytes, *, exact: bool = False) -> None:
    """`data` in a new temporary file beside `path` (0600), then renamed over it: four system calls
    (five when the umask makes `exact` false and the mode is set by hand); the rename keeps the mode."""
    _finish(*_create_temp(path, exact=exact), path, data)


def _create_temp(path: Path, *, exact: bool) -> tuple[str, int]:
    """A new, empty temporary file beside `path`, 0600 whatever the umask: (its name, an open fd)."""
    tmp = f"{path.parent}{os.sep}.{path.name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, _CREATE, FILE_MODE)
    if not exact:
        try:
            os.chmod(tmp, FILE_MODE)
        except BaseException:
            _discard(fd, tmp)
            raise
    return tmp, fd


def _finish(tmp: str, fd: int, path: Path, data: bytes) -> None:
    """Write `data` to the temporary file, close it and rename it to `path`; on failure it is removed."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _discard(fd: int, tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
