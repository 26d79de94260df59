"""What was spent today: estimated and actual cost of detections and tasks, from running totals.

Estimates are recorded at submit (this module's own table in the ledger); actual costs come
from each finished task's `usage.video_duration`. "Today" is the server's local calendar day.
Served as the `spend://today` resource (`tools/resources.py`) and by the `doctor` command.

Why running totals kept by triggers: a busy day holds thousands of tasks (and a history built in
one day, 100,000), so summing the day's rows on every read grows with the day. The database keeps
a few rows per day instead (`spend_totals`: per family, state and billed ratio; `spend_detections`:
per family), moved by triggers on `tasks`, `spend_estimates` and `detections` inside the very
transaction that changes a row. No writer can forget them (a submit, a rename by reconciliation, a
merge, an import), and a read costs the number of kinds of task, not of tasks. A poll that
changes nothing (most of them) fires no trigger work: the trigger runs only `WHEN` a column it
depends on really changed. The tables and triggers are migration 0002 of each dialect
(`server/store/sql/<dialect>/0002_spend_totals.sql`), which sums a ledger's existing rows once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from server.pricing import PriceTable, actual_cost
from server.store.ledger import DEAD_STATUSES, Ledger

SPEND_URI = "spend://today"


def record_estimate(ledger: Ledger, task_id: str, family: str, estimated_cny: float, basis: str) -> None:
    ledger.execute(
        "INSERT INTO spend_estimates (task_id, family, estimated_cny, basis, created_at) VALUES (?,?,?,?,?)"
        " ON CONFLICT (task_id) DO UPDATE SET family = excluded.family, estimated_cny = excluded.estimated_cny,"
        " basis = excluded.basis, created_at = excluded.created_at",
        (task_id, family, estimated_cny, basis, time.time()),
    )


def estimate_of(ledger: Ledger, task_id: str) -> float | None:
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
    day = datetime.fromtimestamp(time.time() if now is None else now).strftime("%Y-%m-%d")
    detect_rows = ledger.query("SELECT family, n FROM spend_detections WHERE day = ?", (day,))
    detections = sum(int(row["n"]) for row in detect_rows)
    detect_cny = sum(int(row["n"]) * prices.detect(str(row["family"])).cny for row in detect_rows)
    groups = ledger.query(
        "SELECT family, kind, ratio, n, estimated, seconds FROM spend_totals WHERE day = ? AND n != 0", (day,)
    )
    estimated = actual = total = 0.0
    unfinished = tasks = 0
    for row in groups:
        tasks += int(row["n"])
        estimated += float(row["estimated"] or 0.0)
        if row["kind"] == "billed":
            usage = {"video_duration": float(row["seconds"] or 0.0), "video_ratio": row["ratio"] or None}
            cost = actual_cost(prices, str(row["family"]), usage) or 0.0
            actual += cost
            total += cost
        elif row["kind"] == "open":
            unfinished += int(row["n"])
            total += float(row["estimated"] or 0.0)
    return SpendToday(
        day=day,
        detections=detections,
        detect_cny=round(detect_cny, 4),
        tasks=tasks,
        estimated_cny=round(estimated, 4),
        actual_cny=round(actual, 4),
        unfinished_tasks=unfinished,
        total_cny=round(total + detect_cny, 4),
    )


def drop_estimate(ledger: Ledger, task_id: str) -> None:
    """Forget an estimate held under a submit's local id (its task has its own now, or it is gone)."""
    ledger.execute("DELETE FROM spend_estimates WHERE task_id = ?", (task_id,))


def spent_since(ledger: Ledger, prices: PriceTable, since: float) -> float:
    """CNY spent since `since` (a tenant's UTC day, for its daily budget): finished jobs at their actual
    cost, open jobs at their estimate, detections at their price, failed and cancelled jobs at nothing.

    A submit still waiting for its answer counts at the estimate held under its local id (a tenant with
    a daily budget holds one; server/domain/generation.py). Indexed reads of the day's rows (`tasks_by_created`,
    `detections_by_created`): the cost follows one tenant's day, never the history."""
    total = 0.0
    detections = "SELECT family, COUNT(*) AS n FROM detections WHERE created_at >= ? GROUP BY family"
    for row in ledger.query(detections, (since,)):
        total += int(row["n"]) * prices.detect(str(row["family"])).cny
    rows = ledger.query(
        "SELECT t.task_id, t.family, t.status, t.usage, e.estimated_cny FROM tasks t"
        " LEFT JOIN spend_estimates e ON e.task_id = t.task_id WHERE t.created_at >= ?",
        (since,),
    )
    for row in rows:
        usage = json.loads(row["usage"]) if row["usage"] else None
        cost = actual_cost(prices, str(row["family"]), usage) if usage else None
        if cost is not None:
            total += cost
        elif str(row["status"]) in DEAD_STATUSES:
            continue
        elif row["estimated_cny"] is not None:
            total += float(row["estimated_cny"])
    return round(total, 6)
