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
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from server.models import EVIDENCE_FOLDER, Family
from server.redaction import redact, register_secret

DIR_MODE = 0o700
PRIVATE_CACHE = 4096
FILE_MODE = 0o600
_UID = os.getuid() if hasattr(os, "getuid") else -1


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

    def _private_dir(self, path: Path) -> Path:
        if path not in self._private:
            private_dir(path, self.output_dir)
            if len(self._private) > PRIVATE_CACHE:
                self._private.clear()
            self._private.add(path)
        return path

    def family_dir(self, family: Family) -> Path:
        return self.output_dir / EVIDENCE_FOLDER[family]

    def new_detection_dir(self, family: Family) -> Path:
        return self.stamped_dir(family, "detect")

    def stamped_dir(self, family: Family, kind: str) -> Path:
        """A new folder `<kind>/<YYYYMMDD>/<UTC stamp>-<random>` (detections, submits, dry runs)."""
        now = time.gmtime()
        path = self.family_dir(family) / kind / time.strftime("%Y%m%d", now)
        return self._private_dir(path / f"{time.strftime('%Y%m%dT%H%M%SZ', now)}-{uuid.uuid4().hex[:8]}")

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
        text = redact(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True))
        self._private_dir(path.parent)
        try:
            _atomic_write(path, text.encode("utf-8"))
        except FileNotFoundError:  # the folder went away since it was made (removed by hand): make it again
            self._private.discard(path.parent)
            self._private_dir(path.parent)
            _atomic_write(path, text.encode("utf-8"))
        return path

    def write_poll(self, task_dir: Path, number: int, status: str, data: Any) -> Path:
        return self.write_json(task_dir / "polls" / f"{number:04d}-{_safe_name(status)}.json", data)


def _safe_name(text: str) -> str:
    """Task ids are uuids upstream; anything else is reduced to a filename-safe form."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:128]
    return cleaned.strip(".") or "_"


def _atomic_write(path: Path, data: bytes) -> None:
    # mkstemp creates the file 0600 whatever the umask; the rename keeps that mode.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
