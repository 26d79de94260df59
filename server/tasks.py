"""Following a task to its end: poll, snapshot every answer, download a finished video at once.

The task id and the result URL expire 24 h after the task ends, so the video is downloaded on the
first poll that sees SUCCEEDED; after that the ledger answers without asking upstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from server.config import Settings
from server.dashscope import DashScopeClient
from server.errors import EmoMcpError, TaskNotFoundError
from server.evidence import Evidence
from server.ledger import TERMINAL_STATUSES, Ledger, TaskRecord
from server.models import Family
from server.results import TaskStatus

logger = logging.getLogger(__name__)

Progress = Callable[[float, float, str], Awaitable[None]]

UNKNOWN_MESSAGE = (
    "DashScope does not know this task: the id is wrong, or the task ended more than 24 hours ago "
    "(task ids expire then)."
)


def _video_url(output: dict[str, Any]) -> str | None:
    """emo-v1 puts it in output.results.video_url, emoji-v1 directly in output.video_url."""
    results = output.get("results")
    if isinstance(results, dict) and isinstance(results.get("video_url"), str):
        return str(results["video_url"])
    url = output.get("video_url")
    return url if isinstance(url, str) else None


def _infer_family(body: dict[str, Any]) -> Family:
    """For a task another process submitted before the ledger knew it."""
    output = body.get("output") or {}
    usage = body.get("usage") or {}
    if isinstance(output.get("results"), dict) or usage.get("video_ratio") in {"1:1", "3:4"}:
        return "emo"
    return "emoji"


class TaskTracker:
    def __init__(self, settings: Settings, client: DashScopeClient, ledger: Ledger, evidence: Evidence) -> None:
        self._settings = settings
        self._client = client
        self._ledger = ledger
        self._evidence = evidence
        self._locks: dict[str, anyio.Lock] = {}

    def _lock(self, task_id: str) -> anyio.Lock:
        return self._locks.setdefault(task_id, anyio.Lock())

    async def status(self, task_id: str, wait_seconds: float = 0, progress: Progress | None = None) -> TaskStatus:
        """Poll until the task ends (video on disk) or `wait_seconds` run out."""
        started = time.monotonic()
        download_error: str | None = None
        while True:
            record, download_error = await self._refresh(task_id)
            if self._settled(record):
                break
            remaining = wait_seconds - (time.monotonic() - started)
            if remaining <= 0:
                break
            if progress is not None:
                elapsed = time.monotonic() - started
                await progress(elapsed, float(wait_seconds), f"{record.status}: waited {elapsed:.0f}s")
            await anyio.sleep(min(self._settings.poll_interval, remaining))
        return self.to_result(record, download_error)

    @staticmethod
    def _settled(record: TaskRecord) -> bool:
        return record.finished and not (record.status == "SUCCEEDED" and not record.video_path)

    async def _refresh(self, task_id: str) -> tuple[TaskRecord, str | None]:
        """One step: answer from the ledger when settled, else poll (and download) under a lock."""
        async with self._lock(task_id):
            record = self._ledger.get_task(task_id)
            if record is not None and self._settled(record) and _video_present(record):
                return record, None
            if record is None or not record.finished:
                record = await self._poll(task_id, record)
            if record.status == "SUCCEEDED" and not _video_present(record):
                return await self._download(record)
            return record, None

    async def _poll(self, task_id: str, record: TaskRecord | None) -> TaskRecord:
        body = await self._client.get_task(task_id)
        output = body.get("output") if isinstance(body.get("output"), dict) else {}
        assert isinstance(output, dict)
        status = str(output.get("task_status") or "UNKNOWN")
        if record is None:
            if status == "UNKNOWN":
                raise TaskNotFoundError(
                    f"Task {task_id} is not in this server's ledger and {UNKNOWN_MESSAGE} "
                    "Use the task_id returned by emo_generate or emoji_generate."
                )
            record = self._adopt(task_id, body)
        polls = record.polls + 1
        self._evidence.write_poll(Path(record.evidence_dir), polls, status, body)
        fields: dict[str, Any] = {"status": status, "polls": polls}
        for name in ("submit_time", "scheduled_time", "end_time"):
            if output.get(name):
                fields[name] = str(output[name])
        if status == "SUCCEEDED":
            fields["video_url"] = _video_url(output)
            fields["usage"] = body.get("usage") if isinstance(body.get("usage"), dict) else None
        elif status in {"FAILED", "CANCELED"}:
            fields["code"] = str(output.get("code") or status)
            fields["message"] = str(output.get("message") or "")
        elif status == "UNKNOWN":
            fields["code"], fields["message"] = "UNKNOWN", UNKNOWN_MESSAGE
        self._ledger.update_task(task_id, **fields)
        updated = self._ledger.get_task(task_id)
        assert updated is not None
        if status in TERMINAL_STATUSES:
            self._evidence.write_json(Path(updated.evidence_dir) / "result.json", body)
        return updated

    def _adopt(self, task_id: str, body: dict[str, Any]) -> TaskRecord:
        family = _infer_family(body)
        evidence_dir = self._evidence.task_dir(family, task_id)
        model = "emo-v1" if family == "emo" else "emoji-v1"
        self._ledger.add_task(
            task_id=task_id,
            family=family,
            model=model,
            payload={},
            ratio=None,
            status="PENDING",
            request_id=None,
            evidence_dir=str(evidence_dir),
        )
        record = self._ledger.get_task(task_id)
        assert record is not None
        return record

    async def _download(self, record: TaskRecord) -> tuple[TaskRecord, str | None]:
        if not record.video_url:
            self._ledger.update_task(record.task_id, message="SUCCEEDED without a video_url")
            return record, "DashScope reported SUCCEEDED without a video_url."
        destination = Path(record.evidence_dir) / f"{Path(record.evidence_dir).name}.mp4"
        try:
            got = await self._client.download(record.video_url, destination)
        except EmoMcpError as exc:
            logger.warning("download of task %s failed: %s", record.task_id, exc)
            return record, str(exc)
        self._ledger.update_task(
            record.task_id, video_path=str(got.path), video_sha256=got.sha256, video_bytes=got.size
        )
        updated = self._ledger.get_task(record.task_id)
        assert updated is not None
        return updated, None

    def to_result(self, record: TaskRecord, download_error: str | None = None) -> TaskStatus:
        return TaskStatus(
            sandbox=self._settings.sandbox,
            task_id=record.task_id,
            task_status=record.status,
            finished=record.finished,
            model=record.model,
            submit_time=record.submit_time,
            scheduled_time=record.scheduled_time,
            end_time=record.end_time,
            video_url=record.video_url,
            video_path=record.video_path,
            video_sha256=record.video_sha256,
            video_bytes=record.video_bytes,
            usage=record.usage,
            code=record.code,
            message=record.message,
            download_error=download_error,
            evidence_dir=record.evidence_dir,
        )


def _video_present(record: TaskRecord) -> bool:
    return record.status != "SUCCEEDED" or bool(record.video_path and Path(record.video_path).is_file())
