"""The ledger's view of a task, as the `tasks://` resources and the `status` command show it, and the
signed links to finished videos (`VideoLinks`) that views and `task_status` hand out.

Read-only and local: building a view never asks DashScope. The signed `video_url` is left out
(it is a bearer link and expires anyway); `video_path` is where the video lives, and `video_link`
(HTTP servers with `EMO_MCP_PUBLIC_URL` and `EMO_MCP_LINK_SECRET`) where anyone holding it can fetch it
from the workers until it expires, counted from the moment the view is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.config import Settings
from server.pricing import PriceTable, actual_cost
from server.store.ledger import Ledger, TaskRecord
from server.store.spend import estimate_of
from server.tenancy.links import LinkSigner

RECENT_LIMIT = 20
# The name a single-user server's links carry where a tenant's name would be.
IMPLICIT_TENANT = "default"


class VideoLinks:
    """Signed links to one tenant's downloaded videos (none unless links are configured)."""

    def __init__(self, settings: Settings) -> None:
        self._tenant = settings.tenant or IMPLICIT_TENANT
        self._signer = (
            LinkSigner(settings.link_secret, settings.public_url, settings.link_ttl)
            if settings.public_url is not None and settings.link_secret is not None
            else None
        )

    def of(self, record: TaskRecord) -> str | None:
        if self._signer is None or record.status != "SUCCEEDED" or not record.video_path:
            return None
        return self._signer.link(self._tenant, record.task_id, Path(record.video_path).name)


def task_view(
    record: TaskRecord, ledger: Ledger, prices: PriceTable, links: VideoLinks | None = None
) -> dict[str, Any]:
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
        "video_link": links.of(record) if links is not None else None,
        "video_bytes": record.video_bytes,
        "video_sha256": record.video_sha256,
        "code": record.code,
        "message": record.message,
        "request_id": record.request_id,
        "evidence_dir": record.evidence_dir,
    }


def recent_views(
    ledger: Ledger, prices: PriceTable, links: VideoLinks | None = None, limit: int = RECENT_LIMIT
) -> list[dict[str, Any]]:
    """Newest first."""
    return [task_view(record, ledger, prices, links) for record in ledger.tasks(limit=limit)]
