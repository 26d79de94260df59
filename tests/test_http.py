"""The Streamable HTTP transport through the SDK's own HTTP client, served by uvicorn on loopback.

A "public" configuration (token + Host allowlist, as `http_security` builds it for 0.0.0.0) is
served on 127.0.0.1 here: the tests never bind anything but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from server.cli.main import main
from server.config import Settings
from server.errors import ConfigError
from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.http import (
    HEADER_TIMEOUT_SECONDS,
    HOSTS_ENV,
    ORIGINS_ENV,
    TOKEN_ENV,
    build_http_app,
    http_security,
    uvicorn_config,
)
from tests.conftest import TEST_KEY, TOOL_NAMES, call_ok, detect_emo, emo_arguments, make_env
from tests.serving import _Server, serving

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "test-http-token-0123456789abcdef"
PUBLIC_ENV = {TOKEN_ENV: TOKEN, HOSTS_ENV: "127.0.0.1:*,mcp.example.com"}


@contextlib.asynccontextmanager
async def http_client(base: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    """The SDK client over HTTP; extra headers (token, Host) go on a client we own and close."""
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client,
    ):
        yield client


def leaves(error: BaseException) -> list[BaseException]:
    """The SDK client reports a refused HTTP request as an MCPError inside task-group exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def raw_initialize(base: str, headers: dict[str, str]) -> httpx2.Response:
    body: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with httpx2.AsyncClient(timeout=30) as raw:
        return await raw.post(
            f"{base}/mcp",
            json=body,
            headers={"Accept": "application/json, text/event-stream", **headers},
        )


async def test_loopback_serves_the_chain_without_a_token(settings: Settings, fake: FakeDashScope) -> None:
    fake.polls_to_finish = 10_000  # the task ends only when the progress callback below says so
    async with serving(settings, http_security("127.0.0.1", {})) as base:
        async with http_client(base) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert names == TOOL_NAMES
            detection = await detect_emo(client)
            submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
        # Stateless: a brand-new connection finishes the task the first one submitted, with progress.
        seen: list[str | None] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(message)
            fake.complete(submitted["task_id"])

        async with http_client(base) as client:
            result = await client.call_tool(
                "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10}, progress_callback=on_progress
            )
    assert not result.is_error and result.structured_content is not None
    status = result.structured_content
    assert status["task_status"] == "SUCCEEDED"
    assert seen and "waited" in (seen[0] or "")
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])


async def test_public_configuration_requires_the_bearer_token(settings: Settings, fake: FakeDashScope) -> None:
    security = http_security("0.0.0.0", PUBLIC_ENV)  # noqa: S104 (policy only; served on loopback below)
    async with serving(settings, security) as base:
        missing = await raw_initialize(base, {})
        wrong = await raw_initialize(base, {"Authorization": "Bearer not-the-token-at-all"})
        assert missing.status_code == 401 and wrong.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer realm=")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert TOKEN not in missing.text + wrong.text

        with pytest.raises(ExceptionGroup) as refused:
            async with http_client(base) as client:
                await client.list_tools()
        assert any(isinstance(leaf, MCPError) for leaf in leaves(refused.value))

        async with http_client(base, {"Authorization": f"Bearer {TOKEN}"}) as client:
            tools = (await client.list_tools()).tools
            await detect_emo(client)
        assert len(tools) == len(TOOL_NAMES)
        # The client's token stops at this server: DashScope only ever sees the server's own key.
        (upstream_call,) = fake.requests
        assert upstream_call.headers["authorization"] == f"Bearer {TEST_KEY}"

        # The health check needs no token and says nothing about the configuration.
        async with httpx2.AsyncClient() as raw:
            health = await raw.get(f"{base}/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "database": "ok"}


async def test_foreign_host_and_origin_are_refused(settings: Settings) -> None:
    security = http_security("0.0.0.0", PUBLIC_ENV)  # noqa: S104
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(settings, security) as base:
        foreign_host = await raw_initialize(base, {**auth, "Host": "attacker.example"})
        foreign_origin = await raw_initialize(base, {**auth, "Origin": "http://attacker.example"})
        allowed_host = await raw_initialize(base, {**auth, "Host": "mcp.example.com"})
        with pytest.raises(ExceptionGroup) as refused:
            async with http_client(base, {**auth, "Host": "attacker.example"}) as client:
                await client.list_tools()
    assert any(isinstance(leaf, MCPError) for leaf in leaves(refused.value))
    assert foreign_host.status_code == 421
    assert foreign_origin.status_code == 403
    assert allowed_host.status_code == 200


async def test_loopback_default_still_guards_against_dns_rebinding(settings: Settings) -> None:
    async with serving(settings, http_security("127.0.0.1", {})) as base:
        rebound = await raw_initialize(base, {"Host": "attacker.example"})
        local = await raw_initialize(base, {"Host": "localhost:8000"})
    assert rebound.status_code == 421
    assert local.status_code == 200


def test_public_bind_without_token_or_hosts_is_refused() -> None:
    with pytest.raises(ConfigError, match=TOKEN_ENV) as missing_both:
        http_security("0.0.0.0", {})  # noqa: S104
    assert HOSTS_ENV in str(missing_both.value)
    with pytest.raises(ConfigError, match=HOSTS_ENV):
        http_security("192.168.1.20", {TOKEN_ENV: TOKEN})
    with pytest.raises(ConfigError, match="too short"):
        http_security("127.0.0.1", {TOKEN_ENV: "short"})
    with pytest.raises(ConfigError, match="may not contain"):
        http_security("0.0.0.0", {TOKEN_ENV: TOKEN, HOSTS_ENV: "*"})  # noqa: S104
    # Loopback needs neither; an explicit Origin list is optional everywhere.
    assert http_security("::1", {}).token is None
    assert http_security("127.0.0.2", {}).allowed_hosts == ("127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.2:*")
    assert http_security("localhost", {HOSTS_ENV: "dev.local:*"}).allowed_hosts == ("dev.local:*",)
    public = http_security("0.0.0.0", {**PUBLIC_ENV, ORIGINS_ENV: "https://app.example.com"})  # noqa: S104
    assert public.allowed_origins == ("https://app.example.com",)


def test_cli_refuses_an_unsafe_bind_before_serving(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in (TOKEN_ENV, HOSTS_ENV, ORIGINS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", TEST_KEY)
    monkeypatch.chdir(tmp_path)
    code = main(["--transport", "http", "--host", "0.0.0.0", "--port", "9"])  # noqa: S104
    err = capsys.readouterr().err
    assert code == 2
    assert "Refusing to serve HTTP on 0.0.0.0" in err and TOKEN_ENV in err and HOSTS_ENV in err
    assert TEST_KEY not in err
    assert main(["--host", "127.0.0.1"]) == 2
    assert "--transport http" in capsys.readouterr().err


async def test_console_script_serves_http_until_stopped(fake: FakeDashScope, tmp_path: Path) -> None:
    """The real command line: `--transport http` on loopback, health check, a tool call, a clean stop."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    command = [sys.executable, "-m", "server", "--transport", "http", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with anyio.fail_after(60):
        async with await anyio.open_process(
            command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ) as process:
            try:
                async with httpx2.AsyncClient() as raw:
                    for _ in range(200):
                        try:
                            health = await raw.get(f"{base}/healthz")
                            break
                        except httpx2.TransportError:
                            await anyio.sleep(0.05)
                    else:
                        pytest.fail("the HTTP server did not come up")
                assert health.json() == {"status": "ok", "database": "ok"}
                async with http_client(base) as client:
                    detection = await detect_emo(client)
                assert detection["model"] == "emo-detect-v1"
            finally:
                process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
            assert process.stderr is not None
            stderr = b"".join([chunk async for chunk in process.stderr]).decode()
    assert f"serving Streamable HTTP at http://127.0.0.1:{port}/mcp" in stderr
    assert TEST_KEY not in stderr


@contextlib.asynccontextmanager
async def served_with_header_timeout(settings: Settings, seconds: float) -> AsyncIterator[int]:
    """The production uvicorn configuration (`uvicorn_config`), with a short header deadline."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    app = build_http_app(settings, http_security("127.0.0.1", {}))
    server = _Server(uvicorn_config(app, "127.0.0.1", port, header_timeout=seconds, access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(10):
            await server.ready.wait()
        yield port
    finally:
        server.should_exit = True
        with anyio.CancelScope(shield=True):
            await task
        sock.close()


async def until_closed(stream: anyio.abc.SocketStream, trickle: bytes) -> bytes:
    """Send `trickle` every 0.1 s until the server closes the connection; what it answered meanwhile."""
    answered = b""
    while True:
        with contextlib.suppress(anyio.BrokenResourceError):
            if trickle:
                await stream.send(trickle)
        with anyio.move_on_after(0.1):
            try:
                answered += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return answered


async def test_a_client_that_trickles_its_headers_is_disconnected(settings: Settings) -> None:
    """Slowloris: header bytes that never end, on a new connection and on a kept-alive one."""
    default = uvicorn_config(build_http_app(settings, http_security("127.0.0.1", {})), "127.0.0.1", 1)
    assert getattr(default.http, "header_timeout", None) == HEADER_TIMEOUT_SECONDS == 10
    async with served_with_header_timeout(settings, 0.5) as port:
        with anyio.fail_after(20):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                assert await until_closed(stream, b"X-Slow: 1\r\n") == b""

            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                assert await until_closed(stream, b"") == b""  # connected, sent nothing

            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                first = await stream.receive()
                assert first.startswith(b"HTTP/1.1 200") and b'{"status":"ok","database":"ok"}' in first
                await stream.send(b"GET /healthz HTTP/1.1\r\n")  # the next request's headers never end
                assert await until_closed(stream, b"X-Slow: 1\r\n") == b""

        async with httpx2.AsyncClient() as raw:  # a client that sends its headers at once is served
            assert (await raw.get(f"http://127.0.0.1:{port}/healthz")).json() == {"status": "ok", "database": "ok"}
