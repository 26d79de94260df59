"""Every tool call answers within its bound whatever DashScope does, and giving up on a call strands nothing.

The bound (`tools.context.CALL_BOUND`, 50 s in service) is lowered here so that an upstream held back
for 30 s shows the difference; each `anyio.fail_after` is a hang guard well above the lowered bound.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from server.app import create_app
from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import Ledger
from server.upstream import client as dashscope
from tests.conftest import PORTRAIT, call_error, call_ok, detect_emo, emo_arguments, make_env, text_of
from tools import context

pytestmark = pytest.mark.anyio

DETECT_PATH = "/services/aigc/image2video/face-detect"
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"
HELD = 30.0  # how long the fake holds an answer back: far beyond the lowered bound
GUARD = 10.0  # a hang guard: a call that waited for a held answer would trip it


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(context, "CALL_BOUND", 1.0)
    return 1.0


def slow_watcher(fake: FakeDashScope, tmp_path: Path) -> Settings:
    """A 60 s poll interval: the only task queries are the one after a submit and the ones asked for."""
    return load_settings(make_env(fake, tmp_path, EMO_MCP_POLL_INTERVAL="60"), cwd=tmp_path)


@pytest.fixture
async def slow_client(fake: FakeDashScope, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client(create_app(slow_watcher(fake, tmp_path))) as session:
        yield session


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 - the state is the server's ledger or the fake's log
        await anyio.sleep(0.02)


def detects(fake: FakeDashScope) -> int:
    return sum(1 for r in fake.requests if r.method == "POST" and r.path.endswith(DETECT_PATH))


# ---------------------------------------------------------------- detect


@pytest.mark.parametrize(
    "hold",
    [
        pytest.param({"delay": HELD, "passthrough": True}, id="slow-answer"),
        pytest.param({"status": 429, "headers": {"Retry-After": "40"}}, id="long-retry-after"),
    ],
)
async def test_a_detect_dashscope_holds_answers_within_the_bound(
    client: Client, fake: FakeDashScope, bound: float, hold: dict[str, Any]
) -> None:
    fake.inject("POST", DETECT_PATH, **hold)
    with anyio.fail_after(GUARD):
        message = await call_error(client, "emo_detect", {"image_url": PORTRAIT})
    assert f"did not answer the emo_detect of {PORTRAIT} within {bound:g} s" in message
    assert "may or may not have been billed" in message and "at most once" in message
    assert "calling emo_detect again with the same arguments" in message
    assert detects(fake) == 1


async def test_calling_detect_again_picks_up_the_late_answer_without_a_second_bill(
    client: Client, fake: FakeDashScope, settings: Settings, bound: float
) -> None:
    fake.inject("POST", DETECT_PATH, delay=2.0, passthrough=True)
    with anyio.fail_after(GUARD):
        first = await call_error(client, "emo_detect", {"image_url": PORTRAIT})
        assert "within" in first
        while True:  # each call is bounded; the same detection answers one of them
            result = await client.call_tool("emo_detect", {"image_url": PORTRAIT})
            if not result.is_error:
                break
            assert "picks up its answer" in text_of(result)
    assert result.structured_content is not None and result.structured_content["check_pass"] is True
    assert detects(fake) == 1
    [detection] = fake.detections
    assert result.structured_content["face_bbox"] == detection.face_bbox
    # The late answer was recorded for provenance: generate accepts its boxes.
    submitted = await call_ok(client, "emo_generate", emo_arguments(result.structured_content))
    assert submitted["task_status"] == "PENDING"


# ---------------------------------------------------------------- task_status


@pytest.mark.parametrize(
    "hold",
    [
        pytest.param({"delay": HELD, "passthrough": True}, id="slow-answer"),
        pytest.param({"status": 429, "headers": {"Retry-After": "40"}}, id="long-retry-after"),
    ],
)
async def test_task_status_answers_from_the_ledger_while_dashscope_holds_the_query(
    slow_client: Client, fake: FakeDashScope, bound: float, hold: dict[str, Any]
) -> None:
    fake.auto_progress = False
    detection = await detect_emo(slow_client)
    fake.inject("GET", "/tasks/", **hold)  # the query right after the submit is held back
    submitted = await call_ok(slow_client, "emo_generate", emo_arguments(detection))
    task_id = submitted["task_id"]
    await until(lambda: len(fake.queries(task_id)) == 1)
    with anyio.fail_after(GUARD):
        status = await call_ok(slow_client, "task_status", {"task_id": task_id})
    assert status["task_status"] == "PENDING" and status["finished"] is False
    assert f"DashScope did not answer within {bound:g} s" in status["last_error"]
    assert "ledger's view" in status["last_error"] and "call task_status again" in status["last_error"]
    assert len(fake.queries(task_id)) == 1  # the call shared the query in flight, it did not add one


async def test_a_wait_longer_than_the_bound_is_cut_to_it(client: Client, fake: FakeDashScope, bound: float) -> None:
    fake.auto_progress = False
    detection = await detect_emo(client)
    submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
    with anyio.fail_after(GUARD):
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": HELD})
    assert status["task_status"] in {"PENDING", "RUNNING"} and status["finished"] is False
    assert "last_error" not in status  # an ordinary end of a wait, not a late answer


async def test_task_status_does_not_wait_for_a_reconcile_pass_in_progress(
    fake: FakeDashScope, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context, "CALL_BOUND", 3.0)
    monkeypatch.setattr(dashscope, "SUBMIT_TIMEOUT", httpx2.Timeout(0.3, connect=5.0))
    async with Client(create_app(settings)) as client:
        detection = await detect_emo(client)
        fake.inject("POST", SUBMIT_PATH, delay=1.0, passthrough=True)
        fake.inject("GET", "/tasks", delay=HELD, passthrough=True)  # the task list of the reconcile pass
        message = await call_error(client, "emo_generate", emo_arguments(detection))
        match = re.search(r"submit-[0-9a-f]{16}", message)
        assert match is not None and "may have been created" in message
        local_id = match.group(0)
        await until(lambda: any(r.path == "/api/v1/tasks" for r in fake.requests))  # the pass is under way
        with anyio.fail_after(GUARD):
            status = await call_ok(client, "task_status", {"task_id": local_id})
    assert status["task_id"] == local_id and status["task_status"] == "SUBMIT_OUTCOME_UNKNOWN"
    assert "DashScope did not answer within 3 s" in status["last_error"]


# ---------------------------------------------------------------- generate


async def test_a_submit_dashscope_is_slow_to_answer_goes_on_under_its_local_id(
    client: Client, fake: FakeDashScope, settings: Settings, bound: float
) -> None:
    detection = await detect_emo(client)
    fake.inject("POST", SUBMIT_PATH, delay=3.0, passthrough=True)
    with anyio.fail_after(GUARD):
        submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
    local_id = submitted["task_id"]
    assert re.fullmatch(r"submit-[0-9a-f]{16}", local_id) and submitted["task_status"] == "SUBMITTING"
    # The bound counts from the call's start (its cost-confirmation resolver ran first).
    assert re.search(r"not answered the submit within [\d.]+ s", submitted["next_step"])
    assert f"call task_status with task_id {local_id}" in submitted["next_step"].lower()
    assert "Do NOT submit again" in submitted["next_step"]
    assert submitted["estimated_cost_cny"] > 0
    with anyio.fail_after(GUARD):
        status = await call_ok(client, "task_status", {"task_id": local_id})
        while status["task_status"] == "SUBMITTING":
            status = await call_ok(client, "task_status", {"task_id": local_id, "wait_seconds": 1})
    [task] = fake.tasks.values()
    assert status["task_id"] == task.task_id and status["local_id"] == local_id
    again = await call_ok(client, "emo_generate", emo_arguments(detection))
    assert again["task_id"] == task.task_id and again["deduplicated"] is True
    assert len(fake.submits()) == 1
    assert status["estimated_cost_cny"] == submitted["estimated_cost_cny"]  # recorded by the background


async def test_a_submit_refused_after_its_caller_left_is_told_by_its_local_id(
    client: Client, fake: FakeDashScope, bound: float
) -> None:
    detection = await detect_emo(client)
    refusal = {"code": "InvalidParameter.DataInspection", "message": "Download the media resource timed out."}
    fake.inject("POST", SUBMIT_PATH, status=400, body=refusal, delay=2.0)
    with anyio.fail_after(GUARD):
        submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
        assert submitted["task_status"] == "SUBMITTING"
        while True:
            result = await client.call_tool("task_status", {"task_id": submitted["task_id"]})
            if result.is_error:
                break
            assert result.structured_content is not None
            assert result.structured_content["task_status"] == "SUBMITTING"
            await anyio.sleep(0.05)
    message = text_of(result)
    assert f"the submit under local id {submitted['task_id']} was refused" in message
    assert "nothing is billed" in message and "InvalidParameter.DataInspection" in message
    assert not fake.tasks
    again = await call_ok(client, "emo_generate", emo_arguments(detection))  # nothing blocks a new try
    assert again["task_status"] == "PENDING"


async def test_a_client_that_gives_up_mid_submit_strands_nothing(
    client: Client, fake: FakeDashScope, settings: Settings
) -> None:
    detection = await detect_emo(client)
    fake.inject("POST", SUBMIT_PATH, delay=1.5, passthrough=True)
    ledger = Ledger(settings.state_dir)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "emo_generate", emo_arguments(detection))
            await until(lambda: len(fake.submits()) == 1)  # sent; the fake holds its answer
            tg.cancel_scope.cancel()  # the client gives up: the SDK sends notifications/cancelled
        [row] = ledger.tasks()
        assert row.status == "SUBMITTING" and row.local_id == row.task_id
        # The submit's bookkeeping completes in the background once the answer arrives.
        await until(lambda: ledger.get_task(row.task_id) is not None and ledger.tasks()[0].status != "SUBMITTING")
    [task] = fake.tasks.values()
    [row] = ledger.tasks()
    assert row.task_id == task.task_id and row.local_id is not None and row.status == "PENDING"
    # DashScope's own answer was recorded (not a reconciler's match by model and time).
    assert row.request_id == task.request_id
    assert (Path(row.evidence_dir) / "submit.json").is_file()
    assert not (Path(row.evidence_dir) / "reconciled.json").exists()
    status = await call_ok(client, "task_status", {"task_id": row.local_id})
    assert status["task_id"] == task.task_id
    again = await call_ok(client, "emo_generate", emo_arguments(detection))  # not refused as "in progress"
    assert again["task_id"] == task.task_id and again["deduplicated"] is True
    assert len(fake.submits()) == 1


# ---------------------------------------------------------------- cancel


@pytest.mark.parametrize("follow_up", ["task_status", "task_cancel"])
async def test_after_a_cancel_whose_answer_was_lost_the_next_call_asks_dashscope_first(
    slow_client: Client, fake: FakeDashScope, bound: float, follow_up: str
) -> None:
    fake.auto_progress = False
    detection = await detect_emo(slow_client)
    submitted = await call_ok(slow_client, "emo_generate", emo_arguments(detection))
    task_id = submitted["task_id"]
    await until(lambda: len(fake.queries(task_id)) == 1)  # the watcher's look right after the submit
    fake.inject("POST", f"/tasks/{task_id}/cancel", delay=HELD, passthrough=True)  # takes effect, answer held
    with anyio.fail_after(GUARD):
        message = await call_error(slow_client, "task_cancel", {"task_id": task_id})
    assert f"has not answered the cancel of task {task_id} within {bound:g} s" in message
    assert "may or may not take effect" in message and "asks DashScope before answering" in message
    assert fake.tasks[task_id].status == "CANCELED"

    asked = len(fake.queries(task_id))
    with anyio.fail_after(GUARD):
        status = await call_ok(slow_client, follow_up, {"task_id": task_id})
    assert len(fake.queries(task_id)) == asked + 1  # asked DashScope, though the last poll was recent
    assert status["task_status"] == "CANCELED" and status["finished"] is True
    # No self-contradiction afterwards: a further cancel says the task is CANCELED, as DashScope does.
    refusal = await call_error(slow_client, "task_cancel", {"task_id": task_id})
    assert "already CANCELED" in refusal


async def test_a_refused_cancel_reports_the_state_dashscope_gives_not_a_stale_one(
    slow_client: Client, fake: FakeDashScope
) -> None:
    fake.auto_progress = False
    detection = await detect_emo(slow_client)
    submitted = await call_ok(slow_client, "emo_generate", emo_arguments(detection))
    task_id = submitted["task_id"]
    await until(lambda: len(fake.queries(task_id)) == 1)
    fake.set_status(task_id, "RUNNING")  # started after the watcher's last look (the ledger says PENDING)
    refusal = await call_error(slow_client, "task_cancel", {"task_id": task_id})
    assert "already RUNNING" in refusal and "only PENDING" in refusal
    status = await call_ok(slow_client, "task_status", {"task_id": task_id})
    assert status["task_status"] == "RUNNING"
