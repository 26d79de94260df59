"""The background watcher, dedup, reconciliation, limits and cancel, through an MCP client session."""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from server.app import create_app
from server.config import Settings, load_settings
from server.jobs.submits import fingerprint
from server.jobs.watcher import DOUBTFUL_ANSWERS
from server.sandbox.fake_dashscope import FakeDashScope
from server.store.ledger import Ledger
from server.upstream import client as dashscope
from server.upstream.limits import Limits, RateLimiter
from tests.conftest import PORTRAIT, SPEECH, call_error, call_ok, detect_emo, detect_emoji, make_env

pytestmark = pytest.mark.anyio


def emo_args(detection: dict[str, Any], audio_url: str = SPEECH) -> dict[str, Any]:
    return {
        "image_url": PORTRAIT,
        "audio_url": audio_url,
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


def slow_settings(fake: FakeDashScope, tmp_path: Path, interval: str = "60") -> Settings:
    return load_settings(make_env(fake, tmp_path, EMO_MCP_POLL_INTERVAL=interval), cwd=tmp_path)


async def wait_for_file(path: Path) -> None:
    while not path.is_file():  # noqa: ASYNC110 - written by the server's background watcher
        await anyio.sleep(0.02)


async def test_many_waiters_share_one_upstream_query(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.auto_progress = False
    with anyio.fail_after(30):
        async with Client(create_app(slow_settings(fake, tmp_path))) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
            task_id = submitted["task_id"]
            answers: list[dict[str, Any]] = []

            async def waiter(wait_seconds: int) -> None:
                answers.append(await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": wait_seconds}))

            async with anyio.create_task_group() as tg:
                for index in range(25):
                    tg.start_soon(waiter, index % 2)
    # The interval (60 s) is longer than the whole test: every waiter shared the watcher's one query.
    assert len(fake.queries(task_id)) == 1
    assert len(answers) == 25
    assert {a["task_status"] for a in answers} == {"PENDING"}
    assert {a["queue_ahead"] for a in answers} == {0}


async def test_a_task_nobody_polls_is_downloaded_anyway(
    client: Client, fake: FakeDashScope, settings: Settings
) -> None:
    submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
    task_id = submitted["task_id"]
    video = Path(submitted["evidence_dir"]) / f"{task_id}.mp4"
    assert video.is_relative_to(settings.output_dir / "aliyun-emo" / "tasks")
    with anyio.fail_after(20):
        await wait_for_file(video)
    assert hashlib.sha256(video.read_bytes()).hexdigest() == fake.video_sha256(task_id)
    queries = len(fake.queries(task_id))
    status = await call_ok(client, "task_status", {"task_id": task_id})
    assert status["task_status"] == "SUCCEEDED" and status["video_path"] == str(video)
    assert status["video_sha256"] == fake.video_sha256(task_id)
    assert len(fake.queries(task_id)) == queries  # answered from the ledger
    record = Ledger(settings.state_dir).get_task(task_id)
    assert record is not None and record.video_sha256 == fake.video_sha256(task_id)


async def test_reads_survive_5xx_and_a_download_cut_off_mid_stream(
    client: Client, fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashscope, "BACKOFF_BASE", 0.01)
    submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
    fake.video_size = 4 * 64 * 1024
    fake.break_downloads = 2
    fake.inject("GET", "/tasks/", status=503, times=2)
    fake.inject("GET", "/tasks/", status=500, times=1)
    with anyio.fail_after(20):
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 15})
    assert status["task_status"] == "SUCCEEDED"
    assert status["video_bytes"] == fake.video_size
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])
    downloads = [r for r in fake.requests if r.path.startswith("/files/")]
    assert len(downloads) == 3  # two cut off, then one whole
    assert not list(Path(status["video_path"]).parent.glob("*.part"))  # the evidence folder


async def test_identical_generate_returns_the_same_task_unless_allowed(client: Client, fake: FakeDashScope) -> None:
    args = emo_args(await detect_emo(client))
    first = await call_ok(client, "emo_generate", args)
    again = await call_ok(client, "emo_generate", args)
    assert again["task_id"] == first["task_id"]
    assert again["deduplicated"] is True and "allow_duplicate" in again["note"]
    assert first["deduplicated"] is False
    assert len(fake.submits()) == 1
    forced = await call_ok(client, "emo_generate", {**args, "allow_duplicate": True})
    assert forced["task_id"] != first["task_id"] and forced["deduplicated"] is False
    assert len(fake.submits()) == 2
    # A different request (other style) is not a duplicate.
    other = await call_ok(client, "emo_generate", {**args, "style_level": "calm"})
    assert other["deduplicated"] is False and len(fake.submits()) == 3

    detection = await detect_emoji(client)
    emoji = {
        "image_url": PORTRAIT,
        "face_bbox": detection["face_bbox"],
        "ext_bbox_face": detection["ext_bbox_face"],
        "template_id": "mengwa_kaixin",
    }
    one = await call_ok(client, "emoji_generate", emoji)
    two = await call_ok(client, "emoji_generate", emoji)
    assert one["task_id"] == two["task_id"] and two["deduplicated"] is True
    assert len(fake.submits()) == 4


async def test_failed_task_does_not_block_an_identical_generate(client: Client, fake: FakeDashScope) -> None:
    args = emo_args(await detect_emo(client), "https://audio.example.com/failtask.wav")
    first = await call_ok(client, "emo_generate", args)
    status = await call_ok(client, "task_status", {"task_id": first["task_id"], "wait_seconds": 10})
    assert status["task_status"] == "FAILED"
    again = await call_ok(client, "emo_generate", args)
    assert again["task_id"] != first["task_id"] and again["deduplicated"] is False


async def test_submit_timeout_is_outcome_unknown_then_reconciled_without_a_second_task(
    fake: FakeDashScope, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashscope, "SUBMIT_TIMEOUT", httpx2.Timeout(0.3, connect=5.0))
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            args = emo_args(await detect_emo(client))
            fake.inject("POST", "/services/aigc/image2video/video-synthesis", delay=1.0, passthrough=True)
            # The first task-list answer is held back, so the identical generate below meets an unresolved submit.
            fake.inject("GET", "/tasks", delay=3.0, passthrough=True)
            message = await call_error(client, "emo_generate", args)
            assert "may have been created" in message and "billed" in message and "NOT" in message
            match = re.search(r"submit-[0-9a-f]{16}", message)
            assert match is not None
            local_id = match.group(0)
            # An identical request is refused while the first is unresolved, and nothing is sent.
            refusal = await call_error(client, "emo_generate", args)
            assert local_id in refusal and "allow_duplicate" in refusal
            status = await call_ok(client, "task_status", {"task_id": local_id, "wait_seconds": 20})
    [task] = fake.tasks.values()
    assert len(fake.submits()) == 1
    assert status["task_id"] == task.task_id and status["local_id"] == local_id
    assert status["task_status"] == "SUCCEEDED"
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(task.task_id)
    listing = next(r for r in fake.requests if r.method == "GET" and r.path == "/api/v1/tasks")
    assert listing.query["model_name"] == "emo-v1"
    assert re.fullmatch(r"\d{14}", listing.query["start_time"]) and re.fullmatch(r"\d{14}", listing.query["end_time"])
    # The original request stays where the agent was told it was saved.
    assert list((settings.output_dir / "aliyun-emo" / "submits").rglob("outcome-unknown.json"))
    assert "evidence_dir" not in status  # it is the video's folder
    assert (Path(status["video_path"]).parent / "reconciled.json").is_file()


async def test_a_local_id_keeps_its_reconciled_task_watched(
    fake: FakeDashScope, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking with the `submit-...` id (as the error told the agent to) must not strand the real task."""
    monkeypatch.setattr(dashscope, "SUBMIT_TIMEOUT", httpx2.Timeout(0.3, connect=5.0))
    fake.auto_progress = False
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            args = emo_args(await detect_emo(client))
            fake.inject("POST", "/services/aigc/image2video/video-synthesis", delay=1.0, passthrough=True)
            message = await call_error(client, "emo_generate", args)
            match = re.search(r"submit-[0-9a-f]{16}", message)
            assert match is not None
            found = await call_ok(client, "task_status", {"task_id": match.group(0), "wait_seconds": 3})
            [task] = fake.tasks.values()
            assert found["task_id"] == task.task_id and found["task_status"] == "PENDING"
            for _ in range(3):  # fresh news by the local id, an interval apart
                await anyio.sleep(0.1)
                again = await call_ok(client, "task_status", {"task_id": match.group(0)})
                assert again["task_id"] == task.task_id
            fake.complete(task.task_id)
            done = await call_ok(client, "task_status", {"task_id": task.task_id, "wait_seconds": 10})
    assert done["task_status"] == "SUCCEEDED" and done["video_path"]


async def test_cancel_a_pending_task_and_refuse_the_others(client: Client, fake: FakeDashScope) -> None:
    fake.auto_progress = False
    detection = await detect_emo(client)
    pending = await call_ok(client, "emo_generate", emo_args(detection))
    cancelled = await call_ok(client, "task_cancel", {"task_id": pending["task_id"]})
    assert cancelled["task_status"] == "CANCELED" and cancelled["finished"] is True
    assert fake.tasks[pending["task_id"]].status == "CANCELED"
    again = await call_error(client, "task_cancel", {"task_id": pending["task_id"]})
    assert "already CANCELED" in again

    running = await call_ok(client, "emo_generate", emo_args(detection, "https://audio.example.com/two.wav"))
    fake.set_status(running["task_id"], "RUNNING")
    refusal = await call_error(client, "task_cancel", {"task_id": running["task_id"]})
    assert "RUNNING" in refusal and "only PENDING" in refusal
    assert fake.tasks[running["task_id"]].status == "RUNNING"

    fake.complete(running["task_id"])
    done = await call_ok(client, "task_status", {"task_id": running["task_id"], "wait_seconds": 10})
    assert done["task_status"] == "SUCCEEDED"
    finished = await call_error(client, "task_cancel", {"task_id": running["task_id"]})
    assert "already SUCCEEDED" in finished


async def test_queue_position_counts_earlier_open_tasks_of_the_model(client: Client, fake: FakeDashScope) -> None:
    fake.auto_progress = False
    detection = await detect_emo(client)
    first = await call_ok(client, "emo_generate", emo_args(detection, "https://audio.example.com/1.wav"))
    second = await call_ok(client, "emo_generate", emo_args(detection, "https://audio.example.com/2.wav"))
    third = await call_ok(client, "emo_generate", emo_args(detection, "https://audio.example.com/3.wav"))
    status = await call_ok(client, "task_status", {"task_id": third["task_id"]})
    assert status["queue_ahead"] == 2
    fake.complete(first["task_id"])
    done = await call_ok(client, "task_status", {"task_id": first["task_id"], "wait_seconds": 10})
    assert "queue_ahead" not in done
    status = await call_ok(client, "task_status", {"task_id": second["task_id"]})
    assert status["queue_ahead"] == 0


async def test_succeeded_without_a_video_url_is_asked_again_before_the_video_is_given_up(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    """One such answer is a glitch, not a lost video: it is recorded only after DOUBTFUL_ANSWERS in a row."""
    settings = slow_settings(fake, tmp_path, "0.05")
    lying = {"request_id": "r-1", "output": {"task_status": "SUCCEEDED"}, "usage": {"video_duration": 5.2}}
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
            task_id = submitted["task_id"]
            fake.fault("task_query", "shape", body=lying, times=1_000)
            first = await call_ok(client, "task_status", {"task_id": task_id})
            while first.get("code") is None:  # the watcher asks again in the background
                assert first["task_status"] != "SUCCEEDED" or first.get("last_error"), first
                await anyio.sleep(0.05)
                first = await call_ok(client, "task_status", {"task_id": task_id})
    lies = [served for served in fake.faults.served if served == ("task_query", "shape")]
    assert len(lies) >= DOUBTFUL_ANSWERS
    assert first["task_status"] == "SUCCEEDED" and first["finished"] is True
    assert first["code"] == "VideoExpired" and "never gave its video URL" in first["message"]
    assert "billed" in first["message"] and "video_path" not in first


async def test_a_video_url_that_expired_before_the_restart_is_recorded_not_retried(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    fake.auto_progress = False
    settings = slow_settings(fake, tmp_path, "0.05")
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
        task_id = submitted["task_id"]
        fake.complete(task_id)
        fake.expired_videos.add(task_id)
        async with Client(create_app(settings)) as client:
            status = await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": 10})
            downloads = len([r for r in fake.requests if r.path.startswith("/files/")])
            await anyio.sleep(0.3)  # several intervals: a lost video is not asked for again
            assert len([r for r in fake.requests if r.path.startswith("/files/")]) == downloads == 1
    assert status["task_status"] == "SUCCEEDED" and status["finished"] is True
    assert status["code"] == "VideoExpired" and "24 hours" in status["message"]
    assert "video_path" not in status


async def test_a_throttled_account_pauses_every_query(fake: FakeDashScope, tmp_path: Path) -> None:
    fake.auto_progress = False
    settings = slow_settings(fake, tmp_path, "0.05")
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            detection = await detect_emo(client)
            fake.inject("GET", "/tasks/", status=429, headers={"Retry-After": "0.5"}, times=1)
            ids = [
                (await call_ok(client, "emo_generate", emo_args(detection, f"https://audio.example.com/{n}.wav")))[
                    "task_id"
                ]
                for n in range(3)
            ]
            while not all(len(fake.queries(task_id)) >= 2 for task_id in ids):  # noqa: ASYNC110 - fake's log
                await anyio.sleep(0.05)
    queries = fake.queries()
    throttled_at = queries[0].at
    # Nothing was asked of the throttled account until Retry-After had passed, by any task.
    assert all(q.at - throttled_at >= 0.5 for q in queries[1:])


# ---------------------------------------------------------------- pure helpers


async def test_rate_limiter_spaces_slots_and_pauses_everyone() -> None:
    now = [100.0]
    starts: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(9):
        await limiter.acquire()
        starts.append(now[0])
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(starts))
    assert all(sum(1 for s in starts if t <= s < t + 1.0) <= 4 for t in starts)
    before = now[0]
    limiter.pause(2.0)
    await limiter.acquire()
    assert now[0] == pytest.approx(before + 2.0)


async def test_a_fast_limiter_lets_a_batch_go_together_in_one_reservation_and_a_slow_one_keeps_its_spacing() -> None:
    """At ~1,000 starts/s and more a tick's batch leaves together (up to EARLY ahead of its times), with
    one shared reservation for the batch it announced; the window bound holds either way."""
    now = [100.0]
    sleeps: list[float] = []
    reserved: list[int] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    class Window:
        """A shared window with a free timeline: every slot asked for, from now."""

        def reserve(self, key: str, count: int, spacing: float, horizon: float) -> tuple[float, int]:
            reserved.append(count)
            return 0.0, count

        def pause(self, key: str, seconds: float) -> None: ...

    fast = RateLimiter(2000.0, clock=lambda: now[0], sleep=sleep, shared=Window())
    fast.expect(8)
    for _ in range(8):
        await fast.acquire()
    assert sleeps == [] and reserved == [8]  # eight starts, no sleep, one reservation
    starts: list[float] = []
    for _ in range(2100):
        await fast.acquire()
        starts.append(now[0])
    assert max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts[::50]) <= 2000

    sleeps.clear()
    slow = RateLimiter(20.0, clock=lambda: now[0], sleep=sleep)
    slow.expect(3)
    for _ in range(3):
        await slow.acquire()
    assert len(sleeps) == 2 and all(seconds == pytest.approx(0.05) for seconds in sleeps)  # 1/20 s apart


def test_limits_follow_the_contract_and_aliases_share_a_limiter() -> None:
    limits = Limits(20.0, {"emo-v1": ("my-emo",)})
    assert limits.queries.rate == 20.0
    assert limits.model("emo-v1").rate == 5.0
    assert limits.model("emoji-v1").rate == 1.0 and limits.model("emoji-detect-v1").rate == 1.0
    assert limits.model("my-emo") is limits.model("emo-v1")


def test_fingerprint_ignores_key_order_but_not_values() -> None:
    a = {"model": "emo-v1", "input": {"image_url": "u", "face_bbox": [1, 2, 3, 4]}}
    b = {"input": {"face_bbox": [1, 2, 3, 4], "image_url": "u"}, "model": "emo-v1"}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "model": "emo-v2"})


def test_query_rate_is_configurable(tmp_path: Path) -> None:
    env = {"DASHSCOPE_API_KEY": "sk-x", "OUTPUT_DIR": str(tmp_path / "out"), "HOME": str(tmp_path)}
    assert load_settings(env, cwd=tmp_path).max_query_qps == 20.0
    assert load_settings({**env, "EMO_MCP_MAX_QUERY_QPS": "5"}, cwd=tmp_path).max_query_qps == 5.0


async def test_a_damaged_video_is_set_aside_and_downloaded_again_on_restart(
    fake: FakeDashScope, tmp_path: Path
) -> None:
    settings = slow_settings(fake, tmp_path, "0.05")
    with anyio.fail_after(30):
        async with Client(create_app(settings)) as client:
            submitted = await call_ok(client, "emo_generate", emo_args(await detect_emo(client)))
            first = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
        video = Path(first["video_path"])
        video.write_bytes(video.read_bytes()[:1000])  # damaged behind the server's back
        async with Client(create_app(settings)) as client:
            again = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})
    assert again["video_path"] == first["video_path"]
    assert video.read_bytes() == fake.video_bytes(submitted["task_id"])
    assert Path(first["video_path"] + ".wrong-size").stat().st_size == 1000
