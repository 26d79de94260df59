"""Serving MCP over stdio with the pipes read and written on the event loop, not on worker threads.

The SDK's `stdio_server()` wraps stdin and stdout in `anyio.wrap_file`, so every line read, every
write and every flush is a hop to a worker thread and back: about 0.5 to 1 ms per tool call on a
two-CPU machine (bench/RESULTS.md), which is most of what a call costs on top of the upstream. When
both ends are pipes or sockets (how every MCP client spawns a server) this module hands the SDK's
`stdio_server()` line reader and writer objects served by asyncio's pipe transports instead; its
message parsing and serialization stay the SDK's. Anything else (a terminal, a regular file, a
platform without `fcntl`) takes the SDK's own path unchanged: a terminal's blocking mode must not
be changed under the user's shell.

Like the SDK, it claims the standard descriptors while serving: fd 0 reads the null device and fd 1
writes to stderr, so a stray `print` or a child process can never corrupt the protocol stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
from mcp.server.stdio import stdio_server

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

log = logging.getLogger(__name__)

# One JSON-RPC message per line; a longer line is dropped (logged) instead of ending the session.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _is_pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def can_use_pipes() -> bool:
    """True when stdin and stdout are both pipes or sockets on a POSIX system."""
    return sys.platform != "win32" and _is_pipe_or_socket(0) and _is_pipe_or_socket(1)


class PipeLines:
    """`async for line in ...` over a pipe, as text (what the SDK's stdin reader iterates)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                line = await self._reader.readline()
            except ValueError:  # over MAX_LINE_BYTES: asyncio has already discarded it
                log.warning("dropped an incoming message longer than %d bytes", MAX_LINE_BYTES)
                continue
            if not line:
                raise StopAsyncIteration
            return line.decode("utf-8", errors="replace")


class PipeWriter:
    """`write` + `flush` on a pipe (what the SDK's stdout writer calls); flush waits for the pipe's room."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


@contextmanager
def claimed_standard_fds() -> Iterator[tuple[int, int]]:
    """Private duplicates of fds 0 and 1 (the wire); fd 0 reads /dev/null and fd 1 goes to stderr meanwhile."""
    import fcntl  # POSIX only, like this whole path

    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
    finally:
        os.close(null)
    try:
        yield wire_in, wire_out
    finally:
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        for fd in (wire_in, wire_out):
            os.set_blocking(fd, True)  # asyncio made them non-blocking; the client may share them
        # The duplicates stay open, as the SDK's do: a closing transport may still hold them.


@asynccontextmanager
async def pipe_streams(wire_in: int, wire_out: int) -> AsyncIterator[tuple[PipeLines, PipeWriter]]:
    """asyncio transports on the two wire descriptors (they stay open: the claim owns them)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES, loop=loop)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(wire_in, "rb", buffering=0, closefd=False)
    )
    write_transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop),
        os.fdopen(wire_out, "wb", buffering=0, closefd=False),
    )
    writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
    try:
        yield PipeLines(reader), PipeWriter(writer)
    finally:
        read_transport.close()
        if not write_transport.is_closing():
            write_transport.close()


async def serve_stdio(app: MCPServer[Any]) -> None:
    """Serve `app` over stdio: on asyncio pipes when both ends allow it, else the SDK's own way."""
    if not can_use_pipes():
        await app.run_stdio_async()
        return
    # The SDK takes explicit stdin/stdout objects for exactly this; it only iterates lines from one
    # and calls write/flush on the other. MCPServer exposes no stdio entry taking streams, hence
    # the low-level server (the same call `run_stdio_async` makes).
    lowlevel = app._lowlevel_server
    with claimed_standard_fds() as (wire_in, wire_out):
        async with (
            pipe_streams(wire_in, wire_out) as (lines, writer),
            stdio_server(cast("anyio.AsyncFile[str]", lines), cast("anyio.AsyncFile[str]", writer)) as (read, write),
        ):
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
