"""The ledger database going away mid-run, for one worker (a proxy between it and PostgreSQL).

What the issue asks of an outage: tool calls fail fast with a clear error (the ledger database is
unreachable, nothing was sent), no paid call reaches DashScope (detects are billed and could not be
recorded for provenance), /healthz says 503 "database": "down", the process stays up, and calls
succeed again within 15 s of the database's return without a restart. A worker cut off from the
database stops querying within one lease, and a worker with its own connection takes its tasks over.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx2
import pytest

from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import PORTRAIT, call_error, call_ok, detect_emo
from tests.dbproxy import database_proxy
from tests.postgres import needs_postgres
from tests.postgres import pg_url as pg_url
from tests.test_cluster import INTERVAL, LEASE, arrivals, cluster, cluster_env, emo_args, gaps, open_tasks
from tests.test_http import http_client

pytestmark = [pytest.mark.anyio, needs_postgres]

# How long one tool call may take while the database is away (the pool's and the breaker's bounds).
CALL_BOUND = 6.0
# The bound on recovery after the database returns.
RECOVERY = 15.0


def paid_calls(fake: FakeDashScope) -> int:
    """Detects and submits the fake has seen (every POST but uploads' policy requests is one)."""
    return sum(1 for request in fake.requests if request.method == "POST")


async def test_calls_fail_fast_and_clearly_while_the_database_is_away_and_recover_by_themselves(
    fake: FakeDashScope, tmp_path: Path, pg_url: str
) -> None:
    with database_proxy(pg_url) as proxy, anyio.fail_after(120):
        env = cluster_env(fake, tmp_path, {"EMO_MCP_DATABASE_URL": proxy.url(pg_url)})
        async with cluster(env, tmp_path, 1) as [worker]:
            async with http_client(worker.base) as client:
                detection = await detect_emo(client)
                submitted = await call_ok(client, "emo_generate", emo_args(detection, 0))
            sent = paid_calls(fake)
            proxy.cut()
            calls = {
                "emo_detect": {"image_url": PORTRAIT, "ratio": "1:1"},
                "emoji_detect": {"image_url": PORTRAIT},
                "emo_generate": emo_args(detection, 1),
                "task_status": {"task_id": submitted["task_id"]},
            }
            async with http_client(worker.base) as client:
                for name, arguments in calls.items():
                    began = time.monotonic()
                    text = await call_error(client, name, arguments)
                    took = time.monotonic() - began
                    assert "ledger database is unreachable" in text, (name, text)
                    assert "Nothing was sent" in text, (name, text)
                    assert "emo_test_pw" not in text
                    assert took <= CALL_BOUND, (name, took)
            assert paid_calls(fake) == sent, "a paid call was sent while the ledger could not record it"
            async with httpx2.AsyncClient() as raw:
                health = await raw.get(f"{worker.base}/healthz")
            assert health.status_code == 503 and health.json()["database"] == "down", health.text
            assert worker.process.returncode is None  # the server stays up

            proxy.restore()
            back = time.monotonic()
            detected = None
            while time.monotonic() - back < RECOVERY and detected is None:
                async with http_client(worker.base) as client:
                    result = await client.call_tool("emo_detect", {"image_url": PORTRAIT, "ratio": "1:1"})
                if not result.is_error:
                    detected = result
                else:
                    await anyio.sleep(0.5)
            assert detected is not None, f"calls did not succeed within {RECOVERY} s of the database's return"
            async with httpx2.AsyncClient() as raw:
                assert (await raw.get(f"{worker.base}/healthz")).status_code == 200


async def test_a_worker_cut_off_stops_querying_within_a_lease_and_another_takes_its_tasks_over(
    fake: FakeDashScope, tmp_path: Path, pg_url: str
) -> None:
    with database_proxy(pg_url) as proxy, anyio.fail_after(120):
        behind = cluster_env(fake, tmp_path, {"EMO_MCP_DATABASE_URL": proxy.url(pg_url)})
        direct = cluster_env(fake, tmp_path, {"EMO_MCP_DATABASE_URL": pg_url})
        for folder in ("a", "b"):
            (tmp_path / folder).mkdir()
        async with cluster(behind, tmp_path / "a", 1) as workers:
            task_ids = await open_tasks(fake, workers, 3)
            await anyio.sleep(1.0)
            assert all(arrivals(fake, task_id) for task_id in task_ids)  # the worker follows them
            proxy.cut()
            cut = time.monotonic()
            await anyio.sleep(LEASE + 1.0)
            # Only the cut-off worker runs: any query after one lease would be its own.
            late = arrivals(fake, since=cut + LEASE)
            assert late == [], f"{len(late)} queries from a worker cut off from the ledger"
            async with cluster(direct, tmp_path / "b", 1):
                taken = time.monotonic()
                await anyio.sleep(LEASE + INTERVAL + 2.0)
                for task_id in task_ids:
                    assert arrivals(fake, task_id, since=taken), f"{task_id} was not taken over"
                proxy.restore()  # the first worker rejoins: still one poller per task
                await anyio.sleep(LEASE + 2.0)
                rejoined = time.monotonic()
                await anyio.sleep(2.0)
                for task_id in task_ids:
                    seen = arrivals(fake, task_id, since=rejoined)
                    assert seen and min(gaps(seen) or [INTERVAL]) >= INTERVAL / 2, gaps(seen)
