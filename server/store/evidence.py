"""Evidence on disk: what was sent, what came back, every poll, and the video.

Layout under OUTPUT_DIR (one folder per model family, named after the seed skills), sharded by
UTC day so no folder grows without bound (a day's work per folder, one folder per day):

    aliyun-emo/detect/<YYYYMMDD>/<UTC stamp>-<id>/request.json, response.json
    aliyun-emo/tasks/<YYYYMMDD>/<task_id>/request.json, submit.json, polls/0001-RUNNING.json,
                                          result.json, <task_id>.mp4

Every folder is recorded in the ledger (`evidence_dir`), and nothing is ever looked up by listing
folders, so older, flat folders (`tasks/<task_id>/`) stay valid as they are.

Files are written atomically (temp file + rename) so a crash never leaves half a JSON file,
and the API key is scrubbed from anything written, however it got there.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from server.models import EVIDENCE_FOLDER, Family

REDACTED = "***"


class Evidence:
    def __init__(self, output_dir: Path, api_key: str | None) -> None:
        self.output_dir = output_dir
        self._api_key = api_key

    def family_dir(self, family: Family) -> Path:
        return self.output_dir / EVIDENCE_FOLDER[family]

    def new_detection_dir(self, family: Family) -> Path:
        return self.stamped_dir(family, "detect")

    def stamped_dir(self, family: Family, kind: str) -> Path:
        """A new folder `<kind>/<YYYYMMDD>/<UTC stamp>-<random>` (detections, submits, dry runs)."""
        now = time.gmtime()
        path = self.family_dir(family) / kind / time.strftime("%Y%m%d", now)
        path = path / f"{time.strftime('%Y%m%dT%H%M%SZ', now)}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def task_path(self, family: Family, task_id: str) -> Path:
        """Where a task first seen now keeps its evidence (today's shard); the ledger remembers it."""
        day = time.strftime("%Y%m%d", time.gmtime())
        return self.family_dir(family) / "tasks" / day / _safe_name(task_id)

    def task_dir(self, family: Family, task_id: str) -> Path:
        path = self.task_path(family, task_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pending_submit_dir(self, family: Family) -> Path:
        """Where a submit's request lives before a task id exists (kept if the outcome is unknown)."""
        return self.stamped_dir(family, "submits")

    def write_json(self, path: Path, data: Any) -> Path:
        text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True)
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, REDACTED)
        _atomic_write(path, text.encode("utf-8"))
        return path

    def write_poll(self, task_dir: Path, number: int, status: str, data: Any) -> Path:
        return self.write_json(task_dir / "polls" / f"{number:04d}-{_safe_name(status)}.json", data)


def _safe_name(text: str) -> str:
    """Task ids are uuids upstream; anything else is reduced to a filename-safe form."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:128]
    return cleaned.strip(".") or "_"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
