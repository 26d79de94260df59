"""A loopback fake of the DashScope portrait-animation API (see shared/dashscope-contract.md).

It backs the test-suite and the product's ``--sandbox`` mode, so it is strict about the wire
format (headers, field names, box provenance) and deterministic (boxes come from hashes, videos
from the task id). Scenario keywords in URLs select failure paths: ``noface``, ``multiface`` and
``unreachable`` at detect time, ``failtask`` at generate time. ``/images/<name>.png`` serves a drawn
portrait whose face sits in the face box detected for that URL. Nothing here writes to stdout:
the product speaks MCP over stdio.

Misbehaviour on demand: ``inject(...)`` replaces the next answers of a path with a status or a
JSON body; ``fault(endpoint, kind, ...)`` (the fault layer, `FaultLayer` at the end of this module)
makes any endpoint answer with HTML, truncated or wrongly shaped 200s, lies in Content-Length,
resets mid-body, stalls, redirect loops, redirects to private addresses or compressed bombs,
before or after the fake acted on the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, get_args

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.config import SANDBOX_API_KEY
from server.sandbox.sample_media import portrait_png

EMO_DETECT_MODEL = "emo-detect-v1"
EMOJI_DETECT_MODEL = "emoji-detect-v1"
EMO_MODEL = "emo-v1"
EMOJI_MODEL = "emoji-v1"
_FAMILY = {EMO_DETECT_MODEL: "emo", EMOJI_DETECT_MODEL: "emoji", EMO_MODEL: "emo", EMOJI_MODEL: "emoji"}

DRIVEN_IDS = frozenset(
    {
        "mengwa_kaixin", "mengwa_dengyan", "mengwa_gandong", "mengwa_renzhen_1", "mengwa_jidong",
        "mengwa_kun_1", "mengwa_jiaoxie",
        "dagong_kaixin", "dagong_yangwang", "dagong_kunhuo", "dagong_zhuakuang", "dagong_wunai",
        "dagong_weixiao", "dagong_ganji",
        "jingdian_tiaopi", "jingdian_deyi_1", "jingdian_qidai", "jingdian_landuo_1", "jingdian_xianqi",
        "jingdian_lei",
    }
)  # fmt: skip
STYLE_LEVELS = frozenset({"normal", "calm", "active"})
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})

IMAGE_SIZE = (1000, 1200)  # the pretend size (w, h) of every detected image
CHUNK_SIZE = 64 * 1024
# ftyp box + an mdat box whose size 0 means "runs to the end of the file": enough to look like an MP4.
MP4_HEADER = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x00mdat"
MAX_UPLOAD_MB = 100
POLICY_TTL = 300

_BEIJING = timezone(timedelta(hours=8))
_URL_SCHEMES = ("http://", "https://", "oss://")
_DEFAULT_CODES = {
    400: ("InvalidParameter", "Invalid parameter."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    403: ("AccessDenied", "Access denied."),
    404: ("NotFound", "Not found."),
    429: ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, form fields (file -> bytes), undecodable JSON as text, or None
    at: float


@dataclass
class FakeTask:
    task_id: str
    model: str
    status: str
    input: dict[str, Any]
    parameters: dict[str, Any] | None
    submitted_at: float  # monotonic
    submit_wall: float  # epoch seconds, for the Beijing-time strings
    request_id: str
    query_count: int = 0
    finished_at: float | None = None
    scheduled_wall: float | None = None
    end_wall: float | None = None
    code: str | None = None
    message: str | None = None
    # The output length a simulated account reports in usage (None: the fake's fixed figure).
    video_duration: float | None = None
    # The key (account) that submitted it: another account's key is told the task does not exist.
    account: str = ""


@dataclass
class Detection:
    family: str  # "emo" or "emoji"
    image_url: str
    source: str  # "url:<url>" or "sha256:<hex of the uploaded bytes>"
    ratio: str
    face_bbox: list[int]
    ext_bbox: list[int]


@dataclass
class StoredObject:
    model: str
    data: bytes
    sha256: str


@dataclass
class _Policy:
    model: str
    policy: str
    signature: str
    upload_dir: str
    access_key_id: str
    expires_at: float


@dataclass
class _Injection:
    method: str
    path_prefix: str
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] | None
    times: int
    delay: float
    passthrough: bool


class ApiError(Exception):
    """A refused request, answered with the DashScope error envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def beijing_time(epoch: float) -> str:
    """Format like DashScope's task timestamps: ``2025-09-11 14:33:38.716`` (UTC+8, no zone)."""
    dt = datetime.fromtimestamp(epoch, _BEIJING)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def detect_boxes(digest: bytes, ratio: str, scale: float) -> tuple[list[int], list[int]]:
    """Derive a plausible face box and an ext box of exactly `ratio` that contains it and fits the image."""
    width, height = IMAGE_SIZE
    n = [int.from_bytes(digest[i : i + 2], "big") for i in range(0, 8, 2)]
    fw = 160 + n[0] % 180
    fh = fw + n[1] % 40
    x1 = 350 + n[2] % 301 - fw // 2
    y1 = 400 + n[3] % 301 - fh // 2
    face = [x1, y1, x1 + fw, y1 + fh]
    side = max(fw, fh) * scale
    if ratio == "3:4":
        unit = min(math.ceil(side / 3), width // 3, height // 4)
        ew, eh = 3 * unit, 4 * unit
        top = (y1 + fh // 2) - eh // 3  # half body: the face sits in the upper third
    else:
        ew = eh = min(math.ceil(side), width, height)
        top = (y1 + fh // 2) - eh // 2
    left = min(max((x1 + fw // 2) - ew // 2, 0), width - ew)
    top = min(max(top, 0), height - eh)
    return face, [left, top, left + ew, top + eh]


def _request_id() -> str:
    return str(uuid.uuid4())


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": _request_id()}


def _oss_error(status: int, code: str, message: str) -> Response:
    """OSS answers its own errors in XML, unlike the DashScope API."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + "</Code><Message>" + message
        + "</Message><RequestId>" + uuid.uuid4().hex.upper() + "</RequestId></Error>"
    )  # fmt: skip
    return Response(xml, status_code=status, media_type="application/xml")


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal capture (the host process owns Ctrl+C) that reports readiness."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_ready()


_Handler = Callable[[Request, RecordedRequest, dict[str, str]], Response]


class FakeDashScope:
    """In-process DashScope: tasks, detections and uploads live in memory, guarded by one lock."""

    def __init__(
        self,
        *,
        api_key: str = SANDBOX_API_KEY,
        polls_to_finish: int = 2,
        video_size: int = 64 * 1024,
        auto_progress: bool = True,
        video: bytes | None = None,
        video_for: Callable[[FakeTask], bytes | None] | None = None,
    ) -> None:
        if polls_to_finish < 1:
            raise ValueError("polls_to_finish must be >= 1")
        self.api_key = api_key
        # Further accounts' keys (tenants with keys of their own); each sees only its own tasks.
        self.extra_keys: set[str] = set()
        self.polls_to_finish = polls_to_finish
        # `video` replaces the generated bytes (e.g. a real MP4 a browser can play).
        self.video = video
        self.video_size = len(video) if video is not None else video_size
        # `video_for` picks real bytes per task (the sandbox's clip for its output size), else `video` is used.
        self.video_for = video_for
        self.auto_progress = auto_progress
        # Download faults: a pause before each chunk, the next N downloads cut off after one chunk,
        # and task ids whose signed URL has expired (OSS answers 403).
        self.download_chunk_delay = 0.0
        self.break_downloads = 0
        self.expired_videos: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self.tasks: dict[str, FakeTask] = {}
        self.detections: list[Detection] = []
        self.objects: dict[str, StoredObject] = {}  # uploaded OSS objects by key
        self.origin = ""
        self.base_url = ""
        self._policies: dict[str, _Policy] = {}
        self._images: dict[str, bytes] = {}
        self._injections: list[_Injection] = []
        self._md5s: dict[tuple[str, int], str] = {}
        # Planned faults per endpoint (see FaultLayer); `fault(...)` adds one.
        self.faults = FaultLayer(self)
        self._lock = threading.RLock()
        self._closing = False
        api = "/api/v1"
        self._routes: list[tuple[str, re.Pattern[str], _Handler, bool]] = [
            (m, re.compile(p + "/?"), h, auth)
            for m, p, h, auth in [
                ("POST", api + "/services/aigc/image2video/face-detect", self._detect, True),
                ("POST", api + "/services/aigc/image2video/video-synthesis", self._generate, True),
                ("GET", api + "/tasks", self._list_tasks, True),
                ("POST", api + r"/tasks/(?P<task_id>[^/]+)/cancel", self._cancel, True),
                ("GET", api + r"/tasks/(?P<task_id>[^/]+)", self._query, True),
                ("GET", api + "/uploads", self._get_policy, True),
                ("POST", "/oss-upload", self._oss_upload, False),
                ("GET", r"/files/(?P<task_id>[^/]+)\.mp4", self._download, False),
                ("GET", r"/images/(?P<name>[A-Za-z0-9_-]+)\.png", self._image, False),
            ]
        ]
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        self.app = Starlette(routes=[Route("/{path:path}", self._entry, methods=methods)])

    # ----------------------------------------------------------------- test controls

    def inject(
        self,
        method: str,
        path_prefix: str,
        *,
        status: int = 500,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay: float = 0.0,
        passthrough: bool = False,
    ) -> None:
        """Override the next `times` matching answers.

        `method` "*" matches any method; `path_prefix` is matched against the full path and also
        relative to /api/v1 (so "/tasks/" works). `body` is sent verbatim; without one the
        DashScope error envelope for `status` is sent. With `passthrough` the request is processed
        normally (its effect happens at once) and only the answer is held back by `delay`.
        """
        with self._lock:
            self._injections.append(
                _Injection(method.upper(), path_prefix, status, body, headers, times, delay, passthrough)
            )

    def clear_injections(self) -> None:
        """Drop every injected answer not yet used."""
        with self._lock:
            self._injections.clear()

    def fault(
        self,
        endpoint: Endpoint,
        kind: FaultKind,
        *,
        after: bool = False,
        times: int = 1,
        status: int = 503,
        retry_after: str | None = None,
        body: Any = None,
        seconds: float = 30.0,
        match: str | None = None,
    ) -> Fault:
        """Make the next `times` requests to `endpoint` misbehave as `kind` (see `FaultLayer`).

        With `after` the fake first acts on the request (a task is created, a cancel done, an upload
        stored) and only its answer is replaced: the answer of a request that worked is lost.
        `match` limits the fault to paths that contain it (one task's queries or video).
        """
        planned = Fault(endpoint, kind, after, times, status, retry_after, body, seconds, match)
        self.faults.add(planned)
        return planned

    def complete(self, task_id: str) -> None:
        with self._lock:
            self._transition(self.tasks[task_id], "SUCCEEDED")

    def fail(self, task_id: str, code: str = "InternalError.Algo", message: str = "Algorithm process failed.") -> None:
        with self._lock:
            self._transition(self.tasks[task_id], "FAILED", code, message)

    def set_status(self, task_id: str, status: str) -> None:
        """Force any status; "UNKNOWN" makes the task look expired (query answers UNKNOWN, no video)."""
        with self._lock:
            self._transition(self.tasks[task_id], status)

    def submits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.rstrip("/").endswith("/video-synthesis")]

    def queries(self, task_id: str | None = None) -> list[RecordedRequest]:
        pattern = re.compile(r"/api/v1/tasks/([^/]+)/?")
        found = []
        for r in self.requests:
            m = pattern.fullmatch(r.path)
            if r.method == "GET" and m and (task_id is None or m.group(1) == task_id):
                found.append(r)
        return found

    def video_chunks(self, task_id: str) -> Iterator[bytes]:
        """The video of `task_id`, in CHUNK_SIZE pieces: deterministic, never held whole in memory."""
        video = self._given_video(task_id)
        if video is not None:
            for start in range(0, len(video), CHUNK_SIZE):
                yield video[start : start + CHUNK_SIZE]
            return
        base = hashlib.shake_128(task_id.encode()).digest(CHUNK_SIZE)
        offset = index = 0
        while offset < self.video_size:
            n = min(CHUNK_SIZE, self.video_size - offset)
            head = MP4_HEADER if index == 0 else index.to_bytes(8, "big")
            yield (head + base[len(head) :])[:n]
            offset += n
            index += 1

    def _given_video(self, task_id: str) -> bytes | None:
        task = self.tasks.get(task_id)
        chosen = self.video_for(task) if self.video_for is not None and task is not None else None
        return self.video if chosen is None else chosen

    def video_bytes(self, task_id: str) -> bytes:
        return b"".join(self.video_chunks(task_id))

    def video_md5(self, task_id: str) -> str:
        """The video's MD5 as OSS sends it in Content-MD5 (base64), computed once per task and size."""
        key = (task_id, self.video_size if self.video is None else -id(self.video))
        if key not in self._md5s:
            digest = hashlib.md5(usedforsecurity=False)
            for chunk in self.video_chunks(task_id):
                digest.update(chunk)
            self._md5s[key] = base64.b64encode(digest.digest()).decode()
        return self._md5s[key]

    def video_sha256(self, task_id: str) -> str:
        digest = hashlib.sha256()
        for chunk in self.video_chunks(task_id):
            digest.update(chunk)
        return digest.hexdigest()

    # ----------------------------------------------------------------- serving

    def _make_server(self, on_ready: Callable[[], None]) -> tuple[_QuietServer, socket.socket]:
        # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
        # and without it every keep-alive answer waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        self.origin = f"http://127.0.0.1:{port}"
        self.base_url = self.origin + "/api/v1"
        self._closing = False
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=3,
        )
        return _QuietServer(config, on_ready), sock

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        """Serve on a free loopback port inside the current asyncio loop; yields base_url."""
        ready = anyio.Event()
        server, sock = self._make_server(ready.set)

        async def run() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                sock.close()
                ready.set()

        # A bare asyncio task, not an anyio task group: the caller's exceptions (failed asserts)
        # then leave this context unwrapped instead of inside an ExceptionGroup.
        task = asyncio.create_task(run())
        try:
            await ready.wait()
            if not server.started:
                raise RuntimeError("the fake DashScope server failed to start")
            yield self.base_url
        finally:
            self._closing = True
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                await task

    @contextlib.contextmanager
    def serve_in_thread(self) -> Iterator[str]:
        """Serve from a background thread with its own event loop, for synchronous callers."""
        ready = threading.Event()
        server, sock = self._make_server(ready.set)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # SystemExit from a failed startup included
                errors.append(exc)
            finally:
                sock.close()
                ready.set()

        thread = threading.Thread(target=run, name="fake-dashscope", daemon=True)
        thread.start()
        ready.wait()
        if not server.started:
            thread.join()
            cause = errors[0] if errors else None
            raise RuntimeError("the fake DashScope server failed to start") from cause
        try:
            yield self.base_url
        finally:
            self._closing = True
            server.should_exit = True
            thread.join()

    # ----------------------------------------------------------------- request plumbing

    async def _entry(self, request: Request) -> Response:
        at = time.monotonic()
        body = await self._read_body(request)
        path = request.url.path
        record = RecordedRequest(request.method, path, dict(request.query_params), dict(request.headers), body, at)
        with self._lock:
            self.requests.append(record)
            rule = self._take_injection(request.method, path)
            fault = self.faults.take(request.method, path) if rule is None else None
        if fault is not None and not fault.after:
            return self.faults.answer(fault, request, None)
        if rule is not None and not rule.passthrough:
            await self._sleep(rule.delay)
            if rule.body is not None:
                return JSONResponse(rule.body, rule.status, headers=rule.headers)
            code, message = _DEFAULT_CODES.get(
                rule.status, ("InternalError", "An internal error has occurred, please try again later.")
            )
            return JSONResponse(_error_body(code, message), rule.status, headers=rule.headers)
        try:
            with self._lock:
                response = self._dispatch(request, record)
        except ApiError as exc:
            response = JSONResponse(_error_body(exc.code, exc.message), exc.status, headers=exc.headers)
        if rule is not None:
            await self._sleep(rule.delay)
            for name, value in (rule.headers or {}).items():
                response.headers[name] = value
        if fault is not None:
            return self.faults.answer(fault, request, response)
        return response

    async def _read_body(self, request: Request) -> Any:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                async with request.form(max_part_size=MAX_UPLOAD_MB * 1024 * 1024) as form:
                    fields: dict[str, Any] = {}
                    for name, value in form.multi_items():
                        fields[name] = await value.read() if isinstance(value, UploadFile) else value
                    return fields
            except Exception:  # a malformed form is recorded as absent and refused later
                return None
        raw = await request.body()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _take_injection(self, method: str, path: str) -> _Injection | None:
        for rule in self._injections:
            prefixes = [rule.path_prefix, "/api/v1" + rule.path_prefix]
            if rule.method in ("*", method) and any(path.startswith(p) for p in prefixes):
                rule.times -= 1
                if rule.times <= 0:
                    self._injections.remove(rule)
                return rule
        return None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but end early when the server shuts down so shutdown never waits on a delay."""
        deadline = time.monotonic() + seconds
        # A polled flag, not an Event: serve_in_thread sets it from another thread.
        while not self._closing and (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110
            await anyio.sleep(min(left, 0.05))

    def _dispatch(self, request: Request, record: RecordedRequest) -> Response:
        for method, pattern, handler, auth in self._routes:
            match = pattern.fullmatch(record.path)
            if match is None:
                continue
            if auth:
                self._check_auth(record)
            if method != record.method:
                raise ApiError(405, "MethodNotAllowed", f"Method {record.method} is not allowed here.")
            return handler(request, record, match.groupdict())
        if record.path.startswith("/api/v1"):
            self._check_auth(record)
        raise ApiError(404, "NotFound", f"No such resource: {record.path}")

    def _check_auth(self, record: RecordedRequest) -> None:
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        keys = (self.api_key, *sorted(self.extra_keys))
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), key) for key in keys):
            raise ApiError(401, "InvalidApiKey", "Invalid API-key provided.")

    @staticmethod
    def _account(record: RecordedRequest) -> str:
        return record.headers.get("authorization", "").partition(" ")[2].strip()

    def _visible(self, task: FakeTask | None, record: RecordedRequest) -> FakeTask | None:
        """A task as the caller's account sees it: another account's task does not exist for it."""
        if task is None or (task.account and task.account != self._account(record)):
            return None
        return task

    def _json_body(self, record: RecordedRequest) -> dict[str, Any]:
        if not isinstance(record.body, dict):
            raise ApiError(400, "InvalidParameter", "The request body must be a JSON object.")
        return record.body

    def _resolve_url(self, record: RecordedRequest, name: str, value: Any, model: str) -> str:
        """Validate a media URL; an oss:// one must be an upload for `model`. Returns its source key."""
        if not isinstance(value, str) or not value.startswith(_URL_SCHEMES):
            raise ApiError(400, "InvalidParameter", f"input.{name} must be an http(s) or oss:// URL.")
        if not value.startswith("oss://"):
            if "unreachable" in value.lower():
                raise ApiError(400, "InvalidURL", f"Download the media resource timed out: {name}.")
            return "url:" + value
        if record.headers.get("x-dashscope-ossresourceresolve") != "enable":
            raise ApiError(
                400,
                "InvalidParameter",
                f"input.{name} is an oss:// URL: X-DashScope-OssResourceResolve required.",
            )
        stored = self.objects.get(value[len("oss://") :])
        if stored is None or stored.model != model:
            raise ApiError(400, "InvalidURL", f"input.{name}: no such object uploaded for model {model}.")
        return "sha256:" + stored.sha256

    # ----------------------------------------------------------------- detect

    def _detect(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        if "x-dashscope-async" in record.headers:
            raise ApiError(403, "AccessDenied", "current user api does not support asynchronous calls")
        body = self._json_body(record)
        model = body.get("model")
        if model not in (EMO_DETECT_MODEL, EMOJI_DETECT_MODEL):
            raise ApiError(404, "ModelNotFound", f"Model not exist: {model}")
        family = _FAMILY[model]
        inp = body.get("input")
        params = body.get("parameters", {})
        if not isinstance(inp, dict) or not isinstance(params, dict):
            raise ApiError(400, "InvalidParameter", "input and parameters must be JSON objects.")
        ratio = params.get("ratio", "1:1")
        if ratio not in (("1:1", "3:4") if family == "emo" else ("1:1",)):
            raise ApiError(400, "InvalidParameter", f"parameters.ratio is invalid: {ratio!r}")
        url = inp.get("image_url")
        source = self._resolve_url(record, "image_url", url, model)
        assert isinstance(url, str)
        lowered = "" if source.startswith("sha256:") else url.lower()
        if "multiface" in lowered:
            raise ApiError(400, "InvalidFile.MultiHuman", "More than one person is in the image.")
        usage = {"image_count": 1}
        if "noface" in lowered:
            if family == "emo":
                output: dict[str, Any] = {
                    "check_pass": False,
                    "humanoid": False,
                    "code": "InvalidFile.NoHuman",
                }
                output["message"] = "No human face was detected in the image."
            else:
                output = {"code": "InvalidFile.FacePose", "message": "No front-facing face was detected."}
            return JSONResponse({"output": output, "usage": usage, "request_id": _request_id()})
        if source.startswith("sha256:"):
            digest = bytes.fromhex(source[len("sha256:") :])
        else:
            digest = hashlib.sha256(url.encode()).digest()
        scale = 2.2 if family == "emoji" or ratio == "3:4" else 2.5
        face, ext = detect_boxes(digest, ratio, scale)
        self.detections.append(Detection(family, url, source, ratio, face, ext))
        if family == "emo":
            output = {"check_pass": True, "face_bbox": face, "ext_bbox": ext, "humanoid": True}
        else:
            output = {"bbox_face": face, "ext_bbox_face": ext}
        return JSONResponse({"output": output, "usage": usage, "request_id": _request_id()})

    # ----------------------------------------------------------------- generate

    def _generate(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        if record.headers.get("x-dashscope-async") != "enable":
            raise ApiError(403, "AccessDenied", "current user api does not support synchronous calls")
        body = self._json_body(record)
        model = body.get("model")
        if model not in (EMO_MODEL, EMOJI_MODEL):
            raise ApiError(404, "ModelNotFound", f"Model not exist: {model}")
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise ApiError(400, "InvalidParameter", "input must be a JSON object.")
        params = body.get("parameters")
        if model == EMO_MODEL:
            if params is not None and not isinstance(params, dict):
                raise ApiError(400, "InvalidParameter", "parameters must be a JSON object.")
            style = (params or {}).get("style_level", "normal")
            if style not in STYLE_LEVELS:
                raise ApiError(400, "InvalidParameter", f"parameters.style_level is invalid: {style!r}")
            self._resolve_url(record, "audio_url", inp.get("audio_url"), model)
        else:
            if "parameters" in body:
                raise ApiError(400, "InvalidParameter", "parameters is not supported by emoji-v1.")
            for wrong in ("template_id", "ext_bbox_face", "bbox_face"):
                if wrong in inp:
                    raise ApiError(400, "InvalidParameter", f"input.{wrong} is not a valid field.")
            if inp.get("driven_id") not in DRIVEN_IDS:
                raise ApiError(400, "InvalidParameter", f"input.driven_id is invalid: {inp.get('driven_id')!r}")
        source = self._resolve_url(record, "image_url", inp.get("image_url"), model)
        face, ext = inp.get("face_bbox"), inp.get("ext_bbox")
        if not _is_box(face) or not _is_box(ext):
            raise ApiError(400, "InvalidParameter", "input.face_bbox and input.ext_bbox must be 4 integers.")
        family = _FAMILY[model]
        if not any(
            d.family == family and d.source == source and d.face_bbox == face and d.ext_bbox == ext
            for d in self.detections
        ):
            raise ApiError(400, "InvalidParameter", "face_bbox/ext_bbox do not match the detection of this image")
        request_id = _request_id()
        task = FakeTask(
            task_id=str(uuid.uuid4()),
            model=model,
            status="PENDING",
            input=inp,
            parameters=params,
            submitted_at=time.monotonic(),
            submit_wall=time.time(),
            request_id=request_id,
            account=self._account(record),
        )
        self.tasks[task.task_id] = task
        output = {"task_id": task.task_id, "task_status": "PENDING"}
        return JSONResponse({"output": output, "request_id": request_id})

    # ----------------------------------------------------------------- tasks

    def _transition(self, task: FakeTask, status: str, code: str | None = None, msg: str | None = None) -> None:
        now = time.time()
        if status == "SUCCEEDED":
            self.video_md5(task.task_id)  # computed now, not while a download waits for its headers
        task.status = status
        if status == "RUNNING" or status in ("SUCCEEDED", "FAILED"):
            task.scheduled_wall = task.scheduled_wall or now
        if status in TERMINAL_STATUSES:
            task.end_wall = task.end_wall or now
            task.finished_at = task.finished_at or time.monotonic()
        else:
            task.end_wall = task.finished_at = None
        if status == "FAILED":
            task.code = code or "InternalError.Algo"
            task.message = msg or "Algorithm process failed."
        else:
            task.code = task.message = None

    def _advance(self, task: FakeTask) -> None:
        task.query_count += 1
        if not self.auto_progress or task.status not in ("PENDING", "RUNNING"):
            return
        if task.query_count >= self.polls_to_finish:
            trigger = task.input.get("audio_url" if task.model == EMO_MODEL else "image_url")
            if isinstance(trigger, str) and "failtask" in trigger.lower():
                self._transition(task, "FAILED", "InternalError.Algo", "Algorithm process failed (failtask).")
            else:
                self._transition(task, "SUCCEEDED")
        elif task.query_count >= 2:
            self._transition(task, "RUNNING")

    def _query(self, _: Request, record: RecordedRequest, args: dict[str, str]) -> Response:
        task_id = args["task_id"]
        task = self._visible(self.tasks.get(task_id), record)
        if task is None or task.status == "UNKNOWN":
            if task is not None:
                task.query_count += 1
            output = {"task_id": task_id, "task_status": "UNKNOWN"}
            return JSONResponse({"request_id": _request_id(), "output": output})
        self._advance(task)
        out: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": task.status,
            "submit_time": beijing_time(task.submit_wall),
        }
        if task.scheduled_wall is not None:
            out["scheduled_time"] = beijing_time(task.scheduled_wall)
        if task.end_wall is not None:
            out["end_time"] = beijing_time(task.end_wall)
        answer: dict[str, Any] = {"request_id": _request_id(), "output": out}
        if task.status == "SUCCEEDED":
            video_url = f"{self.origin}/files/{task.task_id}.mp4"
            if task.model == EMO_MODEL:
                out["results"] = {"video_url": video_url}
                ext = task.input["ext_bbox"]
                ratio = "1:1" if ext[2] - ext[0] == ext[3] - ext[1] else "3:4"
                answer["usage"] = {"video_duration": task.video_duration or 5.2, "video_ratio": ratio}
            else:
                out["video_url"] = video_url
                answer["usage"] = {"video_duration": task.video_duration or 3, "video_ratio": "standard"}
        elif task.status == "FAILED":
            out["code"], out["message"] = task.code, task.message
        return JSONResponse(answer)

    def _cancel(self, _: Request, record: RecordedRequest, args: dict[str, str]) -> Response:
        task = self._visible(self.tasks.get(args["task_id"]), record)
        if task is None or task.status == "UNKNOWN":
            raise ApiError(400, "InvalidParameter", "task not found")
        if task.status != "PENDING":
            raise ApiError(
                400,
                "UnsupportedOperation",
                "Failed to cancel the task, please confirm if the task is in PENDING status.",
            )
        self._transition(task, "CANCELED")
        return JSONResponse({"request_id": _request_id()})

    def _list_tasks(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        q = record.query
        for name in ("start_time", "end_time"):
            if name in q and not re.fullmatch(r"\d{14}", q[name]):
                raise ApiError(400, "InvalidParameter", f"{name} must be YYYYMMDDhhmmss.")
        try:
            page_no, page_size = int(q.get("page_no", "1")), int(q.get("page_size", "10"))
        except ValueError:
            raise ApiError(400, "InvalidParameter", "page_no and page_size must be integers.") from None
        if page_no < 1 or not 1 <= page_size <= 100:
            raise ApiError(400, "InvalidParameter", "page_no must be >= 1 and page_size within 1..100.")

        def keep(t: FakeTask) -> bool:
            stamp = datetime.fromtimestamp(t.submit_wall, _BEIJING).strftime("%Y%m%d%H%M%S")
            return (
                t.status != "UNKNOWN"
                and self._visible(t, record) is not None
                and q.get("start_time", stamp) <= stamp <= q.get("end_time", stamp)
                and q.get("model_name", t.model) == t.model
                and q.get("status", t.status) == t.status
            )

        found = sorted(filter(keep, self.tasks.values()), key=lambda t: t.submit_wall, reverse=True)
        page = found[(page_no - 1) * page_size : page_no * page_size]
        data = [
            {
                "task_id": t.task_id,
                "status": t.status,
                "model_name": t.model,
                "gmt_create": int(t.submit_wall * 1000),
                "start_time": beijing_time(t.scheduled_wall) if t.scheduled_wall else None,
                "end_time": beijing_time(t.end_wall) if t.end_wall else None,
                "request_id": t.request_id,
            }
            for t in page
        ]
        return JSONResponse(
            {
                "data": data,
                "total": len(found),
                "total_page": math.ceil(len(found) / page_size),
                "page_no": page_no,
                "page_size": page_size,
                "request_id": _request_id(),
            }
        )

    def _download(self, _: Request, __: RecordedRequest, args: dict[str, str]) -> Response:
        task = self.tasks.get(args["task_id"])
        if task is None or task.status != "SUCCEEDED":
            return _oss_error(404, "NoSuchKey", "The specified key does not exist.")
        if task.task_id in self.expired_videos:
            return _oss_error(403, "AccessDenied", "Request has expired.")
        chunks = self.video_chunks(task.task_id)
        broken = self.break_downloads > 0
        self.break_downloads -= int(broken)
        delay = self.download_chunk_delay

        async def stream() -> AsyncIterator[bytes]:
            for index, chunk in enumerate(chunks):
                if broken and index == 1:
                    # Fewer bytes than Content-Length, then the connection drops.
                    raise ConnectionResetError("download cut off by the fake")
                if delay:
                    await self._sleep(delay)
                yield chunk

        given = self._given_video(task.task_id)
        # OSS sends the object's MD5 (base64), which is what lets a client see a body cut short.
        headers = {
            "content-length": str(self.video_size if given is None else len(given)),
            "content-md5": self.video_md5(task.task_id),
        }
        return StreamingResponse(stream(), headers=headers, media_type="video/mp4")

    def image_url(self, name: str) -> str:
        """A loopback portrait URL: the fake serves a drawn PNG there whose face matches its detection."""
        return f"{self.origin}/images/{name}.png"

    def _image(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        url = self.origin + record.path
        if url not in self._images:
            face, _ext = detect_boxes(hashlib.sha256(url.encode()).digest(), "1:1", 2.5)
            self._images[url] = portrait_png(face, IMAGE_SIZE)
        return Response(self._images[url], media_type="image/png")

    # ----------------------------------------------------------------- temporary uploads

    def _get_policy(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        if record.query.get("action") != "getPolicy":
            raise ApiError(400, "InvalidParameter", "action must be getPolicy.")
        model = record.query.get("model", "")
        if model not in _FAMILY:
            raise ApiError(404, "ModelNotFound", f"Model not exist: {model}")
        expires = datetime.now(UTC) + timedelta(seconds=POLICY_TTL)
        document = {
            "expiration": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "conditions": [["eq", "model", model]],
        }
        policy_text = base64.b64encode(json.dumps(document).encode()).decode()
        secret = uuid.uuid4().bytes
        signature = base64.b64encode(hmac.new(secret, policy_text.encode(), "sha1").digest()).decode()
        day = datetime.now(_BEIJING).strftime("%Y-%m-%d")
        policy = _Policy(
            model=model,
            policy=policy_text,
            signature=signature,
            upload_dir=f"dashscope-instant/{uuid.uuid4().hex}/{day}",
            access_key_id="LTAI5tSandbox" + uuid.uuid4().hex[:10],
            expires_at=time.monotonic() + POLICY_TTL,
        )
        self._policies[policy_text] = policy
        data = {
            "policy": policy.policy,
            "signature": policy.signature,
            "upload_dir": policy.upload_dir,
            "upload_host": f"{self.origin}/oss-upload",
            "expire_in_seconds": POLICY_TTL,
            "max_file_size_mb": MAX_UPLOAD_MB,
            "capacity_limit_mb": 999999999,
            "oss_access_key_id": policy.access_key_id,
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }
        return JSONResponse({"data": data, "request_id": _request_id()})

    def _oss_upload(self, _: Request, record: RecordedRequest, __: dict[str, str]) -> Response:
        form = record.body
        if not isinstance(form, dict):
            return _oss_error(400, "InvalidArgument", "The request must be a multipart/form-data POST.")
        required = ["OSSAccessKeyId", "Signature", "policy", "key", "x-oss-object-acl"]
        required += ["x-oss-forbid-overwrite", "success_action_status", "file"]
        missing = [name for name in required if name not in form]
        if missing:
            return _oss_error(400, "InvalidArgument", f"Missing form field(s): {', '.join(missing)}.")
        if list(form)[-1] != "file":
            return _oss_error(400, "InvalidArgument", "The file field must be the last form field.")
        policy = self._policies.get(str(form["policy"]))
        if policy is None or policy.expires_at < time.monotonic():
            return _oss_error(403, "AccessDenied", "Invalid according to Policy: Policy expired or unknown.")
        if form["Signature"] != policy.signature or form["OSSAccessKeyId"] != policy.access_key_id:
            return _oss_error(403, "SignatureDoesNotMatch", "The request signature does not match.")
        expected = {
            "x-oss-object-acl": "private",
            "x-oss-forbid-overwrite": "true",
            "success_action_status": "200",
        }
        for name, value in expected.items():
            if form[name] != value:
                return _oss_error(400, "InvalidArgument", f"{name} must be {value}.")
        key = str(form["key"])
        if not key.startswith(policy.upload_dir + "/") or len(key) == len(policy.upload_dir) + 1:
            return _oss_error(403, "AccessDenied", "Invalid according to Policy: key outside upload_dir.")
        if key in self.objects:
            return _oss_error(403, "FileAlreadyExists", "The object you specified already exists.")
        data = form["file"]
        data = data if isinstance(data, bytes) else str(data).encode()
        if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
            return _oss_error(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.")
        self.objects[key] = StoredObject(policy.model, data, hashlib.sha256(data).hexdigest())
        return Response(b"", status_code=200)


# ================================================================= fault layer
# Everything below makes the fake misbehave on purpose (tests/test_faults.py); the fake itself
# only calls `FaultLayer.take` and `FaultLayer.answer` from `_entry`.

Endpoint = Literal["detect", "submit", "task_query", "task_list", "cancel", "download", "upload_policy", "upload"]
FaultKind = Literal[
    "status",  # an error status (`status`), with `retry_after` as Retry-After when given
    "html",  # 200 with an HTML page (a proxy's or a captive portal's)
    "truncated",  # 200 whose body is cut in half (a complete HTTP message: Content-Length says the cut length)
    "shape",  # 200 with `body` as JSON (a wrong shape)
    "length_lie",  # Content-Length says more than is sent, then the connection closes
    "reset",  # half of the body (chunked), then the connection is reset
    "stall",  # nothing for `seconds` (after: once the headers, and for a download a first piece, are sent)
    "redirect",  # 302 to the same URL with an extra query parameter (a legitimate hop)
    "redirect_loop",  # 302 to the very same URL
    "redirect_private",  # 302 to the same path on 10.0.0.1 (the client must refuse it without connecting)
    "bomb",  # Content-Encoding: gzip of BOMB_BYTES zeros (~64 KiB on the wire)
    "bad_encoding",  # Content-Encoding: gzip on a body that is not gzip
]
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
BOMB_BYTES = 64 * 1024 * 1024
PRIVATE_ORIGIN = "http://10.0.0.1"  # never contacted: the client's address guard must refuse it first
_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)
_ENDPOINT_PATHS: list[tuple[Endpoint, str, re.Pattern[str]]] = [
    ("detect", "POST", re.compile(r"/api/v1/services/aigc/image2video/face-detect/?")),
    ("submit", "POST", re.compile(r"/api/v1/services/aigc/image2video/video-synthesis/?")),
    ("task_list", "GET", re.compile(r"/api/v1/tasks/?")),
    ("cancel", "POST", re.compile(r"/api/v1/tasks/[^/]+/cancel/?")),
    ("task_query", "GET", re.compile(r"/api/v1/tasks/[^/]+/?")),
    ("upload_policy", "GET", re.compile(r"/api/v1/uploads/?")),
    ("upload", "POST", re.compile(r"/oss-upload/?")),
    ("download", "GET", re.compile(r"/files/(?P<task_id>[^/]+)\.mp4")),
]
_RESET = object()  # a part of a _FaultAnswer: break the connection here


def endpoint_of(method: str, path: str) -> Endpoint | None:
    for endpoint, expected, pattern in _ENDPOINT_PATHS:
        if method == expected and pattern.fullmatch(path):
            return endpoint
    return None


@dataclass
class Fault:
    """One planned fault; `served` counts the answers it replaced."""

    endpoint: Endpoint
    kind: FaultKind
    after: bool = False
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    body: Any = None
    seconds: float = 30.0
    match: str | None = None
    served: int = 0


class _FaultAnswer(Response):
    """An answer sent piece by piece in raw ASGI, so it can lie about its length, stall or break off."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        parts: list[Any],
        sleep: Callable[[float], Any],
        *,
        silence: float = 0.0,
    ) -> None:
        super().__init__(status_code=status)
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._parts = parts
        self._pause = sleep
        self._silence = silence  # before the headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._silence:
            await self._pause(self._silence)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for part in self._parts:
            if part is _RESET:
                # uvicorn closes the connection of an app that fails mid-answer: the client sees a cut body.
                raise ConnectionResetError("connection reset by the fake's fault layer")
            if isinstance(part, float):
                await self._pause(part)
            else:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class FaultLayer:
    """Planned faults per endpoint, used in the order they were added, each for its `times` requests."""

    _bomb: bytes | None = None

    def __init__(self, fake: FakeDashScope) -> None:
        self._fake = fake
        self._planned: list[Fault] = []
        self.served: list[tuple[Endpoint, FaultKind]] = []  # what was sent, in order

    def add(self, fault: Fault) -> None:
        if fault.endpoint not in ENDPOINTS or fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {fault.endpoint}/{fault.kind}")
        with self._fake._lock:
            self._planned.append(fault)

    def clear(self) -> None:
        """Drop every planned fault not yet used: the upstream behaves again."""
        with self._fake._lock:
            self._planned.clear()

    def pending(self) -> list[Fault]:
        with self._fake._lock:
            return list(self._planned)

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if one is planned (called under the fake's lock)."""
        endpoint = endpoint_of(method, path)
        for fault in self._planned:
            if fault.endpoint == endpoint and (fault.match is None or fault.match in path):
                fault.served += 1
                if fault.served >= fault.times:
                    self._planned.remove(fault)
                self.served.append((fault.endpoint, fault.kind))
                return fault
        return None

    @classmethod
    def bomb(cls) -> bytes:
        if cls._bomb is None:
            cls._bomb = gzip.compress(bytes(BOMB_BYTES), compresslevel=9)  # zeros: ~1000:1
        return cls._bomb

    def answer(self, fault: Fault, request: Request, acted: Response | None) -> Response:
        """The faulty answer; `acted` is the fake's own answer when it acted first (an `after` fault)."""
        download = fault.endpoint == "download"
        media = "video/mp4" if download else "application/json"
        body = self._body(fault, request, acted)
        headers: dict[str, str] = {"content-type": media}
        if fault.retry_after is not None:
            headers["retry-after"] = fault.retry_after
        sleep = self._fake._sleep
        kind = fault.kind
        if kind == "status":
            if download or fault.endpoint == "upload":
                error = _oss_error(fault.status, "InternalError", "Injected fault.")
            else:
                code, message = _DEFAULT_CODES.get(fault.status, ("InternalError", "An internal error has occurred."))
                error = JSONResponse(_error_body(code, message), fault.status)
            for name, value in headers.items():
                if name != "content-type":
                    error.headers[name] = value
            return error
        if kind in ("redirect", "redirect_loop", "redirect_private"):
            here = str(request.url)
            if kind == "redirect":
                here += ("&" if request.url.query else "?") + f"hop={fault.served}"
            elif kind == "redirect_private":
                here = PRIVATE_ORIGIN + request.url.path
            return Response(b"", 302, headers={"location": here})
        if kind == "html":
            return Response(_HTML_PAGE, 200, media_type="text/html")
        if kind == "shape":
            return JSONResponse(fault.body if fault.body is not None else {"request_id": _request_id()}, 200)
        if kind == "truncated":
            cut = body[: max(1, len(body) // 2)]
            if download:
                headers["content-md5"] = self._fake.video_md5(self._task_id(request))  # the whole object's
            return _FaultAnswer(200, {**headers, "content-length": str(len(cut))}, [cut], sleep)
        if kind == "length_lie":
            return _FaultAnswer(200, {**headers, "content-length": str(len(body) + 4096)}, [body, _RESET], sleep)
        if kind == "reset":
            return _FaultAnswer(200, headers, [body[: len(body) // 2], _RESET], sleep)
        if kind == "stall" and (fault.after or download):
            # Chunked (no Content-Length): even an empty body is not complete until its last chunk.
            first = body[:CHUNK_SIZE] if download else b""
            return _FaultAnswer(200, headers, [first, float(fault.seconds), body[len(first) :]], sleep)
        if kind == "stall":  # before acting: silence, then a refusal (if anyone still listens)
            refused = json.dumps(_error_body("InternalError", "stalled")).encode()
            return _FaultAnswer(fault.status, headers, [refused], sleep, silence=float(fault.seconds))
        if kind == "bomb":
            headers.update({"content-encoding": "gzip", "content-length": str(len(self.bomb()))})
            return _FaultAnswer(200, headers, [self.bomb()], sleep)
        headers.update({"content-encoding": "gzip", "content-length": str(len(body))})  # bad_encoding
        return _FaultAnswer(200, headers, [body], sleep)

    def _task_id(self, request: Request) -> str:
        match = _ENDPOINT_PATHS[-1][2].fullmatch(request.url.path)
        return match.group("task_id") if match else ""

    def _body(self, fault: Fault, request: Request, acted: Response | None) -> bytes:
        """What the faulty answer carries: the video, the fake's own answer, or a plausible one."""
        if fault.endpoint == "download":
            return self._fake.video_bytes(self._task_id(request))
        if acted is not None and not isinstance(acted, StreamingResponse):
            return bytes(acted.body)
        return json.dumps({"request_id": _request_id(), "output": {"task_status": "PENDING"}}).encode()
