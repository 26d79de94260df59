"""Crash recovery with real server processes over stdio: SIGKILL right after a submit, in mid-poll,
in mid-download and in mid-submit, then one restart on the same OUTPUT_DIR finishes every task,
with matching checksums and no task submitted twice."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import Ledger
from tests.conftest import PORTRAIT, call_ok, detect_emo, make_env

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"


def children() -> set[int]:
    """Process ids whose parent is this test process (Linux /proc)."""
    me = str(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            found.add(int(entry.name))
    return found


@asynccontextmanager
async def server(env: dict[str, str], cwd: Path) -> AsyncIterator[tuple[Client, Callable[[], None]]]:
    """A `python -m server` process and an MCP client to it, plus a function that SIGKILLs it."""
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=full_env, cwd=str(cwd))
    before = children()
    async with Client(params) as client:
        [pid] = children() - before

        def kill() -> None:
            os.kill(pid, signal.SIGKILL)

        yield client, kill


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - the state lives in another process or on disk
        await anyio.sleep(0.02)


def emo_args(detection: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "image_url": PORTRAIT,
        "audio_url": f"https://audio.example.com/take-{n}.wav",
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


async def ignore_errors(call: Callable[[], Awaitable[object]]) -> None:
    with contextlib.suppress(Exception):  # the server is killed under this call on purpose
        await call()


async def test_every_task_survives_sigkill_at_each_point_of_its_life(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.auto_progress = False
    env = make_env(fake, tmp_path)
    tasks_root = tmp_path / "output" / "aliyun-emo" / "tasks"
    with anyio.fail_after(90):
        # 1. Killed right after the submit answered.
        async with server(env, tmp_path) as (client, kill):
            detection = await detect_emo(client)
            first = (await call_ok(client, "emo_generate", emo_args(detection, 1)))["task_id"]
            kill()

        # 2. Killed while a task query is in flight (the fake holds the answer back).
        async with server(env, tmp_path) as (client, kill):
            second = (await call_ok(client, "emo_generate", emo_args(detection, 2)))["task_id"]
            asked = len(fake.queries(second))
            fake.inject("GET", f"/tasks/{second}", delay=30, passthrough=True)
            await until(lambda: len(fake.queries(second)) > asked)
            kill()

        # 3. Killed in the middle of a download.
        fake.video_size = 8 * 64 * 1024
        fake.download_chunk_delay = 0.5
        async with server(env, tmp_path) as (client, kill):
            submitted = await call_ok(client, "emo_generate", emo_args(detection, 3))
            third, third_dir = submitted["task_id"], Path(submitted["evidence_dir"])
            assert third_dir.is_relative_to(tasks_root)  # in its day's shard
            fake.complete(third)
            await until(lambda: any(third_dir.glob("*.part")))
            kill()
        assert not (third_dir / f"{third}.mp4").exists()
        assert list(third_dir.glob("*.part"))  # a half-written file was left behind

        # 4. Killed after sending a submit, before its answer arrived.
        fake.inject("POST", SUBMIT_PATH, delay=30, passthrough=True)
        submits = len(fake.submits())
        async with server(env, tmp_path) as (client, kill), anyio.create_task_group() as tg:
            tg.start_soon(ignore_errors, lambda: client.call_tool("emo_generate", emo_args(detection, 4)))
            await until(lambda: len(fake.submits()) > submits)
            kill()
            tg.cancel_scope.cancel()
        [fourth] = set(fake.tasks) - {first, second, third}

        # Restart once: everything ends downloaded, nothing is submitted twice.
        fake.download_chunk_delay = 0.0
        for task_id in (first, second, fourth):
            fake.complete(task_id)
        async with server(env, tmp_path) as (client, _):
            statuses = [
                await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": 20})
                for task_id in (first, second, third, fourth)
            ]
            again = await call_ok(client, "emo_generate", emo_args(detection, 4))

    assert len(fake.submits()) == 4 == len(fake.tasks)
    assert again["task_id"] == fourth and again["deduplicated"] is True
    ledger = Ledger(tmp_path / "output")
    for status in statuses:
        task_id = status["task_id"]
        assert status["task_status"] == "SUCCEEDED", status
        video = Path(status["video_path"])
        assert hashlib.sha256(video.read_bytes()).hexdigest() == fake.video_sha256(task_id) == status["video_sha256"]
        record = ledger.get_task(task_id)
        assert record is not None and record.video_sha256 == status["video_sha256"]
        assert record.fingerprint is not None  # the ledger's own submit, not an adopted stranger
    assert not list(tasks_root.rglob("*.part"))
    assert len(ledger.tasks(limit=10)) == 4
