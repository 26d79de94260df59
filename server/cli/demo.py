"""`dashscope-emo-mcp demo`: both chains through a real MCP client session against the sandbox.

It shows what an agent sees: each tool call, the one-line summary the server returns, and where
the evidence and the video landed. Nothing leaves the machine and nothing is billed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mcp import Client
from mcp_types import CallToolResult, TextContent

from server.app import create_app
from server.config import load_settings
from server.sandbox.fake_dashscope import FakeDashScope

PORTRAIT = "https://example.com/sandbox/portrait.jpg"
SPEECH = "https://example.com/sandbox/speech.wav"
EMOJI_PORTRAIT = "https://example.com/sandbox/selfie.png"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _call(client: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    _say(f"\n→ {name} {json.dumps(arguments)}")
    result: CallToolResult = await client.call_tool(name, arguments)
    text = next((c.text for c in result.content if isinstance(c, TextContent)), "")
    _say(("  ✗ " if result.is_error else "  ✓ ") + text.splitlines()[0] if text else "  (no text)")
    if result.is_error:
        raise RuntimeError(f"{name} failed: {text}")
    return dict(result.structured_content or {})


async def _follow(client: Client, task_id: str) -> dict[str, Any]:
    while True:
        status = await _call(client, "task_status", {"task_id": task_id, "wait_seconds": 10})
        if status.get("finished"):
            return status


async def run_demo() -> int:
    async with FakeDashScope(polls_to_finish=3).serve() as base_url:
        settings = load_settings(sandbox=True, sandbox_base_url=base_url)
        _say(f"Sandbox DashScope at {base_url}; evidence goes to {settings.output_dir}")
        async with Client(create_app(settings)) as client:
            tools = await client.list_tools()
            _say("Tools: " + ", ".join(tool.name for tool in tools.tools))

            _say("\n== EMO: portrait + speech → talking head")
            detection = await _call(client, "emo_detect", {"image_url": PORTRAIT, "ratio": "1:1"})
            submitted = await _call(
                client,
                "emo_generate",
                {
                    "image_url": PORTRAIT,
                    "audio_url": SPEECH,
                    "face_bbox": detection["face_bbox"],
                    "ext_bbox": detection["ext_bbox"],
                    "style_level": "active",
                },
            )
            emo = await _follow(client, submitted["task_id"])

            _say("\n== Emoji: portrait + official template → expression clip")
            detection = await _call(client, "emoji_detect", {"image_url": EMOJI_PORTRAIT})
            submitted = await _call(
                client,
                "emoji_generate",
                {
                    "image_url": EMOJI_PORTRAIT,
                    "face_bbox": detection["face_bbox"],
                    "ext_bbox_face": detection["ext_bbox_face"],
                    "template_id": "mengwa_kaixin",
                },
            )
            emoji = await _follow(client, submitted["task_id"])

            _say("\n== Strict by design: invented boxes are refused before anything is sent")
            refused = await client.call_tool(
                "emo_generate",
                {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": [1, 2, 3, 4], "ext_bbox": [0, 0, 9, 9]},
            )
            first = next((c.text for c in refused.content if isinstance(c, TextContent)), "")
            _say(f"  ✗ (as intended) {first.splitlines()[0] if first else ''}")

    _say(f"\nDone. EMO video: {emo.get('video_path')}\n      Emoji video: {emoji.get('video_path')}")
    return 0
