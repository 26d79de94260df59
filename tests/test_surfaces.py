"""What a client sees besides tool calls: honest annotations, resource links, resources, prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import ResourceLink, TextResourceContents

from server.models import template_ids
from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import PORTRAIT, SPEECH, call_ok, detect_emo, emo_arguments

pytestmark = pytest.mark.anyio


async def read_json(client: Client, uri: str) -> Any:
    result = await client.read_resource(uri)
    (content,) = result.contents
    assert isinstance(content, TextResourceContents)
    assert content.mime_type == "application/json"
    return json.loads(content.text)


async def finished_emo_task(client: Client) -> dict[str, Any]:
    detection = await detect_emo(client)
    submitted = await call_ok(client, "emo_generate", emo_arguments(detection))
    return await call_ok(client, "task_status", {"task_id": submitted["task_id"], "wait_seconds": 10})


async def test_annotations_tell_the_truth(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    for name, tool in tools.items():
        assert tool.title and tool.description and tool.output_schema, name
        hints = tool.annotations
        assert hints is not None and hints.open_world_hint is True, name
        if name.endswith("_generate"):
            assert (hints.read_only_hint, hints.idempotent_hint, hints.destructive_hint) == (False, False, False)
            assert "Paid" in tool.description and "task_status" in tool.description
        elif name == "task_cancel":
            # Ends a queued job for good; a second call changes nothing.
            assert (hints.read_only_hint, hints.idempotent_hint, hints.destructive_hint) == (False, True, True)
        else:
            assert hints.read_only_hint is True, name
    described = {name: tool.description or "" for name, tool in tools.items()}
    for name in ("emo_detect", "emoji_detect"):
        assert "CNY" in described[name] and "Call this first" in described[name]
    assert "Free to call" in described["task_status"]


async def test_a_downloaded_video_comes_with_a_resource_link(client: Client) -> None:
    detection = await detect_emo(client)
    submitted_result = await client.call_tool(
        "emo_generate",
        emo_arguments(detection),
    )
    assert not any(isinstance(block, ResourceLink) for block in submitted_result.content)
    task_id = (submitted_result.structured_content or {})["task_id"]
    result = await client.call_tool("task_status", {"task_id": task_id, "wait_seconds": 10})
    links = [block for block in result.content if isinstance(block, ResourceLink)]
    assert result.structured_content is not None
    video = Path(result.structured_content["video_path"])
    assert len(links) == 1
    assert links[0].uri == video.as_uri() and links[0].mime_type == "video/mp4"
    assert links[0].size == video.stat().st_size


async def test_template_catalogue_resource_matches_the_enum(client: Client) -> None:
    listed = {str(resource.uri) for resource in (await client.list_resources()).resources}
    assert {"emoji://templates", "tasks://recent"} <= listed
    templates = (await client.list_resource_templates()).resource_templates
    assert "tasks://{task_id}" in [t.uri_template for t in templates]

    catalogue = await read_json(client, "emoji://templates")
    ids = [t["id"] for t in catalogue["templates"]]
    assert tuple(ids) == template_ids() and len(ids) == 20
    assert all(t["series"] and t["meaning"] and t["typical_max_seconds"] == 5 for t in catalogue["templates"])
    tool = next(t for t in (await client.list_tools()).tools if t.name == "emoji_generate")
    assert tool.input_schema["properties"]["template_id"]["enum"] == ids


async def test_task_resources_show_the_ledger(client: Client, fake: FakeDashScope) -> None:
    assert (await read_json(client, "tasks://recent")) == {"tasks": []}
    status = await finished_emo_task(client)
    recent = (await read_json(client, "tasks://recent"))["tasks"]
    assert [task["task_id"] for task in recent] == [status["task_id"]]
    one = await read_json(client, f"tasks://{status['task_id']}")
    assert one == recent[0]
    assert one["status"] == "SUCCEEDED" and one["video_path"] == status["video_path"]
    assert one["billed_seconds"] == status["usage"]["video_duration"]
    assert "video_url" not in one  # signed URLs stay out of resources
    assert one["cost_cny"] == round(status["usage"]["video_duration"] * 0.08, 4)  # 1:1 rate
    assert one["estimated_cost_cny"] is not None
    queries = len(fake.requests)
    await read_json(client, f"tasks://{status['task_id']}")
    assert len(fake.requests) == queries  # reading a resource never asks DashScope

    with pytest.raises(MCPError, match="not in this server's ledger"):
        await client.read_resource("tasks://no-such-task")


async def test_prompts_walk_the_chains(client: Client) -> None:
    prompts = {prompt.name: prompt for prompt in (await client.list_prompts()).prompts}
    assert set(prompts) == {"talking_head", "emoji_clip"}
    args = {arg.name: arg.required for arg in prompts["talking_head"].arguments or []}
    assert args == {"image_url": True, "audio_url": True, "style_level": False}

    talking = await client.get_prompt(
        "talking_head", {"image_url": PORTRAIT, "audio_url": SPEECH, "style_level": "calm"}
    )
    text = talking.messages[0].content.text  # type: ignore[union-attr]
    assert text.index("emo_detect") < text.index("emo_generate") < text.index("task_status")
    assert PORTRAIT in text and SPEECH in text and '"calm"' in text

    clip = await client.get_prompt("emoji_clip", {"image_url": PORTRAIT, "template_id": "dagong_kaixin"})
    text = clip.messages[0].content.text  # type: ignore[union-attr]
    assert text.index("emoji_detect") < text.index("emoji_generate") < text.index("task_status")
    assert "dagong_kaixin (office worker, happy)" in text

    with pytest.raises(MCPError, match="official template"):
        await client.get_prompt("emoji_clip", {"image_url": PORTRAIT, "template_id": "made_up"})
    with pytest.raises(MCPError, match="style_level"):
        await client.get_prompt("talking_head", {"image_url": PORTRAIT, "audio_url": SPEECH, "style_level": "wild"})
