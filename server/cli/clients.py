"""Where each MCP client keeps its server list, and the shape of one entry there.

Verified against the clients' documentation (README "Use it from your MCP client"):
- Claude Desktop: `claude_desktop_config.json` under `~/Library/Application Support/Claude` (macOS) or
  `%APPDATA%\\Claude` (Windows), top-level `mcpServers` (modelcontextprotocol.io/quickstart/user). There is
  no official Linux build; the community builds read `$XDG_CONFIG_HOME/Claude` (default `~/.config/Claude`).
- Cursor: `~/.cursor/mcp.json` (`%USERPROFILE%\\.cursor\\mcp.json`), top-level `mcpServers` (cursor.com/docs/mcp).
- VS Code: `mcp.json` in the user profile folder (`~/Library/Application Support/Code/User`,
  `%APPDATA%\\Code\\User`, `~/.config/Code/User`), top-level `servers` with `"type": "stdio"`, and `inputs`
  whose `promptString` with `"password": true` lets VS Code ask for the key and keep it out of the file
  (code.visualstudio.com/docs/copilot/reference/mcp-configuration).
- Claude Code: user scope in `~/.claude.json`, top-level `mcpServers`, entries with `"type": "stdio"`
  (code.claude.com/docs/en/mcp, "MCP installation scopes").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ClientId = Literal["claude-desktop", "cursor", "vscode", "claude-code"]
CLIENTS: tuple[ClientId, ...] = ("claude-desktop", "cursor", "vscode", "claude-code")
TITLES: dict[ClientId, str] = {
    "claude-desktop": "Claude Desktop",
    "cursor": "Cursor",
    "vscode": "VS Code",
    "claude-code": "Claude Code",
}
NEXT_STEP: dict[ClientId, str] = {
    "claude-desktop": "quit Claude Desktop completely and start it again",
    "cursor": "reload Cursor (or toggle the server under Settings → MCP)",
    "vscode": "run “MCP: List Servers” in VS Code and start dashscope-emo; it asks for the key once",
    "claude-code": "start a new Claude Code session; /mcp lists the server",
}
KEY_VARIABLE = "DASHSCOPE_API_KEY"
VSCODE_INPUT_ID = "dashscope-api-key"


@dataclass(frozen=True)
class Platform:
    """The operating system's layout: injectable, so every client and platform can be tested in a temp home."""

    system: Literal["darwin", "win32", "linux"]
    home: Path
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def current(cls) -> Platform:
        system: Literal["darwin", "win32", "linux"] = (
            "darwin" if sys.platform == "darwin" else "win32" if sys.platform == "win32" else "linux"
        )
        return cls(system, Path.home(), os.environ)

    def _appdata(self) -> Path:
        return Path(self.env["APPDATA"]) if self.env.get("APPDATA") else self.home / "AppData" / "Roaming"

    def _xdg_config(self) -> Path:
        return Path(self.env["XDG_CONFIG_HOME"]) if self.env.get("XDG_CONFIG_HOME") else self.home / ".config"

    def app_config_dir(self, mac_and_windows_name: str, linux_name: str) -> Path:
        if self.system == "darwin":
            return self.home / "Library" / "Application Support" / mac_and_windows_name
        if self.system == "win32":
            return self._appdata() / mac_and_windows_name
        return self._xdg_config() / linux_name


def config_path(client: ClientId, platform: Platform) -> Path:
    """The user-level configuration file `client` reads on `platform`."""
    if client == "claude-desktop":
        return platform.app_config_dir("Claude", "Claude") / "claude_desktop_config.json"
    if client == "vscode":
        return platform.app_config_dir("Code", "Code") / "User" / "mcp.json"
    if client == "cursor":
        return platform.home / ".cursor" / "mcp.json"
    return platform.home / ".claude.json"


def servers_key(client: ClientId) -> str:
    return "servers" if client == "vscode" else "mcpServers"


def server_entry(client: ClientId, command: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One stdio entry in the client's own shape (VS Code and Claude Code name the transport)."""
    entry: dict[str, Any] = {"command": command, "args": args, "env": env}
    return {"type": "stdio", **entry} if client in ("vscode", "claude-code") else entry


def vscode_key_input() -> dict[str, Any]:
    return {
        "type": "promptString",
        "id": VSCODE_INPUT_ID,
        "description": "DashScope API key (Model Studio, Beijing region)",
        "password": True,
    }
