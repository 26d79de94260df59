"""Both chains end to end through an MCP client session, checked against what the fake received."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest
from mcp import Client

from server.app import create_app
from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import (
    PORTRAIT,
    SPEECH,
    TEST_KEY,
    call_ok,
    detect_emo,
    detect_emoji,
    emo_arguments,
    make_env,
    read_json,
    submit_emo,
)

pytestmark = pytest.mark.anyio


async def test_emo_chain_ends_with_the_video_on_disk(client: Client, fake: FakeDashScope, settings: Settings) -> None:
    detection = await detect_emo(client, ratio="3:4")
    assert detection["output_size"] == "512x704"
    assert detection["ratio"] == "3:4"
    x1, y1, x2, y2 = detection["ext_bbox"]
    assert (x2 - x1) * 4 == (y2 - y1) * 3

    submitted = await call_ok(
        client,
        "emo_generate",
        {
            "image_url": PORTRAIT,
            "audio_url": SPEECH,
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
            "style_level": "calm",
        },
    )
    assert submitted["task_status"] == "PENDING"
    assert submitted["output_size"] == "512x704"
    task_id = submitted["task_id"]

    status = await call_ok(client, "task_status", {"task_id": task_id, "wait_seconds": 5})
    assert status["task_status"] == "SUCCEEDED"
    assert status["finished"] is True
    video = Path(status["video_path"])
    assert video.is_absolute() and video.is_file()
    assert video.is_relative_to(settings.output_dir / "aliyun-emo")
    assert hashlib.sha256(video.read_bytes()).hexdigest() == fake.video_sha256(task_id) == status["video_sha256"]
    assert status["usage"]["video_ratio"] == "3:4"
    assert status["submit_time"] and status["end_time"]

    # Wire format as DashScope received it.
    detect_request = next(r for r in fake.requests if r.path.endswith("/face-detect"))
    assert "x-dashscope-async" not in detect_request.headers
    assert detect_request.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert detect_request.body == {
        "model": "emo-detect-v1",
        "input": {"image_url": PORTRAIT},
        "parameters": {"ratio": "3:4"},
    }
    [submit] = fake.submits()
    assert submit.headers["x-dashscope-async"] == "enable"
    assert submit.body == {
        "model": "emo-v1",
        "input": emo_arguments(detection),
        "parameters": {"style_level": "calm"},
    }
    # The result URL is a signed storage URL: the API key must not travel there.
    download = next(r for r in fake.requests if r.path.startswith("/files/"))
    assert "authorization" not in download.headers


async def test_emoji_chain_maps_tool_names_to_wire_names(client: Client, fake: FakeDashScope) -> None:
    detection = await detect_emoji(client)
    assert detection["output_size"] == "512x512"
    submitted = await call_ok(
        client,
        "emoji_generate",
        {
            "image_url": PORTRAIT,
            "face_bbox": detection["face_bbox"],
            "ext_bbox_face": detection["ext_bbox_face"],
            "template_id": "dagong_zhuakuang",
        },
    )
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["task_status"] == "SUCCEEDED"
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])
    assert "/aliyun-emoji/" in status["video_path"]
    assert status["usage"] == {"video_duration": 3, "video_ratio": "standard"}

    [submit] = fake.submits()
    assert submit.headers["x-dashscope-async"] == "enable"
    assert submit.body == {
        "model": "emoji-v1",
        "input": {
            "image_url": PORTRAIT,
            "driven_id": "dagong_zhuakuang",
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox_face"],
        },
    }


async def test_evidence_holds_requests_boxes_polls_and_video(
    client: Client, fake: FakeDashScope, settings: Settings
) -> None:
    detection, submitted = await submit_emo(client)
    await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})

    detect_dir = Path(detection["evidence_dir"])
    assert read_json(detect_dir / "request.json")["input"]["image_url"] == PORTRAIT
    assert read_json(detect_dir / "response.json")["output"]["face_bbox"] == detection["face_bbox"]

    task_dir = Path(submitted["evidence_dir"])
    assert task_dir.name == submitted["task_id"]
    assert task_dir.is_relative_to(settings.output_dir / "aliyun-emo" / "tasks")
    assert read_json(task_dir / "request.json")["parameters"] == {"style_level": "normal"}
    assert read_json(task_dir / "submit.json")["output"]["task_id"] == submitted["task_id"]
    polls = sorted((task_dir / "polls").iterdir())
    assert [p.name.split("-", 1)[1] for p in polls] == ["PENDING.json", "SUCCEEDED.json"]
    assert read_json(task_dir / "result.json")["output"]["task_status"] == "SUCCEEDED"
    assert (task_dir / f"{submitted['task_id']}.mp4").is_file()
    assert not list(task_dir.glob("*.part"))


async def test_finished_task_is_answered_from_the_ledger(client: Client, fake: FakeDashScope) -> None:
    detection = await detect_emoji(client)
    submitted = await call_ok(
        client,
        "emoji_generate",
        {
            "image_url": PORTRAIT,
            "face_bbox": detection["face_bbox"],
            "ext_bbox_face": detection["ext_bbox_face"],
            "template_id": "jingdian_lei",
        },
    )
    first = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    queries = len(fake.queries(submitted["task_id"]))
    again = await call_ok(client, "task_status", {"task_id": submitted["task_id"]})
    assert again["video_path"] == first["video_path"]
    assert len(fake.queries(submitted["task_id"])) == queries


async def test_wait_sends_progress_notifications(client: Client, fake: FakeDashScope) -> None:
    _, submitted = await submit_emo(client)
    seen: list[tuple[float, float | None, str | None]] = []
    fake.auto_progress = False  # the background watcher must not finish it before the wait starts

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))
        fake.complete(submitted["task_id"])

    result = await client.call_tool(
        "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5}, progress_callback=on_progress
    )
    assert not result.is_error
    assert seen and seen[0][1] == 5.0
    assert "PENDING" in (seen[0][2] or "")


async def test_without_wait_one_poll_reports_progress_state(fake: FakeDashScope, tmp_path: Path) -> None:
    # A poll interval longer than the test: the watcher's first query is the only one.
    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_POLL_INTERVAL="60"), cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        _, submitted = await submit_emo(client)
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"]})
    assert status["task_status"] == "PENDING"
    assert status["finished"] is False
    assert "video_path" not in status  # an unset field is left out
    assert len(fake.queries(submitted["task_id"])) == 1


async def test_long_waits_are_capped_not_refused(
    client: Client, fake: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tools import schemas

    monkeypatch.setattr(schemas, "MAX_WAIT_SECONDS", 0.3)
    fake.polls_to_finish = 10_000
    _, submitted = await submit_emo(client)
    with anyio.fail_after(10):
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 3600})
    assert status["finished"] is False
    assert status["task_status"] in {"PENDING", "RUNNING"}
