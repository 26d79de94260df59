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

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.models import EVIDENCE_FOLDER, Family
from server.redaction import redact, register_secret

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
PRIVATE_CACHE = 4096
FILE_MODE = 0o600
# Detection folders made ahead per family (see `Evidence.open_detection`), and the files each holds.
SPARES = 2
SPARE_DELAY = 0.01
SPARE_FILES = ("request.json", "response.json")
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
        self._spares = _Spares(self._make_spare)

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
        `reserve` made but not yet filled (see `Opened`).

        New inodes are what evidence costs on a busy disk (a mkdir or a file creation can take half a
        millisecond; a rename or a write a few tens of microseconds), so the folder and its files are
        taken from a spare made ahead while the loop is idle (`SPARES`), renamed into place; without one
        (the first detection of a family in this process, or a burst) they are made here. A detect
        calls this while its request is in flight."""
        spare = self._spares.take(family)
        try:
            if spare is not None:
                try:
                    return self._open_spare(spare, family, files, reserve)
                except FileNotFoundError:  # the spare (or its day folder) was removed by hand: make one here
                    spare.discard()
            folder = self.new_detection_dir(family)
            for name, data in files.items():
                self.write_bytes(folder / name, data)
            tmp, fd = _create_temp(folder / reserve, exact=self._exact_files)
            return Opened(folder / reserve, tmp, fd)
        finally:
            self._spares.refill_later(family, self._spare_day(family))

    def _spare_day(self, family: Family) -> Path:
        return self.family_dir(family) / "detect" / time.strftime("%Y%m%d", time.gmtime())

    def _open_spare(self, spare: _Spare, family: Family, files: dict[str, bytes], reserve: str) -> Opened:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = self._private_dir(self.family_dir(family) / "detect" / stamp[:8])
        folder = day / f"{stamp}-{os.urandom(4).hex()}"
        os.rename(spare.folder, folder)  # the spare's files (and their open descriptors) move with it
        spare.folder = str(folder)
        self._remember(folder)
        for name, data in files.items():
            taken = spare.take(name)
            if taken is None:
                self.write_bytes(folder / name, data)
            else:
                _finish(*taken, folder / name, data)
        taken = spare.take(reserve)
        if taken is None:
            taken = _create_temp(folder / reserve, exact=self._exact_files)
        spare.discard()  # files it held that this detection did not need
        return Opened(folder / reserve, *taken)

    def _make_spare(self, day: Path) -> _Spare:
        """A hidden folder in `day` with an empty temporary file per detection file, all private;
        renamed into place by `_open_spare`."""
        self._private_dir(day)
        folder = f"{day}{os.sep}.spare-{os.urandom(6).hex()}"
        os.mkdir(folder, DIR_MODE)
        if not self._exact_dirs:
            os.chmod(folder, DIR_MODE)
        spare = _Spare(folder)
        try:
            for name in SPARE_FILES:
                spare.files[name] = _create_temp(Path(folder) / name, exact=self._exact_files)
        except BaseException:
            spare.discard()
            raise
        return spare


class _Spare:
    """A detection folder made ahead: its path and, per file name, an empty temporary file (name, fd)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.files: dict[str, tuple[str, int]] = {}

    def take(self, name: str) -> tuple[str, int] | None:
        """The temporary file for `name`, at the folder's present path."""
        held = self.files.pop(name, None)
        if held is None:
            return None
        return f"{self.folder}{os.sep}{os.path.basename(held[0])}", held[1]

    def discard(self) -> None:
        """Close and remove what is left; the folder too when it is still a spare (never renamed)."""
        for name in list(self.files):
            taken = self.take(name)
            assert taken is not None
            _discard(taken[1], taken[0])
        if os.path.basename(self.folder).startswith(".spare-"):
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)


class _Spares:
    """Spare detection folders per family, at most `SPARES` ready, made on the event loop `SPARE_DELAY`
    seconds after a detection took one (its answer is out by then, and the loop is idle between calls;
    a worker thread would cost the next call its GIL hand-offs). Without a running asyncio loop (a
    script) none is made. A failure to make one is logged (the detection that finds none makes its
    folder itself, and a failure there is its error); spares left at exit are removed."""

    def __init__(self, make: Callable[[Path], _Spare]) -> None:
        self._make = make
        self._ready: dict[str, list[_Spare]] = {}
        self._due: set[str] = set()
        weakref.finalize(self, _Spares._close, self._ready)

    def take(self, family: str) -> _Spare | None:
        ready = self._ready.get(family)
        return ready.pop() if ready else None

    def refill_later(self, family: str, day: Path) -> None:
        if family in self._due or len(self._ready.get(family, ())) >= SPARES:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._due.add(family)
        loop.call_later(SPARE_DELAY, self._refill, family, day)

    def _refill(self, family: str, day: Path) -> None:
        self._due.discard(family)
        ready = self._ready.setdefault(family, [])
        try:
            while len(ready) < SPARES:
                ready.append(self._make(day))
        except Exception:
            logger.exception("a spare detection folder could not be made in %s (detections make their own)", day)

    @staticmethod
    def _close(ready: dict[str, list[_Spare]]) -> None:
        spares = [spare for family in ready.values() for spare in family]
        ready.clear()
        for spare in spares:
            spare.discard()


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
