"""The loopback fake of DashScope in a process of its own, for benchmarks.

A separate process keeps the fake's work off the measured processes' CPU time and GIL: the
server under test and the baseline client then see the same upstream, and neither pays for it.
It prints its base URL as one line on stdout, then serves until stdin closes.

With `--control`, each line on stdin is a JSON command answered by one JSON line on stdout (see
`Control`): a bench whose measured quantity is counted at the fake (per-task query times, submits,
a video's digest) asks for it without running the fake in its own process, where the fake's
hundreds of requests per second would compete with the bench's clients for the GIL. Request times
are `time.monotonic()`, which on Linux is one clock for every process of the host.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.sandbox.fake_dashscope import EMO_MODEL, FakeDashScope, FakeTask

# The workers' ports speak through httptools (a C parser; a dev dependency) where it is installed: the
# fake shares a small host's CPUs with the servers it measures, and h11 cost it ~0.47 ms of CPU per query
# there against ~0.35 ms (500 open tasks at 0.5 s want 1,000 queries/s). Not the sandbox fake's protocol
# (server/sandbox/fake_dashscope.py keeps h11): this is the bench's instrument, not what tests talk to.
HTTP = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"

_TASK_PATH = re.compile(r"/api/v1/tasks/([^/]+)/?")
_VIDEO_PATH = re.compile(r"/files/([^/]+)\.mp4")


class PortTags:
    """ASGI middleware: which of the fake's ports each task query came in on.

    Why: with `--ports N` every worker of a cluster is given a port of its own (its
    DASHSCOPE_HTTP_BASE_URL), so the fake can tell two workers querying one task apart from one
    worker's late query followed by its next one, without anything in the server knowing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.queries: list[tuple[str, float, int]] = []  # (task id, monotonic arrival, port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and (match := _TASK_PATH.fullmatch(scope["path"])):
            server = scope.get("server") or ("", 0)
            self.queries.append((match.group(1), time.monotonic(), int(server[1] or 0)))
        await self.app(scope, receive, send)


class _Quiet(uvicorn.Server):
    """uvicorn without its signal capture (stdin closing stops the process), saying when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    def capture_signals(self) -> Any:
        return contextlib.nullcontext()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    async def serve_on(self, sock: socket.socket) -> None:
        try:
            await self.serve(sockets=[sock])
        finally:
            sock.close()
            self.ready.set()


class Control:
    """The commands of `--control`: each takes the command's fields and returns a JSON-able answer."""

    def __init__(self, fake: FakeDashScope, tags: PortTags, ports: Sequence[int]) -> None:
        self.fake = fake
        self.tags = tags
        self.ports = list(ports)

    def handle(self, command: dict[str, Any]) -> Any:
        op = command.pop("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"error": f"unknown op {op!r}"}
        with self.fake._lock:  # the fake's own lock: its request handlers hold it too
            return handler(**command)

    def op_config(self, **settings: Any) -> dict[str, Any]:
        """Change `auto_progress`, `polls_to_finish` or `video_size` while serving."""
        for name, value in settings.items():
            if name not in ("auto_progress", "polls_to_finish", "video_size"):
                return {"error": f"unknown setting {name!r}"}
            setattr(self.fake, name, value)
        return {}

    def op_open(self, task_ids: Sequence[str], running: int = 1) -> dict[str, Any]:
        """Tasks the account has in its queue: the first `running` RUNNING, the rest PENDING."""
        for index, task_id in enumerate(task_ids):
            self.fake.tasks[task_id] = FakeTask(
                task_id=task_id,
                model=EMO_MODEL,
                status="RUNNING" if index < running else "PENDING",
                input={"image_url": "https://images.example.com/people/alice.jpg"},
                parameters=None,
                submitted_at=time.monotonic(),
                submit_wall=time.time(),
                request_id=str(uuid.uuid4()),
                scheduled_wall=time.time() if index < running else None,
            )
        return {}

    def op_requests(self, since: float = 0.0) -> dict[str, Any]:
        """What the fake was asked since `since`: per-task queries and downloads, submits, detects."""
        queries: list[tuple[str, float]] = []
        downloads: list[tuple[str, float]] = []
        submits: list[tuple[str, float]] = []
        detects: list[float] = []
        other_tasks_calls: list[float] = []  # the task list and cancels: they count against the query limit
        for record in self.fake.requests:
            if record.at < since:
                continue
            if record.method == "GET" and (match := _TASK_PATH.fullmatch(record.path)):
                queries.append((match.group(1), record.at))
            elif record.method == "GET" and (match := _VIDEO_PATH.fullmatch(record.path)):
                downloads.append((match.group(1), record.at))
            elif record.method == "POST" and record.path.rstrip("/").endswith("/video-synthesis"):
                body = record.body if isinstance(record.body, dict) else {}
                submits.append((str(body.get("input", {}).get("audio_url")), record.at))
            elif record.method == "POST" and record.path.rstrip("/").endswith("/face-detect"):
                detects.append(record.at)
            elif record.path.startswith("/api/v1/tasks"):
                other_tasks_calls.append(record.at)
        return {
            "queries": queries,
            "downloads": downloads,
            "submits": submits,
            "detects": detects,
            "other_tasks_calls": other_tasks_calls,
        }

    def op_ports(self) -> dict[str, Any]:
        """The base URLs of the extra ports (`--ports`), one per worker."""
        return {"base_urls": [f"http://127.0.0.1:{port}/api/v1" for port in self.ports]}

    def op_tagged(self, since: float = 0.0) -> dict[str, Any]:
        """Task queries since `since` with the port each came in on: (task id, arrival, port)."""
        return {"queries": [q for q in self.tags.queries if q[1] >= since]}

    def op_tasks(self) -> dict[str, Any]:
        """Every task the fake knows: id, status and the audio it was submitted with."""
        return {
            "tasks": [
                {"task_id": t.task_id, "status": t.status, "audio_url": t.input.get("audio_url")}
                for t in self.fake.tasks.values()
            ]
        }

    def op_sha256(self, task_ids: Sequence[str]) -> dict[str, Any]:
        return {"sha256": {task_id: self.fake.video_sha256(task_id) for task_id in task_ids}}

    def op_forget(self) -> dict[str, Any]:
        """Drop the request log (a long run would otherwise keep every request)."""
        self.fake.requests.clear()
        self.tags.queries.clear()
        return {}


def _control_loop(control: Control) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = control.handle(json.loads(line))
        except Exception as exc:  # a bad command is answered, not fatal: the bench reports it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
        sys.stdout.flush()


async def _serve(fake: FakeDashScope, control: bool, ports: int) -> None:
    tags = PortTags(fake.app)
    fake.app = tags  # type: ignore[assignment]  # the same app, seen through the tags
    async with fake.serve() as base_url, anyio.create_task_group() as tg:
        servers: list[_Quiet] = []
        bound: list[int] = []
        for _ in range(ports):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY, as the fake
            sock.bind(("127.0.0.1", 0))
            bound.append(int(sock.getsockname()[1]))
            config = uvicorn.Config(tags, log_config=None, access_log=False, lifespan="off", http=HTTP, ws="none")
            servers.append(_Quiet(config))
            tg.start_soon(servers[-1].serve_on, sock)
        for server in servers:
            await server.ready.wait()
        sys.stdout.write(base_url + "\n")
        sys.stdout.flush()
        # Serve until the parent closes our stdin (or dies).
        if control:
            await anyio.to_thread.run_sync(_control_loop, Control(fake, tags, bound))
        else:
            await anyio.to_thread.run_sync(sys.stdin.read)
        for server in servers:
            server.should_exit = True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--video-size", type=int, default=64 * 1024, help="bytes of every result video")
    parser.add_argument("--polls-to-finish", type=int, default=1)
    parser.add_argument("--no-auto-progress", action="store_true", help="tasks stay as they are until told")
    parser.add_argument("--control", action="store_true", help="answer JSON commands on stdin (see Control)")
    parser.add_argument("--ports", type=int, default=0, help="extra ports, one per worker (see PortTags)")
    args = parser.parse_args(argv)
    fake = FakeDashScope(
        api_key=args.api_key,
        video_size=args.video_size,
        polls_to_finish=args.polls_to_finish,
        auto_progress=not args.no_auto_progress,
    )
    anyio.run(_serve, fake, args.control, args.ports)


if __name__ == "__main__":
    main()
