"""Downloads stream to disk hashed on the way, and start-up builds no HTTP client (it costs ~80 ms)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx2
import pytest
from mcp import Client

from server.errors import PermissionDeniedError, UpstreamUnavailableError
from server.sandbox.fake_dashscope import FakeDashScope
from server.upstream import client as dashscope
from server.upstream.client import MAX_READ_RETRIES, DashScopeClient
from server.upstream.streaming import fetch_to_file
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def raw_http(answer: bytes) -> Iterator[tuple[str, list[int]]]:
    """A loopback server that sends `answer` to every connection, then closes it; yields (url, count)."""
    listener = socket.create_server(("127.0.0.1", 0))
    served: list[int] = []

    listener.settimeout(0.05)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection, suppress(OSError):  # a client that gave up early resets the connection
                served.append(1)
                connection.recv(65536)
                connection.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/files/t.mp4", served
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# What every saved video must start with: an ftyp box (the server refuses anything else).
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


def _answer(body: bytes, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: %d\r\n\r\n" % length + body


async def _no_sleep(_: float) -> None:
    return None


def _client() -> DashScopeClient:
    return DashScopeClient(None, "http://127.0.0.1:9/api/v1", "sk-test", sleep=_no_sleep)


async def test_a_video_of_several_megabytes_arrives_whole_with_its_sha256(client: Client, fake: FakeDashScope) -> None:
    fake.video_size = 3 * 1024 * 1024 + 12345
    detection = await detect_emo(client)
    arguments = {"image_url": PORTRAIT, "audio_url": SPEECH}
    submitted = await call_ok(
        client, "emo_generate", {**arguments, "face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
    )
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
    video = Path(status["video_path"])
    assert video.read_bytes() == fake.video_bytes(submitted["task_id"])
    assert status["video_sha256"] == fake.video_sha256(submitted["task_id"])
    assert status["video_bytes"] == fake.video_size
    assert not list(video.parent.glob("*.part"))


async def test_a_download_cut_mid_stream_is_retried_then_reported(tmp_path: Path) -> None:
    destination = tmp_path / "t.mp4"
    with (
        raw_http(_answer(MP4_HEAD + b"x" * 100_000, declared=5_000_000)) as (url, served),
        pytest.raises(UpstreamUnavailableError, match="could not be downloaded"),
    ):
        await _client().download(url, destination)
    assert len(served) == MAX_READ_RETRIES + 1
    assert not destination.exists()  # a file named .mp4 is always complete


async def test_a_download_returns_size_and_sha256_of_what_was_written(tmp_path: Path) -> None:
    body = MP4_HEAD + bytes(range(256)) * 4000
    with raw_http(_answer(body)) as (url, _):
        got = await _client().download(url, tmp_path / "t.mp4")
    assert (got.size, got.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert got.path.read_bytes() == body
    assert not (tmp_path / "t.mp4.part").exists()


async def test_an_expired_result_url_is_reported_at_once_not_retried(tmp_path: Path) -> None:
    xml = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired.</Message></Error>"
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n" % len(xml)
    with raw_http(answer + xml) as (url, served), pytest.raises(PermissionDeniedError) as caught:
        await _client().download(url, tmp_path / "t.mp4")
    assert len(served) == 1
    assert caught.value.status_code == 403
    assert not (tmp_path / "t.mp4").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_an_os_error() -> None:
    with raw_http(_answer(MP4_HEAD + b"x" * 3_000_000)) as (url, _), pytest.raises(OSError, match="No space"):
        fetch_to_file(url, Path("/dev/full"), httpx2.Timeout(10.0), threading.Event())


def test_listing_tools_builds_no_http_client(tmp_path: Path) -> None:
    """The HTTP stacks (and their TLS contexts) load on the first upstream call, not at start-up."""
    script = f"""
import sys, anyio
from mcp import Client
from server.app import create_app
from server.config import load_settings
env = {{"DASHSCOPE_API_KEY": "sk-x", "OUTPUT_DIR": {str(tmp_path)!r}, "HOME": {str(tmp_path)!r}}}
async def main():
    async with Client(create_app(load_settings(env))) as client:
        assert len((await client.list_tools()).tools) == 6
    sys.stdout.write(str([name for name in ("httpcore2", "aiohttp") if name in sys.modules]))
anyio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]"


async def test_a_download_that_drips_slower_than_its_deadline_is_cut_off_and_retried(
    fake: FakeDashScope, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stall is long enough to trip the read timeout, yet the attempt as a whole must end."""
    monkeypatch.setattr(dashscope, "DOWNLOAD_DEADLINE", 0.5)
    fake.video_size = 3 * 64 * 1024
    fake.auto_progress = False
    task_id = await _submitted_task(fake)
    fake.complete(task_id)
    fake.fault("download", "stall", seconds=1.0, times=1_000)
    url = f"{fake.origin}/files/{task_id}.mp4"
    client = DashScopeClient(None, fake.base_url, "sk-test", sleep=_no_sleep)
    with pytest.raises(UpstreamUnavailableError, match="longer than its deadline"):
        await client.download(url, tmp_path / "t.mp4")
    assert not list(tmp_path.iterdir())  # nothing half-written is left, nothing named .mp4
    fake.faults.clear()
    got = await client.download(url, tmp_path / "t.mp4")
    assert got.sha256 == fake.video_sha256(task_id)


async def _submitted_task(fake: FakeDashScope) -> str:
    """A task created on the fake directly (detect, then submit with its boxes)."""
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    async with httpx2.AsyncClient(base_url=fake.base_url, headers=auth) as http:
        request = {"model": "emo-detect-v1", "input": {"image_url": PORTRAIT}, "parameters": {"ratio": "1:1"}}
        boxes = (await http.post("/services/aigc/image2video/face-detect", json=request)).json()["output"]
        payload = {
            "model": "emo-v1",
            "input": {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": boxes["face_bbox"],
                      "ext_bbox": boxes["ext_bbox"]},
        }  # fmt: skip
        answer = await http.post(
            "/services/aigc/image2video/video-synthesis", json=payload, headers={"X-DashScope-Async": "enable"}
        )
    return str(answer.json()["output"]["task_id"])
