"""The server as users meet it: the official MCP Inspector CLI launching the real console script.

The Inspector is a pinned devDependency (package.json / package-lock.json; `npm ci` in .ci/run).
Without Node or without `npm ci` these tests skip and say so; `.ci/run` sets
EMO_MCP_REQUIRE_INSPECTOR=1 so that in CI a missing Inspector fails instead of skipping.

Each Inspector call starts a fresh server process on the same OUTPUT_DIR, talking to the test's
loopback fake of DashScope, so the chain also proves the ledger carries state between processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.config import Settings
from server.sandbox.fake_dashscope import FakeDashScope
from server.transport.http import HOSTS_ENV, TOKEN_ENV, http_security
from tests.conftest import PORTRAIT, SPEECH, TOOL_NAMES, make_env
from tests.serving import serving

ROOT = Path(__file__).resolve().parent.parent
INSPECTOR = ROOT / "node_modules" / ".bin" / "mcp-inspector"
CONSOLE_SCRIPT = Path(sys.executable).parent / "dashscope-emo-mcp"


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed (the MCP Inspector CLI needs it)"
    if not INSPECTOR.exists():
        return "the MCP Inspector is not installed: run `npm ci` in the repository root"
    if not CONSOLE_SCRIPT.exists():
        return f"the console script is not installed at {CONSOLE_SCRIPT}: run `pip install -e .`"
    return None


MISSING = _missing()
if MISSING and os.environ.get("EMO_MCP_REQUIRE_INSPECTOR") == "1":
    raise RuntimeError(f"EMO_MCP_REQUIRE_INSPECTOR=1 but {MISSING}")
pytestmark = [pytest.mark.anyio, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


class Inspector:
    def __init__(self, fake: FakeDashScope, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.server_env = make_env(fake, tmp_path)
        # The Inspector keeps a catalogue under $HOME; keep it inside the test's folder.
        self.env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home")}

    async def run(self, method: str, *options: str, strict: bool = False) -> tuple[dict[str, Any], str]:
        command = [str(INSPECTOR), "--cli", str(CONSOLE_SCRIPT), "--method", method, "--format", "json"]
        command += ["--cwd", str(self.cwd)]
        for name, value in self.server_env.items():
            command += ["-e", f"{name}={value}"]
        command += list(options)
        if strict:
            command.append("--strict")
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=self.env, cwd=self.cwd, check=False)
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 0, f"{method} exited {done.returncode}: {stderr[-2000:]}"
        envelope = json.loads(done.stdout)
        assert isinstance(envelope, dict)
        return envelope, stderr

    async def run_raw(self, *arguments: str) -> subprocess.CompletedProcess[bytes]:
        with anyio.fail_after(60):
            return await anyio.run_process(
                [str(INSPECTOR), "--cli", *arguments, "--format", "json"], env=self.env, cwd=self.cwd, check=False
            )

    async def remote(self, url: str, method: str, *options: str) -> dict[str, Any]:
        done = await self.run_raw(url, "--method", method, *options)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        envelope = json.loads(done.stdout)
        assert isinstance(envelope, dict)
        return envelope

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        envelope, _ = await self.run("tools/call", "--tool-name", tool, "--tool-args-json", json.dumps(arguments))
        result = envelope["result"]
        assert result.get("isError") is not True, result
        structured = result["structuredContent"]
        assert isinstance(structured, dict)
        return structured


@pytest.fixture
def inspector(fake: FakeDashScope, tmp_path: Path) -> Inspector:
    return Inspector(fake, tmp_path)


async def test_tools_list_is_strictly_portable(inspector: Inspector) -> None:
    envelope, stderr = await inspector.run("tools/list", strict=True)
    assert "schemaFindings" not in envelope, envelope.get("schemaFindings")
    assert "portability" not in stderr
    names = [tool["name"] for tool in envelope["result"]["tools"]]
    assert set(names) == TOOL_NAMES and len(names) == len(TOOL_NAMES)
    assert all(tool["inputSchema"].get("additionalProperties") is False for tool in envelope["result"]["tools"])


async def test_full_chain_through_tools_call(inspector: Inspector, fake: FakeDashScope) -> None:
    detection = await inspector.call("emo_detect", {"image_url": PORTRAIT, "ratio": "3:4"})
    assert detection["check_pass"] is True and detection["output_size"] == "512x704"
    submitted = await inspector.call(
        "emo_generate",
        {
            "image_url": PORTRAIT,
            "audio_url": SPEECH,
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
            "style_level": "active",
        },
    )
    status = await inspector.call("task_status", {"task_id": submitted["task_id"], "wait_seconds": 20})
    assert status["task_status"] == "SUCCEEDED"
    assert Path(status["video_path"]).read_bytes() == fake.video_bytes(submitted["task_id"])

    # Invented boxes are refused by the real process too, as a tool error the Inspector reports.
    command_result = await anyio.run_process(
        [
            str(INSPECTOR),
            "--cli",
            str(CONSOLE_SCRIPT),
            "--method",
            "tools/call",
            "--tool-name",
            "emo_generate",
            "--tool-args-json",
            json.dumps(
                {"image_url": PORTRAIT, "audio_url": SPEECH, "face_bbox": [1, 2, 3, 4], "ext_bbox": [0, 0, 9, 9]}
            ),
            "--format",
            "json",
            "--cwd",
            str(inspector.cwd),
            *[part for name, value in inspector.server_env.items() for part in ("-e", f"{name}={value}")],
        ],
        env=inspector.env,
        check=False,
    )
    assert command_result.returncode != 0
    assert b"emo_detect" in command_result.stdout + command_result.stderr


async def test_resources_and_prompts_over_http_with_a_token(
    inspector: Inspector, settings: Settings, fake: FakeDashScope
) -> None:
    """The Inspector as a remote client: Streamable HTTP, bearer token, resources and prompts."""
    token = "inspector-token-0123456789abcdef"
    security = http_security("0.0.0.0", {TOKEN_ENV: token, HOSTS_ENV: "127.0.0.1:*"})  # noqa: S104 (served on loopback)
    async with serving(settings, security) as base:
        url = f"{base}/mcp"
        header = ("--header", f"Authorization: Bearer {token}")
        refused = await inspector.run_raw(url, "--method", "tools/list", "--stored-auth-only")
        assert refused.returncode != 0 and b"auth_required" in refused.stderr
        assert token.encode() not in refused.stdout + refused.stderr

        listed = await inspector.remote(url, "resources/list", *header)
        assert {r["uri"] for r in listed["result"]["resources"]} == {
            "emoji://templates",
            "tasks://recent",
            "spend://today",
            "ui://dashscope-emo/viewer.html",
        }
        templates = await inspector.remote(url, "resources/templates/list", *header)
        assert "tasks://{task_id}" in [t["uriTemplate"] for t in templates["result"]["resourceTemplates"]]
        catalogue = await inspector.remote(url, "resources/read", "--uri", "emoji://templates", *header)
        content = catalogue["result"]["contents"][0]
        assert content["mimeType"] == "application/json"
        assert len(json.loads(content["text"])["templates"]) == 20

        detection = await inspector.remote(
            url,
            "tools/call",
            "--tool-name",
            "emoji_detect",
            "--tool-args-json",
            json.dumps({"image_url": PORTRAIT}),
            *header,
        )
        boxes = detection["result"]["structuredContent"]
        arguments = {
            "image_url": PORTRAIT,
            "face_bbox": boxes["face_bbox"],
            "ext_bbox_face": boxes["ext_bbox_face"],
            "template_id": "jingdian_tiaopi",
        }
        submitted = await inspector.remote(
            url, "tools/call", "--tool-name", "emoji_generate", "--tool-args-json", json.dumps(arguments), *header
        )
        task_id = submitted["result"]["structuredContent"]["task_id"]
        task = await inspector.remote(url, "resources/read", "--uri", f"tasks://{task_id}", *header)
        view = json.loads(task["result"]["contents"][0]["text"])
        assert (
            view["task_id"] == task_id
            and view["model"] == "emoji-v1"
            and view["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}
        )

        prompts = await inspector.remote(url, "prompts/list", *header)
        assert {p["name"] for p in prompts["result"]["prompts"]} == {"talking_head", "emoji_clip"}
        prompt = await inspector.remote(
            url,
            "prompts/get",
            "--prompt-name",
            "talking_head",
            "--prompt-args",
            f"image_url={PORTRAIT}",
            f"audio_url={SPEECH}",
            "style_level=calm",
            *header,
        )
        text = prompt["result"]["messages"][0]["content"]["text"]
        assert "emo_detect" in text and SPEECH in text
