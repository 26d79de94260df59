"""Failures come back as results or tool errors an agent can act on, never tracebacks or leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from server.app import create_app
from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import (
    PORTRAIT,
    TEST_KEY,
    all_files_text,
    call_error,
    call_ok,
    detect_emo,
    emo_arguments,
    make_env,
    submit_emo,
)

pytestmark = pytest.mark.anyio


async def test_failed_emo_detection_is_a_result_with_the_reason(client: Client) -> None:
    result = await call_ok(client, "emo_detect", {"image_url": "https://img.example.com/noface.jpg"})
    assert result["check_pass"] is False
    assert result["code"] == "InvalidFile.NoHuman"
    assert result["message"]
    assert result["face_bbox"] is None and result["ext_bbox"] is None


async def test_portrait_refused_with_http_400_is_a_failed_check(client: Client) -> None:
    result = await call_ok(client, "emo_detect", {"image_url": "https://img.example.com/multiface.jpg"})
    assert result["check_pass"] is False
    assert result["code"] == "InvalidFile.MultiHuman"
    assert result["request_id"]
    emoji = await call_ok(client, "emoji_detect", {"image_url": "https://img.example.com/noface.jpg"})
    assert emoji["check_pass"] is False
    assert emoji["code"] == "InvalidFile.FacePose"


async def test_unreachable_image_is_a_tool_error_with_code_and_request_id(client: Client) -> None:
    message = await call_error(client, "emo_detect", {"image_url": "https://img.example.com/unreachable.jpg"})
    assert "InvalidURL" in message and "request_id" in message


async def test_failed_task_reports_code_and_message(client: Client) -> None:
    detection = await detect_emo(client)
    submitted = await call_ok(
        client,
        "emo_generate",
        {
            "image_url": PORTRAIT,
            "audio_url": "https://audio.example.com/failtask.wav",
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
        },
    )
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["task_status"] == "FAILED"
    assert status["finished"] is True
    assert status["code"] == "InternalError.Algo"
    assert status["message"]
    assert "video_path" not in status


async def test_unknown_task_id_says_unknown_or_expired(client: Client) -> None:
    result = await client.call_tool("task_status", {"task_id": "00000000-0000-0000-0000-000000000000"})
    assert result.is_error
    text = result.content[0].text if result.content and result.content[0].type == "text" else ""
    assert "24 hours" in text and "emo_generate" in text
    assert result.structured_content == {"task_status": "UNKNOWN", "message": text}


async def test_wrong_key_explains_region_and_how_to_set_it(fake: FakeDashScope, tmp_path: Path) -> None:
    settings = load_settings(make_env(fake, tmp_path, DASHSCOPE_API_KEY="sk-wrong-key-000"), cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        message = await call_error(client, "emo_detect", {"image_url": PORTRAIT})
    assert "InvalidApiKey" in message and "401" in message
    assert "Beijing" in message and "DASHSCOPE_API_KEY" in message
    assert "sk-wrong-key-000" not in message


async def test_missing_key_lists_both_ways_and_tools_still_list(fake: FakeDashScope, tmp_path: Path) -> None:
    env = make_env(fake, tmp_path)
    del env["DASHSCOPE_API_KEY"]
    settings = load_settings(env, cwd=tmp_path)
    assert settings.key_source == "none"
    async with Client(create_app(settings)) as client:
        assert len((await client.list_tools()).tools) == 6
        message = await call_error(client, "emoji_detect", {"image_url": PORTRAIT})
        assert "DASHSCOPE_API_KEY" in message and "~/.alibabacloud/credentials" in message
        message = await call_error(client, "task_status", {"task_id": "abc"})
        assert "DASHSCOPE_API_KEY" in message
    assert fake.requests == []


async def test_throttled_task_query_is_retried_after_retry_after(client: Client, fake: FakeDashScope) -> None:
    _, submitted = await submit_emo(client)
    fake.inject("GET", "/tasks/", status=429, headers={"Retry-After": "0.2"}, times=1)
    fake.inject("GET", "/tasks/", status=503, times=1)
    status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    assert status["task_status"] == "SUCCEEDED"
    task_queries = [r for r in fake.requests if r.path.startswith("/api/v1/tasks/")]
    assert task_queries[1].at - task_queries[0].at >= 0.2


async def test_submit_without_answer_is_not_retried_and_says_it_may_be_billed(
    fake: FakeDashScope, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx2

    from server.upstream import client as dashscope

    monkeypatch.setattr(dashscope, "SUBMIT_TIMEOUT", httpx2.Timeout(0.5, connect=5.0))
    async with Client(create_app(settings)) as client:
        detection = await detect_emo(client)
        fake.inject("POST", "/services/aigc/image2video/video-synthesis", delay=2.0, passthrough=True)
        message = await call_error(
            client,
            "emo_generate",
            emo_arguments(detection),
        )
    assert "may have been created" in message and "billed" in message and "NOT" in message
    assert len(fake.submits()) == 1
    saved = list((settings.output_dir / "aliyun-emo" / "submits").rglob("request.json"))
    assert len(saved) == 1


async def test_the_api_key_never_reaches_evidence(client: Client, fake: FakeDashScope, settings: Settings) -> None:
    _, submitted = await submit_emo(client)
    await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
    await call_ok(client, "emo_detect", {"image_url": "https://img.example.com/noface.jpg"})
    text = all_files_text(settings.output_dir)
    assert "aliyun-emo" in str(list(settings.output_dir.iterdir()))
    assert TEST_KEY not in text
    assert "Bearer" not in text
