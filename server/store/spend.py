"""What was spent today: estimated and actual cost of detections and tasks, from running totals.

Estimates are recorded at submit (this module's own table in the ledger file); actual costs come
from each finished task's `usage.video_duration`. "Today" is the server's local calendar day.
Served as the `spend://today` resource (`tools/resources.py`) and by the `doctor` command.

Why running totals kept by triggers: a busy day holds thousands of tasks (and a history built in
one day, 100,000), so summing the day's rows on every read grows with the day. The database keeps
a few rows per day instead (`spend_totals`: per family, state and billed ratio; `spend_detections`:
per family), moved by triggers on `tasks`, `spend_estimates` and `detections` inside the very
transaction that changes a row. No writer can forget them (a submit, a rename by reconciliation, a
merge, an import), and a read costs the number of kinds of task, not of tasks. A poll that
changes nothing (most of them) fires no trigger work: the trigger runs only `WHEN` a column it
depends on really changed. A ledger from before
the totals is summed once, when they are installed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from server.pricing import PriceTable, actual_cost
from server.store.ledger import DEAD_STATUSES, Ledger

SPEND_URI = "spend://today"
# A task is in one of three states for spend: billed (upstream reported a duration), dead (it will
# never be billed: failed, cancelled, never created) or open (its estimate counts until it settles).
_DEAD_LIST = ",".join(f"'{status}'" for status in sorted(DEAD_STATUSES))  # constants, never user text


def _kind(row: str) -> str:
    return (
        f"CASE WHEN json_type({row}.usage, '$.video_duration') IN ('integer', 'real') THEN 'billed'"
        f" WHEN {row}.status IN ({_DEAD_LIST}) THEN 'dead' ELSE 'open' END"
    )


def _ratio(row: str) -> str:
    return (
        f"CASE WHEN json_type({row}.usage, '$.video_duration') IN ('integer', 'real')"
        f" THEN COALESCE(json_extract({row}.usage, '$.video_ratio'), '') ELSE '' END"
    )


def _seconds(row: str) -> str:
    return (
        f"CASE WHEN json_type({row}.usage, '$.video_duration') IN ('integer', 'real')"
        f" THEN json_extract({row}.usage, '$.video_duration') ELSE 0 END"
    )


def _day(row: str) -> str:
    return f"date({row}.created_at, 'unixepoch', 'localtime')"


def _estimate(task_id: str) -> str:
    return f"COALESCE((SELECT estimated_cny FROM spend_estimates WHERE task_id = {task_id}), 0)"  # noqa: S608


def _move(row: str, sign: str, estimate: str) -> str:
    """Add (`sign` '+') or take away ('-') one task's contribution to its bucket of the totals."""
    return (
        "INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds)"  # noqa: S608 (no user text)
        f" VALUES ({_day(row)}, {row}.family, {_kind(row)}, {_ratio(row)}, {sign}1, {sign}{estimate},"
        f" {sign}({_seconds(row)}))"
        " ON CONFLICT (day, family, kind, ratio) DO UPDATE SET n = n + excluded.n,"
        " estimated = estimated + excluded.estimated, seconds = seconds + excluded.seconds;"
    )


def _estimate_move(sign: str, amount: str, task_id: str) -> str:
    """Move the estimate of a task that already sits in a bucket (the estimate comes after the row)."""
    return (
        f"UPDATE spend_totals SET estimated = estimated {sign} {amount} WHERE (day, family, kind, ratio) IN"  # noqa: S608
        f" (SELECT {_day('t')}, t.family, {_kind('t')}, {_ratio('t')} FROM tasks t WHERE t.task_id = {task_id});"
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend_estimates (
    task_id TEXT PRIMARY KEY,
    family TEXT NOT NULL,
    estimated_cny REAL NOT NULL,
    basis TEXT,
    created_at REAL NOT NULL
);
"""
# Built from this module's constants, never user text.
_TOTALS = f"""
CREATE TABLE spend_totals (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    kind TEXT NOT NULL,
    ratio TEXT NOT NULL,
    n INTEGER NOT NULL,
    estimated REAL NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (day, family, kind, ratio)
);
CREATE TABLE spend_detections (
    day TEXT NOT NULL,
    family TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (day, family)
);
INSERT INTO spend_totals (day, family, kind, ratio, n, estimated, seconds)
    SELECT {_day("t")}, t.family, {_kind("t")}, {_ratio("t")}, COUNT(*), SUM(COALESCE(e.estimated_cny, 0)),
        SUM({_seconds("t")})
    FROM tasks t LEFT JOIN spend_estimates e ON e.task_id = t.task_id GROUP BY 1, 2, 3, 4;
INSERT INTO spend_detections (day, family, n)
    SELECT {_day("d")}, d.family, COUNT(*) FROM detections d GROUP BY 1, 2;
CREATE TRIGGER spend_task_added AFTER INSERT ON tasks BEGIN
    {_move("NEW", "+", _estimate("NEW.task_id"))}
END;
CREATE TRIGGER spend_task_removed AFTER DELETE ON tasks BEGIN
    {_move("OLD", "-", _estimate("OLD.task_id"))}
END;
CREATE TRIGGER spend_task_changed AFTER UPDATE OF task_id, family, status, usage, created_at ON tasks
WHEN OLD.task_id IS NOT NEW.task_id OR OLD.family IS NOT NEW.family OR OLD.status IS NOT NEW.status
    OR OLD.usage IS NOT NEW.usage OR OLD.created_at IS NOT NEW.created_at BEGIN
    {_move("OLD", "-", _estimate("OLD.task_id"))}
    {_move("NEW", "+", _estimate("NEW.task_id"))}
END;
CREATE TRIGGER spend_estimate_added AFTER INSERT ON spend_estimates BEGIN
    {_estimate_move("+", "NEW.estimated_cny", "NEW.task_id")}
END;
CREATE TRIGGER spend_estimate_changed AFTER UPDATE OF estimated_cny, task_id ON spend_estimates BEGIN
    {_estimate_move("-", "OLD.estimated_cny", "OLD.task_id")}
    {_estimate_move("+", "NEW.estimated_cny", "NEW.task_id")}
END;
CREATE TRIGGER spend_estimate_removed AFTER DELETE ON spend_estimates BEGIN
    {_estimate_move("-", "OLD.estimated_cny", "OLD.task_id")}
END;
CREATE TRIGGER spend_detection_added AFTER INSERT ON detections BEGIN
    INSERT INTO spend_detections (day, family, n) VALUES ({_day("NEW")}, NEW.family, 1)
    ON CONFLICT (day, family) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER spend_detection_removed AFTER DELETE ON detections BEGIN
    UPDATE spend_detections SET n = n - 1 WHERE day = {_day("OLD")} AND family = OLD.family;
END;
"""  # noqa: S608


def install(ledger: Ledger) -> None:
    """The estimates table, and (once per ledger file, summing what it already holds) the totals.

    Idempotent and cheap after the first call; runs in one write transaction, so two processes
    opening an old ledger at once cannot both sum it.
    """
    ledger.ensure_schema(_SCHEMA)
    ledger.ensure_once("spend_totals", _TOTALS)


def record_estimate(ledger: Ledger, task_id: str, family: str, estimated_cny: float, basis: str) -> None:
    install(ledger)
    ledger.execute(
        "INSERT INTO spend_estimates (task_id, family, estimated_cny, basis, created_at) VALUES (?,?,?,?,?)"
        " ON CONFLICT (task_id) DO UPDATE SET family = excluded.family, estimated_cny = excluded.estimated_cny,"
        " basis = excluded.basis, created_at = excluded.created_at",
        (task_id, family, estimated_cny, basis, time.time()),
    )


def estimate_of(ledger: Ledger, task_id: str) -> float | None:
    install(ledger)
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
    install(ledger)
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
