"""`dashscope-emo-mcp demo`: the chains through a real MCP client session against the sandbox.

It shows what an agent sees: each tool call, the one-line summary the server returns, and where
the evidence and the video landed. Nothing leaves the machine and nothing is billed. The videos
are the sandbox's real clips (labelled SANDBOX), one per output frame size, so they play; `--open`
hands them to the platform's viewer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp import Client
from mcp_types import CallToolResult, TextContent

from server.app import create_app
from server.config import load_settings
from server.sandbox.clips import sandbox_upstream

PORTRAIT = "https://example.com/sandbox/portrait.jpg"
HALF_BODY = "https://example.com/sandbox/half-body.jpg"
SPEECH = "https://example.com/sandbox/speech.wav"
EMOJI_PORTRAIT = "https://example.com/sandbox/selfie.png"

# Opens one file with a viewer; returns the launched process when there is one (tests wait on it).
Opener = Callable[[Path], "subprocess.Popen[bytes] | None"]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def platform_opener(
    platform: str = sys.platform, which: Callable[[str], str | None] = shutil.which
) -> tuple[Opener | None, str]:
    """The platform's "open with the default app" and how a person would type it, or None if absent."""
    if platform == "win32":
        startfile = getattr(os, "startfile", None)
        if startfile is None:
            return None, "start"

        def start(path: Path) -> None:
            startfile(str(path))

        return start, "start"
    name = "open" if platform == "darwin" else "xdg-open"
    found = which(name)
    if found is None:
        return None, name
    command = found

    def launch(path: Path) -> subprocess.Popen[bytes]:
        # Detached and silent: the viewer outlives the demo, and stdout stays ours.
        return subprocess.Popen(
            [command, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    return launch, name


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


async def _emo(client: Client, image_url: str, ratio: str) -> dict[str, Any]:
    detection = await _call(client, "emo_detect", {"image_url": image_url, "ratio": ratio})
    submitted = await _call(
        client,
        "emo_generate",
        {
            "image_url": image_url,
            "audio_url": SPEECH,
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
            "style_level": "active",
        },
    )
    return await _follow(client, submitted["task_id"])


async def _emoji(client: Client) -> dict[str, Any]:
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
    return await _follow(client, submitted["task_id"])


def _show_videos(videos: dict[str, dict[str, Any]], open_videos: bool, opener: Opener | None, verb: str) -> None:
    _say("\nDone. Sandbox videos (real, playable H.264 clips labelled SANDBOX, not made from your portrait):")
    for label, status in videos.items():
        _say(f"  {label:<18} {status.get('video_path')}")
    paths = [Path(status["video_path"]) for status in videos.values() if status.get("video_path")]
    if not open_videos:
        _say(f"Open one with: {verb} {paths[0] if paths else '<video>'}   (or run: dashscope-emo-mcp demo --open)")
        return
    if opener is None:
        _say(f"No viewer found ({verb} is not on PATH): open the files above with any video player.")
        return
    for path in paths:
        opener(path)
    _say(f"Opened {len(paths)} videos with {verb}.")


async def run_demo(*, open_videos: bool = False, opener: Opener | None = None, verb: str | None = None) -> int:
    """Run the chains; `opener`/`verb` default to the platform's (injectable so tests open nothing)."""
    if opener is None and verb is None:
        opener, verb = platform_opener()
    async with sandbox_upstream(polls_to_finish=3).serve() as base_url:
        settings = load_settings(sandbox=True, sandbox_base_url=base_url)
        _say(f"Sandbox DashScope at {base_url}; evidence goes to {settings.output_dir}")
        async with Client(create_app(settings)) as client:
            tools = await client.list_tools()
            _say("Tools: " + ", ".join(tool.name for tool in tools.tools))

            _say("\n== EMO: portrait + speech → talking head (1:1, head shot, 512x512)")
            emo = await _emo(client, PORTRAIT, "1:1")
            _say("\n== EMO: half-body portrait + speech → talking head (3:4, 512x704)")
            emo_half = await _emo(client, HALF_BODY, "3:4")

            _say("\n== Emoji: portrait + official template → expression clip (512x512, silent)")
            emoji = await _emoji(client)

            _say("\n== Strict by design: invented boxes are refused before anything is sent")
            refused = await client.call_tool(
                "emo_generate",
                {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": [1, 2, 3, 4], "ext_bbox": [0, 0, 9, 9]},
            )
            first = next((c.text for c in refused.content if isinstance(c, TextContent)), "")
            _say(f"  ✗ (as intended) {first.splitlines()[0] if first else ''}")

    videos = {"EMO 1:1, 512x512": emo, "EMO 3:4, 512x704": emo_half, "Emoji, 512x512": emoji}
    _show_videos(videos, open_videos, opener, verb or "open")
    return 0
