"""Serve the real HTTP app with uvicorn on a free loopback port inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import uvicorn

from server.config import Settings
from server.transport.http import HttpSecurity, build_http_app


class _Server(uvicorn.Server):
    """uvicorn that leaves signals to pytest and reports when it is up (or gave up)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


@contextlib.asynccontextmanager
async def serving(settings: Settings, security: HttpSecurity) -> AsyncIterator[str]:
    """Serve the real ASGI app on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_http_app(settings, security), log_config=None, access_log=False, ws="none")
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(10):
            await server.ready.wait()
        assert server.started, "the HTTP server failed to start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with anyio.CancelScope(shield=True):
            await task
        sock.close()
