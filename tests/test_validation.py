"""Strict schemas: what an agent invents is refused by the schema, and the server keeps answering."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import PORTRAIT, SPEECH, TOOL_NAMES, call_error, call_ok

pytestmark = pytest.mark.anyio

GOOD_BOX = [10, 20, 110, 120]
EMO_GENERATE = {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": GOOD_BOX, "ext_bbox": [0, 0, 300, 300]}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("emo_detect", {"image_url": "ftp://example.com/a.jpg"}, "http"),
    ("emo_detect", {"image_url": "not a url"}, "http"),
    ("emo_detect", {"image_url": ""}, "image_url"),
    ("emo_detect", {"image_url": "https://" + "a" * 3000 + ".com/x.jpg"}, "image_url"),
    ("emo_detect", {"image_url": "file:///etc/passwd"}, "http"),
    ("emo_detect", {"image_url": PORTRAIT, "ratio": "2:1"}, "ratio"),
    ("emo_detect", {"image_url": PORTRAIT, "ratio": "16:9"}, "ratio"),
    ("emo_detect", {"image_url": PORTRAIT, "bogus": 1}, "bogus"),
    ("emo_detect", {"image_url": PORTRAIT, "model": "emo-v1-detect"}, "model"),
    ("emo_detect", {}, "image_url"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=[1, 2, 3]), "face_bbox"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=[1, 2, 3, 4, 5]), "face_bbox"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=[-1, 2, 30, 40]), "face_bbox"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=[50, 2, 30, 40]), "x1 < x2"),
    ("emo_generate", with_(EMO_GENERATE, ext_bbox=[0, 50, 30, 40]), "y1 < y2"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=["10", "20", "110", "120"]), "face_bbox"),
    ("emo_generate", with_(EMO_GENERATE, face_bbox=[10.5, 20, 110, 120]), "face_bbox"),
    ("emo_generate", with_(EMO_GENERATE, style_level="wild"), "style_level"),
    ("emo_generate", with_(EMO_GENERATE, audio_url="ftp://x/y.wav"), "audio_url"),
    ("emo_generate", with_(EMO_GENERATE, seed=42), "seed"),
    (
        "emoji_generate",
        {"image_url": PORTRAIT, "face_bbox": GOOD_BOX, "ext_bbox_face": GOOD_BOX, "template_id": "emoji_001"},
        "template_id",
    ),
    (
        "emoji_generate",
        {"image_url": PORTRAIT, "face_bbox": GOOD_BOX, "ext_bbox": GOOD_BOX, "template_id": "mengwa_kaixin"},
        "ext_bbox",
    ),
    ("emoji_detect", {"image_url": PORTRAIT, "ratio": "1:1"}, "ratio"),
    ("emo_detect", {"image_url": "https://images.example.com/a\x01b.jpg"}, "U+0001"),
    ("emo_detect", {"image_url": "https://images.example.com/a\x7f.jpg"}, "U+007F"),
    ("emo_detect", {"image_url": "https://images.example.com/a\nb.jpg"}, "control characters"),
    ("emo_detect", {"image_url": "https://images.example.com/a.jpg\r\nHost: evil"}, "RFC 3986"),
    ("emoji_detect", {"image_url": "https://images.example.com/\x1b[31m.jpg"}, "percent-encode"),
    ("emoji_detect", {"image_url": "file:///tmp/portrait\x00.jpg"}, "U+0000"),
    ("emo_generate", with_(EMO_GENERATE, audio_url="https://audio.example.com/a\tb.wav"), "U+0009"),
    ("task_status", {"task_id": ""}, "task_id"),
    ("task_status", {"task_id": "../../etc/passwd"}, "task_id"),
    ("task_status", {"task_id": "abc", "wait_seconds": -1}, "wait_seconds"),
    ("task_status", {"task_id": "abc", "wait_seconds": "5"}, "wait_seconds"),
]


@pytest.mark.parametrize(("tool", "arguments", "mentions"), BAD_CALLS)
async def test_bad_input_is_refused_and_the_server_keeps_answering(
    client: Client, fake: FakeDashScope, tool: str, arguments: dict[str, Any], mentions: str
) -> None:
    message = await call_error(client, tool, arguments)
    assert mentions in message
    assert "Traceback" not in message
    assert fake.requests == []
    # Still serving after the refusal.
    assert (await call_ok(client, "emo_detect", {"image_url": PORTRAIT}))["check_pass"] is True


async def test_published_schemas_are_strict_and_match_runtime(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOL_NAMES
    for tool in tools.values():
        assert tool.input_schema.get("additionalProperties") is False, tool.name
        assert tool.output_schema is not None, tool.name
        assert tool.description and tool.title, tool.name
    generate = tools["emo_generate"].input_schema["properties"]
    for media in ("image_url", "audio_url"):  # the same rule the runtime applies, for schema-checking clients
        assert generate[media]["pattern"] == "^[^\\u0000-\\u001F\\u007F]*$"
    box = generate["face_bbox"]
    assert box["type"] == "array" and box["minItems"] == 4 and box["maxItems"] == 4
    assert box["items"] == {"minimum": 0, "type": "integer"}
    assert generate["style_level"]["enum"] == ["normal", "calm", "active"]
    assert tools["emo_detect"].input_schema["properties"]["ratio"]["enum"] == ["1:1", "3:4"]
    templates = tools["emoji_generate"].input_schema["properties"]["template_id"]["enum"]
    assert len(templates) == 20 and "mengwa_kaixin" in templates and "emoji_001" not in templates
    assert tools["emo_generate"].annotations is not None
    assert tools["emo_generate"].annotations.read_only_hint is False
    assert tools["emo_generate"].annotations.idempotent_hint is False
    assert tools["task_status"].annotations is not None
    assert tools["task_status"].annotations.read_only_hint is True
