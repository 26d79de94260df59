"""Schema and result size: bytes every agent pays in tokens, on every turn (tools/list) or every call.

Sizes are of the JSON-RPC `result` exactly as the server wrote it on stdout (compact JSON). The
baseline for `tools/list` is the same list with every `description` removed (the bare schemas), so
the ratio is what the descriptions cost; for a tool result it is its `structuredContent` alone (the
data), so the ratio is what the summary line and the JSON text copy cost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import PORTRAIT, ROOT, SERVER_COMMAND, SPEECH, Row, fake_process, server_env, stdio_session
from server.models import template_ids

# Our own budget (the issue sets none): about 800 tokens a tool, description, input and output schema.
TOOL_BUDGET = 3 * 1024 + 256
RESULT_BUDGET = 2 * 1024  # about 500 tokens per call


def _compact(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _strip_descriptions(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _strip_descriptions(item) for key, item in value.items() if key != "description"}
    if isinstance(value, list):
        return [_strip_descriptions(item) for item in value]
    return value


def _tokens(size: int) -> str:
    return f"{size:,} B (~{size / 4 / 1000:.1f}k tokens)" if size >= 4000 else f"{size:,} B (~{size // 4} tokens)"


def measure(workdir: Path) -> list[Row]:
    results: dict[str, tuple[int, int, int]] = {}  # tool -> (wire bytes, structured bytes, text bytes)
    with fake_process() as base_url, stdio_session(SERVER_COMMAND, server_env(workdir / "output", base_url), ROOT) as s:
        s.initialize()
        listed = s.request("tools/list", {})
        list_bytes = s.last_answer_bytes
        bare = _compact(_strip_descriptions(listed))

        def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            result = s.call_tool(name, arguments)
            text = sum(len(block.get("text", "").encode()) for block in result.get("content", []))
            results[name] = (s.last_answer_bytes, _compact(result["structuredContent"]), text)
            structured: dict[str, Any] = result["structuredContent"]
            return structured

        emo = call("emo_detect", {"image_url": PORTRAIT, "ratio": "1:1"})
        task = call(
            "emo_generate",
            {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": emo["face_bbox"], "ext_bbox": emo["ext_bbox"]},
        )
        emoji = call("emoji_detect", {"image_url": PORTRAIT})
        call(
            "emoji_generate",
            {
                "image_url": PORTRAIT,
                "face_bbox": emoji["face_bbox"],
                "ext_bbox_face": emoji["ext_bbox_face"],
                "template_id": template_ids()[0],
            },
        )
        call("task_status", {"task_id": task["task_id"], "wait_seconds": 10})
    tools = len(listed["tools"])
    rows = [
        Row(
            name=f"tools/list ({tools} tools)",
            figure=_tokens(list_bytes),
            baseline=f"{bare:,} B (descriptions removed)",
            ratio=f"{list_bytes / bare:.2f}×",
            goal=f"≤ {tools * TOOL_BUDGET / 1024:.1f} KB ({TOOL_BUDGET / 1024:.2f} KB a tool, our budget)",
            met=list_bytes <= tools * TOOL_BUDGET,
            how="compact JSON-RPC result as written on stdout; ~4 bytes per token",
        )
    ]
    for name, (wire, data, text) in results.items():
        rows.append(
            Row(
                name=f"Result of {name}" + (" (SUCCEEDED)" if name == "task_status" else ""),
                figure=_tokens(wire) + f"; text {text:,} B",
                baseline=f"{data:,} B (structuredContent)",
                ratio=f"{wire / data:.2f}×",
                goal=f"≤ {RESULT_BUDGET // 1024} KB",
                met=wire <= RESULT_BUDGET,
                how="a typical sandbox call; text = summary line + compact JSON (unset fields dropped)",
            )
        )
    return rows
