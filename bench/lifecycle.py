"""Reliability figures of the task lifecycle (issue 3), measured against the loopback fake.

    python bench/lifecycle.py [--cycles 100] > bench/LIFECYCLE.md

Prints Markdown: each figure, its goal, and how it was measured. Nothing here is a test: the
numbers depend on the machine, so they are reported, not asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.app import create_app  # noqa: E402
from server.config import Settings, load_settings  # noqa: E402
from server.sandbox.fake_dashscope import FakeDashScope, FakeTask  # noqa: E402
from server.store.ledger import Ledger  # noqa: E402

KEY = "sk-bench-0000000000"
PORTRAIT = "https://images.example.com/people/bench.jpg"


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def env_for(fake: FakeDashScope, folder: Path, **extra: str) -> dict[str, str]:
    return {
        "DASHSCOPE_API_KEY": KEY,
        "DASHSCOPE_HTTP_BASE_URL": fake.base_url,
        "OUTPUT_DIR": str(folder / "output"),
        "HOME": str(folder),
        "EMO_MCP_LOG_LEVEL": "WARNING",
        **extra,
    }


def settings_for(fake: FakeDashScope, folder: Path, **extra: str) -> Settings:
    return load_settings(env_for(fake, folder, **extra), cwd=folder)


def data(result: Any) -> dict[str, Any]:
    if result.is_error or result.structured_content is None:
        raise RuntimeError(f"tool error: {result.content}")
    return dict(result.structured_content)


async def detect(client: Client) -> dict[str, Any]:
    return data(await client.call_tool("emo_detect", {"image_url": PORTRAIT}))


def emo_args(detection: dict[str, Any], audio: str) -> dict[str, Any]:
    return {
        "image_url": PORTRAIT,
        "audio_url": audio if audio.startswith("https://") else f"https://audio.example.com/{audio}",
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


def peak_per_second(stamps: list[float]) -> int:
    """Most events in any half-open one-second window [t, t+1)."""
    stamps = sorted(stamps)
    best, start = 0, 0
    for end, stamp in enumerate(stamps):
        while stamp - stamps[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


# ---------------------------------------------------------------- 1. waiters share queries


async def waiters_share_queries(interval: float, intervals: int) -> None:
    out("## 1. Upstream queries per poll interval, N agents waiting on one task (goal: 1, 1, 1)")
    out()
    out(
        "One open task that never finishes; N concurrent agents (tasks sharing one in-memory MCP session) call "
        "`task_status` in a loop (half with `wait_seconds=1`, half with `wait_seconds=0` every 50 ms) for "
        f"{intervals} poll intervals of {interval} s; the fake counts `GET /tasks/{{id}}`."
    )
    out()
    out("| agents | queries | intervals | queries per interval |")
    out("|---:|---:|---:|---:|")
    for agents in (1, 10, 100):
        fake = FakeDashScope(api_key=KEY, auto_progress=False)
        async with fake.serve():
            with tempfile.TemporaryDirectory() as folder:
                settings = settings_for(fake, Path(folder), EMO_MCP_POLL_INTERVAL=str(interval))
                async with Client(create_app(settings)) as client:
                    submitted = data(await client.call_tool("emo_generate", emo_args(await detect(client), "a.wav")))
                    task_id = submitted["task_id"]
                    await anyio.sleep(interval)  # past the first query that follows a submit
                    start = time.monotonic()
                    stop = start + intervals * interval

                    async def agent(index: int, stop: float = stop, task_id: str = task_id) -> None:
                        while time.monotonic() < stop:
                            wait = index % 2
                            await client.call_tool("task_status", {"task_id": task_id, "wait_seconds": wait})
                            if not wait:
                                await anyio.sleep(0.05)

                    async with anyio.create_task_group() as tg:
                        for index in range(agents):
                            tg.start_soon(agent, index)
                    queries = [q for q in fake.queries(task_id) if start <= q.at < stop]
        out(f"| {agents} | {len(queries)} | {intervals} | {len(queries) / intervals:.2f} |")
    out()


# ---------------------------------------------------------------- 2. peak rate with 200 open tasks


async def peak_rate_with_open_tasks(tasks: int, seconds: float) -> None:
    out(f"## 2. Peak upstream query rate with {tasks} open tasks (goal: never above the configured limit)")
    out()
    fake = FakeDashScope(api_key=KEY, auto_progress=False)
    async with fake.serve():
        with tempfile.TemporaryDirectory() as folder:
            settings = settings_for(fake, Path(folder), EMO_MCP_POLL_INTERVAL="0.5")
            # The tasks are put straight into the fake and the ledger: submitting 200 through the tools
            # would take 40 s at emo-v1's 5 submits/s, and it is the watcher's query rate being measured.
            ledger = Ledger(settings.state_dir)
            for _ in range(tasks):
                task_id = str(uuid.uuid4())
                fake.tasks[task_id] = FakeTask(
                    task_id, "emo-v1", "PENDING", {}, None, time.monotonic(), time.time(), str(uuid.uuid4())
                )
                ledger.add_task(
                    task_id=task_id,
                    family="emo",
                    model="emo-v1",
                    payload={},
                    ratio="1:1",
                    status="PENDING",
                    request_id=None,
                    evidence_dir=str(settings.output_dir / "aliyun-emo" / "tasks" / task_id),
                )
            ledger.close()
            start = time.monotonic()
            async with Client(create_app(settings)):
                await anyio.sleep(seconds)
            stamps = [q.at for q in fake.queries() if q.at >= start]
    demand = tasks / 0.5
    out(
        f"{tasks} PENDING tasks in the ledger, poll interval 0.5 s (a demand of {demand:.0f} queries/s), limit "
        f"`EMO_MCP_MAX_QUERY_QPS` = {settings.max_query_qps:.0f}; the server ran {seconds:.0f} s with no agent; "
        "the peak is the most queries the fake received in any one-second window."
    )
    out()
    out("| queries | mean per second | peak in any 1 s window | limit |")
    out("|---:|---:|---:|---:|")
    mean = len(stamps) / seconds
    out(f"| {len(stamps)} | {mean:.1f} | {peak_per_second(stamps)} | {settings.max_query_qps:.0f} |")
    out()

    fake = FakeDashScope(api_key=KEY, auto_progress=False)
    async with fake.serve():
        with tempfile.TemporaryDirectory() as folder:
            settings = settings_for(fake, Path(folder), EMO_MCP_POLL_INTERVAL="60")
            async with Client(create_app(settings)) as client:
                detection = await detect(client)
                async with anyio.create_task_group() as tg:
                    for n in range(20):
                        tg.start_soon(client.call_tool, "emo_generate", emo_args(detection, f"s{n}.wav"))
            stamps = [r.at for r in fake.submits()]
    out(
        f"Submits: 20 concurrent `emo_generate` calls: {len(stamps)} submits, peak {peak_per_second(stamps)} in any "
        "one-second window (emo-v1 limit 5/s)."
    )
    out()


# ---------------------------------------------------------------- 3. SUCCEEDED -> on disk


async def success_to_disk(interval: float, samples: int) -> None:
    out("## 3. Time from SUCCEEDED upstream to the video on disk, nobody polling (goal: ≤ one interval + download)")
    out()
    fake = FakeDashScope(api_key=KEY, auto_progress=False)
    fake.video_size = 16 * 64 * 1024
    rows: list[tuple[float, float]] = []
    async with fake.serve():
        with tempfile.TemporaryDirectory() as folder:
            settings = settings_for(fake, Path(folder), EMO_MCP_POLL_INTERVAL=str(interval))
            async with Client(create_app(settings)) as client:
                detection = await detect(client)
                for n in range(samples):
                    submitted = data(await client.call_tool("emo_generate", emo_args(detection, f"d{n}.wav")))
                    task_id = submitted["task_id"]
                    await anyio.sleep(random.uniform(0, interval))  # land anywhere in the poll cycle
                    video = settings.output_dir / "aliyun-emo" / "tasks" / task_id / f"{task_id}.mp4"
                    marked = time.monotonic()
                    fake.complete(task_id)
                    while not video.is_file():  # noqa: ASYNC110 - written by the server's watcher
                        await anyio.sleep(0.002)
                    landed = time.monotonic()
                    download = next(r.at for r in fake.requests if r.path == f"/files/{task_id}.mp4")
                    rows.append((landed - marked, landed - download))
    latencies = [r[0] for r in rows]
    within = sum(1 for total, download in rows if total <= interval + download + 0.05)
    out(
        f"{samples} tasks, poll interval {interval} s, 1 MiB videos; no `task_status` call at all. The fake marks "
        "the task SUCCEEDED at a random point of the poll cycle; the clock stops when the `.mp4` appears."
    )
    out()
    out("| median | max | max download alone | within interval + download (+50 ms scheduling) |")
    out("|---:|---:|---:|---:|")
    out(
        f"| {statistics.median(latencies):.3f} s | {max(latencies):.3f} s | {max(r[1] for r in rows):.3f} s "
        f"| {within}/{samples} |"
    )
    out()


# ---------------------------------------------------------------- 4. kill / restart cycles


def children() -> set[int]:
    me = str(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    found.add(int(entry.name))
    return found


@asynccontextmanager
async def process(env: dict[str, str], cwd: Path) -> AsyncIterator[tuple[Client, int]]:
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=full, cwd=str(cwd))
    before = children()
    async with Client(params) as client:
        [pid] = children() - before
        yield client, pid


async def settle_job(client: Client, detection: dict[str, Any], audio: str) -> str | None:
    """What a careful agent does for one job: generate (dedup makes it safe), then wait for the end."""
    result = await client.call_tool("emo_generate", emo_args(detection, audio))
    if result.is_error:
        return None  # outcome unknown / unresolved: try again later, never force a duplicate
    task_id = str(result.structured_content["task_id"]) if result.structured_content else ""
    status = data(await client.call_tool("task_status", {"task_id": task_id, "wait_seconds": 2}))
    return task_id if status["finished"] else None


async def kill_restart_cycles(cycles: int, budget: float) -> None:
    out("## 4. Randomized kill/restart cycles (goal: 0 lost tasks, 0 duplicate submits)")
    out()
    rng = random.Random(20261121)
    fake = FakeDashScope(api_key=KEY, polls_to_finish=3)
    fake.video_size = 4 * 64 * 1024
    jobs: list[str] = []
    outcome: dict[str, str] = {}  # job -> the task id the agent saw finish
    done = 0
    started = time.monotonic()
    points: dict[str, int] = {}
    async with fake.serve():
        with tempfile.TemporaryDirectory() as folder:
            env = env_for(fake, Path(folder), EMO_MCP_POLL_INTERVAL="0.1", EMO_MCP_RECONCILE_WINDOW="3")
            detection: dict[str, Any] = {}
            for cycle in range(cycles):
                if time.monotonic() - started > budget:
                    break
                if cycle % 2 == 0 or not jobs:
                    failing = rng.random() < 0.1
                    jobs.append(f"https://audio.example.com/job-{len(jobs)}{'-failtask' if failing else ''}.wav")
                fake.download_chunk_delay = rng.choice([0.0, 0.05, 0.2])
                if rng.random() < 0.3:
                    fake.inject("POST", "/services/aigc/image2video/video-synthesis", delay=5, passthrough=True)
                if rng.random() < 0.3:
                    fake.inject("GET", "/tasks/", delay=5, passthrough=True)
                kill_after = rng.uniform(0.05, 1.5)
                async with process(env, Path(folder)) as (client, pid), anyio.create_task_group() as tg:

                    async def work(client: Client = client) -> None:
                        nonlocal detection
                        if not detection:
                            detection = await detect(client)
                        for audio in rng.sample(jobs, len(jobs)):
                            if audio not in outcome:  # an agent does not re-run a job it saw end
                                task_id = await settle_job(client, detection, audio)
                                if task_id is not None:
                                    outcome[audio] = task_id

                    async def guarded() -> None:
                        with suppress(Exception):
                            await work()

                    tg.start_soon(guarded)
                    await anyio.sleep(kill_after)
                    point = lifecycle_point(fake)
                    points[point] = points.get(point, 0) + 1
                    os.kill(pid, signal.SIGKILL)
                    tg.cancel_scope.cancel()
                done += 1
                fake.clear_injections()
            # One last run without kills: every job must end downloaded or recorded-failed.
            fake.download_chunk_delay = 0.0
            async with process(env, Path(folder)) as (client, _):
                if not detection:
                    detection = await detect(client)
                deadline = time.monotonic() + 120
                pending = [audio for audio in jobs if audio not in outcome]
                while pending and time.monotonic() < deadline:
                    for audio in list(pending):
                        task_id = await settle_job(client, detection, audio)
                        if task_id is not None:
                            outcome[audio] = task_id
                            pending.remove(audio)
                    await anyio.sleep(0.2)
            lost, duplicates, reruns, downloaded, failed = audit(fake, Path(folder) / "output", jobs, outcome)
            reconciled = len(list((Path(folder) / "output").rglob("reconciled.json")))
            unknown_dirs = len(list((Path(folder) / "output").rglob("submits/*")))
    elapsed = time.monotonic() - started
    out(
        f"{done} cycles in {elapsed:.0f} s (of {cycles} asked; the run stops starting cycles after {budget:.0f} s). "
        "Each cycle starts `python -m server` over stdio on one shared OUTPUT_DIR, adds a job every other cycle "
        "(10% of jobs fail upstream on purpose), lets an agent re-run `emo_generate` + `task_status` for every "
        "job (relying on dedup, never `allow_duplicate`), randomly holds the next submit answer or task query "
        "back by 5 s and slows downloads, then SIGKILLs the server after a random 0.05-1.5 s. A final run "
        "without kills waits for every job. Poll interval 0.1 s, reconcile window 3 s."
    )
    out()
    out("Where the kills landed (the fake's last request before each kill):")
    out()
    for point, count in sorted(points.items()):
        out(f"- {point}: {count}")
    out()
    out(
        "| jobs | upstream tasks | downloaded + checksum ok | recorded FAILED | lost | duplicate submits "
        "| re-runs after a FAILED task |"
    )
    out("|---:|---:|---:|---:|---:|---:|---:|")
    out(f"| {len(jobs)} | {len(fake.tasks)} | {downloaded} | {failed} | {len(lost)} | {duplicates} | {reruns} |")
    out()
    out(
        f"Submits whose answer never reached the ledger (the process died after sending): {reconciled} found again "
        f"by reconciliation with the task list; {unknown_dirs} submit folder(s) were left under `submits/` "
        "(every submit that was cut off, including those that never reached the fake)."
    )
    out()
    out(
        "A job's agent that was killed before it saw its task FAIL calls `emo_generate` again; a FAILED task "
        "does not block an identical request (it is not billed, and a re-run is what the agent asks for), so "
        "that creates a new task. Those are counted apart from duplicates, which are second tasks while an "
        "earlier one was alive, succeeded or unresolved."
    )
    if lost:
        out()
        out(f"Lost: {', '.join(lost)}")
    out()


def audit(
    fake: FakeDashScope, output: Path, jobs: list[str], outcome: dict[str, str]
) -> tuple[list[str], int, int, int, int]:
    """Every upstream task must be in the ledger and end downloaded (checksum ok) or recorded FAILED."""
    ledger = Ledger(output)
    lost: list[str] = []
    duplicates = downloaded = failed = reruns = 0
    for audio in jobs:
        upstream = sorted(
            (t for t in fake.tasks.values() if t.input.get("audio_url") == audio), key=lambda t: t.submit_wall
        )
        # A later task of the same job is a duplicate unless every earlier one had FAILED (a failed task is
        # not billed and does not block an identical generate: that is a re-run, counted apart).
        for index in range(1, len(upstream)):
            if all(earlier.status == "FAILED" for earlier in upstream[:index]):
                reruns += 1
            else:
                duplicates += 1
                earlier = [(t.task_id, t.status, getattr(ledger.get_task(t.task_id), "status", None)) for t in upstream]
                sys.stderr.write(f"duplicate for {audio}: {earlier}\n")
        for task in upstream:
            record = ledger.get_task(task.task_id)
            if record is None:
                lost.append(task.task_id)
            elif record.status == "SUCCEEDED" and record.video_path:
                video = Path(record.video_path)
                digest = hashlib.sha256(video.read_bytes()).hexdigest() if video.is_file() else ""
                if digest != fake.video_sha256(task.task_id) or digest != record.video_sha256:
                    lost.append(task.task_id)
                else:
                    downloaded += 1
            elif record.status == "FAILED" and record.code:
                failed += 1
            else:
                lost.append(task.task_id)
        if audio not in outcome:
            lost.append(audio)
    ledger.close()
    return lost, duplicates, reruns, downloaded, failed


def lifecycle_point(fake: FakeDashScope) -> str:
    """A rough label of what was going on when the kill came, from the fake's last request."""
    if not fake.requests:
        return "before any request"
    last = fake.requests[-1]
    if last.path.endswith("/video-synthesis"):
        return "around a submit"
    if last.path.startswith("/files/"):
        return "around a download"
    if last.path.startswith("/api/v1/tasks"):
        return "around a task query or list"
    return "around a detection"


async def main(cycles: int, budget: float) -> None:
    out("# Lifecycle reliability figures")
    out()
    out(f"`python bench/lifecycle.py --cycles {cycles}` on {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}.")
    out()
    steps: list[Callable[[], Awaitable[None]]] = [
        lambda: waiters_share_queries(0.5, 10),
        lambda: peak_rate_with_open_tasks(200, 10.0),
        lambda: success_to_disk(0.5, 20),
        lambda: kill_restart_cycles(cycles, budget),
    ]
    for step in steps:
        await step()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new cycle starts")
    args = parser.parse_args()
    anyio.run(main, args.cycles, args.budget)
