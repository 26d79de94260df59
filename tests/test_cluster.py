"""Several real server processes (`--transport http` on loopback) sharing one OUTPUT_DIR and ledger.

What a cluster must hold, measured at the loopback fake of DashScope: each open task is queried by
one worker at a time (never two queries of a task closer than half an interval), a worker killed
with SIGKILL has its tasks taken over within one lease plus one interval, each video is downloaded
once even when the download outlasts a lease, a waiter on one worker wakes within about a second of
another worker's change, the query limit holds for the sum of the workers (and is not starved), a
429 pauses every worker, and the identical generate sent to three workers at once is submitted once.

Each multi-worker test runs on both backends (`backend`): SQLite (one file in the shared state
folder) and PostgreSQL (the workers get `EMO_MCP_DATABASE_URL` naming a fresh schema, tests/postgres.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import Process

from bench.cluster_host import NGINX, free_port, render_nginx
from server.jobs.workers import Worker as Worker_
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.leases import Leases
from server.store.ledger import Ledger
from server.store.queue import DueQueue
from server.store.rates import SharedRates
from server.upstream.limits import RateLimiter
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo, make_env
from tests.postgres import pg_url as pg_url
from tests.test_http import http_client
from tests.test_store_contract import ledger as ledger

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"
LEASE = 2.0
INTERVAL = 0.3


@dataclass
class Worker:
    base: str
    process: Process

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The workers' ledger: SQLite in the shared folder ({}), or a fresh PostgreSQL schema (its URL)."""
    if request.param == "postgresql":
        return {"EMO_MCP_DATABASE_URL": request.getfixturevalue("pg_url")}
    return {}


def open_ledger(tmp_path: Path, backend: dict[str, str]) -> Ledger:
    """The ledger the test's workers share, opened by the test itself."""
    return Ledger(tmp_path / "output", backend.get("EMO_MCP_DATABASE_URL"))


def cluster_env(fake: FakeDashScope, tmp_path: Path, backend: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        **make_env(
            fake,
            tmp_path,
            EMO_MCP_LEASE_SECONDS=str(LEASE),
            EMO_MCP_POLL_INTERVAL=str(INTERVAL),
            EMO_MCP_POLL_SCHEDULE="fixed",
            **backend,
            **extra,
        ),
    }


async def _up(base: str) -> None:
    async with httpx2.AsyncClient() as raw:
        for _ in range(400):
            with contextlib.suppress(httpx2.TransportError):
                if (await raw.get(f"{base}/healthz")).status_code == 200:
                    return
            await anyio.sleep(0.05)
    pytest.fail(f"the worker at {base} did not come up")


@contextlib.asynccontextmanager
async def cluster(env: dict[str, str], cwd: Path, count: int) -> AsyncIterator[list[Worker]]:
    """`count` worker processes on free loopback ports, stopped (SIGINT) at the end unless killed."""
    workers: list[Worker] = []
    logs = []
    try:
        for index in range(count):
            port = free_port()
            log = (cwd / f"worker-{index}.log").open("wb")
            logs.append(log)
            command = [sys.executable, "-m", "server", "--transport", "http", "--port", str(port)]
            process = await anyio.open_process(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            workers.append(Worker(f"http://127.0.0.1:{port}", process))
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(_up, worker.base)
        yield workers
    finally:
        for worker in workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGINT)
        with anyio.move_on_after(15, shield=True):
            for worker in workers:
                await worker.process.wait()
        for worker in workers:
            if worker.process.returncode is None:
                worker.kill()
                await worker.process.wait()
            await worker.process.aclose()
        for log in logs:
            log.close()


async def call(base: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    async with http_client(base) as client:
        return await call_ok(client, name, arguments)


def emo_args(detection: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "image_url": PORTRAIT,
        "audio_url": f"https://audio.example.com/cluster-{n}.wav",
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


async def open_tasks(fake: FakeDashScope, workers: Sequence[Worker], count: int) -> list[str]:
    """`count` open (PENDING) tasks, submitted through the workers in turn after one detection."""
    fake.auto_progress = False
    async with http_client(workers[0].base) as client:
        detection = await detect_emo(client)
    return [
        (await call(workers[n % len(workers)].base, "emo_generate", emo_args(detection, n)))["task_id"]
        for n in range(count)
    ]


def arrivals(fake: FakeDashScope, task_id: str | None = None, since: float = 0.0) -> list[float]:
    return sorted(r.at for r in fake.queries(task_id) if r.at >= since)


def busiest_second(times: Sequence[float]) -> int:
    best, start = 0, 0
    for end, moment in enumerate(times):
        while moment - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def gaps(times: Sequence[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_one_poller_per_task_takeover_after_a_kill_and_one_download_each(
    fake: FakeDashScope, tmp_path: Path, backend: dict[str, str]
) -> None:
    env = cluster_env(fake, tmp_path, backend)
    with anyio.fail_after(120):
        async with cluster(env, tmp_path, 3) as workers:
            task_ids = await open_tasks(fake, workers, 4)
            await anyio.sleep(2 * INTERVAL)
            start = time.monotonic()
            await anyio.sleep(3.0)
            # Four tasks, one query each per interval for the whole cluster (not one per worker).
            for task_id in task_ids:
                seen = arrivals(fake, task_id, start)
                assert 3.0 / INTERVAL * 0.6 <= len(seen) <= 3.0 / INTERVAL + 2, (task_id, len(seen))
                assert min(gaps(seen)) >= INTERVAL / 2, gaps(seen)

            workers[0].kill()
            killed = time.monotonic()
            await anyio.sleep(LEASE + INTERVAL + 1.5)
            for task_id in task_ids:
                seen = arrivals(fake, task_id, start)
                after = [t for t in seen if t > killed]
                assert after, f"{task_id} was never queried again after the kill"
                # Taken over within one lease plus one interval (plus a second for the machinery), and
                # never queried by two workers at once meanwhile.
                assert max(gaps([t for t in seen if t <= killed][-1:] + after)) <= LEASE + INTERVAL + 1.0
                assert min(gaps(seen)) >= INTERVAL / 2, gaps(seen)

            # Downloads that outlast the lease (8 chunks, 0.4 s each): renewed, never started twice.
            fake.video_size = 8 * 64 * 1024
            fake.download_chunk_delay = 0.4
            survivors = workers[1:]
            finished: dict[tuple[str, int], float] = {}

            async def wait_on(task_id: str, index: int) -> None:
                status = await call(survivors[index].base, "task_status", {"task_id": task_id, "wait_seconds": 40})
                finished[task_id, index] = time.time()
                assert status["task_status"] == "SUCCEEDED" and status["video_path"], status

            async with anyio.create_task_group() as tg:
                for task_id in task_ids:
                    for index in range(len(survivors)):
                        tg.start_soon(wait_on, task_id, index)
                await anyio.sleep(1.0)  # the waiters are waiting
                for task_id in task_ids:
                    fake.complete(task_id)

    ledger = open_ledger(tmp_path, backend)
    for task_id in task_ids:
        downloads = [r for r in fake.requests if r.path == f"/files/{task_id}.mp4"]
        assert len(downloads) == 1, task_id
        record = ledger.get_task(task_id)
        assert record is not None and record.video_sha256 == fake.video_sha256(task_id)
        [row] = ledger.query("SELECT updated_at FROM tasks WHERE task_id = ?", (task_id,))
        recorded = float(row[0])
        for index in range(len(survivors)):
            # Every waiter, on the worker that downloaded and on the other, within about a second.
            assert finished[task_id, index] - recorded < 1.5, (task_id, index)
    ledger.close()


async def test_the_query_limit_holds_for_the_sum_of_the_workers_and_a_429_pauses_them_all(
    fake: FakeDashScope, tmp_path: Path, backend: dict[str, str]
) -> None:
    limit = 5
    env = cluster_env(fake, tmp_path, backend, EMO_MCP_MAX_QUERY_QPS=str(limit))
    with anyio.fail_after(120):
        async with cluster(env, tmp_path, 3) as workers:
            await open_tasks(fake, workers, 8)  # 8 tasks every 0.3 s: about 27 queries/s wanted, 5 allowed
            await anyio.sleep(1.5)
            start = time.monotonic()
            await anyio.sleep(4.0)
            seen = arrivals(fake, since=start)
            assert busiest_second(seen) <= limit, busiest_second(seen)
            assert len(seen) / 4.0 >= 0.75 * limit, len(seen)

            injected = time.monotonic()
            fake.inject("GET", "/tasks/", status=429, headers={"Retry-After": "2"})
            await anyio.sleep(3.5)
            throttled = arrivals(fake, since=injected)[0]  # the query that got the 429
            quiet = [t for t in arrivals(fake, since=throttled + 0.3) if t < throttled + 1.8]
            assert quiet == [], f"{len(quiet)} queries arrived while every worker should pause"
            assert arrivals(fake, since=throttled + 2.0), "the workers did not resume after the pause"


async def test_the_identical_generate_sent_to_three_workers_at_once_is_submitted_once(
    fake: FakeDashScope, tmp_path: Path, backend: dict[str, str]
) -> None:
    env = cluster_env(fake, tmp_path, backend)
    with anyio.fail_after(90):
        async with cluster(env, tmp_path, 3) as workers:
            async with http_client(workers[1].base) as client:
                detection = await detect_emo(client)  # detected on one worker, generated on all
            fake.inject("POST", SUBMIT_PATH, delay=1.0, passthrough=True)  # the others meet it in flight
            answers: list[dict[str, Any]] = []

            async def generate(worker: Worker) -> None:
                answers.append(await call(worker.base, "emo_generate", emo_args(detection, 0)))

            async with anyio.create_task_group() as tg:
                for worker in workers:
                    tg.start_soon(generate, worker)
    assert len(fake.submits()) == 1
    assert len({answer["task_id"] for answer in answers}) == 1, answers
    assert sorted(bool(answer.get("deduplicated")) for answer in answers) == [False, True, True]


if NGINX is None and os.environ.get("EMO_MCP_REQUIRE_NGINX") == "1":  # CI: a missing balancer fails, not skips
    raise RuntimeError("EMO_MCP_REQUIRE_NGINX=1 but nginx is not installed (Debian: apt-get install nginx)")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)")
async def test_a_chain_through_nginx_round_robin_lands_on_several_workers(
    fake: FakeDashScope, tmp_path: Path, backend: dict[str, str]
) -> None:
    assert NGINX is not None
    env = cluster_env(fake, tmp_path, backend)
    prefix = tmp_path / "nginx"
    with anyio.fail_after(90):
        async with cluster(env, tmp_path, 2) as workers:
            port = free_port()
            conf = render_nginx(prefix, port, [w.base for w in workers])
            command = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
            async with await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as nginx:
                try:
                    balancer = f"http://127.0.0.1:{port}"
                    await _up(balancer)
                    async with http_client(balancer) as client:
                        detection = await detect_emo(client)
                        arguments = {**emo_args(detection, 0), "audio_url": SPEECH}
                        submitted = await call_ok(client, "emo_generate", arguments)
                        status = await call_ok(
                            client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 30}
                        )
                finally:
                    nginx.send_signal(signal.SIGQUIT)  # graceful: the log is flushed
                    with anyio.move_on_after(10, shield=True):
                        await nginx.wait()
    assert status["task_status"] == "SUCCEEDED", status
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])
    landed = [line.strip() for line in (prefix / "logs" / "workers.log").read_text().splitlines() if line.strip()]
    assert {w.base.removeprefix("http://") for w in workers} <= set(landed), landed  # both workers served
    assert len(fake.submits()) == 1


# ---------------------------------------------------------------- the pieces, in one process


def test_a_reservation_spaces_its_slots_and_holds_back_when_the_timeline_runs_ahead(ledger: Ledger) -> None:
    """The shared window's one statement, on each backend: slots on one timeline per key, none granted
    while the timeline is further ahead than the horizon or the key is paused."""
    now = [1000.0]
    rates = SharedRates(ledger, clock=lambda: now[0])
    assert rates.reserve("queries", 3, 0.1, 0.15) == (0.0, 3)  # slots at +0.0, +0.1, +0.2; next free at +0.3
    wait, granted = rates.reserve("queries", 2, 0.1, 0.15)
    assert granted == 0 and wait == pytest.approx(0.15)  # the timeline is 0.3 s ahead, 0.15 s past the horizon
    now[0] += 0.2
    wait, granted = rates.reserve("queries", 2, 0.1, 0.15)
    assert granted == 2 and wait == pytest.approx(0.1)  # this caller's slots begin where the others' end
    rates.pause("queries", 5.0)  # a 429's Retry-After, seen by any worker
    wait, granted = rates.reserve("queries", 1, 0.1, 0.15)
    assert granted == 0 and wait == pytest.approx(5.0)
    assert rates.reserve("model:emo-v1", 1, 0.2, 0.15) == (0.0, 1)  # each key has a timeline of its own
    assert SharedRates(ledger, clock=lambda: now[0], scope="key-2").reserve("queries", 1, 0.1, 0.15) == (0.0, 1)


async def test_two_limiters_on_one_ledger_share_one_window_and_one_pause(ledger: Ledger) -> None:
    """What two workers' query limiters do with one ledger (on each backend), at the grant."""
    limiters = [RateLimiter(5.0, shared=SharedRates(ledger)) for _ in range(2)]
    granted: list[float] = []

    async def start(limiter: RateLimiter) -> None:
        await limiter.acquire()
        granted.append(time.monotonic())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(start, limiters[index % 2])
        assert busiest_second(sorted(granted)) <= 5
        limiters[0].pause(1.0)  # a 429 seen by one worker
        paused = time.monotonic()
        await limiters[1].acquire()
        assert time.monotonic() - paused >= 0.9


def test_a_claim_in_flight_keeps_its_lease_and_a_dead_workers_claims_are_freed(ledger: Ledger) -> None:
    queue, leases = DueQueue(ledger), Leases(ledger)
    mine, other = Worker_(ledger, LEASE), Worker_(ledger, LEASE)
    now = time.time()
    queue.schedule("task-1", "emo-v1", now, now)
    assert queue.claim(now, 10, LEASE, other.id) == ["task-1"]
    queue.schedule("task-1", "emo-v1", now, now)  # "look at it now" from anyone: the claim stays
    assert queue.claim(now, 10, LEASE, mine.id) == []
    assert leases.take("task-1", mine.id, now, LEASE) == "held"
    assert leases.take("task-2", mine.id, now, LEASE) == "none"
    assert not mine.dead(other.id)
    ledger.execute("UPDATE workers SET heartbeat_at = ? WHERE worker_id = ?", (now - 2 * LEASE, other.id))
    assert other.id in mine.stale()
    assert leases.release_workers(mine.stale(), now) == ["task-1"]
    assert leases.take("task-1", mine.id, now, LEASE) == "taken"
    assert leases.renew(mine.id, ["task-1"], now + 2 * LEASE) == 1
    assert mine.dead("no-such-worker") and not mine.dead(mine.id)
    # A named chore: one holder at a time, taken over from a dead one, free after a clean stop.
    assert leases.hold("reconcile", other.id, now, LEASE) and not leases.hold("reconcile", mine.id, now, LEASE)
    assert leases.holder_of("reconcile") == other.id
    assert leases.take_over("reconcile", other.id, mine.id, now, LEASE) and leases.hold("reconcile", mine.id, now, 1)
    leases.drop(mine.id)
    assert leases.holder_of("reconcile") is None


def test_a_stalled_worker_filing_late_leaves_its_successors_claim_alone(ledger: Ledger) -> None:
    """A worker that stalled past its lease files its step's result after another took the task over:
    the successor's claim and lease stay (else a third worker could claim the task while it is in flight)."""
    queue = DueQueue(ledger)
    taken: list[int] = []
    queue.on_takeover = taken.append
    now = time.time()
    queue.schedule("task-1", "emo-v1", now, now)
    assert queue.claim(now, 10, LEASE, "stalled") == ["task-1"]
    assert taken == []  # a first claim is no takeover
    later = now + LEASE + 0.1  # the stalled worker's lease ran out: the successor claims the task
    assert queue.claim(later, 10, LEASE, "successor") == ["task-1"]
    assert taken == [1]  # counted as a takeover after the lease expired (emo_mcp_leases_taken_over)
    queue.file("task-1", "emo-v1", now, later + 0.5, "query", owner="stalled")
    queue.reschedule("task-1", later + 0.5, "query", owner="stalled")
    assert queue.claims() == [("task-1", "successor")]
    [entry] = ledger.query("SELECT due_at FROM due_queue WHERE task_id = 'task-1'")
    assert float(entry[0]) == pytest.approx(later + LEASE)
    queue.file("task-1", "emo-v1", now, later + 0.5, "query", owner="successor")  # its own claim: released
    assert queue.claims() == []
    assert queue.claim(later + 0.5, 10, LEASE, "successor") == ["task-1"] and taken == [1]


def test_a_dead_workers_submit_that_never_left_is_withdrawn_and_one_that_left_is_looked_for(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A worker killed between writing a submit's row and sending it (say while the submit waited for its
    rate-limit turn) left nothing upstream: the row goes at once and the identical generate may be sent,
    rather than being refused for EMO_MCP_RECONCILE_WINDOW. One killed after the request left may have
    created a task: it is looked for in the task list, and identical generates stay refused."""
    from server.config import load_settings
    from server.jobs.reconcile import Reconciler
    from server.store.ledger import SUBMIT_UNKNOWN
    from tests.test_store_contract import submit

    assert submit(ledger, "submit-queued", "fp-queued") is None and submit(ledger, "submit-left", "fp-left") is None
    ledger.mark_sent("submit-left")
    notified: list[str] = []
    settings = load_settings({"HOME": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}, cwd=tmp_path)
    unused: Any = None  # neither the client nor the evidence is touched by this step
    reconciler = Reconciler(
        settings, unused, ledger, unused, lambda *ids: notified.extend(ids), owner_dead=lambda owner, created_at: True
    )
    unknown = reconciler.mark_dead_submits()
    assert ledger.get_task("submit-queued") is None and notified == ["submit-queued"]
    assert [(row.task_id, row.status) for row in unknown] == [("submit-left", SUBMIT_UNKNOWN)]
    assert submit(ledger, "submit-again", "fp-queued") is None  # the identical generate is sent
    refused = submit(ledger, "submit-twice", "fp-left")
    assert refused is not None and refused.task_id == "submit-left"  # this one may exist: not sent twice
