"""Client configurations work on the first paste: every JSON block parses, every server entry launches the
real console script, the registry manifest matches the package, and the documented exit codes are the real ones."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from server.cli import commands
from server.cli.main import _parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPT = next(iter(PYPROJECT["project"]["scripts"]))


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def json_blocks() -> list[Any]:
    blocks = re.findall(r"```json\n(.*?)```", README, flags=re.DOTALL)
    return [json.loads(block) for block in blocks]


def server_entries(config: Any) -> list[dict[str, Any]]:
    servers = config.get("mcpServers") or config.get("servers") or {}
    return list(servers.values())


def test_every_client_config_launches_the_console_script() -> None:
    configs = [*json_blocks(), json.loads((ROOT / "mcp.json").read_text(encoding="utf-8"))]
    entries = [entry for config in configs for entry in server_entries(config)]
    assert len(entries) >= 4
    for entry in entries:
        assert Path(entry["command"].replace("\\", "/")).name in {"uvx", "uvx.exe"}, entry
        args = entry["args"]
        assert args[0] == "--from" and args[2] == SCRIPT, args
        assert set(entry["env"]) >= {"DASHSCOPE_API_KEY", "OUTPUT_DIR"}
    claude_code = section("Use it from your MCP client").split("claude mcp add", 1)[1].split("```", 1)[0]
    assert f"-- uvx --from /absolute/path/to/dashscope-emo-mcp {SCRIPT}" in claude_code


def test_the_client_section_leads_with_the_bundle_and_the_installer() -> None:
    clients = section("Use it from your MCP client")
    bundle, installer, by_hand = (
        clients.index(f"### {title}") for title in ("Claude Desktop", "Any client", "By hand")
    )
    assert bundle < installer < by_hand
    assert "python bundle/build.py" in clients and f"{SCRIPT} install claude-desktop" in clients
    from server.cli.clients import CLIENTS

    assert all(f"`{name}`" in clients or f" {name}" in clients for name in CLIENTS)
    manifest = json.loads((ROOT / "bundle" / "manifest.json").read_text(encoding="utf-8"))
    for option in manifest["user_config"].values():
        assert option["title"].split(" (", 1)[0] in clients, option["title"]


def test_registry_manifest_matches_the_package() -> None:
    manifest = json.loads((ROOT / "server.json").read_text(encoding="utf-8"))
    (package,) = manifest["packages"]
    assert package["identifier"] == PYPROJECT["project"]["name"]
    assert manifest["version"] == package["version"] == PYPROJECT["project"]["version"]
    assert package["transport"] == {"type": "stdio"} and package["runtimeHint"] == "uvx"
    assert len(manifest["description"]) <= 100
    variables = {variable["name"]: variable for variable in package["environmentVariables"]}
    assert variables["DASHSCOPE_API_KEY"]["isSecret"] is True
    assert all(not v["isSecret"] for name, v in variables.items() if name != "DASHSCOPE_API_KEY")
    configuration = section("Configuration")
    assert all(f"`{name}`" in configuration for name in variables)
    assert f"mcp-name: {manifest['name']}" in README


def test_exit_codes_and_commands_are_documented() -> None:
    cli = section("Command line")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", cli, flags=re.MULTILINE)}
    real = {value for name, value in vars(commands).items() if name.startswith("EXIT_")}
    assert documented == real
    subparsers = next(a for a in _parser()._actions if a.dest == "command")
    names = set(getattr(subparsers, "choices", {}))
    assert names == {"serve", "demo", "detect", "generate", "status", "templates", "doctor", "install", "db"}
    assert all(f"{SCRIPT} {name}" in cli for name in names - {"serve", "install"})
    # `install` is documented where it is used: the client section.
    assert f"{SCRIPT} install" in section("Use it from your MCP client")
