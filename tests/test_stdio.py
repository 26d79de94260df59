"""The real console entry point over stdio: stdout carries only protocol messages, and a second
server process on the same OUTPUT_DIR finishes a task the first one submitted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.stdio import PipeLines
from tests.conftest import PORTRAIT, TEST_KEY, call_ok, detect_emo, emo_arguments, make_env

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def server_params(env: dict[str, str], tmp_path: Path) -> StdioServerParameters:
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return StdioServerParameters(command=sys.executable, args=["-m", "server"], env=full_env, cwd=str(tmp_path))


def rpc(message_id: int | None, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if message_id is not None:
        message["id"] = message_id
    if params is not None:
        message["params"] = params
    return (json.dumps(message) + "\n").encode()


async def test_stdout_carries_only_json_rpc(fake: FakeDashScope, tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    script = b"".join(
        [
            rpc(
                1,
                "initialize",
                {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            ),
            rpc(None, "notifications/initialized"),
            rpc(2, "tools/list", {}),
            rpc(3, "tools/call", {"name": "emo_detect", "arguments": {"image_url": PORTRAIT}}),
            rpc(4, "tools/call", {"name": "emo_detect", "arguments": {"image_url": "ftp://nope"}}),
            rpc(5, "tools/call", {"name": "task_status", "arguments": {"task_id": "missing-task"}}),
        ]
    )
    with anyio.fail_after(60):
        async with await anyio.open_process(
            [sys.executable, "-m", "server"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:
            assert process.stdin is not None and process.stdout is not None and process.stderr is not None
            await process.stdin.send(script)
            received = b""
            answered: set[int] = set()
            while answered != {1, 2, 3, 4, 5}:
                received += await process.stdout.receive()
                for line in received.splitlines():
                    if line.strip():
                        with_id = json.loads(line)
                        if "id" in with_id:
                            answered.add(with_id["id"])
            await process.stdin.aclose()
            received += b"".join([chunk async for chunk in process.stdout])
            stderr = b"".join([chunk async for chunk in process.stderr])
    lines = [line for line in received.decode().splitlines() if line.strip()]
    messages = [json.loads(line) for line in lines]  # every stdout line must be JSON
    assert all(message.get("jsonrpc") == "2.0" for message in messages)
    by_id = {m["id"]: m for m in messages if "id" in m}
    assert by_id[3]["result"]["structuredContent"]["check_pass"] is True
    assert by_id[4]["result"]["isError"] is True
    assert by_id[5]["result"]["isError"] is True
    assert TEST_KEY.encode() not in received + stderr


async def test_a_second_process_finishes_a_task_the_first_submitted(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.polls_to_finish = 3
    params = server_params(make_env(fake, tmp_path), tmp_path)
    with anyio.fail_after(60):
        async with Client(params) as first:
            detection = await detect_emo(first)
            submitted = await call_ok(
                first,
                "emo_generate",
                emo_arguments(detection),
            )
            status = await call_ok(first, "task_status", {"task_id": submitted["task_id"]})
            assert status["finished"] is False
        async with Client(params) as second:
            status = await call_ok(second, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
    assert status["task_status"] == "SUCCEEDED"
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])
    # The second process knew the task's model and evidence folder from the shared ledger.
    assert status["model"] == "emo-v1"
    assert Path(status["video_path"]).with_name("request.json").is_file()  # the video is in the evidence folder


def _handshake_and_list() -> bytes:
    return b"".join(
        [
            rpc(
                1,
                "initialize",
                {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            ),
            rpc(None, "notifications/initialized"),
            rpc(2, "tools/list", {}),
        ]
    )


async def test_a_regular_file_on_stdout_is_served_the_sdk_way(fake: FakeDashScope, tmp_path: Path) -> None:
    """asyncio cannot watch a regular file, so that case keeps the SDK's thread-based streams.

    stdin stays a pipe held open until the answers are in: at EOF the SDK stops serving and may drop
    requests still in flight, so a file on stdin would make this test race."""
    answers_file = tmp_path / "answers.jsonl"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    answers: dict[int, Any] = {}
    with answers_file.open("wb") as stdout, anyio.fail_after(60):
        async with await anyio.open_process(
            [sys.executable, "-m", "server"], cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=stdout
        ) as process:
            assert process.stdin is not None
            await process.stdin.send(_handshake_and_list())
            while 2 not in answers:
                await anyio.sleep(0.05)
                written = answers_file.read_bytes()
                lines = written[: written.rfind(b"\n") + 1].splitlines()  # whole lines only
                answers = {m["id"]: m for m in map(json.loads, lines) if "id" in m}
            await process.stdin.aclose()
    assert len(answers[2]["result"]["tools"]) == 6


async def test_a_message_longer_than_the_pipe_buffer_is_answered(fake: FakeDashScope, tmp_path: Path) -> None:
    """One JSON-RPC line of 1 MB (far over a pipe's 64 KiB) arrives whole and gets its answer."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    long_url = "https://images.example.com/" + "a" * 1_000_000 + ".jpg"
    script = _handshake_and_list() + rpc(3, "tools/call", {"name": "emo_detect", "arguments": {"image_url": long_url}})
    with anyio.fail_after(60):
        async with await anyio.open_process(
            [sys.executable, "-m", "server"], cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as process:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send(script)
            received = b""
            while b'"id":3' not in received:
                received += await process.stdout.receive()
            await process.stdin.aclose()
            received += b"".join([chunk async for chunk in process.stdout])
    answers = {m["id"]: m for m in map(json.loads, received.splitlines()) if "id" in m}
    assert answers[3]["result"]["isError"] is True  # refused (URL too long), and said so
    assert "2048" in answers[3]["result"]["content"][0]["text"]


async def test_a_line_over_the_limit_is_dropped_and_the_next_one_read() -> None:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(b"x" * 5000 + b"\n" + b'{"jsonrpc":"2.0"}\n')
    reader.feed_eof()
    lines = [line async for line in PipeLines(reader)]
    assert lines == ['{"jsonrpc":"2.0"}\n']
