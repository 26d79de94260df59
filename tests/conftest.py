"""Shared fixtures: a loopback fake of DashScope over real HTTP, and an MCP client session to the server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from server.app import create_app
from server.config import Settings, load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from tests.postgres import pg_url  # noqa: F401 (the fixture: a fresh schema on the test PostgreSQL)
from tests.tenancy import accounts, database  # noqa: F401 (fixtures of the tenancy tests)

TEST_KEY = "sk-test-secret-1234567890"
TOOL_NAMES = frozenset({"emo_detect", "emo_generate", "emoji_detect", "emoji_generate", "task_status", "task_cancel"})
PORTRAIT = "https://images.example.com/people/alice.jpg"
OTHER_PORTRAIT = "https://images.example.com/people/bob.jpg"
SPEECH = "https://audio.example.com/hello.wav"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDashScope]:
    upstream = FakeDashScope(api_key=TEST_KEY, polls_to_finish=2)
    async with upstream.serve():
        yield upstream


def make_env(fake: FakeDashScope, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "DASHSCOPE_API_KEY": TEST_KEY,
        "DASHSCOPE_HTTP_BASE_URL": fake.base_url,
        "OUTPUT_DIR": str(tmp_path / "output"),
        "EMO_MCP_POLL_INTERVAL": "0.05",
        "HOME": str(tmp_path / "home"),
    }
    env.update(extra)
    return env


@pytest.fixture
def settings(fake: FakeDashScope, tmp_path: Path) -> Settings:
    return load_settings(make_env(fake, tmp_path), cwd=tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(create_app(settings)) as session:
        yield session


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


async def call_ok(client: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def call_error(client: Client, name: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(name, arguments)
    assert result.is_error, f"{name} unexpectedly succeeded: {text_of(result)}"
    return text_of(result)


async def detect_emo(client: Client, image_url: str = PORTRAIT, ratio: str = "1:1") -> dict[str, Any]:
    result = await call_ok(client, "emo_detect", {"image_url": image_url, "ratio": ratio})
    assert result["check_pass"] is True
    return result


def emo_arguments(detection: dict[str, Any], audio_url: str = SPEECH) -> dict[str, Any]:
    """emo_generate arguments for PORTRAIT with the boxes a detection returned."""
    return {
        "image_url": PORTRAIT,
        "audio_url": audio_url,
        "face_bbox": detection["face_bbox"],
        "ext_bbox": detection["ext_bbox"],
    }


async def submit_emo(client: Client, audio_url: str = SPEECH) -> tuple[dict[str, Any], dict[str, Any]]:
    """Detect PORTRAIT and submit an emo-v1 task with its boxes; returns (detection, submitted)."""
    detection = await detect_emo(client)
    submitted = await call_ok(client, "emo_generate", emo_arguments(detection, audio_url))
    return detection, submitted


async def detect_emoji(client: Client, image_url: str = PORTRAIT) -> dict[str, Any]:
    result = await call_ok(client, "emoji_detect", {"image_url": image_url})
    assert result["check_pass"] is True
    return result


def all_files_text(root: Path) -> str:
    """Every file under `root` as text (binary files decoded leniently), to look for leaks."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
