"""The real console entry point over stdio: stdout carries only protocol messages, and a second
server process on the same OUTPUT_DIR finishes a task the first one submitted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR

from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.stdio import MAX_LINE_BYTES, FileLines, PipeLines, ScreenedLines
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


async def test_a_regular_file_on_stdout_gets_the_same_answers_to_refused_lines(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    """The thread-served path (a terminal, a regular file) screens lines exactly as the pipe path does."""
    answers_file = tmp_path / "answers.jsonl"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    script = _handshake_and_list() + b"".join(line + b"\n" for line, _, _ in REFUSED_LINES)
    script += request_line("after", "ping") + b"\n"
    answers: list[dict[str, Any]] = []
    with answers_file.open("wb") as stdout, anyio.fail_after(60):
        async with await anyio.open_process(
            [sys.executable, "-m", "server"], cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=stdout
        ) as process:
            assert process.stdin is not None
            await process.stdin.send(script)
            while not any(a.get("id") == "after" for a in answers):
                await anyio.sleep(0.05)
                written = answers_file.read_bytes()
                answers = [json.loads(line) for line in written[: written.rfind(b"\n") + 1].splitlines()]
            await process.stdin.aclose()
    refused = [a for a in answers if "error" in a]
    assert [(a["id"], a["error"]["code"]) for a in refused] == [(i, code) for _, i, code in REFUSED_LINES]
    assert fake.requests == []


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


class RawServer:
    """`python -m server` on pipes, spoken to in raw bytes: what any client (or attacker) can send."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._pending = b""
        self.answers: list[dict[str, Any]] = []

    async def send(self, *lines: bytes) -> None:
        await self._stdin.send(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))

    async def read_until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Every answer so far once `done(answers)` holds (each stdout line must be one JSON object)."""
        while not done(self.answers):
            self._pending += await self._stdout.receive()
            *whole, self._pending = self._pending.split(b"\n")
            self.answers += [json.loads(line) for line in whole if line.strip()]
        return self.answers

    async def answer_to(self, message_id: int | str) -> dict[str, Any]:
        answers = await self.read_until(lambda got: any(a.get("id") == message_id for a in got))
        return next(a for a in answers if a.get("id") == message_id)

    async def handshake(self) -> None:
        await self.send(_handshake_and_list())
        await self.answer_to(2)


@asynccontextmanager
async def raw_server(fake: FakeDashScope, tmp_path: Path) -> AsyncIterator[RawServer]:
    """A real stdio server process; stderr goes to a file, so its logs can never fill a pipe and stall it."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    with (tmp_path / "stderr.log").open("wb") as stderr:
        async with await anyio.open_process(
            [sys.executable, "-m", "server"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        ) as process:
            server = RawServer(process)
            try:
                yield server
            finally:
                await server._stdin.aclose()


def request_line(message_id: Any, method: str, params: Any = None, **extra: Any) -> bytes:
    message = {"jsonrpc": "2.0", "id": message_id, "method": method, **extra}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


DETECT_WITH_BAD_UTF8 = (
    b'{"jsonrpc":"2.0","id":"utf8","method":"tools/call","params":{"name":"emo_detect",'
    b'"arguments":{"image_url":"https://images.example.com/\xff\xfe.jpg"}}}'
)
# (line, the id its answer must carry (None: null), the error code)
REFUSED_LINES: list[tuple[bytes, int | str | None, int]] = [
    (b"this is not JSON", None, PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":10,"method":"ping"', 10, PARSE_ERROR),  # cut off: the id is still read
    (DETECT_WITH_BAD_UTF8, "utf8", PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":11,"method":"ping","params":{"a":"\\ud800"}}', 11, INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":12,"method":"ping","params":{"a":' + b"[" * 300 + b"]" * 300 + b"}}", 12, INVALID_REQUEST),
    (
        b'{"jsonrpc":"2.0","id":13,"method":"ping","params":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        13,
        INVALID_REQUEST,
    ),
    (b'{"jsonrpc":"2.0","id":14,"method":"tools/list","params":[1,2]}', 14, INVALID_PARAMS),
    (b'{"jsonrpc":"1.0","id":15,"method":"ping"}', 15, INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":16,"method":"ping","params":{"a":NaN}}', 16, PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', None, INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', None, INVALID_REQUEST),
    (b'[{"jsonrpc":"2.0","id":17,"method":"ping"}]', None, INVALID_REQUEST),
    (b'"just a string"', None, INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":18,"result":"not an object"}', None, INVALID_REQUEST),  # a response: never its id
]


async def test_every_line_the_sdk_would_drop_is_answered_with_its_id(fake: FakeDashScope, tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with raw_server(fake, tmp_path) as server:
            await server.handshake()
            before = len(server.answers)
            await server.send(*(line for line, _, _ in REFUSED_LINES))
            await server.send(request_line("after", "ping"))
            await server.answer_to("after")
            answers = server.answers[before:-1]
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(i, code) for _, i, code in REFUSED_LINES]
    assert all(a["error"]["message"] and "Traceback" not in a["error"]["message"] for a in answers)
    assert "UTF-8" in answers[2]["error"]["message"] and "surrogate" in answers[3]["error"]["message"]
    assert fake.requests == []  # the detect with invalid UTF-8 was never sent upstream


class Collected:
    """The far end of stdout, in memory: what the transport wrote, line by line."""

    def __init__(self) -> None:
        self.text = ""

    async def write(self, text: str) -> None:
        self.text += text

    async def flush(self) -> None:
        pass

    def answers(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


PING_5 = b'{"jsonrpc":"2.0","id":5,"method":"ping"}\n'


async def test_a_line_over_the_limit_is_answered_and_the_next_one_read() -> None:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"x":"' + b"x" * 5000 + b'"}}\n' + PING_5)
    reader.feed_eof()
    out = Collected()
    lines = [line async for line in ScreenedLines(PipeLines(reader), out)]
    assert lines == [PING_5.decode()]
    (answer,) = out.answers()
    assert answer["id"] == 4 and answer["error"]["code"] == INVALID_REQUEST
    assert str(MAX_LINE_BYTES) in answer["error"]["message"]


async def test_a_line_over_the_limit_of_a_file_is_answered_and_the_next_one_read(tmp_path: Path) -> None:
    """The thread-served path (a terminal, a regular file) keeps the same limit and answers the same way."""
    wire = tmp_path / "stdin.jsonl"
    wire.write_bytes(b'{"jsonrpc":"2.0","id":"long","method":"ping","params":{"x":"' + b"x" * 5000 + b'"}}\n' + PING_5)
    out = Collected()
    with wire.open("rb") as file:
        lines = [line async for line in ScreenedLines(FileLines(file, limit=1024), out)]
    assert lines == [PING_5.decode()]
    (answer,) = out.answers()
    assert answer["id"] == "long" and answer["error"]["code"] == INVALID_REQUEST
