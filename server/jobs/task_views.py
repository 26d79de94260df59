"""The ledger's view of a task, as the `tasks://` resources and the `status` command show it.

Read-only and local: building a view never asks DashScope. The signed `video_url` is left out
(it is a bearer link and expires anyway); `video_path` is where the video lives.
"""

from __future__ import annotations

from typing import Any

from server.pricing import PriceTable, actual_cost
from server.store.ledger import Ledger, TaskRecord
from server.store.spend import estimate_of

RECENT_LIMIT = 20


def task_view(record: TaskRecord, ledger: Ledger, prices: PriceTable) -> dict[str, Any]:
    usage = record.usage or {}
    duration = usage.get("video_duration")
    return {
        "task_id": record.task_id,
        "family": record.family,
        "model": record.model,
        "status": record.status,
        "finished": record.finished,
        "ratio": record.ratio,
        "submit_time": record.submit_time,
        "end_time": record.end_time,
        "billed_seconds": float(duration) if isinstance(duration, int | float) else None,
        "estimated_cost_cny": estimate_of(ledger, record.task_id),
        # From usage.video_duration once the task has finished; null before.
        "cost_cny": actual_cost(prices, record.family, record.usage),
        "video_path": record.video_path,
        "video_bytes": record.video_bytes,
        "video_sha256": record.video_sha256,
        "code": record.code,
        "message": record.message,
        "request_id": record.request_id,
        "evidence_dir": record.evidence_dir,
    }


def recent_views(ledger: Ledger, prices: PriceTable, limit: int = RECENT_LIMIT) -> list[dict[str, Any]]:
    """Newest first."""
    return [task_view(record, ledger, prices) for record in ledger.tasks(limit=limit)]
