"""The README stays true: its tool table matches the live tools/list, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.anyio


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "demo" in commands[0]
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci_script.splitlines()


async def test_tool_table_matches_tools_list(client: Client) -> None:
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| (yes|no) \|", README, flags=re.MULTILINE)
    documented = {name: (title.strip(), flag == "yes") for name, title, flag in rows}
    live = {
        tool.name: (tool.title, bool(tool.annotations and tool.annotations.read_only_hint))
        for tool in (await client.list_tools()).tools
    }
    assert documented == live
