"""Serving MCP over stdio: every line read gets an answer, and the pipes are served on the event loop.

The SDK's `stdio_server()` drops a line it cannot parse (invalid JSON, a lone surrogate escape, too
deep a nesting, `params` that is not an object, ...): the client then waits forever for its answer.
It also decodes invalid UTF-8 into U+FFFD and passes the message on, so a URL nobody wrote could be
sent upstream. Here every line is screened first (`screen`): a line the SDK would accept goes to it
unchanged; any other line is answered at once with a JSON-RPC error, `-32700` (parse error) or
`-32600`/`-32602`, carrying the request's id whenever that can be read, else `null`.

The SDK's `stdio_server()` also wraps stdin and stdout in `anyio.wrap_file`, so every line read,
every write and every flush is a hop to a worker thread and back: about 0.5 to 1 ms per tool call on
a two-CPU machine (bench/RESULTS.md). When both ends are pipes or sockets (how every MCP client
spawns a server) the SDK's reader and writer get objects served by asyncio's pipe transports
instead. Anything else (a terminal, a regular file) is read and written on worker threads as the
SDK does, with the same screening: a terminal's blocking mode must not be changed under the user's
shell. Windows keeps the SDK's own path unchanged. Message parsing, dispatch and serialization stay
the SDK's throughout.

Like the SDK, it claims the standard descriptors while serving: fd 0 reads the null device and fd 1
writes to stderr, so a stray `print` or a child process can never corrupt the protocol stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

import anyio
from mcp.server.stdio import stdio_server
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    JSONRPCMessage,
    JSONRPCNotification,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError
from pydantic_core import ErrorDetails

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

log = logging.getLogger(__name__)

# One JSON-RPC message per line; a longer line is skipped (and answered) instead of ending the session.
MAX_LINE_BYTES = 64 * 1024 * 1024
# Of an over-long line only this much is kept, to read the request id it is answered with.
HEAD_BYTES = 64 * 1024
# About how deep pydantic-core's JSON parser (the SDK's) lets arrays and objects nest; named in the answer.
MAX_DEPTH = 200

RequestId = int | str


# ---------------------------------------------------------------------------- screening


@dataclass(frozen=True)
class RawLine:
    """One line as read: its bytes, or only the first HEAD_BYTES of a line over the limit."""

    data: bytes
    overlong: bool = False


@dataclass(frozen=True)
class Refusal:
    """The JSON-RPC error a line is answered with instead of being passed on."""

    code: int
    message: str
    id: RequestId | None = None

    def line(self) -> str:
        # ASCII-only JSON: a string id holding a lone surrogate is echoed as the escape it came as.
        error = {"jsonrpc": "2.0", "id": self.id, "error": {"code": self.code, "message": self.message}}
        return json.dumps(error, separators=(",", ":")) + "\n"


def screen(line: RawLine) -> str | Refusal | None:
    """The line as text when the SDK accepts it, else the error it must be answered with.

    None for a blank line (nothing to answer). The SDK's own validation decides what passes, so a
    line passed on is never dropped later; only the refused ones are looked at further, to say why.
    """
    if line.overlong:
        shown = line.data.decode("utf-8", "replace")
        reason = f"The message is longer than {MAX_LINE_BYTES} bytes and was not read; send smaller messages."
        return Refusal(INVALID_REQUEST, reason, _request_id(_top_level(shown)))
    try:
        text = line.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        request_id = _request_id(_top_level(line.data.decode("utf-8", "replace")))
        if isinstance(request_id, str) and "\ufffd" in request_id:
            request_id = None  # the bad bytes are in the id itself: it cannot be echoed as sent
        reason = f"Parse error: the message is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON."
        return Refusal(PARSE_ERROR, reason, request_id)
    if not text or text.isspace():
        return None
    try:
        message = jsonrpc_message_adapter.validate_json(text, by_name=False)
    except ValidationError as exc:
        return _diagnose(text, exc)
    # Two things the SDK lets through: NaN/Infinity (not JSON), and a request whose id is not a string
    # or an integer (1.5, true, null), which it takes for a notification and never answers.
    if isinstance(message, JSONRPCNotification) or "NaN" in text or "Infinity" in text:
        return _looked_over(text, message)
    return text


def _looked_over(text: str, message: JSONRPCMessage) -> str | Refusal:
    try:
        document = _load(text)
    except _Unreadable as exc:
        return exc.refusal
    if isinstance(message, JSONRPCNotification) and isinstance(document, dict) and "id" in document:
        return Refusal(INVALID_REQUEST, 'Invalid request: "id" must be a string or an integer.')
    return text


class _Unreadable(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _load(text: str) -> Any:
    """Python's reading of a line (strict JSON: no NaN or Infinity); `_Unreadable` when there is none."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        reason = f"The message nests arrays or objects too deeply (the limit is about {MAX_DEPTH} levels)."
        raise _Unreadable(Refusal(INVALID_REQUEST, reason, _request_id(_top_level(text)))) from None
    except ValueError as exc:
        reason = f"Parse error: the message is not valid JSON ({exc}); send one JSON-RPC message per line."
        raise _Unreadable(Refusal(PARSE_ERROR, reason, _request_id(_top_level(text)))) from None


def _diagnose(text: str, exc: ValidationError) -> Refusal:
    """Why the SDK refused `text`, as the error to answer (parse error, or an invalid request)."""
    try:
        document = _load(text)
    except _Unreadable as unreadable:
        return unreadable.refusal
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":  # valid JSON to Python, but not to the SDK's parser
        message = str(first.get("ctx", {}).get("error", first["msg"]))
        if "recursion" in message:
            reason = f"The message nests arrays or objects too deeply (the limit is about {MAX_DEPTH} levels)."
        elif "surrogate" in message or "hex escape" in message:
            reason = (
                "The message holds a lone UTF-16 surrogate escape (such as \\ud800), which is not a Unicode "
                "character; escape characters outside the BMP as a surrogate pair."
            )
        else:
            reason = f"The message cannot be read: {message}."
        return Refusal(INVALID_REQUEST, reason, _request_id(document))
    return _shape_refusal(document, errors)


def _shape_refusal(document: Any, errors: list[ErrorDetails]) -> Refusal:
    """Valid JSON that is not a JSON-RPC 2.0 message: say which rule it breaks."""
    if isinstance(document, list):
        return Refusal(INVALID_REQUEST, "Batches (JSON arrays) are not supported: send one message per line.")
    if not isinstance(document, dict):
        return Refusal(INVALID_REQUEST, "A JSON-RPC message must be a JSON object.")
    request_id = _request_id(document)
    if document.get("jsonrpc") != "2.0":
        return Refusal(INVALID_REQUEST, 'Invalid request: "jsonrpc" must be "2.0".', request_id)
    if "method" in document:
        if not isinstance(document["method"], str):
            return Refusal(INVALID_REQUEST, 'Invalid request: "method" must be a string.', request_id)
        if "id" in document and request_id is None:
            return Refusal(INVALID_REQUEST, 'Invalid request: "id" must be a string or an integer.')
        if document.get("params") is not None and not isinstance(document["params"], dict):
            return Refusal(INVALID_PARAMS, 'Invalid params: "params" must be an object.', request_id)
    elif "result" not in document and "error" not in document:
        return Refusal(INVALID_REQUEST, 'Invalid request: no "method" (and not a response either).')
    kind, branch = ("request", "JSONRPCRequest") if "method" in document else ("response", "JSONRPCResponse")
    if kind == "response" and "error" in document:
        branch = "JSONRPCError"
    error = next((e for e in errors if e["loc"][:1] == (branch,)), errors[0])
    where = ".".join(str(part) for part in error["loc"][1:]) or "the message"
    return Refusal(INVALID_REQUEST, f"Invalid {kind} at {where}: {error['msg']}.", request_id)


def _request_id(members: dict[str, Any] | Any) -> RequestId | None:
    """The id to answer with: only a request's (a response's id names one of the server's requests)."""
    if not isinstance(members, dict) or "method" not in members or "result" in members or "error" in members:
        return None
    value = members.get("id")
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALARS = json.JSONDecoder(parse_constant=_reject_constant)
_NESTED = object()  # a member whose value is an object or array (skipped, not parsed)


def _top_level(text: str) -> dict[str, Any] | None:
    """The members of a JSON object read so far, without recursing into nested values.

    Used only for a line that cannot be parsed (broken, too deep, cut off), to find its id: it stops
    at the first thing it cannot read and keeps what came before. A nested value's key is kept
    (as `_NESTED`) as soon as it is seen, so a cut-off `"result": {...` still marks a response.
    """
    pos = _skip_space(text, 0)
    if not text.startswith("{", pos):
        return None
    members: dict[str, Any] = {}
    pos += 1
    while True:
        pos = _skip_space(text, pos)
        if not text.startswith('"', pos):
            return members
        try:
            key, pos = _SCALARS.raw_decode(text, pos)
        except ValueError:
            return members
        assert isinstance(key, str)  # it started with a quote
        pos = _skip_space(text, pos)
        if not text.startswith(":", pos):
            return members
        pos = _skip_space(text, pos + 1)
        if text.startswith(("{", "["), pos):
            members[key] = _NESTED
            end = _skip_nested(text, pos)
            if end is None:
                return members
            pos = end
        else:
            try:
                value, pos = _SCALARS.raw_decode(text, pos)
            except ValueError:
                return members
            pos = _skip_space(text, pos)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and not text.startswith((",", "}"), pos):  # "12" of a cut-off "123" is not the id
                return members
            members[key] = value
        pos = _skip_space(text, pos)
        if not text.startswith(",", pos):
            return members
        pos += 1


def _skip_space(text: str, pos: int) -> int:
    found = _WHITESPACE.match(text, pos)
    return found.end() if found is not None else pos


def _skip_nested(text: str, pos: int) -> int | None:
    """The end of the object or array starting at `pos` (brackets counted, strings skipped), or None."""
    depth = 0
    while (found := _STRUCTURE.search(text, pos)) is not None:
        char = found.group()
        pos = found.end()
        if char == '"':
            rest = _STRING_REST.match(text, pos)
            if rest is None:
                return None
            pos = rest.end()
            continue
        depth += 1 if char in "[{" else -1
        if depth == 0:
            return pos
    return None


class LineWriter(Protocol):
    """What the SDK's stdout writer calls."""

    async def write(self, text: str) -> None: ...

    async def flush(self) -> None: ...


class ScreenedLines:
    """`async for line in ...` over raw lines (what the SDK's stdin reader iterates), screened.

    A refused line is answered on `writer` right away and never reaches the SDK.
    """

    def __init__(self, lines: AsyncIterator[RawLine], writer: LineWriter) -> None:
        self._lines = lines
        self._writer = writer

    def __aiter__(self) -> ScreenedLines:
        return self

    async def __anext__(self) -> str:
        while True:
            verdict = screen(await anext(self._lines))
            if isinstance(verdict, str):
                return verdict
            if verdict is not None:
                log.warning("refused an incoming message (%d): %s", verdict.code, verdict.message)
                await self._writer.write(verdict.line())
                await self._writer.flush()


# ---------------------------------------------------------------------------- the two ways to read and write


class PipeLines:
    """Raw lines from an asyncio pipe; a line over the reader's limit arrives as its head, flagged."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> RawLine:
        try:
            return RawLine(await self._reader.readuntil(b"\n"))
        except asyncio.IncompleteReadError as exc:  # the stream ended, maybe after a last unterminated line
            if not exc.partial:
                raise StopAsyncIteration from None
            return RawLine(exc.partial)
        except asyncio.LimitOverrunError as exc:
            return RawLine(await self._skip_overlong(exc.consumed), overlong=True)

    async def _skip_overlong(self, buffered: int) -> bytes:
        """Keep the head of an over-long line and discard the rest, up to and including its newline.

        `buffered` bytes of the line are in the reader's buffer (asyncio's `LimitOverrunError.consumed`).
        """
        head = await self._reader.readexactly(min(HEAD_BYTES, buffered))
        await self._reader.readexactly(buffered - len(head))
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return head
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return head


class PipeWriter:
    """`write` + `flush` on a pipe; a write is one call into the transport, so lines never interleave."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


class FileLines:
    """Raw lines from a blocking file read on worker threads (a terminal, a regular file)."""

    def __init__(self, file: BinaryIO, limit: int = MAX_LINE_BYTES) -> None:
        self._file = file
        self._limit = limit

    def __aiter__(self) -> FileLines:
        return self

    async def _readline(self) -> bytes:
        return await anyio.to_thread.run_sync(self._file.readline, self._limit + 1)

    async def __anext__(self) -> RawLine:
        data = await self._readline()
        if not data:
            raise StopAsyncIteration
        if data.endswith(b"\n") or len(data) <= self._limit:
            return RawLine(data)
        rest = data
        while rest and not rest.endswith(b"\n"):
            rest = await self._readline()
        return RawLine(data[:HEAD_BYTES], overlong=True)


class FileWriter:
    """`write` + `flush` on a blocking file through worker threads, one at a time."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lock = anyio.Lock()

    async def write(self, text: str) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._file.write, text.encode("utf-8"))

    async def flush(self) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._file.flush)


def _is_pipe_or_socket(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def can_use_pipes() -> bool:
    """True when stdin and stdout are both pipes or sockets on a POSIX system."""
    return sys.platform != "win32" and _is_pipe_or_socket(0) and _is_pipe_or_socket(1)


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


@asynccontextmanager
async def file_streams(wire_in: int, wire_out: int) -> AsyncIterator[tuple[FileLines, FileWriter]]:
    """Thread-served files on the two wire descriptors (never closed: a worker may still block on one)."""
    yield FileLines(os.fdopen(wire_in, "rb", closefd=False)), FileWriter(os.fdopen(wire_out, "wb", closefd=False))


async def serve_stdio(app: MCPServer[Any]) -> None:
    """Serve `app` over stdio, answering every line: on asyncio pipes when both ends allow it."""
    if sys.platform == "win32":
        await app.run_stdio_async()
        return
    pipes = can_use_pipes()  # asked before the claim points fds 0 and 1 elsewhere
    with claimed_standard_fds() as (wire_in, wire_out):
        if pipes:
            async with pipe_streams(wire_in, wire_out) as (lines, writer):
                await _serve(app, lines, writer)
        else:
            async with file_streams(wire_in, wire_out) as (file_lines, file_writer):
                await _serve(app, file_lines, file_writer)


async def _serve(app: MCPServer[Any], lines: AsyncIterator[RawLine], writer: LineWriter) -> None:
    # The SDK takes explicit stdin/stdout objects for exactly this; it only iterates lines from one
    # and calls write/flush on the other. MCPServer exposes no stdio entry taking streams, hence
    # the low-level server (the same call `run_stdio_async` makes).
    lowlevel = app._lowlevel_server
    stdin = cast("anyio.AsyncFile[str]", ScreenedLines(lines, writer))
    async with stdio_server(stdin, cast("anyio.AsyncFile[str]", writer)) as (read, write):
        await lowlevel.run(read, write, lowlevel.create_initialization_options())
