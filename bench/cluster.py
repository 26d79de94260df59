"""Cluster figures: worker processes behind nginx on one shared ledger, measured at the fake DashScope.

What issue 14 asks a cluster to hold, each figure counted where it matters (at the upstream, which
here is the loopback fake in its own process, `bench.fake_host --control`):

1. one poller per task: upstream queries per task per interval with 4 workers, 500 open tasks and a
   0.5 s fixed interval (goal 1.00), and duplicate polls (goal 0), with a query limit high enough
   not to bind;
2. the query limit held by the sum of the workers: with the default 20/s saturated, the busiest
   sliding one-second window at the fake (goal <= 20) and the mean (goal >= 15, 75% of it);
3. kill -9: random kills of workers (each restarted on its port) while generate jobs run through
   nginx: lost results, duplicate submits (both goal 0) and the longest takeover (from a kill to
   the next request for a task the killed worker had in flight);
4. detect calls per second through nginx with 1, 2 and 4 workers (concurrent MCP clients);
5. with `--database-url`: one detect's own cost on PostgreSQL against SQLite.

Workers are `python -m server --transport http` on
loopback ports with one OUTPUT_DIR; nginx is Debian's, running a rendered copy of deploy/nginx.conf.
With `--database-url`, each part gets a fresh schema on that server (dropped afterwards) and the
workers get it as EMO_MCP_DATABASE_URL; the output says whether the workers really used it.

    python -m bench.cluster                                   # about 5 minutes
    python -m bench.cluster --database-url postgresql://u:p@127.0.0.1:5432/db
    python -m bench.cluster --tasks 20 --window 2 --kills 3 --jobs 3 ...   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import math
import os
import random
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import TextContent

from bench.cluster_host import NGINX, Cluster, FakeHost
from bench.common import BENCH_KEY, PORTRAIT, ROOT, publish

RESULTS = ROOT / "bench" / "CLUSTER.md"
INTERVAL = 0.5
LEASE = 2.0  # the tests' lease: a takeover within one lease plus one interval stays measurable in seconds
HIGH_QPS = 2000  # a query limit that does not bind (500 tasks every 0.5 s want 1000/s)
DEFAULT_QPS = 20
MODEL_QPS = "emo-detect-v1=1000,emo-v1=1000"  # the server's limiter out of the way of (3) and (4)
LEDGER_FILE = "ledger.sqlite3"


# ---------------------------------------------------------------------------------------------- ledger


@dataclass
class Backend:
    """Where the workers' ledger lives for one part: a fresh PostgreSQL schema, or SQLite in OUTPUT_DIR."""

    url: str | None  # the workers' EMO_MCP_DATABASE_URL; None: the SQLite ledger
    schema: str | None = None
    why_not: str | None = None  # set when PostgreSQL was asked for and is not in use

    @property
    def label(self) -> str:
        return "PostgreSQL" if self.url else "SQLite"


def _psycopg() -> Any:
    """psycopg, when installed (the `postgres` extra); imported by name so SQLite runs never need it."""
    return importlib.import_module("psycopg")


def with_schema(url: str, schema: str) -> str:
    """The URL with libpq's `options=-csearch_path=...`: a schema of its own without CREATE DATABASE."""
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"


def redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Schemas:
    """Fresh schemas on `--database-url`, one per part (a part's open tasks must not reach the next)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.made: list[str] = []
        self.why_not: str | None = None

    def fresh(self) -> Backend:
        if self.url is None:
            return Backend(None)
        if self.why_not is not None:
            return Backend(None, why_not=self.why_not)
        schema = f"emo_bench_{uuid.uuid4().hex[:12]}"
        try:
            with _psycopg().connect(self.url, autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'CREATE SCHEMA "{schema}"')
        except ImportError:
            self.why_not = "psycopg is not installed (pip install 'psycopg[binary,pool]')"
            return Backend(None, why_not=self.why_not)
        except Exception as exc:  # unreachable, refused, no right to create a schema: SQLite instead
            text = f"{type(exc).__name__}: {exc}".strip()
            password = urlsplit(self.url).password
            if password:
                text = text.replace(password, "***")
            self.why_not = f"could not create a schema on {redact(self.url)}: {text}"
            return Backend(None, why_not=self.why_not)
        self.made.append(schema)
        return Backend(with_schema(self.url, schema), schema)

    def used_by_workers(self, backend: Backend) -> bool:
        """Whether the workers created their tables in the schema (a build without the PostgreSQL
        backend ignores EMO_MCP_DATABASE_URL and quietly runs on SQLite)."""
        if backend.url is None or self.url is None:
            return False
        with _psycopg().connect(self.url, autocommit=True, connect_timeout=5) as admin:
            [(count,)] = admin.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (backend.schema,)
            ).fetchall()
        return int(count) > 0

    def drop_all(self) -> None:
        if self.url is None or not self.made:
            return
        with _psycopg().connect(self.url, autocommit=True, connect_timeout=5) as admin:
            for schema in self.made:
                admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def check_backend(schemas: Schemas, backend: Backend) -> Backend:
    """After the workers started: the backend they really use (SQLite when they ignored the URL)."""
    if backend.url is not None and not schemas.used_by_workers(backend):
        why = (
            "this server build ignores EMO_MCP_DATABASE_URL (no table appeared in the fresh schema after the "
            "workers started)"
        )
        schemas.why_not = why
        return Backend(None, why_not=why)
    return backend


class ClaimReader:
    """Which tasks a worker (by pid) has a step in flight for: the due queue's claims in the ledger."""

    def __init__(self, backend: Backend, output_dir: Path) -> None:
        self._pg: Any = None
        self._sqlite: sqlite3.Connection | None = None
        self._output_dir = output_dir
        if backend.url is not None:
            self._pg = _psycopg().connect(backend.url, autocommit=True, connect_timeout=5)

    def held_by(self, pid: int) -> list[str]:
        sql = (
            "SELECT d.task_id FROM due_queue d JOIN workers w ON d.claimed_by = w.worker_id"
            " WHERE w.pid = {0} AND w.host = {0}"
        )
        host = socket.gethostname()
        if self._pg is not None:
            rows = self._pg.execute(sql.format("%s"), (pid, host)).fetchall()
        else:
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(self._output_dir / LEDGER_FILE, timeout=10, check_same_thread=False)
            rows = self._sqlite.execute(sql.format("?"), (pid, host)).fetchall()
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._sqlite is not None:
            self._sqlite.close()


# ---------------------------------------------------------------------------------------------- clients


class ToolFailed(RuntimeError):
    """A tool answered with isError (its text is the message)."""


@asynccontextmanager
async def mcp_client(base: str, seconds: float = 60.0) -> AsyncIterator[Client]:
    """The SDK's MCP client over Streamable HTTP (stateless: each call may land on another worker)."""
    async with (
        httpx2.AsyncClient(timeout=seconds) as http,
        Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client,
    ):
        yield client


async def call(client: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    if result.is_error or result.structured_content is None:
        text = " ".join(block.text for block in result.content if isinstance(block, TextContent))
        raise ToolFailed(f"{name}: {text}")
    return dict(result.structured_content)


async def call_once(base: str, name: str, arguments: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One call in a session of its own, bounded in time (a killed worker may leave a stream hanging)."""
    with anyio.fail_after(seconds):
        async with mcp_client(base, seconds) as client:
            return await call(client, name, arguments)


def emo_arguments(detection: dict[str, Any], audio_url: str) -> dict[str, Any]:
    return {
        "image_url": PORTRAIT,
        "audio_url": audio_url,
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


def audio_of(part: str, index: int) -> str:
    return f"https://audio.example.com/bench-{part}-{index}.wav"


def worker_env(fake_url: str, work: Path, backend: Backend, *, query_qps: float) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOME": str(work / "home"),
        "LANG": "C.UTF-8",
        "DASHSCOPE_API_KEY": BENCH_KEY,
        "DASHSCOPE_HTTP_BASE_URL": fake_url,
        "OUTPUT_DIR": str(work / "output"),
        "EMO_MCP_POLL_INTERVAL": str(INTERVAL),
        "EMO_MCP_POLL_SCHEDULE": "fixed",
        "EMO_MCP_LEASE_SECONDS": str(LEASE),
        "EMO_MCP_MAX_QUERY_QPS": str(query_qps),
        "EMO_MCP_MODEL_QPS": MODEL_QPS,
        "EMO_MCP_LOG_LEVEL": "WARNING",
    }
    if backend.url is not None:
        env["EMO_MCP_DATABASE_URL"] = backend.url
    return env


async def submit_many(base: str, part: str, indexes: range, clients: int) -> list[str]:
    """emo_generate jobs `indexes` (one detect first), `clients` MCP sessions at once; their task ids."""
    async with mcp_client(base) as client:
        detection = await call(client, "emo_detect", {"image_url": PORTRAIT})
    task_ids: dict[int, str] = {}
    todo = iter(indexes)

    async def one_client() -> None:
        async with mcp_client(base) as client:
            for index in todo:
                arguments = emo_arguments(detection, audio_of(part, index))
                task_ids[index] = (await call(client, "emo_generate", arguments))["task_id"]

    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one_client)
    return [task_ids[index] for index in indexes]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds of these processes so far (/proc; a gone process counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# ---------------------------------------------------------------------------------------------- statistics


def busiest_second(times: Sequence[float]) -> int:
    """The most arrivals in any sliding one-second window."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


# ---------------------------------------------------------------------------------------------- parts


@dataclass
class Polling:
    tasks: int
    window: float
    per_task_per_interval: float
    fewest: int
    most: int
    never: int
    duplicates: int  # consecutive queries of one task by two workers, less than half an interval apart
    jitter: int  # the same, by one worker (a late query, then its next on time)
    rate: float
    workers_cpu: float  # CPUs the workers used over the window
    fake_cpu: float


@dataclass
class Limit:
    window: float
    busiest: int
    mean: float


@dataclass
class Kills:
    jobs: int
    kills: int
    seconds: float
    lost: int
    duplicate_submits: int
    takeovers: list[float] = field(default_factory=list)
    # Takeovers cut short by a second kill: the task was held again by the next victim before anyone asked.
    cascaded: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def measure_polling(fake: FakeHost, cluster: Cluster, task_ids: Sequence[str], window: float) -> Polling:
    """Queries of each open task at the fake over `window` seconds, and the CPU the processes used."""
    await anyio.sleep(2 * INTERVAL + 1.0)  # the submits' first queries are behind us
    pids = [w.pid for w in cluster.workers]
    workers_cpu, fake_cpu = cpu_seconds(pids), cpu_seconds([fake.process.pid])
    start = time.monotonic()
    await anyio.sleep(window)
    end = time.monotonic()
    workers_cpu, fake_cpu = cpu_seconds(pids) - workers_cpu, cpu_seconds([fake.process.pid]) - fake_cpu
    tagged: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for task_id, at, port in fake.ask("tagged", since=start)["queries"]:
        if at < end:
            tagged[str(task_id)].append((float(at), int(port)))
    counts = [len(tagged.get(task_id, [])) for task_id in task_ids]
    two_workers = same_worker = 0
    for queries in tagged.values():
        for (earlier, port), (later, next_port) in itertools.pairwise(sorted(queries)):
            if later - earlier < INTERVAL / 2:
                two_workers += port != next_port
                same_worker += port == next_port
    return Polling(
        tasks=len(task_ids),
        window=end - start,
        per_task_per_interval=sum(counts) / len(task_ids) / ((end - start) / INTERVAL),
        fewest=min(counts),
        most=max(counts),
        never=sum(1 for count in counts if count == 0),
        duplicates=two_workers,
        jitter=same_worker,
        rate=sum(counts) / (end - start),
        workers_cpu=workers_cpu / (end - start),
        fake_cpu=fake_cpu / (end - start),
    )


async def part_polling(args: argparse.Namespace, schemas: Schemas, work: Path) -> tuple[list[Polling], Limit, Backend]:
    """(1) and (2) on one set of open tasks: first with a limit that does not bind (at `--light-tasks`,
    a load this host can serve, then at `--tasks`), then with the default limit."""
    await anyio.Path(work).mkdir(parents=True, exist_ok=True)
    # The tasks stay PENDING (open for the whole part); each worker has a port of the fake to itself.
    fake = FakeHost(BENCH_KEY, auto_progress=False, ports=args.workers)
    backend = schemas.fresh()
    stages = sorted({min(args.light_tasks, args.tasks), args.tasks})
    pollings: list[Polling] = []
    try:
        env = worker_env(fake.base_url, work, backend, query_qps=HIGH_QPS)
        cluster = Cluster(env, work, args.workers, upstreams=fake.worker_urls)
        try:
            await cluster.start()
            backend = check_backend(schemas, backend)
            task_ids: list[str] = []
            for count in stages:
                task_ids += await submit_many(cluster.base, "open", range(len(task_ids), count), args.clients)
                known = {t["task_id"] for t in fake.ask("tasks")["tasks"] if t["status"] == "PENDING"}
                assert set(task_ids) <= known, "an open task is not open at the fake"
                pollings.append(await measure_polling(fake, cluster, task_ids, args.window))
        finally:
            cluster.close()
        # (2): the same ledger and open tasks, the workers restarted with the default limit.
        env = worker_env(fake.base_url, work, backend, query_qps=DEFAULT_QPS)
        cluster = Cluster(env, work, args.workers, upstreams=fake.worker_urls)
        try:
            await cluster.start()
            await anyio.sleep(3.0)  # past the start-up's first claims
            start = time.monotonic()
            await anyio.sleep(args.limit_window)
            end = time.monotonic()
        finally:
            cluster.close()
        seen = fake.ask("requests", since=start)
        arrivals = [float(at) for _, at in seen["queries"] if at < end]
        arrivals += [float(at) for at in seen["other_tasks_calls"] if at < end]
        limit = Limit(window=end - start, busiest=busiest_second(arrivals), mean=len(arrivals) / (end - start))
        return pollings, limit, backend
    finally:
        fake.close()


def failure(exc: BaseException) -> str:
    """What failed, through any exception groups (the client's task groups wrap a cut stream's error)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def part_kills(args: argparse.Namespace, schemas: Schemas, work: Path) -> tuple[Kills, Backend]:
    """(3): generate jobs through nginx while workers are killed with SIGKILL and started again."""
    await anyio.Path(work).mkdir(parents=True, exist_ok=True)
    fake = FakeHost(BENCH_KEY, polls_to_finish=args.polls_to_finish)
    backend = schemas.fresh()
    rng = random.Random(args.seed)
    cluster = Cluster(worker_env(fake.base_url, work, backend, query_qps=HIGH_QPS), work, args.workers)
    jobs: dict[int, str] = {}  # job -> task id
    finals: dict[int, dict[str, Any]] = {}
    errors: dict[int, Counter[str]] = defaultdict(Counter)  # job -> its failures, how often each
    kills: list[tuple[float, list[str]]] = []
    killing = args.kills * args.kill_gap
    life = args.polls_to_finish * INTERVAL
    spread = max(1.0, killing - life)
    try:
        await cluster.start()
        backend = check_backend(schemas, backend)
        reader = ClaimReader(backend, work / "output")
        async with mcp_client(cluster.base) as client:
            detection = await call(client, "emo_detect", {"image_url": PORTRAIT})
        # Jobs may go on until `--settle` seconds (plus one task's life) after the last kill, however long
        # the kills took on this host (a slower host restarts its workers more slowly).
        deadline = [math.inf]

        async def job(index: int) -> None:
            await anyio.sleep(rng.uniform(0, spread))
            arguments = emo_arguments(detection, audio_of("kill", index))
            # The same generate again after a failure: the server must answer with the one task, never
            # a second submit (a lost answer is reconciled, an identical request deduplicated).
            while index not in jobs and time.monotonic() < deadline[0]:
                try:
                    jobs[index] = (await call_once(cluster.base, "emo_generate", arguments, 30))["task_id"]
                except Exception as exc:  # a killed worker: 502 from nginx, a cut stream, a timeout
                    errors[index][f"generate: {failure(exc)}"[:200]] += 1
                    await anyio.sleep(0.3)
            while index in jobs and time.monotonic() < deadline[0]:
                try:
                    status = await call_once(
                        cluster.base, "task_status", {"task_id": jobs[index], "wait_seconds": 10}, 25
                    )
                except Exception as exc:
                    errors[index][f"task_status: {failure(exc)}"[:200]] += 1
                    await anyio.sleep(0.3)
                    continue
                if status.get("task_status") == "SUCCEEDED" and status.get("video_path"):
                    finals[index] = status
                    return

        async def killer() -> None:
            try:
                await anyio.sleep(1.0)
                for _ in range(args.kills):
                    await anyio.sleep(rng.uniform(0, 2 * args.kill_gap))
                    alive = [w for w in cluster.workers if w.alive()]
                    victim = rng.choice(alive)
                    pid = victim.pid
                    victim.kill()
                    killed = time.monotonic()
                    held = await anyio.to_thread.run_sync(reader.held_by, pid)
                    kills.append((killed, held))
                    victim.start()  # on its port again: nginx skips it until it answers
            finally:
                deadline[0] = time.monotonic() + life + args.settle

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            for index in range(args.jobs):
                tg.start_soon(job, index)
        seconds = time.monotonic() - started
        reader.close()
    finally:
        cluster.close()
    try:
        seen = fake.ask("requests")
        digests = fake.ask("sha256", task_ids=sorted(set(jobs.values())))["sha256"]
    finally:
        fake.close()
    lost = 0
    notes: list[str] = []
    for index in range(args.jobs):
        final = finals.get(index)
        path = Path(final["video_path"]) if final else None
        if final is None or path is None or not path.is_file():
            lost += 1
            seen_errors = "; ".join(f"{count}x {text}" for text, count in errors[index].most_common(3))
            notes.append(f"job {index}: not finished ({seen_errors or 'no error seen'})")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digests.get(jobs[index]):
            lost += 1
            notes.append(f"job {index}: the video on disk has the wrong sha256")
    submits: dict[str, int] = defaultdict(int)
    for audio, _ in seen["submits"]:
        submits[str(audio)] += 1
    duplicates = sum(count - 1 for audio, count in submits.items() if audio.startswith(audio_of("kill", 0)[:-5]))
    requests = sorted(
        [(str(t), float(at)) for t, at in seen["queries"]] + [(str(t), float(at)) for t, at in seen["downloads"]],
        key=lambda pair: pair[1],
    )
    takeovers: list[float] = []
    cascaded: list[float] = []
    for killed, held in kills:
        for task_id in held:
            after = next((at for t, at in requests if t == task_id and at > killed), None)
            if after is None:
                notes.append(f"task {task_id}: never asked for again after the kill at {killed:.1f}")
            elif any(killed < again < after and task_id in again_held for again, again_held in kills):
                # The worker that took it over was killed too, before its query: that kill's own takeover.
                cascaded.append(after - killed)
            else:
                takeovers.append(after - killed)
    result = Kills(args.jobs, len(kills), seconds, lost, duplicates, takeovers, cascaded, notes)
    return result, backend


@dataclass
class DetectRate:
    workers: int
    rate: float
    failed: int
    workers_cpu: float  # CPUs the workers used
    clients_cpu: float  # CPUs this process (the MCP clients) used


async def detect_rate(cluster: Cluster, clients: int, seconds: float) -> DetectRate:
    """Detect calls per second completed by `clients` concurrent MCP sessions over `seconds`."""
    base = cluster.base
    pids = [w.pid for w in cluster.workers]
    done = 0
    failed = 0
    measuring = False

    async def one_client(index: int) -> None:
        nonlocal done, failed
        async with mcp_client(base) as client:
            for n in itertools.count():
                image = f"https://images.example.com/people/bench-{index}-{n % 8}.jpg"
                try:
                    await call(client, "emo_detect", {"image_url": image})
                except ToolFailed:
                    failed += measuring
                    continue
                done += measuring

    async with anyio.create_task_group() as tg:
        for index in range(clients):
            tg.start_soon(one_client, index)
        await anyio.sleep(1.0)  # every session open, the workers warm
        measuring = True
        workers_cpu, own = cpu_seconds(pids), os.times()
        started = time.monotonic()
        await anyio.sleep(seconds)
        measuring = False
        elapsed = time.monotonic() - started
        workers_cpu, after = cpu_seconds(pids) - workers_cpu, os.times()
        tg.cancel_scope.cancel()
    clients_cpu = after.user + after.system - own.user - own.system
    return DetectRate(len(pids), done / elapsed, failed, workers_cpu / elapsed, clients_cpu / elapsed)


async def part_detect(args: argparse.Namespace, schemas: Schemas, work: Path) -> list[DetectRate]:
    """(4): the same clients against 1, 2 and 4 workers behind nginx (a fresh ledger each)."""
    await anyio.Path(work).mkdir(parents=True, exist_ok=True)
    fake = FakeHost(BENCH_KEY)
    rates: list[DetectRate] = []
    try:
        for count in args.detect_workers:
            backend = schemas.fresh()
            folder = work / f"detect-{count}"
            await anyio.Path(folder).mkdir()
            cluster = Cluster(worker_env(fake.base_url, folder, backend, query_qps=DEFAULT_QPS), folder, count)
            try:
                await cluster.start()
                backend = check_backend(schemas, backend)
                rates.append(await detect_rate(cluster, args.clients, args.detect_seconds))
            finally:
                cluster.close()
    finally:
        fake.close()
    return rates


async def detect_cost(fake_url: str, folder: Path, backend: Backend, rounds: int) -> float:
    """Median milliseconds of one detect on one worker, one client, one call at a time (no nginx)."""
    await anyio.Path(folder).mkdir()
    cluster = Cluster(worker_env(fake_url, folder, backend, query_qps=DEFAULT_QPS), folder, 1, nginx=False)
    times: list[float] = []
    try:
        await cluster.start()
        async with mcp_client(cluster.base) as client:
            for n in range(rounds + 10):
                started = time.perf_counter()
                await call(client, "emo_detect", {"image_url": f"https://images.example.com/people/cost-{n}.jpg"})
                if n >= 10:  # the first calls warm the worker's caches and connections
                    times.append((time.perf_counter() - started) * 1000)
    finally:
        cluster.close()
    return statistics.median(times)


async def part_cost(args: argparse.Namespace, schemas: Schemas, work: Path) -> tuple[float, float] | None:
    """(5): one detect on SQLite and on PostgreSQL, only when the workers really use PostgreSQL."""
    await anyio.Path(work).mkdir(parents=True, exist_ok=True)
    if schemas.url is None or schemas.why_not is not None:
        return None
    fake = FakeHost(BENCH_KEY)
    try:
        sqlite_ms = await detect_cost(fake.base_url, work / "cost-sqlite", Backend(None), args.detect_rounds)
        backend = schemas.fresh()
        if backend.url is None:
            return None
        postgres_ms = await detect_cost(fake.base_url, work / "cost-postgres", backend, args.detect_rounds)
        return sqlite_ms, postgres_ms
    finally:
        fake.close()


# ---------------------------------------------------------------------------------------------- report


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(
    args: argparse.Namespace,
    command: str,
    backend: Backend,
    schemas: Schemas,
    pollings: list[Polling],
    limit: Limit,
    kills: Kills,
    rates: list[DetectRate],
    cost: tuple[float, float] | None,
) -> list[str]:
    if schemas.url is None:
        ledger = "the shared SQLite ledger in OUTPUT_DIR (no `--database-url`)"
    elif backend.url is None:
        ledger = f"the shared SQLite ledger in OUTPUT_DIR: PostgreSQL was asked for, but {schemas.why_not}"
    else:
        ledger = f"PostgreSQL at {redact(schemas.url)}, a fresh schema per part (dropped afterwards)"
    takeover = max(kills.takeovers) if kills.takeovers else float("nan")
    lines = [
        "# Cluster figures",
        "",
        f"`{command}`: {args.workers} workers (`python -m server --transport http` on loopback ports, one "
        f"OUTPUT_DIR) behind nginx ({NGINX}, a rendered copy of deploy/nginx.conf, round robin), the fake "
        f"DashScope in its own process (`bench.fake_host --control`), everything on 127.0.0.1. Ledger: {ledger}. "
        f"Poll interval {INTERVAL:g} s with `EMO_MCP_POLL_SCHEDULE=fixed`, `EMO_MCP_LEASE_SECONDS={LEASE:g}`, "
        f"`EMO_MCP_MODEL_QPS={MODEL_QPS}` so that the per-model limiter does not set figures 3 and "
        f"4. Host: {os.cpu_count()} CPUs shared by the workers, nginx, the fake and the clients.",
        "",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for polling in pollings:
        lines += [
            f"| 1. upstream queries per task per interval, {polling.tasks} open tasks ({polling.window:.0f} s; "
            f"`EMO_MCP_MAX_QUERY_QPS={HIGH_QPS}`: not binding) | {polling.per_task_per_interval:.2f} (per task "
            f"{polling.fewest}–{polling.most} in {polling.window / INTERVAL:.0f} intervals, {polling.rate:.0f} "
            f"queries/s in all, {polling.never} never queried; the workers used {polling.workers_cpu:.2f} CPUs, the "
            f"fake {polling.fake_cpu:.2f}) | 1.00 | "
            f"{met(abs(polling.per_task_per_interval - 1) <= 0.05 and polling.never == 0)} |",
            f"| 1. duplicate polls, {polling.tasks} open tasks (two workers querying one task less than half an "
            f"interval apart; one worker's own late-then-on-time pairs: {polling.jitter}) | {polling.duplicates} | 0 | "
            f"{met(polling.duplicates == 0)} |",
        ]
    tasks = pollings[-1].tasks
    lines += [
        f"| 2. busiest sliding one-second window at the fake, limit {DEFAULT_QPS}/s saturated "
        f"({tasks} tasks want {tasks / INTERVAL:.0f}/s; {limit.window:.0f} s) | {limit.busiest} | "
        f"≤ {DEFAULT_QPS} | {met(limit.busiest <= DEFAULT_QPS)} |",
        f"| 2. mean queries per second over the same window | {limit.mean:.2f} | ≥ {0.75 * DEFAULT_QPS:g} | "
        f"{met(limit.mean >= 0.75 * DEFAULT_QPS)} |",
        f"| 3. lost results: {kills.jobs} generate jobs through nginx, {kills.kills} kill -9s of random workers "
        f"(each started again at once) over {kills.seconds:.0f} s | {kills.lost} | 0 | {met(kills.lost == 0)} |",
        f"| 3. duplicate submits at the fake | {kills.duplicate_submits} | 0 | {met(kills.duplicate_submits == 0)} |",
        f"| 3. longest takeover: kill → next request for a task the killed worker had in flight "
        f"({len(kills.takeovers)} such tasks in {kills.kills} kills; {len(kills.cascaded)} more whose new holder "
        f"was killed too before asking, longest {max(kills.cascaded, default=0.0):.2f} s from the first kill) | "
        + (f"{takeover:.2f} s" if kills.takeovers else "– (no kill caught a step in flight)")
        + f" | ≤ {LEASE + INTERVAL:g} s (one lease plus one interval) | "
        + (met(takeover <= LEASE + INTERVAL) if kills.takeovers else "")
        + " |",
    ]
    for rate in rates:
        lines.append(
            f"| 4. detect calls per second through nginx, {rate.workers} worker{'s' if rate.workers > 1 else ''}, "
            f"{args.clients} concurrent MCP clients ({args.detect_seconds:g} s; the workers used "
            f"{rate.workers_cpu:.2f} CPUs, the clients {rate.clients_cpu:.2f}) | {rate.rate:.1f}/s | – | |"
        )
    if cost is not None:
        sqlite_ms, postgres_ms = cost
        lines.append(
            f"| 5. one detect's own cost, PostgreSQL against SQLite (median of {args.detect_rounds}, one worker, one "
            f"client) | {postgres_ms:.2f} ms vs {sqlite_ms:.2f} ms: {postgres_ms / sqlite_ms:.2f}× | – | |"
        )
    else:
        why = "no `--database-url`" if schemas.url is None else schemas.why_not
        lines.append(f"| 5. one detect's own cost, PostgreSQL against SQLite | not measured: {why} | – | |")
    lines.append("")
    heavy, cpus = pollings[-1], os.cpu_count() or 1
    if heavy.per_task_per_interval < 0.95 and heavy.workers_cpu + heavy.fake_cpu >= 0.7 * cpus:
        lines += [
            f"Figure 1 at {heavy.tasks} tasks: the workers and the fake used {heavy.workers_cpu + heavy.fake_cpu:.2f} "
            f"of this host's {cpus} CPUs, so {heavy.rate:.0f} queries/s is the machine's capacity, not the "
            f"one-poller rule (which the zero duplicates show); {heavy.tasks} tasks every {INTERVAL:g} s need "
            f"{heavy.tasks / INTERVAL:.0f}/s. "
            + (
                f"At {pollings[0].tasks} tasks, a load this host can serve: {pollings[0].per_task_per_interval:.2f}."
                if len(pollings) > 1
                else ""
            ),
            "",
        ]
    lines += [
        f"Figure 3: `EMO_MCP_MAX_QUERY_QPS={HIGH_QPS}`; each job's task succeeds at the fake after "
        f"{args.polls_to_finish} queries; a job retries its generate (the identical request) and its task_status "
        "until it has its video, so a lost result is one that never came. A killed worker is started again at "
        "once on its port: a starting worker releases the claims of a dead pid on its own host at once, so most "
        f"takeovers here are shorter than the lease; a lost host's claims wait for the lease ({LEASE:g} s).",
        "",
    ]
    failures = sum(rate.failed for rate in rates)
    if failures:
        lines.append(f"Detect calls that failed during figure 4: {failures}.")
        lines.append("")
    if kills.notes:
        lines.append("Kill -9 part, what went wrong:")
        lines.append("")
        lines += [f"- {note}" for note in kills.notes[:20]]
        lines.append("")
    return lines


async def run(args: argparse.Namespace, work: Path) -> list[str]:
    schemas = Schemas(args.database_url)
    try:
        pollings, limit, backend = await part_polling(args, schemas, work / "polling")
        kills, _ = await part_kills(args, schemas, work / "kills")
        rates = await part_detect(args, schemas, work / "detect")
        cost = await part_cost(args, schemas, work / "cost")
    finally:
        schemas.drop_all()
    command = "python -m bench.cluster" + "".join(f" {a}" for a in args.argv_shown)
    return report(args, command, backend, schemas, pollings, limit, kills, rates, cost)


def _workers_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a PostgreSQL server for the ledger (a fresh schema per part)")
    parser.add_argument("--workers", type=int, default=4, help="workers for figures 1-3")
    parser.add_argument("--tasks", type=int, default=500, help="open tasks for figures 1 and 2")
    parser.add_argument("--light-tasks", type=int, default=50, help="figure 1 first at this many open tasks")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of figure 1's window")
    parser.add_argument("--limit-window", type=float, default=10.0, help="seconds of figure 2's window")
    parser.add_argument("--jobs", type=int, default=50, help="generate jobs of figure 3")
    parser.add_argument("--kills", type=int, default=100, help="kill -9s of figure 3")
    parser.add_argument("--kill-gap", type=float, default=1.0, help="mean seconds between kills")
    parser.add_argument("--polls-to-finish", type=int, default=30, help="queries before a job's task succeeds")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds jobs may take after the last kill")
    parser.add_argument("--detect-workers", type=_workers_list, default=[1, 2, 4], help="e.g. 1,2,4")
    parser.add_argument("--detect-seconds", type=float, default=8.0)
    parser.add_argument("--detect-rounds", type=int, default=100, help="timed detects of figure 5")
    parser.add_argument("--clients", type=int, default=8, help="concurrent MCP clients")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (worker logs) for a look")
    args = parser.parse_args(argv)
    if NGINX is None:
        parser.error("nginx is not installed (Debian: apt-get install nginx)")
    shown = list(argv) if argv is not None else sys.argv[1:]
    args.argv_shown = [redact(a) if a.startswith("postgres") else a for a in shown if a not in ("--keep",)]
    work = Path(tempfile.mkdtemp(prefix="emo-cluster-"))
    try:
        lines = anyio.run(run, args, work)
    finally:
        if not args.keep:
            _remove(work)
        else:
            sys.stderr.write(f"work folder kept: {work}\n")
    publish(lines, args.output)
    return 0


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
