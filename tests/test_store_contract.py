"""One contract for every ledger backend: the same tests run on SQLite and on a real PostgreSQL.

What the domain relies on (provenance reads, dedupe, submits resolved or merged, the due queue's
claims and leases, learned rates, spend, the upload cache, versioned schema) must hold whichever
database is behind `Ledger`. The PostgreSQL runs each get a fresh schema (tests/postgres.py) and are
skipped without EMO_MCP_TEST_DATABASE_URL (failed instead under EMO_MCP_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.errors import LedgerUnavailable, StorageError
from server.store.database import DATABASE_URL_VARIABLE, redact_url
from server.store.ledger import DEAD_STATUSES, LIVE_PREDICATE, SUBMITTING, Ledger
from server.store.migrations import latest, migrations, named_queries
from server.store.queue import DOWNLOAD, QUERY, DueQueue
from server.store.spend import estimate_of, record_estimate, spend_today
from server.store.uploads import UploadCache
from tests.postgres import BASE_URL

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not BASE_URL, reason="no PostgreSQL"))]


@pytest.fixture(params=BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    opened = Ledger(tmp_path, url)
    assert opened.dialect == request.param
    try:
        yield opened
    finally:
        opened.close()


def detection(ledger: Ledger, image_url: str = "https://x/a.jpg", **overrides: Any) -> int:
    fields: dict[str, Any] = {
        "family": "emo",
        "model": "emo-detect-v1",
        "image_url": image_url,
        "ratio": "1:1",
        "check_pass": True,
        "face_bbox": [1, 2, 30, 40],
        "ext_bbox": [0, 0, 50, 60],
        "code": None,
        "message": None,
        "request_id": "req-1",
        "evidence_dir": "/evidence/d",
    }
    fields.update(overrides)
    return ledger.add_detection(**fields)


def submit(ledger: Ledger, local_id: str, fingerprint: str = "fp-1", *, allow_duplicate: bool = False) -> Any:
    return ledger.begin_submit(
        local_id=local_id,
        family="emo",
        model="emo-v1",
        payload={"model": "emo-v1", "input": {"image_url": "https://x/a.jpg"}},
        ratio="1:1",
        fingerprint=fingerprint,
        evidence_dir=f"/evidence/{local_id}",
        owner="host:1",
        allow_duplicate=allow_duplicate,
    )


# ---------------------------------------------------------------------------------------------- schema


def test_a_new_ledger_is_at_the_latest_schema_version(ledger: Ledger) -> None:
    assert ledger.version() == latest(ledger.dialect) >= 1
    assert ledger.database.migrate() == latest(ledger.dialect)  # again: nothing to do
    rows = ledger.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(row["version"], row["name"]) for row in rows] == [(m.version, m.name) for m in migrations(ledger.dialect)]


def test_both_dialects_have_the_same_migrations_and_named_queries() -> None:
    assert [m.name for m in migrations("sqlite")] == [m.name for m in migrations("postgresql")]
    assert named_queries("sqlite").keys() == named_queries("postgresql").keys()
    for name, sql in named_queries("sqlite").items():
        assert sql.count("?") == named_queries("postgresql")[name].count("?"), name


def test_the_dedupe_rule_in_python_is_the_unique_index_predicate() -> None:
    # PostgreSQL uses the partial index for a lookup only when the lookup repeats its predicate.
    assert sorted(DEAD_STATUSES) == re.findall(r"'([A-Z_]+)'", LIVE_PREDICATE.split("AND")[0])
    for dialect in ("sqlite", "postgresql"):
        baseline = " ".join(migrations(dialect)[0].sql.split())
        assert f"WHERE dedupe_key IS NOT NULL AND {LIVE_PREDICATE};" in baseline


def test_ping_answers(ledger: Ledger) -> None:
    ledger.ping()


def test_trace_sees_every_statement(ledger: Ledger) -> None:
    seen: list[str] = []
    ledger.trace(seen.append)
    ledger.get_task("nothing")
    ledger.trace(None)
    ledger.get_task("nothing")
    assert len([sql for sql in seen if "FROM tasks" in sql]) == 1


def test_rows_read_by_name_and_by_position(ledger: Ledger) -> None:
    (row,) = ledger.query("SELECT 7 AS seven, 'x' AS ex")
    assert row["seven"] == row[0] == 7 and row["ex"] == row[1] == "x"
    assert list(row.keys()) == ["seven", "ex"]


def test_a_transaction_commits_together_or_not_at_all(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError), ledger.transaction() as tx:
        tx.execute("INSERT INTO due_queue_meta (key, value) VALUES ('a', '1')")
        raise RuntimeError("abandon")
    assert ledger.query("SELECT * FROM due_queue_meta WHERE key = 'a'") == []
    with ledger.transaction() as tx:
        tx.execute("INSERT INTO due_queue_meta (key, value) VALUES ('a', '1')")
        assert tx.one("SELECT value FROM due_queue_meta WHERE key = ?", ("a",)) is not None
    assert len(ledger.query("SELECT * FROM due_queue_meta WHERE key = 'a'")) == 1


def test_a_batch_of_statements_commits_together_or_not_at_all(ledger: Ledger) -> None:
    """The watcher's write-behind batch (server/jobs/writes.py): every statement lands, in order, or none."""
    insert = "INSERT INTO due_queue_meta (key, value) VALUES (?, ?)"
    update = "UPDATE due_queue_meta SET value = ? WHERE key = ?"
    ledger.execute_batch(
        [
            (insert, ("b1", "1")),
            (insert, ("b2", "2")),
            (update, ("3", "b1")),
            (update, ("4", "b1")),
            (insert, ("b4", "4")),
        ],
        durable=False,
    )  # runs of one statement (sent as one executemany on PostgreSQL) keep their order
    rows = ledger.query("SELECT key, value FROM due_queue_meta WHERE key LIKE 'b%' ORDER BY key")
    assert [(row["key"], row["value"]) for row in rows] == [("b1", "4"), ("b2", "2"), ("b4", "4")]
    with pytest.raises(StorageError if ledger.dialect == "postgresql" else sqlite3.IntegrityError):
        ledger.execute_batch([(insert, ("b3", "1")), (insert, ("b1", "again"))])  # the second breaks the key
    assert ledger.query("SELECT * FROM due_queue_meta WHERE key = 'b3'") == []
    ledger.execute_batch([])  # nothing to send: no round trip, no error


# ---------------------------------------------------------------------------------------------- detections


def test_detections_are_read_back_newest_first_with_their_boxes(ledger: Ledger) -> None:
    first = detection(ledger)
    second = detection(ledger, check_pass=False, face_bbox=None, ext_bbox=None, code="InvalidFile")
    detection(ledger, "https://x/other.jpg")
    found = ledger.detections_of("https://x/a.jpg")
    assert [d.id for d in found] == [second, first] and second > first
    assert found[1].check_pass is True and found[1].face_bbox == [1, 2, 30, 40] and found[1].ext_bbox == [0, 0, 50, 60]
    assert found[0].check_pass is False and found[0].face_bbox is None and found[0].code == "InvalidFile"


# ---------------------------------------------------------------------------------------------- tasks


def test_an_identical_submit_reuses_the_usable_task(ledger: Ledger) -> None:
    assert submit(ledger, "submit-a") is None
    reused = submit(ledger, "submit-b")
    assert reused is not None and reused.task_id == "submit-a" and reused.status == SUBMITTING
    assert ledger.get_task("submit-b") is None
    assert submit(ledger, "submit-c", allow_duplicate=True) is None  # asked for: a second task
    assert submit(ledger, "submit-d", "fp-other") is None


def test_a_dead_or_expired_task_does_not_stop_a_new_submit(ledger: Ledger) -> None:
    assert submit(ledger, "submit-a") is None
    ledger.resolve_submit("submit-a", task_id="task-a", status="PENDING", request_id="r", evidence_dir="/e/a")
    ledger.update_task("task-a", status="FAILED")
    assert submit(ledger, "submit-b") is None
    ledger.resolve_submit("submit-b", task_id="task-b", status="SUCCEEDED", request_id=None, evidence_dir="/e/b")
    assert submit(ledger, "submit-c").task_id == "task-b"
    ledger.update_task("task-b", code="VideoExpired")
    assert submit(ledger, "submit-d") is None


def test_a_submit_resolves_to_its_task_and_is_found_by_either_id(ledger: Ledger) -> None:
    submit(ledger, "submit-a")
    ledger.resolve_submit("submit-a", task_id="task-a", status="PENDING", request_id="req-9", evidence_dir="/e/a")
    by_task, by_local = ledger.get_task("task-a"), ledger.get_task("submit-a")
    assert by_task is not None and by_local is not None and by_task == by_local
    assert by_task.local_id == "submit-a" and by_task.request_id == "req-9" and by_task.evidence_dir == "/e/a"
    assert ledger.submitted_task_ids(["task-a", "nope"]) == {"task-a": True}


def test_an_adopted_task_takes_the_submit_identity_on_merge(ledger: Ledger) -> None:
    submit(ledger, "submit-a")
    ledger.add_task(
        task_id="task-a",
        family="emo",
        model="emo-v1",
        payload={},
        ratio=None,
        status="RUNNING",
        request_id=None,
        evidence_dir="/e/adopted",
    )
    assert ledger.submitted_task_ids(["task-a"]) == {"task-a": False}
    ledger.merge_submit("submit-a", "task-a")
    merged = ledger.get_task("submit-a")
    assert merged is not None and merged.task_id == "task-a" and merged.status == "RUNNING"
    assert merged.fingerprint == "fp-1" and merged.payload["model"] == "emo-v1"
    assert submit(ledger, "submit-b").task_id == "task-a"  # still the usable one for its fingerprint


def test_add_task_is_idempotent_and_tasks_list_newest_first(ledger: Ledger) -> None:
    for index in range(3):
        ledger.add_task(
            task_id=f"t{index}",
            family="emoji",
            model="emoji-v1",
            payload={"n": index},
            ratio=None,
            status="PENDING",
            request_id=None,
            evidence_dir="/e",
        )
        time.sleep(0.002)
    ledger.add_task(
        task_id="t0",
        family="emo",
        model="x",
        payload={},
        ratio=None,
        status="FAILED",
        request_id=None,
        evidence_dir="/e",
    )
    assert [t.task_id for t in ledger.tasks(limit=2)] == ["t2", "t1"]
    first = ledger.get_task("t0")
    assert first is not None and first.status == "PENDING" and first.payload == {"n": 0}
    assert [t.task_id for t in ledger.rows(["PENDING"])] == ["t0", "t1", "t2"]


def test_update_task_writes_known_columns_and_redacts_free_text(ledger: Ledger) -> None:
    submit(ledger, "submit-a")
    key = "sk-" + "a1b2c3d4e5" * 3
    ledger.update_task(
        "submit-a", status="SUCCEEDED", usage={"video_duration": 2.5}, message=f"echo {key}", video_bytes=2**40
    )
    record = ledger.get_task("submit-a")
    assert record is not None and record.usage == {"video_duration": 2.5} and record.video_bytes == 2**40
    assert record.message is not None and key not in record.message
    with pytest.raises(ValueError, match="not task columns"):
        ledger.update_task("submit-a", fingerprint="other")


def test_recent_videos_come_newest_first_in_batches(ledger: Ledger) -> None:
    since = time.time() - 1
    for index in range(5):
        ledger.add_task(
            task_id=f"v{index}",
            family="emo",
            model="emo-v1",
            payload={},
            ratio=None,
            status="SUCCEEDED",
            request_id=None,
            evidence_dir="/e",
        )
        ledger.update_task(f"v{index}", video_path=f"/v/{index}.mp4")
        time.sleep(0.002)
    batches = [[t.task_id for t in batch] for batch in ledger.recent_videos(since, 2)]
    assert batches == [["v4", "v3"], ["v2", "v1"], ["v0"]]


def test_delete_task(ledger: Ledger) -> None:
    submit(ledger, "submit-a")
    ledger.delete_task("submit-a")
    assert ledger.get_task("submit-a") is None


# ---------------------------------------------------------------------------------------------- due queue


def test_the_due_queue_claims_due_tasks_once_per_lease(ledger: Ledger) -> None:
    queue, now = DueQueue(ledger), 1000.0
    for index, due in enumerate((990.0, 995.0, 2000.0)):
        queue.schedule(f"q{index}", "emo-v1", 100.0 + index, due)
    assert sorted(queue.claim(now, 10, 30.0, "worker-a")) == ["q0", "q1"]
    assert queue.claim(now, 10, 30.0, "worker-b") == []  # leased: not due again before 1030
    assert sorted(queue.claims()) == [("q0", "worker-a"), ("q1", "worker-a")]
    assert sorted(queue.claim(now + 31, 10, 30.0, "worker-b")) == ["q0", "q1"]  # the lease ran out
    queue.release(["q0"], now)
    assert queue.claim(now, 1, 30.0, "worker-c") == ["q0"]
    assert queue.claim(now, 0, 30.0, "worker-c") == []
    assert set(queue.task_ids()) == {"q0", "q1", "q2"}


def test_a_claim_says_when_each_task_was_due_and_may_take_what_falls_due_shortly(ledger: Ledger) -> None:
    queue, now = DueQueue(ledger), 1000.0
    for index, due in enumerate((1000.04, 990.0, 995.0, 1000.2)):
        queue.schedule(f"q{index}", "emo-v1", 100.0 + index, due)
    # Earliest first, with the due time each was claimed at (the next one counts from it).
    assert list(queue.claim_due(now, 10, 30.0, "w", ahead=0.05).items()) == [
        ("q1", 990.0),
        ("q2", 995.0),
        ("q0", 1000.04),
    ]
    assert queue.claim_due(now, 10, 30.0, "w", ahead=0.05) == {}  # leased now; q3 is not due within 0.05 s
    assert queue.claim_due(now, 10, 30.0, "w") == {}
    assert queue.claim_due(now + 0.2, 10, 30.0, "w") == {"q3": 1000.2}


def test_schedule_only_moves_a_task_earlier_and_file_releases_its_claim(ledger: Ledger) -> None:
    queue = DueQueue(ledger)
    queue.schedule("q", "emo-v1", 100.0, 500.0)
    queue.schedule("q", "emo-v1", 100.0, 900.0)
    assert queue.next_due() == 500.0
    queue.schedule("q", "emo-v1", 100.0, 300.0, DOWNLOAD)
    entry = queue.get("q")
    assert entry is not None and entry.due_at == 300.0 and entry.stage == DOWNLOAD
    queue.claim(400.0, 5, 30.0, "w")

    class Eta:
        start, end, basis = 410.0, 470.0, "learned"

    queue.file("q", "emo-v1", 100.0, 450.0, QUERY, Eta())
    entry = queue.get("q")
    assert entry is not None and entry.due_at == 450.0 and entry.expected_end == 470.0 and entry.basis == "learned"
    assert queue.claims() == []
    queue.file("q", "emo-v1", 100.0, 460.0, QUERY)
    queue.reschedule("q", 470.0, DOWNLOAD)
    queue.expect("q", 12.5)
    entry = queue.get("q")
    assert entry is not None and (entry.due_at, entry.stage, entry.expected_seconds) == (470.0, DOWNLOAD, 12.5)
    queue.remove("q")
    assert queue.get("q") is None and queue.next_due() is None


def test_queue_position_and_neighbours_follow_submit_order(ledger: Ledger) -> None:
    queue = DueQueue(ledger)
    for index in range(4):
        queue.schedule(f"q{index}", "emo-v1", 100.0 + index, 1000.0)
    queue.schedule("other", "emoji-v1", 100.5, 1000.0)
    entry = queue.get("q2")
    assert entry is not None and queue.position("emo-v1", entry.created_at) == 2
    context, behind = queue.context("q2", cap=100), queue.behind("emo-v1", entry.created_at)
    assert context is not None and context.ahead_id == "q1" and behind is not None and behind.task_id == "q3"
    assert context.entry == entry and context.ahead_count == 2
    capped = queue.context("q3", cap=2)
    assert capped is not None and capped.ahead_count == 2  # counted up to the cap, not the queue's depth
    # A tick's batch reads every claimed task's context at once: the same answers as one by one.
    many = queue.contexts(["q0", "q2", "q3", "other", "missing"], cap=2)
    assert set(many) == {"q0", "q2", "q3", "other"}
    for task_id, found in many.items():
        assert found == queue.context(task_id, cap=2)
    assert many["q0"].ahead_id is None and many["q0"].ahead_count == 0 and many["other"].ahead_count == 0


def test_several_tasks_are_read_in_one_call_and_an_answer_can_wait_for_a_batch(ledger: Ledger) -> None:
    for index in range(3):
        ledger.add_task(
            task_id=f"m{index}", family="emo", model="emo-v1", payload={"n": index}, ratio="1:1",
            status="PENDING", request_id=None, evidence_dir="/e",
        )  # fmt: skip
    found = ledger.get_tasks(["m0", "m2", "nope"])
    assert set(found) == {"m0", "m2"} and found["m2"].payload == {"n": 2}
    assert ledger.get_tasks([]) == {}
    statement = ledger.answer_statement("m1", status="RUNNING", polls=4, message="x")
    unchanged = ledger.get_task("m1")
    assert unchanged is not None and unchanged.status == "PENDING"  # built, not run
    ledger.execute_batch([statement], durable=False)
    record = ledger.get_task("m1")
    assert record is not None and (record.status, record.polls, record.message) == ("RUNNING", 4, "x")


def test_rates_are_running_sums(ledger: Ledger) -> None:
    queue = DueQueue(ledger)
    assert queue.rate("emo-v1").finished == 0
    queue.learn("emo-v1", 10.0, 40.0)
    queue.learn("emo-v1", 5.0, 20.0)
    rate = queue.rate("emo-v1")
    assert (rate.finished, rate.output_seconds, rate.run_seconds) == (2, 15.0, 60.0)


def test_fill_once_queues_open_tasks_of_an_older_ledger_once(ledger: Ledger) -> None:
    for task_id, status in (("open", "RUNNING"), ("done", "FAILED"), ("video", "SUCCEEDED")):
        ledger.add_task(
            task_id=task_id,
            family="emo",
            model="emo-v1",
            payload={},
            ratio=None,
            status=status,
            request_id=None,
            evidence_dir="/e",
        )
    queue = DueQueue(ledger)
    assert queue.fill_once(1000.0) == 2
    assert queue.fill_once(1000.0) == 0
    assert sorted(queue.task_ids()) == ["open", "video"]


# ---------------------------------------------------------------------------------------------- spend, uploads


def test_spend_sums_detections_estimates_and_billed_seconds(ledger: Ledger) -> None:
    detection(ledger)
    for task_id, status, usage in (
        ("billed", "SUCCEEDED", {"video_duration": 10, "video_ratio": "1:1"}),
        ("waiting", "RUNNING", None),
        ("dead", "FAILED", None),
    ):
        ledger.add_task(
            task_id=task_id,
            family="emo",
            model="emo-v1",
            payload={},
            ratio="1:1",
            status=status,
            request_id=None,
            evidence_dir="/e",
        )
        if usage:
            ledger.update_task(task_id, usage=usage)
        record_estimate(ledger, task_id, "emo", 0.5, "estimate")
    record_estimate(ledger, "waiting", "emo", 0.7, "again")  # the newest estimate replaces the first
    assert estimate_of(ledger, "waiting") == 0.7 and estimate_of(ledger, "none") is None
    spend = spend_today(ledger)
    assert (spend.detections, spend.tasks, spend.unfinished_tasks) == (1, 3, 1)
    assert spend.actual_cny == 0.8  # 10 s at 0.08
    assert spend.estimated_cny == 1.7
    assert spend.total_cny == round(0.004 + 0.8 + 0.7, 4)


def test_the_upload_cache_keeps_the_newest_fresh_copy(ledger: Ledger) -> None:
    cache = UploadCache(ledger)
    cache.record("sha", "emo-v1", "oss://a", "/m/a.png", 100.0, 200.0)
    assert cache.fresh("sha", "emo-v1", 150.0) == "oss://a"
    assert cache.fresh("sha", "emo-v1", 250.0) is None and cache.fresh("sha", "emoji-v1", 150.0) is None
    cache.record("sha", "emo-v1", "oss://b", "/m/a.png", 300.0, 400.0)
    assert cache.fresh("sha", "emo-v1", 350.0) == "oss://b"


# ---------------------------------------------------------------------------------------------- outages


def test_an_unreachable_database_is_a_ledger_error_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://emo:hunter2-secret@127.0.0.1:1/emo"  # a closed loopback port
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable) as refused:
        Ledger(tmp_path, url)
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert "unreachable" in message and DATABASE_URL_VARIABLE in message and redact_url(url) in message
    assert "hunter2-secret" not in message


def spend_by_rows(ledger: Ledger) -> tuple[int, int, float]:
    """The day's spend summed row by row (what the running totals must always equal)."""
    rows = ledger.query(
        "SELECT t.status, t.usage, e.estimated_cny FROM tasks t LEFT JOIN spend_estimates e ON e.task_id = t.task_id"
    )
    tasks = unfinished = 0
    total = 0.0
    for row in rows:
        tasks += 1
        usage = json.loads(row["usage"]) if row["usage"] else None
        if usage and isinstance(usage.get("video_duration"), int | float):
            total += float(usage["video_duration"]) * (0.08 if usage.get("video_ratio") == "1:1" else 0.16)
        elif row["status"] not in ("FAILED", "CANCELED", "UNKNOWN", "NOT_FOUND"):
            unfinished += 1
            total += float(row["estimated_cny"] or 0.0)
    return tasks, unfinished, round(total, 4)


def test_spend_running_totals_follow_every_kind_of_write(ledger: Ledger) -> None:
    """Submit, answer (a rename), estimates, billing, failure, merge, deletion: the totals the resource
    reads equal the sum over the rows after each, whichever database keeps them (SQLite and PostgreSQL
    triggers)."""

    def task(task_id: str, status: str = "PENDING") -> None:
        ledger.add_task(
            task_id=task_id,
            family="emo",
            model="emo-v1",
            payload={},
            ratio="1:1",
            status=status,
            request_id=None,
            evidence_dir="/e",
        )

    def check() -> None:
        summary = spend_today(ledger)
        assert (summary.tasks, summary.unfinished_tasks, summary.total_cny) == spend_by_rows(ledger)

    task("billed-3x4", "RUNNING")  # billed at another ratio's price
    ledger.update_task("billed-3x4", usage={"video_duration": 2.0, "video_ratio": "3:4"}, status="SUCCEEDED")
    check()
    record_estimate(ledger, "billed-3x4", "emo", 0.3, "test")  # an estimate after billing changes nothing
    check()
    submit(ledger, "local-1")
    check()
    ledger.resolve_submit("local-1", task_id="task-1", status="PENDING", request_id=None, evidence_dir="/e")
    record_estimate(ledger, "task-1", "emo", 0.4, "test")
    record_estimate(ledger, "task-1", "emo", 0.5, "again")
    check()
    ledger.update_task("task-1", status="RUNNING", polls=3)
    ledger.update_task("task-1", status="SUCCEEDED", usage={"video_duration": 5.0, "video_ratio": "1:1"})
    check()
    task("task-2")
    record_estimate(ledger, "task-2", "emo", 0.7, "test")
    ledger.update_task("task-2", status="FAILED", code="InternalError")
    check()
    task("adopted", "RUNNING")
    submit(ledger, "local-2", "fp-2")
    ledger.merge_submit("local-2", "adopted")
    check()
    task("refused")
    record_estimate(ledger, "refused", "emo", 0.9, "test")
    ledger.delete_task("refused")
    check()
    detection(ledger)
    assert spend_today(ledger).detections == 1 and spend_today(ledger).tasks == 4
