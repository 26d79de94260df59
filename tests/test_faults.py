"""Faults of every endpoint, through a real MCP client session against the loopback fake over HTTP.

Each scenario plans one fault (`FakeDashScope.fault`) on one endpoint — before or after the fake
acted on the request — and walks one job through it as an agent would: detect, generate, follow
the task. Every scenario then checks the same four things:
- the server is alive (the session still answers);
- every call the fault touched came back within a bound with an answer the agent can act on
  (a result, or an error saying what happened and what to do), never a bare "Error executing tool";
- nothing was submitted twice (one task upstream, whatever was lost on the way);
- once the fault clears, the video is on disk byte for byte the fake's (or, for a cancel, the task
  is CANCELED).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters

from server.app import create_app
from server.config import load_settings
from server.sandbox.fake_dashscope import ENDPOINTS, Endpoint, FakeDashScope, FaultKind, FaultLayer
from server.upstream import client as dashscope
from tests import media_files
from tests.conftest import PORTRAIT, SPEECH, TEST_KEY, make_env, text_of

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CALL_BOUND = 30.0  # no call may take longer than this, whatever the fault
STORY_BOUND = 90.0
SHORT = httpx2.Timeout(2.0, connect=5.0)  # the stall limit of every call in these tests
LOCAL_STATUSES = {"SUBMITTING", "SUBMIT_OUTCOME_UNKNOWN"}
PERSISTENT = 10_000  # a fault that lasts until the test clears it

UNREADABLE_DETECT = r"may well be fine.*detect\w*( tool)? again"
OUTCOME_UNKNOWN = r"may have been created.*billed.*do NOT submit again|do NOT submit again"
CANCEL_UNKNOWN = r"not known.*task_status.*task_cancel again is safe"
NOT_DOWNLOADED = r"could not be downloaded"


@dataclass(frozen=True)
class Scenario:
    endpoint: Endpoint
    kind: FaultKind
    after: bool = False
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    body: Any = None
    family: Literal["emo", "emoji"] = "emo"
    local: bool = False  # a local portrait, so detect uploads it first
    # What the touched call (or, for a background step, the task's last_error/download_error) must say;
    # None: the fault is absorbed (a retried read) and the agent never sees it.
    expect: str | None = None
    label: str = ""

    @property
    def id(self) -> str:
        parts = [self.endpoint, self.kind, "after" if self.after else "before"]
        if self.kind == "status":
            parts.append(str(self.status) + ("+retry-after" if self.retry_after else ""))
        return "-".join(parts + ([self.label] if self.label else []))


S = Scenario
EMOJI_BOX = [212, 194, 460, 441]
SCENARIOS: list[Scenario] = [
    # ---- detect: billed per call, so never retried blindly; an unreadable answer never blames the portrait
    S("detect", "status", status=500, expect=r"InternalError \(HTTP 500\)"),
    S("detect", "status", status=503, retry_after="1", expect=r"HTTP 503"),
    S("detect", "status", status=429, retry_after="0.2"),
    S("detect", "html", after=True, expect=UNREADABLE_DETECT + r"|probably billed"),
    S("detect", "truncated", after=True, expect=UNREADABLE_DETECT),
    S("detect", "shape", after=True, body={"output": {"check_pass": True}, "usage": {"image_count": 1}},
      expect=r"face_bbox is None, not a box.*was billed.*may well be fine", label="boxes-missing"),
    S("detect", "shape", after=True, expect=r"ext_bbox is .*not a box", label="box-malformed",
      body={"output": {"check_pass": True, "face_bbox": [302, 286, 610, 593], "ext_bbox": [71, 9, 840]}}),
    S("detect", "shape", after=True, expect=r"check_pass is 'yes'", label="check-pass-string",
      body={"output": {"check_pass": "yes", "face_bbox": [302, 286, 610, 593], "ext_bbox": [71, 9, 840, 778]}}),
    S("detect", "shape", after=True, expect=r"no output object", label="no-output", body={"request_id": "r-1"}),
    S("detect", "shape", after=True, family="emoji", expect=r"ext_bbox_face is None, not a box", label="emoji-ext",
      body={"output": {"bbox_face": EMOJI_BOX}, "usage": {"image_count": 1}}),
    S("detect", "shape", after=True, family="emoji", expect=r"bbox_face is .*not a box", label="emoji-string-box",
      body={"output": {"bbox_face": "212,194,460,441", "ext_bbox_face": [63, 30, 609, 575]}}),
    S("detect", "length_lie", after=True, expect=r"connection broke.*" + UNREADABLE_DETECT),
    S("detect", "reset", after=True, expect=r"connection broke.*" + UNREADABLE_DETECT),
    S("detect", "stall", after=True, expect=r"stopped arriving.*probably billed.*" + UNREADABLE_DETECT),
    S("detect", "stall", expect=r"did not answer the detection.*may or may not have been billed.*" + UNREADABLE_DETECT),
    S("detect", "redirect_loop", expect=r"redirect.*probably not billed"),
    S("detect", "redirect_private", expect=r"10\.0\.0\.1.*does not follow.*probably not billed"),
    S("detect", "redirect", expect=r"redirect to .*hop=1 that this server does not follow"),
    S("detect", "bomb", expect=r"larger than .* once decompressed.*" + UNREADABLE_DETECT),
    S("detect", "bad_encoding", after=True, expect=r"not valid 'gzip'.*" + UNREADABLE_DETECT),
    S("detect", "html", family="emoji", expect=UNREADABLE_DETECT, label="emoji"),
    # ---- submit: never retried; a lost answer is SUBMIT_OUTCOME_UNKNOWN and reconciled, never a second task
    S("submit", "status", status=500, expect=OUTCOME_UNKNOWN),
    S("submit", "status", status=500, after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "status", status=429, retry_after="0.2", expect=r"Throttling"),
    S("submit", "html", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "truncated", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "shape", after=True, body={"request_id": "r-1", "output": {}}, expect=r"no task_id.*do NOT submit"),
    S("submit", "length_lie", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "reset", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "stall", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "stall", expect=OUTCOME_UNKNOWN),
    S("submit", "redirect_loop", expect=OUTCOME_UNKNOWN),
    S("submit", "redirect_private", expect=OUTCOME_UNKNOWN),
    S("submit", "redirect", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "bomb", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "bad_encoding", after=True, expect=OUTCOME_UNKNOWN),
    S("submit", "html", after=True, family="emoji", expect=OUTCOME_UNKNOWN, label="emoji"),
    # ---- task query: a read, retried; what cannot be believed is "not known yet", never a final status
    S("task_query", "status", status=500, times=2),
    S("task_query", "status", status=429, retry_after="0.2"),
    S("task_query", "status", status=503, times=PERSISTENT, expect=r"HTTP 503"),
    S("task_query", "html", times=PERSISTENT, expect=r"unreadable.*not JSON \(text/html\)"),
    S("task_query", "truncated", times=PERSISTENT, expect=r"unreadable.*not JSON"),
    S("task_query", "shape", times=PERSISTENT, body={"request_id": "r-1", "output": {}},
      expect=r"no task_status.*not known yet", label="no-status"),
    S("task_query", "shape", times=PERSISTENT, body={"output": {"task_status": "WEIRD"}},
      expect=r"'WEIRD'.*not known yet", label="unknown-status"),
    S("task_query", "shape", times=PERSISTENT, body={"output": "SUCCEEDED"}, expect=r"not known yet",
      label="output-string"),
    S("task_query", "shape", times=2, body={"output": {"task_status": "SUCCEEDED"}, "usage": {"video_duration": 5}},
      label="succeeded-without-url"),
    S("task_query", "shape", times=2, body={"output": {"task_status": "UNKNOWN"}}, label="unknown-once"),
    S("task_query", "length_lie", times=PERSISTENT, expect=r"unreadable.*connection broke"),
    S("task_query", "reset", times=PERSISTENT, expect=r"unreadable.*connection broke"),
    S("task_query", "stall"),
    S("task_query", "redirect_loop", times=PERSISTENT, expect=r"unreadable.*redirect"),
    S("task_query", "redirect_private", times=PERSISTENT, expect=r"unreadable.*10\.0\.0\.1"),
    S("task_query", "bomb", times=PERSISTENT, expect=r"larger than .* once decompressed"),
    S("task_query", "bad_encoding", times=PERSISTENT, expect=r"not valid 'gzip'"),
    S("task_query", "html", times=PERSISTENT, family="emoji", expect=r"unreadable", label="emoji"),
    # ---- task list (reconcile of a lost submit): "cannot tell" keeps it unknown, never NOT_FOUND
    S("task_list", "status", status=500, times=PERSISTENT, expect=r"HTTP 500"),
    S("task_list", "html", times=PERSISTENT, expect=r"unreadable"),
    S("task_list", "truncated", times=PERSISTENT, expect=r"unreadable"),
    S("task_list", "shape", times=PERSISTENT, body={"request_id": "r-1"}, expect=r"no data list", label="no-data"),
    S("task_list", "shape", times=PERSISTENT, body={"data": {"task_id": "t-1"}}, expect=r"no data list",
      label="data-object"),
    S("task_list", "shape", times=PERSISTENT, expect=r"not a time in milliseconds", label="time-string",
      body={"data": [{"task_id": "t-1", "gmt_create": "2025-09-11 14:33:38.716", "status": "RUNNING"}]}),
    S("task_list", "shape", times=PERSISTENT, expect=r"not a time in milliseconds", label="time-seconds",
      body={"data": [{"task_id": "t-1", "gmt_create": 1757572418, "status": "RUNNING"}]}),
    S("task_list", "shape", times=PERSISTENT, body={"data": ["t-1"]}, expect=r"not an object", label="entry-string"),
    S("task_list", "shape", times=PERSISTENT, body={"data": [], "total": 3}, expect=r"holds 0 of 3",
      label="partial-page"),
    S("task_list", "shape", times=PERSISTENT, body={"data": [], "total": "1"}, expect=r"total is '1'",
      label="total-string"),
    S("task_list", "bomb", times=PERSISTENT, expect=r"larger than"),
    S("task_list", "bad_encoding", times=PERSISTENT, expect=r"not valid 'gzip'"),
    S("task_list", "redirect_loop", times=PERSISTENT, expect=r"redirect"),
    S("task_list", "reset", times=PERSISTENT, expect=r"connection broke"),
    S("task_list", "length_lie", times=PERSISTENT, expect=r"connection broke"),
    S("task_list", "redirect_private", times=PERSISTENT, expect=r"10\.0\.0\.1"),
    S("task_list", "stall"),
    # ---- cancel: the answer says whether the task was cancelled, and that calling again is safe
    S("cancel", "status", status=500, expect=CANCEL_UNKNOWN),
    S("cancel", "status", status=500, after=True, expect=CANCEL_UNKNOWN),
    S("cancel", "status", status=429, expect=r"Throttling"),
    S("cancel", "html", after=True, expect=r"accepted the cancel.*not known for sure \(most likely.*again is safe"),
    S("cancel", "truncated", after=True, expect=r"accepted the cancel.*" + CANCEL_UNKNOWN),
    S("cancel", "length_lie", after=True, expect=CANCEL_UNKNOWN),
    S("cancel", "reset", after=True, expect=CANCEL_UNKNOWN),
    S("cancel", "stall", after=True, expect=r"stopped arriving.*" + CANCEL_UNKNOWN),
    S("cancel", "stall", expect=r"did not answer the cancel.*" + CANCEL_UNKNOWN),
    S("cancel", "redirect_loop", expect=r"redirect.*" + CANCEL_UNKNOWN),
    S("cancel", "redirect_private", after=True, expect=r"10\.0\.0\.1.*" + CANCEL_UNKNOWN),
    S("cancel", "bomb", after=True, expect=CANCEL_UNKNOWN),
    S("cancel", "bad_encoding", after=True, expect=CANCEL_UNKNOWN),
    # ---- download: verified before it is saved; every failure is retried in the background
    S("download", "status", status=500, times=PERSISTENT, expect=NOT_DOWNLOADED + r".*HTTP 500"),
    S("download", "status", status=503, retry_after="0.2"),
    S("download", "html", times=PERSISTENT, expect=r"not an MP4"),
    S("download", "truncated", times=PERSISTENT, expect=r"Content-MD5"),
    S("download", "length_lie", times=PERSISTENT, expect=NOT_DOWNLOADED),
    S("download", "reset", times=PERSISTENT, expect=NOT_DOWNLOADED),
    S("download", "stall"),
    S("download", "redirect"),
    S("download", "redirect", times=3, label="three-hops"),
    S("download", "redirect_loop", times=PERSISTENT, expect=r"more than 3 redirects"),
    S("download", "redirect_private", times=PERSISTENT, expect=r"refuses to fetch.*10\.0\.0\.1 is a private address"),
    S("download", "bomb", times=PERSISTENT, expect=NOT_DOWNLOADED),
    S("download", "bad_encoding", times=PERSISTENT, expect=NOT_DOWNLOADED),
    S("download", "shape", times=PERSISTENT, body={"code": "AccessDenied"}, expect=r"not an MP4 .*application/json"),
    S("download", "html", times=PERSISTENT, family="emoji", expect=r"not an MP4", label="emoji"),
    # ---- temporary uploads of a local portrait
    S("upload_policy", "status", status=500, local=True),
    S("upload_policy", "html", local=True),
    S("upload_policy", "bomb", local=True),
    S("upload_policy", "truncated", local=True),
    S("upload_policy", "reset", local=True),
    S("upload_policy", "bad_encoding", local=True),
    S("upload_policy", "redirect_loop", local=True),
    S("upload_policy", "stall", local=True),
    S("upload_policy", "redirect_private", local=True),
    S("upload_policy", "shape", local=True, body={"request_id": "r-1"}, expect=r"no data object.*Call again"),
    S("upload_policy", "status", status=500, times=PERSISTENT, local=True, expect=r"nothing was uploaded",
      label="persistent"),
    S("upload", "status", status=500, local=True, expect=r"temporary storage answered.*nothing was submitted"),
    S("upload", "status", status=500, after=True, local=True, expect=r"temporary storage answered"),
    S("upload", "reset", after=True, local=True, expect=r"upload .*failed.*Call again"),
    S("upload", "stall", local=True, expect=r"upload .*failed.*nothing was submitted or billed.*Call again"),
    S("upload", "stall", after=True, local=True),  # the 200 came: stored, whatever the body does
    S("upload", "html", after=True, local=True),  # 200 is success: the body of an upload answer is not read
    S("upload", "bomb", after=True, local=True),
    S("upload", "length_lie", after=True, local=True),
    S("upload", "redirect_private", local=True, expect=r"temporary storage answered.*redirect"),
]  # fmt: skip


def test_every_endpoint_has_scenarios() -> None:
    assert {s.endpoint for s in SCENARIOS} == set(ENDPOINTS)
    assert len({s.id for s in SCENARIOS}) == len(SCENARIOS)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short stall limits and retry delays, so a stalled answer costs seconds, not minutes."""
    monkeypatch.setattr(dashscope, "BACKOFF_BASE", 0.01)
    for name in ("DEFAULT_TIMEOUT", "DETECT_TIMEOUT", "SUBMIT_TIMEOUT", "UPLOAD_TIMEOUT", "DOWNLOAD_TIMEOUT"):
        monkeypatch.setattr(dashscope, name, SHORT)


@pytest.fixture
async def session(fake: FakeDashScope, tmp_path: Path, quick: None) -> AsyncIterator[Client]:
    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_RECONCILE_WINDOW="1"), cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        yield client


class Agent:
    """Calls tools as an agent does, checking that every answer is one it can act on."""

    def __init__(self, client: Client, scenario: Scenario) -> None:
        self.client = client
        self.scenario = scenario

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        with anyio.fail_after(CALL_BOUND):
            result = await self.client.call_tool(name, arguments)
        if not result.is_error:
            assert result.structured_content is not None
            return dict(result.structured_content), None
        text = text_of(result)
        # The SDK's own text for an exception nobody handled: hides what happened from the agent.
        assert not re.fullmatch(r"Error executing tool \w+", text.strip()), text
        assert TEST_KEY not in text
        return None, text

    def expected(self, text: str | None) -> None:
        """The touched call's error says what the scenario says it must."""
        assert text is not None
        assert self.scenario.expect is not None, f"the fault should have been absorbed, got: {text}"
        assert re.search(self.scenario.expect, text, re.DOTALL), text

    async def ok(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        data, error = await self.call(name, arguments)
        assert data is not None, error
        return data

    async def status(self, task_id: str, wait: float = 0) -> dict[str, Any]:
        return await self.ok("task_status", {"task_id": task_id, "wait_seconds": wait})


def plan(fake: FakeDashScope, scenario: Scenario) -> None:
    fake.fault(
        scenario.endpoint,
        scenario.kind,
        after=scenario.after,
        times=scenario.times,
        status=scenario.status,
        retry_after=scenario.retry_after,
        body=scenario.body,
    )


async def detect(agent: Agent, fake: FakeDashScope, image: str) -> dict[str, Any]:
    tool = f"{agent.scenario.family}_detect"
    data, error = await agent.call(tool, {"image_url": image})
    if data is None:
        agent.expected(error)
        fake.faults.clear()
        data = await agent.ok(tool, {"image_url": image})  # as the message says: call again
    assert data["check_pass"] is True, data
    return data


def generate_arguments(scenario: Scenario, image: str, detection: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if scenario.family == "emo":
        boxes = {"face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
        return "emo_generate", {"image_url": image, "audio_url": SPEECH, **boxes}
    boxes = {"face_bbox": detection["face_bbox"], "ext_bbox_face": detection["ext_bbox_face"]}
    return "emoji_generate", {"image_url": image, "template_id": "mengwa_kaixin", **boxes}


async def generate(agent: Agent, fake: FakeDashScope, tool: str, arguments: dict[str, Any]) -> str:
    """Submit; a lost answer is followed by its local id, exactly as the error tells the agent to."""
    data, error = await agent.call(tool, arguments)
    if data is not None:
        return str(data["task_id"])
    agent.expected(error)
    assert error is not None
    local = re.search(r"submit-[0-9a-f]{16}", error)
    if local is None:  # a clear refusal: nothing was created, and calling again is what it says to do
        assert not fake.tasks
        return str((await agent.ok(tool, arguments))["task_id"])
    with anyio.fail_after(STORY_BOUND):
        status = await agent.status(local.group(0), wait=2)
        while status["task_status"] in LOCAL_STATUSES:
            status = await agent.status(local.group(0), wait=2)
    if status["task_status"] == "NOT_FOUND":  # nothing was created: an identical generate is allowed again
        assert not fake.tasks
        return str((await agent.ok(tool, arguments))["task_id"])
    return str(status["task_id"])


async def until_error(agent: Agent, task_id: str) -> str:
    """Poll task_status until the background fault shows on the task, as `last_error` or `download_error`."""
    with anyio.fail_after(STORY_BOUND):
        while True:
            status = await agent.status(task_id)
            error = status.get("last_error") or status.get("download_error")
            if error:
                assert status["task_status"] not in {"UNKNOWN", "NOT_FOUND"} and status.get("code") is None, status
                return str(error)
            await anyio.sleep(0.05)


async def lost_submit_with_a_broken_list(agent: Agent, fake: FakeDashScope, tool: str, args: dict[str, Any]) -> str:
    """A submit whose answer is lost while the task list misbehaves: unknown it stays, until the list reads."""
    fake.fault("submit", "status", status=500, after=True)
    plan(fake, agent.scenario)
    _, error = await agent.call(tool, args)
    assert error is not None and re.search(OUTCOME_UNKNOWN, error, re.DOTALL), error
    local = re.search(r"submit-[0-9a-f]{16}", error)
    assert local is not None
    if agent.scenario.expect is not None:
        error = await until_error(agent, local.group(0))
        agent.expected(error)
        await anyio.sleep(1.2)  # past the reconcile window: a list that cannot be read still proves nothing
        status = await agent.status(local.group(0))
        assert status["task_status"] == "SUBMIT_OUTCOME_UNKNOWN", status
        refusal = await agent.call(tool, args)
        assert refusal[1] is not None and "allow_duplicate" in refusal[1]  # still no second task
        fake.faults.clear()
    with anyio.fail_after(STORY_BOUND):
        status = await agent.status(local.group(0), wait=2)
        while status["task_status"] in LOCAL_STATUSES:
            status = await agent.status(local.group(0), wait=2)
    [task_id] = fake.tasks
    assert status["task_id"] == task_id
    return task_id


async def cancel(agent: Agent, fake: FakeDashScope, task_id: str) -> None:
    """Cancel through the fault; whatever it said, task_status (and a second cancel) settle it."""
    data, error = await agent.call("task_cancel", {"task_id": task_id})
    if data is None:
        agent.expected(error)
        status = await agent.status(task_id)  # as the message says: look, then cancel again if still PENDING
        if status["task_status"] == "PENDING":
            data = await agent.ok("task_cancel", {"task_id": task_id})
    with anyio.fail_after(STORY_BOUND):
        status = await agent.status(task_id, wait=5)
        while status["task_status"] != "CANCELED":
            status = await agent.status(task_id, wait=1)
    assert fake.tasks[task_id].status == "CANCELED"


async def story(agent: Agent, fake: FakeDashScope, tmp_path: Path) -> None:
    scenario = agent.scenario
    image = PORTRAIT
    if scenario.local:
        media_files.image(tmp_path / "media" / "portrait.png", (640, 800))
        image = "media/portrait.png"
    if scenario.endpoint in {"detect", "upload_policy", "upload"}:
        plan(fake, scenario)
    detection = await detect(agent, fake, image)
    tool, arguments = generate_arguments(scenario, image, detection)
    if scenario.endpoint == "cancel":
        fake.auto_progress = False
        task_id = await generate(agent, fake, tool, arguments)
        plan(fake, scenario)
        await cancel(agent, fake, task_id)
        return
    if scenario.endpoint == "task_list":
        task_id = await lost_submit_with_a_broken_list(agent, fake, tool, arguments)
    else:
        if scenario.endpoint in {"submit", "task_query", "download"}:
            plan(fake, scenario)
        task_id = await generate(agent, fake, tool, arguments)
        if scenario.endpoint in {"task_query", "download"} and scenario.expect is not None:
            agent.expected(await until_error(agent, task_id))
            fake.faults.clear()
    with anyio.fail_after(STORY_BOUND):
        status = await agent.status(task_id, wait=10)
        while not status.get("video_path"):
            assert status.get("code") is None, status  # never a final verdict from a fault
            status = await agent.status(task_id, wait=10)
    assert status["task_status"] == "SUCCEEDED" and status.get("code") is None, status
    video = Path(status["video_path"])
    assert hashlib.sha256(video.read_bytes()).hexdigest() == fake.video_sha256(task_id) == status["video_sha256"]
    assert not list(video.parent.glob("*.part"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
async def test_a_fault_is_survived_answered_and_leaves_one_task_and_its_video(
    scenario: Scenario, session: Client, fake: FakeDashScope, tmp_path: Path
) -> None:
    agent = Agent(session, scenario)
    await story(agent, fake, tmp_path)
    assert (scenario.endpoint, scenario.kind) in fake.faults.served  # the fault really happened
    assert len(fake.tasks) == 1  # never a second, billed task
    assert len((await session.list_tools()).tools) == 6  # alive
    assert not [r for r in fake.requests if "10.0.0.1" in r.headers.get("host", "")]


async def test_one_tasks_broken_video_does_not_hold_up_another(session: Client, fake: FakeDashScope) -> None:
    agent = Agent(session, S("download", "redirect_loop", expect=r"more than 3 redirects"))
    detection = await detect(agent, fake, PORTRAIT)
    tool, arguments = generate_arguments(agent.scenario, PORTRAIT, detection)
    fake.auto_progress = False
    broken = await generate(agent, fake, tool, arguments)
    healthy = await generate(agent, fake, tool, {**arguments, "audio_url": "https://audio.example.com/two.wav"})
    fake.fault("download", "redirect_loop", times=PERSISTENT, match=broken)
    fake.complete(broken)
    agent.expected(await until_error(agent, broken))
    fake.complete(healthy)
    done = await agent.status(healthy, wait=10)
    assert Path(done["video_path"]).read_bytes() == fake.video_bytes(healthy)
    still = await agent.status(broken)
    assert still["task_status"] == "SUCCEEDED" and "redirects" in still["download_error"]
    assert "video_path" not in still
    fake.faults.clear()
    saved = await agent.status(broken, wait=20)
    assert Path(saved["video_path"]).read_bytes() == fake.video_bytes(broken)


async def test_a_compressed_bomb_is_never_inflated_in_memory(session: Client, fake: FakeDashScope) -> None:
    """64 MiB of zeros in 64 KiB of gzip: read whole (as `response.json()` does) it costs 64 MiB."""
    FaultLayer.bomb()  # built before measuring: the fake's own copy is not the client's
    fake.fault("detect", "bomb")
    tracemalloc.start()
    try:
        result = await session.call_tool("emo_detect", {"image_url": PORTRAIT})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.is_error and "once decompressed" in text_of(result)
    assert peak < 16 * 1024 * 1024


async def test_a_real_server_process_survives_a_redirect_loop_and_an_undecodable_answer(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    """Over stdio, with the product's own timeouts: a video URL that redirects to itself (which
    used to escape the watcher and end the process) and task answers labelled gzip but plain."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **make_env(fake, tmp_path)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server"], env=env, cwd=str(tmp_path))
    scenario = S("task_query", "bad_encoding", expect=r"not valid 'gzip'|redirects")
    with anyio.fail_after(120):
        async with Client(params) as client:
            agent = Agent(client, scenario)
            detection = await detect(agent, fake, PORTRAIT)
            tool, arguments = generate_arguments(scenario, PORTRAIT, detection)
            fake.fault("task_query", "bad_encoding", times=PERSISTENT)
            task_id = await generate(agent, fake, tool, arguments)
            agent.expected(await until_error(agent, task_id))
            fake.faults.clear()
            fake.fault("download", "redirect_loop", times=PERSISTENT)
            fake.complete(task_id)
            with anyio.fail_after(60):
                status = await agent.status(task_id)
                while not status.get("download_error"):
                    await anyio.sleep(0.1)
                    status = await agent.status(task_id)
            assert "more than 3 redirects" in status["download_error"]
            assert len((await client.list_tools()).tools) == 6  # the process is alive and answering
            fake.faults.clear()
            saved = await agent.status(task_id, wait=30)
    assert Path(saved["video_path"]).read_bytes() == fake.video_bytes(task_id)
    assert len(fake.tasks) == 1
