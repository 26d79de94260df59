"""`dashscope-emo-mcp install`: each client's file at its platform's place, merged without losing anything,
backed up before it changes, never overwriting someone else's entry, and never showing the key.

Every case runs against a fresh temporary home folder with the platform injected; the last one writes a real
entry through `main()` and then starts exactly what it wrote, over stdio, with an MCP client.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from server.cli.clients import CLIENTS, ClientId, Platform
from server.cli.install import HIDDEN, Outcome, Request, console_script, install, show
from server.cli.main import main
from server.errors import ConfigError, RefusedInputError
from tests.conftest import PORTRAIT, TOOL_NAMES

KEY = "sk-install-secret-0123456789"

# Where each client keeps its user-level file, relative to the home folder (the clients' documentation).
EXPECTED: dict[tuple[str, str], str] = {
    ("claude-desktop", "darwin"): "Library/Application Support/Claude/claude_desktop_config.json",
    ("claude-desktop", "win32"): "AppData/Roaming/Claude/claude_desktop_config.json",
    ("claude-desktop", "linux"): ".config/Claude/claude_desktop_config.json",
    ("cursor", "darwin"): ".cursor/mcp.json",
    ("cursor", "win32"): ".cursor/mcp.json",
    ("cursor", "linux"): ".cursor/mcp.json",
    ("vscode", "darwin"): "Library/Application Support/Code/User/mcp.json",
    ("vscode", "win32"): "AppData/Roaming/Code/User/mcp.json",
    ("vscode", "linux"): ".config/Code/User/mcp.json",
    ("claude-code", "darwin"): ".claude.json",
    ("claude-code", "win32"): ".claude.json",
    ("claude-code", "linux"): ".claude.json",
}


def platform(system: Any, home: Path, **env: str) -> Platform:
    home.mkdir(parents=True, exist_ok=True)
    return Platform(system, home, env)


def never_asked(_: str) -> str:
    raise AssertionError("the key must not be prompted for here")


def read(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def entry_of(document: dict[str, Any], client: str, name: str = "dashscope-emo") -> dict[str, Any]:
    servers = document["servers" if client == "vscode" else "mcpServers"]
    assert isinstance(servers, dict)
    entry = servers[name]
    assert isinstance(entry, dict)
    return entry


def shown(outcome: Outcome) -> str:
    lines: list[str] = []
    show(outcome, lines.append)
    return "\n".join(lines)


@pytest.mark.parametrize("system", ["darwin", "win32", "linux"])
@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_gets_its_file_in_its_format(client: ClientId, system: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    outcome = install(Request(client), platform=platform(system, home, DASHSCOPE_API_KEY=KEY), prompt=never_asked)
    path = home / EXPECTED[(client, system)]
    assert outcome.path == path and outcome.written and outcome.change == "added" and outcome.backup is None
    document = read(path)
    entry = entry_of(document, client)
    assert entry["command"] == str(console_script()) and Path(entry["command"]).is_absolute()
    output = str((home / "dashscope-emo-output").absolute())
    assert entry["args"] == ["serve", "--allowed-root", output]
    assert entry["env"]["OUTPUT_DIR"] == output
    if client in ("vscode", "claude-code"):
        assert entry["type"] == "stdio"
    else:
        assert "type" not in entry
    if client == "vscode":
        # VS Code asks for the key itself: it never lands in the file.
        assert entry["env"]["DASHSCOPE_API_KEY"] == "${input:dashscope-api-key}"
        assert document["inputs"] == [
            {
                "type": "promptString",
                "id": "dashscope-api-key",
                "description": "DashScope API key (Model Studio, Beijing region)",
                "password": True,
            }
        ]
        assert KEY not in path.read_text(encoding="utf-8")
    else:
        assert entry["env"]["DASHSCOPE_API_KEY"] == KEY
        assert outcome.entry["env"]["DASHSCOPE_API_KEY"] == HIDDEN
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a new file may hold the key
    assert KEY not in shown(outcome)


def test_windows_honours_appdata_and_linux_xdg_config_home(tmp_path: Path) -> None:
    roaming, xdg = tmp_path / "Roaming", tmp_path / "xdg"
    on_windows = install(
        Request("claude-desktop", sandbox=True), platform=platform("win32", tmp_path / "w", APPDATA=str(roaming))
    )
    assert on_windows.path == roaming / "Claude" / "claude_desktop_config.json"
    on_linux = install(
        Request("vscode", sandbox=True), platform=platform("linux", tmp_path / "l", XDG_CONFIG_HOME=str(xdg))
    )
    assert on_linux.path == xdg / "Code" / "User" / "mcp.json"


def test_merging_keeps_everything_else_and_backs_up_the_old_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = home / ".claude.json"
    path.parent.mkdir(parents=True)
    before: dict[str, Any] = {
        "numStartups": 41,
        "projects": {"/src/app": {"mcpServers": {"local-one": {"command": "x"}}}},
        "mcpServers": {"playwright": {"type": "stdio", "command": "npx", "args": ["@playwright/mcp@latest"]}},
    }
    path.write_text(json.dumps(before), encoding="utf-8")
    path.chmod(0o644)
    outcome = install(Request("claude-code"), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY))
    after = read(path)
    assert after["numStartups"] == 41 and after["projects"] == before["projects"]
    assert after["mcpServers"]["playwright"] == before["mcpServers"]["playwright"]
    assert entry_of(after, "claude-code")["env"]["DASHSCOPE_API_KEY"] == KEY
    assert outcome.backup is not None and json.loads(outcome.backup.read_text(encoding="utf-8")) == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # an existing file keeps its mode

    again = install(Request("claude-code"), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY))
    assert again.change == "unchanged" and not again.written and again.backup is None
    assert sorted(p.name for p in home.iterdir() if ".bak-" in p.name) == [outcome.backup.name]


def test_a_linked_file_is_written_through_its_link(tmp_path: Path) -> None:
    home, dotfiles = tmp_path / "home", tmp_path / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "claude.json").write_text('{"theme": "dark"}', encoding="utf-8")
    home.mkdir()
    (home / ".claude.json").symlink_to(dotfiles / "claude.json")
    install(Request("claude-code", sandbox=True), platform=platform("linux", home))
    assert (home / ".claude.json").is_symlink()
    assert read(dotfiles / "claude.json")["theme"] == "dark" and "mcpServers" in read(dotfiles / "claude.json")


def test_an_unrelated_entry_of_the_same_name_is_refused_without_force(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = home / ".cursor" / "mcp.json"
    path.parent.mkdir(parents=True)
    theirs = {"mcpServers": {"dashscope-emo": {"command": "node", "args": ["/opt/other/index.js"]}}}
    text = json.dumps(theirs, indent=4)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RefusedInputError, match="does not run dashscope-emo-mcp") as refused:
        install(Request("cursor"), platform=platform("darwin", home, DASHSCOPE_API_KEY=KEY), prompt=never_asked)
    assert "--force" in str(refused.value) and "--name" in str(refused.value)
    assert path.read_text(encoding="utf-8") == text and [p.name for p in path.parent.iterdir()] == ["mcp.json"]

    renamed = install(
        Request("cursor", name="dashscope-emo-2"), platform=platform("darwin", home, DASHSCOPE_API_KEY=KEY)
    )
    assert (
        renamed.change == "added" and read(path)["mcpServers"]["dashscope-emo"] == theirs["mcpServers"]["dashscope-emo"]
    )
    forced = install(Request("cursor", force=True), platform=platform("darwin", home, DASHSCOPE_API_KEY=KEY))
    assert forced.change == "replaced" and forced.backup is not None
    assert entry_of(read(path), "cursor")["command"] == str(console_script())


def test_an_older_entry_of_ours_is_updated_in_place(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = home / ".config" / "Claude" / "claude_desktop_config.json"
    path.parent.mkdir(parents=True)
    ours = {"command": "uvx", "args": ["--from", "/src/dashscope-emo-mcp", "dashscope-emo-mcp"], "env": {}}
    path.write_text(json.dumps({"mcpServers": {"dashscope-emo": ours}}), encoding="utf-8")
    outcome = install(Request("claude-desktop"), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY))
    assert outcome.change == "updated" and outcome.backup is not None
    assert entry_of(read(path), "claude-desktop")["command"] == str(console_script())


def test_dry_run_writes_nothing_and_hides_the_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    outcome = install(Request("cursor", dry_run=True), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY))
    assert not outcome.written and outcome.change == "added" and not (home / ".cursor").exists()
    text = shown(outcome)
    assert "dry run: nothing written" in text and HIDDEN in text and KEY not in text
    assert str(home / ".cursor" / "mcp.json") in text


@pytest.mark.parametrize(
    ("client", "content"),
    [
        ("vscode", '{\n  // my servers\n  "servers": {}\n}\n'),  # JSONC: VS Code allows comments, we cannot keep them
        ("cursor", "[1, 2]"),
        ("cursor", '{"mcpServers": []}'),
        ("vscode", '{"servers": {}, "inputs": {}}'),
    ],
)
def test_a_file_that_cannot_be_merged_is_left_alone(client: ClientId, content: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    target = home / EXPECTED[(client, "linux")]
    target.parent.mkdir(parents=True)
    target.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="nothing was changed"):
        install(Request(client), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY), prompt=never_asked)
    assert target.read_text(encoding="utf-8") == content
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_the_key_is_prompted_only_where_it_must_be(tmp_path: Path) -> None:
    asked: list[str] = []

    def typing(question: str) -> Callable[[str], str]:
        def answer(prompt: str) -> str:
            asked.append(prompt)
            return question

        return answer

    typed = install(Request("claude-desktop"), platform=platform("darwin", tmp_path / "a"), prompt=typing(KEY))
    assert len(asked) == 1 and "not shown" in asked[0]
    assert entry_of(read(typed.path), "claude-desktop")["env"]["DASHSCOPE_API_KEY"] == KEY
    assert KEY not in shown(typed)

    skipped = install(Request("cursor"), platform=platform("darwin", tmp_path / "b"), prompt=typing(""))
    assert "DASHSCOPE_API_KEY" not in entry_of(read(skipped.path), "cursor")["env"]
    assert "credentials" in skipped.key

    scripted = install(Request("claude-code"), platform=platform("linux", tmp_path / "c"), prompt=None)
    assert "DASHSCOPE_API_KEY" not in entry_of(read(scripted.path), "claude-code")["env"]
    assert "set DASHSCOPE_API_KEY" in scripted.key

    for request in (Request("vscode"), Request("cursor", sandbox=True)):
        install(request, platform=platform("linux", tmp_path / request.client), prompt=never_asked)
    assert len(asked) == 2


def test_uvx_from_writes_the_absolute_uvx(tmp_path: Path) -> None:
    uvx = tmp_path / "bin" / "uvx"
    uvx.parent.mkdir()
    uvx.write_text("#!/bin/sh\n")
    home = tmp_path / "home"
    outcome = install(
        Request("cursor", uvx_from="/src/dashscope-emo-mcp", allowed_roots=(tmp_path / "pictures",)),
        platform=platform("linux", home, DASHSCOPE_API_KEY=KEY),
        which=lambda name: str(uvx) if name == "uvx" else None,
    )
    entry = entry_of(read(outcome.path), "cursor")
    output = str((home / "dashscope-emo-output").absolute())
    assert entry["command"] == str(uvx)
    assert entry["args"] == [
        "--from",
        "/src/dashscope-emo-mcp",
        "dashscope-emo-mcp",
        "serve",
        "--allowed-root",
        output,
        str(tmp_path / "pictures"),
    ]
    with pytest.raises(ConfigError, match="uvx"):
        install(Request("cursor", uvx_from="x"), platform=platform("linux", home), which=lambda _: None)


@pytest.mark.anyio
async def test_the_written_entry_starts_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real command line, then the client's side: start exactly what was written."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
    # main() runs its own event loop: give it a thread, as a terminal would give it a process.
    code = await anyio.to_thread.run_sync(
        main, ["install", "cursor", "--sandbox", "--output-dir", str(tmp_path / "videos")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"added the server in {home / '.cursor' / 'mcp.json'}" in out and KEY not in out
    entry = entry_of(read(home / ".cursor" / "mcp.json"), "cursor")
    assert "DASHSCOPE_API_KEY" not in entry["env"]  # the sandbox needs none

    again = ["install", "cursor", "--sandbox", "--output-dir", str(tmp_path / "videos"), "--json"]
    code = await anyio.to_thread.run_sync(main, again)
    assert code == 0 and json.loads(capsys.readouterr().out)["change"] == "unchanged"

    host_cwd = tmp_path / "elsewhere"
    host_cwd.mkdir()
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env={**entry["env"], "HOME": str(home)}, cwd=str(host_cwd)
    )
    with anyio.fail_after(60):
        async with Client(params) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOL_NAMES
            detection = await client.call_tool("emo_detect", {"image_url": PORTRAIT})
            assert not detection.is_error and (detection.structured_content or {})["sandbox"] is True
    assert (tmp_path / "videos" / "ledger.sqlite3").exists()


def test_installing_again_without_a_key_keeps_the_stored_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = install(Request("cursor"), platform=platform("linux", home, DASHSCOPE_API_KEY=KEY))
    assert first.change == "added"
    path = home / ".cursor" / "mcp.json"
    document = read(path)
    document["mcpServers"]["dashscope-emo"]["env"]["EMO_MCP_MAX_COST_CNY"] = "2"  # added by the user
    path.write_text(json.dumps(document), encoding="utf-8")
    again = install(Request("cursor"), platform=platform("linux", home), prompt=None)
    env = entry_of(read(path), "cursor")["env"]
    assert env["DASHSCOPE_API_KEY"] == KEY and env["EMO_MCP_MAX_COST_CNY"] == "2"
    assert again.key == "kept from the existing entry" and KEY not in shown(again)
