"""Money under control: estimates before, actual cost after, dry runs, the ceiling and confirmation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext, ElicitationFnT
from mcp_types import ElicitRequestParams, ElicitResult, ErrorData, TextResourceContents

from server.app import create_app
from server.config import load_settings
from server.pricing import load_prices
from server.sandbox.fake_dashscope import FakeDashScope
from tests import media_files
from tests.conftest import PORTRAIT, SPEECH, call_error, call_ok, detect_emo, detect_emoji, make_env, read_json

pytestmark = pytest.mark.anyio


def answering(action: str, confirm: bool | None = None) -> tuple[ElicitationFnT, list[str]]:
    """An elicitation callback giving one fixed answer, and the questions it was asked."""
    asked: list[str] = []

    async def callback(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult | ErrorData:
        asked.append(params.message)
        content = {"confirm": confirm} if action == "accept" else None
        return ElicitResult(action=action, content=content)  # type: ignore[arg-type]

    return callback, asked


def session(
    fake: FakeDashScope, tmp_path: Path, elicitation: ElicitationFnT | None = None, mode: str = "auto", **env: str
) -> Client:
    """mode "auto" negotiates the 2026-07-28 protocol (questions ride InputRequiredResult); "legacy" the 2025
    one (a server-to-client elicitation request mid-call). Confirmation must work on both."""
    settings = load_settings(make_env(fake, tmp_path, **env), cwd=tmp_path)
    return Client(create_app(settings), elicitation_callback=elicitation, mode=mode)


async def emo_args(client: Client, audio_url: str = SPEECH, ratio: str = "1:1") -> dict[str, Any]:
    detection = await detect_emo(client, ratio=ratio)
    return {
        "image_url": PORTRAIT,
        "audio_url": audio_url,
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


PROTOCOLS = pytest.mark.parametrize("mode", ["auto", "legacy"])


@pytest.fixture(params=["auto", "legacy"])
async def confirming(
    fake: FakeDashScope, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Client, list[str]]]:
    callback, asked = answering("accept", True)
    async with session(fake, tmp_path, callback, request.param, EMO_MCP_CONFIRM_ABOVE_CNY="1") as client:
        assert (client.protocol_version >= "2026-07-28") == (request.param == "auto")
        yield client, asked


async def test_remote_audio_of_unknown_length_is_estimated_at_the_60_s_bound(
    client: Client, fake: FakeDashScope
) -> None:
    for ratio, rate in (("1:1", 0.08), ("3:4", 0.16)):
        submitted = await call_ok(client, "emo_generate", await emo_args(client, ratio=ratio))
        assert submitted["estimated_cost_cny"] == pytest.approx(60 * rate)
        assert "upper bound" in submitted["estimate_basis"]
        status = await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 5})
        assert status["actual_cost_cny"] == pytest.approx(5.2 * rate)
    emoji = await detect_emoji(client)
    submitted = await call_ok(
        client,
        "emoji_generate",
        {
            "image_url": PORTRAIT,
            "face_bbox": emoji["face_bbox"],
            "ext_bbox_face": emoji["ext_bbox_face"],
            "template_id": "dagong_kaixin",
        },
    )
    assert submitted["estimated_cost_cny"] == pytest.approx(0.4)
    assert "unconfirmed" in submitted["estimate_basis"]


def test_prices_can_be_overridden_and_then_count_as_confirmed() -> None:
    prices = load_prices({"EMO_MCP_PRICE_EMOJI": "0.1", "EMO_MCP_PRICE_EMO_3_4": "0.2"})
    assert prices.emoji_rate.cny == 0.1 and prices.emoji_rate.confirmed
    assert prices.emo_rate("3:4").cny == 0.2
    assert prices.emo_rate("1:1").cny == 0.08
    assert not load_prices({}).emoji_rate.confirmed


async def test_dry_run_returns_the_payload_and_sends_nothing(
    client: Client, fake: FakeDashScope, tmp_path: Path
) -> None:
    args = await emo_args(client)
    sent_before = list(fake.requests)
    result = await call_ok(client, "emo_generate", {**args, "style_level": "active", "dry_run": True})
    assert fake.requests == sent_before  # nothing uploaded, nothing submitted
    assert result["dry_run"] is True and result["task_id"] is None and result["task_status"] == "DRY_RUN"
    expected = {
        "model": "emo-v1",
        "input": {k: args[k] for k in ("image_url", "audio_url", "face_bbox", "ext_bbox")},
        "parameters": {"style_level": "active"},
    }
    assert result["payload"] == expected
    assert result["estimated_cost_cny"] == pytest.approx(4.8)
    folder = Path(result["evidence_dir"])
    assert folder.is_relative_to(tmp_path / "output" / "aliyun-emo" / "dry-runs")
    assert read_json(folder / "request.json") == expected
    assert read_json(folder / "estimate.json")["estimated_cost_cny"] == pytest.approx(4.8)


async def test_dry_run_of_local_files_uploads_nothing(client: Client, fake: FakeDashScope, tmp_path: Path) -> None:
    portrait = media_files.image(tmp_path / "me.png")
    detection = await call_ok(client, "emoji_detect", {"image_url": str(portrait)})
    sent_before = len(fake.requests)
    result = await call_ok(
        client,
        "emoji_generate",
        {
            "image_url": str(portrait),
            "face_bbox": detection["face_bbox"],
            "ext_bbox_face": detection["ext_bbox_face"],
            "template_id": "jingdian_lei",
            "dry_run": True,
        },
    )
    assert len(fake.requests) == sent_before
    assert result["payload"] == {
        "model": "emoji-v1",
        "input": {
            "image_url": portrait.as_uri(),
            "driven_id": "jingdian_lei",
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox_face"],
        },
    }
    assert "uploaded" in result["next_step"]


async def test_the_confirmation_parameter_is_not_an_argument(client: Client, fake: FakeDashScope) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    for name in ("emo_generate", "emoji_generate"):
        schema = tools[name].input_schema
        assert "confirmation" not in schema["properties"] and schema["additionalProperties"] is False
        assert schema["properties"]["dry_run"]["type"] == "boolean"
    args = await emo_args(client)
    message = await call_error(client, "emo_generate", {**args, "confirmation": {"action": "accept"}})
    assert "confirmation" in message
    assert fake.submits() == []


async def test_the_ceiling_refuses_an_estimate_above_it(fake: FakeDashScope, tmp_path: Path) -> None:
    speech = media_files.wav(tmp_path / "short.wav", seconds=5)
    async with session(fake, tmp_path, EMO_MCP_MAX_COST_CNY="1") as client:
        args = await emo_args(client)
        message = await call_error(client, "emo_generate", args)  # unknown length: 4.8 CNY bound
        assert "EMO_MCP_MAX_COST_CNY=1" in message and "4.8000 CNY" in message and "Nothing was submitted" in message
        assert fake.submits() == []
        dry = await call_ok(client, "emo_generate", {**args, "dry_run": True})
        assert "would be refused" in dry["next_step"]
        submitted = await call_ok(client, "emo_generate", {**args, "audio_url": str(speech)})  # 0.4 CNY
        assert submitted["estimated_cost_cny"] == pytest.approx(0.4)
    assert len(fake.submits()) == 1


async def test_confirmation_accepted_submits(confirming: tuple[Client, list[str]], fake: FakeDashScope) -> None:
    client, asked = confirming
    submitted = await call_ok(client, "emo_generate", await emo_args(client))
    assert submitted["task_status"] == "PENDING"
    [question] = asked
    assert "4.8000 CNY" in question and "EMO_MCP_CONFIRM_ABOVE_CNY=1" in question
    assert len(fake.submits()) == 1


async def test_below_the_threshold_nobody_is_asked(
    confirming: tuple[Client, list[str]], fake: FakeDashScope, tmp_path: Path
) -> None:
    client, asked = confirming
    speech = media_files.wav(tmp_path / "short.wav", seconds=5)
    await call_ok(client, "emo_generate", await emo_args(client, audio_url=str(speech)))
    await call_ok(client, "emo_generate", {**(await emo_args(client)), "dry_run": True})
    assert asked == []
    assert len(fake.submits()) == 1


@PROTOCOLS
@pytest.mark.parametrize(
    ("action", "confirm", "said"),
    [("decline", None, "declined"), ("cancel", None, "cancelled"), ("accept", False, "declined")],
)
async def test_confirmation_refused_submits_nothing(
    fake: FakeDashScope, tmp_path: Path, action: str, confirm: bool | None, said: str, mode: str
) -> None:
    callback, asked = answering(action, confirm)
    async with session(fake, tmp_path, callback, mode, EMO_MCP_CONFIRM_ABOVE_CNY="0.1") as client:
        detection = await detect_emoji(client)
        message = await call_error(
            client,
            "emoji_generate",
            {
                "image_url": PORTRAIT,
                "face_bbox": detection["face_bbox"],
                "ext_bbox_face": detection["ext_bbox_face"],
                "template_id": "mengwa_kaixin",
            },
        )
    assert len(asked) == 1
    assert f"the user {said} the spend" in message and "Nothing was submitted" in message
    assert fake.submits() == []


@PROTOCOLS
async def test_a_client_without_elicitation_gets_a_refusal_naming_the_setting(
    fake: FakeDashScope, tmp_path: Path, mode: str
) -> None:
    async with session(fake, tmp_path, None, mode, EMO_MCP_CONFIRM_ABOVE_CNY="1") as client:
        message = await call_error(client, "emo_generate", await emo_args(client))
    assert "cannot ask the user" in message and "EMO_MCP_CONFIRM_ABOVE_CNY" in message
    assert fake.submits() == []


async def test_spend_today_sums_estimates_and_actual_costs(client: Client, fake: FakeDashScope) -> None:
    first = await call_ok(client, "emo_generate", await emo_args(client))
    await call_ok(client, "task_status", {"task_id": first["task_id"], "wait_seconds": 5})
    await call_ok(client, "emo_generate", await emo_args(client, ratio="3:4"))  # still pending

    result = await client.read_resource("spend://today")
    [content] = result.contents
    assert isinstance(content, TextResourceContents)
    spend = json.loads(content.text)
    assert spend["detections"] == 2 and spend["detect_cny"] == pytest.approx(0.008)
    assert spend["tasks"] == 2 and spend["unfinished_tasks"] == 1
    assert spend["estimated_cny"] == pytest.approx(4.8 + 9.6)
    assert spend["actual_cny"] == pytest.approx(5.2 * 0.08)
    assert spend["total_cny"] == pytest.approx(0.008 + 5.2 * 0.08 + 9.6)
    assert "spend" in spend["summary"]
