"""Generation refuses boxes that did not come from a passing detection of that same image.

Every refusal names the tool to call first, and nothing is sent upstream.
"""

from __future__ import annotations

import pytest
from mcp import Client

from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import OTHER_PORTRAIT, PORTRAIT, SPEECH, call_error, call_ok, detect_emo, detect_emoji

pytestmark = pytest.mark.anyio


def emo_args(image_url: str, face: list[int], ext: list[int]) -> dict[str, object]:
    return {"image_url": image_url, "audio_url": SPEECH, "face_bbox": face, "ext_bbox": ext}


def emoji_args(image_url: str, face: list[int], ext: list[int]) -> dict[str, object]:
    return {"image_url": image_url, "face_bbox": face, "ext_bbox_face": ext, "template_id": "mengwa_kaixin"}


async def test_invented_boxes_without_any_detection(client: Client, fake: FakeDashScope) -> None:
    message = await call_error(client, "emo_generate", emo_args(PORTRAIT, [10, 10, 200, 200], [0, 0, 400, 400]))
    assert "Call emo_detect" in message
    message = await call_error(client, "emoji_generate", emoji_args(PORTRAIT, [10, 10, 200, 200], [0, 0, 400, 400]))
    assert "Call emoji_detect" in message
    assert fake.requests == []


async def test_boxes_altered_after_a_passing_detection(client: Client, fake: FakeDashScope) -> None:
    detection = await detect_emo(client)
    face = list(detection["face_bbox"])
    face[0] += 1
    message = await call_error(client, "emo_generate", emo_args(PORTRAIT, face, detection["ext_bbox"]))
    assert "emo_detect" in message and "unchanged" in message
    assert fake.submits() == []


async def test_boxes_of_another_image(client: Client, fake: FakeDashScope) -> None:
    detection = await detect_emo(client, OTHER_PORTRAIT)
    message = await call_error(
        client, "emo_generate", emo_args(PORTRAIT, detection["face_bbox"], detection["ext_bbox"])
    )
    assert "Call emo_detect with this image_url first" in message
    assert fake.submits() == []


async def test_boxes_of_the_other_model_family(client: Client, fake: FakeDashScope) -> None:
    emoji = await detect_emoji(client)
    message = await call_error(client, "emo_generate", emo_args(PORTRAIT, emoji["face_bbox"], emoji["ext_bbox_face"]))
    assert "only checked by emoji_detect" in message and "Call emo_detect" in message

    emo = await detect_emo(client, OTHER_PORTRAIT)
    message = await call_error(client, "emoji_generate", emoji_args(OTHER_PORTRAIT, emo["face_bbox"], emo["ext_bbox"]))
    assert "only checked by emo_detect" in message and "Call emoji_detect" in message
    assert fake.submits() == []


async def test_boxes_after_a_failed_detection(client: Client, fake: FakeDashScope) -> None:
    image = "https://images.example.com/noface/landscape.jpg"
    failed = await call_ok(client, "emo_detect", {"image_url": image})
    assert failed["check_pass"] is False
    message = await call_error(client, "emo_generate", emo_args(image, [10, 10, 200, 200], [0, 0, 400, 400]))
    assert "did not pass" in message and "InvalidFile.NoHuman" in message
    assert fake.submits() == []


async def test_a_second_detection_of_the_same_image_keeps_earlier_boxes_valid(
    client: Client, fake: FakeDashScope
) -> None:
    square = await detect_emo(client, ratio="1:1")
    await detect_emo(client, ratio="3:4")
    submitted = await call_ok(client, "emo_generate", emo_args(PORTRAIT, square["face_bbox"], square["ext_bbox"]))
    assert submitted["output_size"] == "512x512"
