"""What every benchmark shares: result rows, statistics, a raw stdio MCP client, the fake's process.

The client speaks newline-delimited JSON-RPC over the child's pipes directly (no SDK client), so
the measuring side adds as little as possible and exactly the same to the server under test and
to its baseline.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "sk-bench-0000000000"
PROTOCOL_VERSION = "2025-06-18"
PORTRAIT = "https://images.example.com/people/alice.jpg"
SPEECH = "https://audio.example.com/hello.wav"
SERVER_COMMAND = (sys.executable, "-m", "server")
MINIMAL_COMMAND = (sys.executable, "-m", "bench.minimal_server")
RAW_COMMAND = (sys.executable, "-m", "bench.raw_echo")


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    name: str
    figure: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: reported, no goal to meet
    how: str


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: the value was actually observed)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small, explicit environment: the repo importable, nothing inherited that changes behaviour."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


def server_env(
    output_dir: Path, base_url: str, *, api_key: str = BENCH_KEY, poll_interval: float | None = 0.05
) -> dict[str, str]:
    """The server's environment; `poll_interval=None` keeps the product's default (15 s)."""
    env = {"DASHSCOPE_API_KEY": api_key, "DASHSCOPE_HTTP_BASE_URL": base_url, "OUTPUT_DIR": str(output_dir)}
    if poll_interval is not None:
        env["EMO_MCP_POLL_INTERVAL"] = str(poll_interval)
    return child_env(env)


class RpcError(RuntimeError):
    """The server answered a request with a JSON-RPC error, or went away."""


class StdioSession:
    """A raw MCP client on a child's stdin/stdout: one request at a time, answers read in order."""

    def __init__(
        self, command: Sequence[str], env: Mapping[str, str], cwd: Path, stderr: IO[bytes] | int | None = None
    ) -> None:
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            env=dict(env),
            cwd=cwd,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        self._next_id = 0
        self.last_answer_bytes = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, method: str, params: dict[str, Any] | None = None, *, notify: bool = False) -> int | None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        ident: int | None = None
        if not notify:
            self._next_id += 1
            ident = message["id"] = self._next_id
        if params is not None:
            message["params"] = params
        self._stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        self._stdin.flush()
        return ident

    def receive(self, ident: int) -> dict[str, Any]:
        """The answer to request `ident`; notifications in between are skipped."""
        while True:
            line = self._stdout.readline()
            if not line:
                raise RpcError(f"the server closed stdout (exit code {self.process.poll()})")
            message = json.loads(line)
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise RpcError(str(message["error"]))
            self.last_answer_bytes = len(line.rstrip(b"\n"))
            result: dict[str, Any] = message["result"]
            return result

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        ident = self.send(method, params)
        assert ident is not None
        return self.receive(ident)

    def initialize(self) -> dict[str, Any]:
        result = self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        self.send("notifications/initialized", notify=True)
        return result

    def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = self.request("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise RpcError(f"{name} failed: {result.get('content')}")
        return result

    def close(self, timeout: float = 10.0) -> None:
        if not self._stdin.closed:
            self._stdin.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stdout.close()


@contextmanager
def stdio_session(
    command: Sequence[str], env: Mapping[str, str], cwd: Path, stderr: IO[bytes] | int | None = None
) -> Iterator[StdioSession]:
    session = StdioSession(command, env, cwd, stderr)
    try:
        yield session
    finally:
        session.close()


@contextmanager
def fake_process(video_size: int = 64 * 1024, *, api_key: str = BENCH_KEY) -> Iterator[str]:
    """Run `bench.fake_host` and yield its base URL; it stops when its stdin closes."""
    command = [sys.executable, "-m", "bench.fake_host", "--api-key", api_key, "--video-size", str(video_size)]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), cwd=ROOT
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        base_url = process.stdout.readline().decode().strip()
        if not base_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake did not start (exit code {process.poll()})")
        yield base_url
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def now() -> float:
    return time.perf_counter()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def publish(lines: Sequence[str], output: Path | None) -> str:
    """A result table: printed, and written to `output` (committed beside the bench) when given."""
    text = "\n".join(lines)
    sys.stdout.write(text)
    if output is not None:
        output.write_text(text, encoding="utf-8")
    return text
