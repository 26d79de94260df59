"""Downloads stream to disk hashed on the way, and start-up builds no HTTP client (it costs ~80 ms)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client

from server import streaming
from server.fake_dashscope import FakeDashScope
from server.streaming import stream_to_file
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def _chunks(pieces: list[bytes], then: Exception | None = None) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    if then is not None:
        raise then


async def test_a_video_of_several_batches_arrives_whole_with_its_sha256(client: Client, fake: FakeDashScope) -> None:
    fake.video_size = 3 * streaming.BATCH + 12345  # several batches and a partial one
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


async def test_stream_to_file_returns_size_and_sha256(tmp_path: Path) -> None:
    pieces = [bytes([i]) * 300_000 for i in range(9)]
    target = tmp_path / "video.part"
    size, sha256 = await stream_to_file(_chunks(pieces), target)
    data = b"".join(pieces)
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data


async def test_a_network_error_mid_stream_comes_out_unwrapped(tmp_path: Path) -> None:
    # The download's retry loop catches httpx2.TransportError: it must not arrive inside an ExceptionGroup.
    with pytest.raises(httpx2.ReadError):
        await stream_to_file(_chunks([b"x" * 2_000_000], httpx2.ReadError("connection reset")), tmp_path / "v.part")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_full_disk_is_an_os_error_not_a_hang() -> None:
    with pytest.raises(OSError, match="No space"):
        await stream_to_file(_chunks([b"x" * streaming.BATCH] * 8), Path("/dev/full"))


def test_listing_tools_builds_no_http_client(tmp_path: Path) -> None:
    """The HTTP transport (and its TLS context) loads on the first upstream call, not at start-up."""
    script = f"""
import sys, anyio
from mcp import Client
from server.app import create_app
from server.config import load_settings
env = {{"DASHSCOPE_API_KEY": "sk-x", "OUTPUT_DIR": {str(tmp_path)!r}, "HOME": {str(tmp_path)!r}}}
async def main():
    async with Client(create_app(load_settings(env))) as client:
        assert len((await client.list_tools()).tools) == 5
    sys.stdout.write(str("httpcore2" in sys.modules))
anyio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False"
