"""What was spent today: estimated and actual cost of detections and tasks, from the ledger.

Estimates are recorded at submit (this module's own table in the ledger file); actual costs come
from each finished task's `usage.video_duration`. "Today" is the server's local calendar day.
Served as the `spend://today` resource (`tools/resources.py`) and by the `doctor` command.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from server.pricing import PriceTable, actual_cost
from server.store.ledger import DEAD_STATUSES, Ledger

SPEND_URI = "spend://today"
# Tasks that will never be billed (failed, cancelled, never created): their estimate is not spend.
_DEAD_MARKS = ",".join("?" * len(DEAD_STATUSES))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend_estimates (
    task_id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    estimated_cny REAL NOT NULL,
    basis TEXT,
    created_at REAL NOT NULL
);
"""


def record_estimate(ledger: Ledger, task_id: str, family: str, estimated_cny: float, basis: str) -> None:
    ledger.ensure_schema(_SCHEMA)
    ledger.execute(
        "INSERT OR REPLACE INTO spend_estimates (task_id, family, estimated_cny, basis, created_at) VALUES (?,?,?,?,?)",
        (task_id, family, estimated_cny, basis, time.time()),
    )


def estimate_of(ledger: Ledger, task_id: str) -> float | None:
    ledger.ensure_schema(_SCHEMA)
    rows = ledger.query("SELECT estimated_cny FROM spend_estimates WHERE task_id = ?", (task_id,))
    return float(rows[0]["estimated_cny"]) if rows else None


@dataclass(frozen=True)
class SpendToday:
    day: str
    detections: int
    detect_cny: float
    tasks: int
    estimated_cny: float  # sum of the estimates of tasks submitted today
    actual_cny: float  # sum of the billed durations of today's tasks that finished
    unfinished_tasks: int
    total_cny: float  # detections + actual where known, else the estimate

    def line(self) -> str:
        return (
            f"spend {self.day}: {self.total_cny:.4f} CNY (detections {self.detections} = {self.detect_cny:.4f}, "
            f"tasks {self.tasks}: estimated {self.estimated_cny:.4f}, actual {self.actual_cny:.4f}, "
            f"{self.unfinished_tasks} unfinished)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spend_today(ledger: Ledger, prices: PriceTable | None = None, now: float | None = None) -> SpendToday:
    """Sum today's detections (per-image price) and tasks (estimate at submit, actual when finished)."""
    prices = prices or PriceTable()
    ledger.ensure_schema(_SCHEMA)
    moment = datetime.fromtimestamp(time.time() if now is None else now)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    end = start + 86400
    detect_rows = ledger.query(
        "SELECT family, COUNT(*) AS n FROM detections WHERE created_at >= ? AND created_at < ? GROUP BY family",
        (start, end),
    )
    detections = sum(int(row["n"]) for row in detect_rows)
    detect_cny = sum(int(row["n"]) * prices.detect(str(row["family"])).cny for row in detect_rows)
    # Aggregated by SQLite over the indexed day range (tasks_by_created), a row per kind of task, so
    # the cost follows the number of kinds, not of tasks (a busy day holds thousands).
    groups = ledger.query(
        "SELECT t.family AS family, json_extract(t.usage, '$.video_ratio') AS ratio,"  # noqa: S608 (no user text)
        " COALESCE(json_type(t.usage, '$.video_duration') IN ('integer', 'real'), 0) AS billed,"
        f" t.status IN ({_DEAD_MARKS}) AS dead, COUNT(*) AS n,"
        " SUM(COALESCE(e.estimated_cny, 0)) AS estimated,"
        " SUM(CASE WHEN json_type(t.usage, '$.video_duration') IN ('integer', 'real')"
        " THEN json_extract(t.usage, '$.video_duration') ELSE 0 END) AS seconds"
        " FROM tasks t LEFT JOIN spend_estimates e ON e.task_id = t.task_id"
        " WHERE t.created_at >= ? AND t.created_at < ? GROUP BY 1, 2, 3, 4",
        (*sorted(DEAD_STATUSES), start, end),
    )
    estimated = actual = total = 0.0
    unfinished = tasks = 0
    for row in groups:
        tasks += int(row["n"])
        estimated += float(row["estimated"] or 0.0)
        if row["billed"]:
            usage = {"video_duration": float(row["seconds"] or 0.0), "video_ratio": row["ratio"]}
            cost = actual_cost(prices, str(row["family"]), usage) or 0.0
            actual += cost
            total += cost
        elif not row["dead"]:
            unfinished += int(row["n"])
            total += float(row["estimated"] or 0.0)
    return SpendToday(
        day=moment.strftime("%Y-%m-%d"),
        detections=detections,
        detect_cny=round(detect_cny, 4),
        tasks=tasks,
        estimated_cny=round(estimated, 4),
        actual_cny=round(actual, 4),
        unfinished_tasks=unfinished,
        total_cny=round(total + detect_cny, 4),
    )
