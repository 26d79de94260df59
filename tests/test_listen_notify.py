"""PostgreSQL's change feed: a waiter wakes on NOTIFY from another connection, not by reading the row.

The migration 0004 trigger NOTIFYs `emo_task_changed` for every written task row; `ListeningFeed`
holds one LISTEN connection on a thread. Here the fallback polling is slowed to a minute, so a waiter
that returns within a second of another ledger's write can only have been woken by the notification.
The database's clock is checked too: a host whose clock is an hour off still reads the server's time.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from server.jobs.changes import ListeningFeed, change_feed
from server.store.ledger import Ledger
from tests.postgres import needs_postgres
from tests.postgres import pg_url as pg_url

pytestmark = [needs_postgres]


def _task(ledger: Ledger, task_id: str) -> None:
    ledger.add_task(
        task_id=task_id,
        family="emo",
        model="emo-v1",
        payload={},
        ratio="1:1",
        status="PENDING",
        request_id=None,
        evidence_dir="/nowhere",
    )


@pytest.mark.anyio
async def test_a_waiter_wakes_on_another_workers_notify_within_a_second(pg_url: str, tmp_path: Path) -> None:
    writer, reader = Ledger(tmp_path / "a", pg_url), Ledger(tmp_path / "b", pg_url)
    try:
        _task(writer, "task-1")
        assert isinstance(change_feed(reader), ListeningFeed)
        feed = ListeningFeed(reader, reader.database, every=60.0)  # type: ignore[arg-type]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed.run)
                while not feed.listening:  # noqa: ASYNC110 (the feed's flag is set from its thread)
                    await anyio.sleep(0.05)
                woke: list[float] = []
                done = anyio.Event()

                async def wait() -> None:
                    await feed.wait("task-1", 30)
                    woke.append(time.monotonic())
                    done.set()

                tg.start_soon(wait)
                await anyio.sleep(0.3)
                changed = time.monotonic()
                writer.update_task("task-1", status="RUNNING")
                await done.wait()
                tg.cancel_scope.cancel()
        assert woke[0] - changed < 1.0
        assert feed.delivered == 1
    finally:
        writer.close()
        reader.close()


def test_the_cluster_clock_is_the_database_servers_even_on_a_skewed_host(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(tmp_path, pg_url)
    try:
        [row] = ledger.query("SELECT extract(epoch FROM clock_timestamp())")
        server_now = float(row[0])
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # this host runs an hour ahead
        assert abs(ledger.clock() - server_now) < 5.0
    finally:
        ledger.close()


def test_a_query_count_alone_notifies_nobody_and_a_new_status_does(pg_url: str, tmp_path: Path) -> None:
    """Migration 0005: an answer that says what the last one said (only `polls` moves) wakes no listener;
    with many open tasks every worker's listener would otherwise wake on every query of the cluster."""
    import psycopg

    writer = Ledger(tmp_path / "a", pg_url)
    try:
        _task(writer, "task-q")
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute("LISTEN emo_task_changed")
            writer.record_answer("task-q", polls=5)
            assert [note.payload for note in listener.notifies(timeout=1.0, stop_after=1)] == []
            writer.record_answer("task-q", polls=6, status="RUNNING")
            woken = [note.payload for note in listener.notifies(timeout=5.0, stop_after=1)]
            assert len(woken) == 1 and woken[0].endswith(" task-q"), woken
    finally:
        writer.close()
