"""The MCP Bundle as a host meets it: validated and packed by the official mcpb CLI, unpacked, and started
from the unpacked folder with the manifest's own command, its user_config substituted by the CLI's own code.

The mcpb CLI is a pinned devDependency (package.json; `npm ci` in .ci/run). Without Node or `npm ci` these
tests skip and say so; in CI (EMO_MCP_REQUIRE_INSPECTOR=1) a missing CLI fails instead. The host side runs
`uv run --project <bundle>` (the manifest's command), which installs the dependencies from PyPI into the
bundle's own environment: uv's cache makes later runs take a few seconds.
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
from mcp import Client, StdioServerParameters

from server.app import create_app
from server.config import load_settings
from server.sandbox.fake_dashscope import FakeDashScope
from tests import media_files
from tests.conftest import TEST_KEY, text_of

ROOT = Path(__file__).resolve().parent.parent
MCPB_PACKAGE = ROOT / "node_modules" / "@anthropic-ai" / "mcpb"
MANIFEST = json.loads((ROOT / "bundle" / "manifest.json").read_text(encoding="utf-8"))
UV = Path(sys.executable).parent / "uv"
# How a host's environment reaches PyPI (proxies, corporate CAs): passed through, as a desktop app would.
NETWORK_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed (the mcpb CLI needs it)"
    if not (MCPB_PACKAGE / "package.json").exists():
        return "the mcpb CLI is not installed: run `npm ci --ignore-scripts` in the repository root"
    if not UV.exists():
        return f"uv is not installed at {UV}: run `pip install -e .[dev]`"
    return None


MISSING = _missing()
if MISSING and os.environ.get("EMO_MCP_REQUIRE_INSPECTOR") == "1":
    raise RuntimeError(f"EMO_MCP_REQUIRE_INSPECTOR=1 but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# The official CLI's own substitution (what a host runs to turn mcp_config into a process to start).
SUBSTITUTE = """
import { getMcpConfigForManifest } from "%s";
const input = JSON.parse(await new Promise((done) => {
  let text = ""; process.stdin.on("data", (c) => (text += c)); process.stdin.on("end", () => done(text));
}));
process.stdout.write(JSON.stringify(await getMcpConfigForManifest(input)));
"""


def mcpb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npx", "--no-install", "mcpb", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )


def substitute(bundle: Path, home: Path, user_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "substitute.mjs"
    script.write_text(SUBSTITUTE % (MCPB_PACKAGE / "dist" / "shared" / "config.js").as_uri(), encoding="utf-8")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    system_dirs = {name: str(home / sub) for name, sub in (("DESKTOP", "Desktop"), ("DOCUMENTS", "Documents"))}
    request = {
        "manifest": manifest,
        "extensionPath": str(bundle),
        "systemDirs": {"HOME": str(home), "DOWNLOADS": str(home / "Downloads"), **system_dirs},
        "userConfig": user_config,
        "pathSeparator": os.sep,
    }
    done = subprocess.run(
        ["node", str(script)], input=json.dumps(request), capture_output=True, text=True, check=True, timeout=60
    )
    config = json.loads(done.stdout)
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bundle/build.py (validate, then pack), then the CLI's own unpack into a fresh folder."""
    out = tmp_path_factory.mktemp("mcpb")
    built = subprocess.run(
        [sys.executable, str(ROOT / "bundle" / "build.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert "Manifest schema validation passes" in built.stderr
    bundle = Path(built.stdout.strip())
    assert bundle.is_file() and bundle.suffix == ".mcpb"
    target = out / "unpacked"
    unpacked = mcpb("unpack", str(bundle), str(target))
    assert unpacked.returncode == 0, unpacked.stdout + unpacked.stderr
    return target


def test_the_manifest_validates_and_the_bundle_holds_the_package(unpacked: Path) -> None:
    checked = mcpb("validate", str(ROOT / "bundle" / "manifest.json"))
    assert checked.returncode == 0 and "validation passes" in checked.stdout + checked.stderr
    assert MANIFEST["manifest_version"] == "0.4" and MANIFEST["server"]["type"] == "uv"
    for name in ("manifest.json", "icon.png", "pyproject.toml", "README.md", "server/cli/main.py", "tools/emo.py"):
        assert (unpacked / name).is_file(), name
    assert sorted(p.name for p in (unpacked / "server" / "sandbox" / "clips").glob("*.mp4")) == [
        "emo-1x1.mp4",
        "emo-3x4.mp4",
        "emoji.mp4",
    ]
    assert not list(unpacked.rglob("__pycache__")) and not (unpacked / "node_modules").exists()
    config = MANIFEST["user_config"]
    assert config["dashscope_api_key"]["sensitive"] is True and config["dashscope_api_key"]["type"] == "string"
    assert config["output_dir"]["type"] == config["allowed_roots"]["type"] == "directory"
    assert config["allowed_roots"]["multiple"] is True
    assert {config[name]["type"] for name in ("max_cost_cny", "confirm_above_cny")} == {"number"}


@pytest.mark.anyio
async def test_the_manifest_lists_the_live_tools_and_prompts(tmp_path: Path) -> None:
    settings = load_settings({"HOME": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}, cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        tools = {tool.name: tool.title for tool in (await client.list_tools()).tools}
        prompts = (await client.list_prompts()).prompts
    assert {tool["name"]: tool["description"] for tool in MANIFEST["tools"]} == tools
    assert {p["name"]: (p["description"], p["arguments"]) for p in MANIFEST["prompts"]} == {
        p.name: (p.description, [a.name for a in p.arguments or []]) for p in prompts
    }
    for prompt in MANIFEST["prompts"]:
        assert all(f"${{arguments.{name}}}" in prompt["text"] for name in prompt["arguments"])


@pytest.mark.anyio
async def test_the_unpacked_bundle_starts_as_a_host_starts_it(
    unpacked: Path, fake: FakeDashScope, tmp_path: Path
) -> None:
    home, output, pictures, voices = (tmp_path / name for name in ("home", "videos", "pictures", "voices"))
    for folder in (home, output, pictures, voices):
        folder.mkdir()
    portrait = media_files.image(pictures / "me.png", (640, 800))
    speech = media_files.wav(voices / "hello.wav", seconds=5)
    # What a user fills in; the confirmation threshold is left empty.
    user_config = {
        "dashscope_api_key": TEST_KEY,
        "output_dir": str(output),
        "allowed_roots": [str(pictures), str(voices)],
        "max_cost_cny": 0.1,
    }
    config = substitute(unpacked, home, user_config, tmp_path)

    # The two traps, exactly as the official substitution leaves them.
    assert config["args"][-4:] == ["--allowed-root", str(output), str(pictures), str(voices)]
    assert config["env"]["EMO_MCP_CONFIRM_ABOVE_CNY"] == "${user_config.confirm_above_cny}"
    assert config["env"]["DASHSCOPE_API_KEY"] == TEST_KEY and config["env"]["EMO_MCP_MAX_COST_CNY"] == "0.1"

    path = os.pathsep.join([str(UV.parent), os.environ.get("PATH", "")])
    command = shutil.which(config["command"], path=path)
    assert command is not None, f"{config['command']} is not on PATH"
    cache = os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")
    env = {
        **{name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ},
        **config["env"],
        "PATH": path,
        "HOME": str(home),
        "UV_CACHE_DIR": cache,
        # The host's world, not the bundle's: this test's loopback DashScope and a quick poll.
        "DASHSCOPE_HTTP_BASE_URL": fake.base_url,
        "EMO_MCP_POLL_INTERVAL": "0.05",
    }
    host_cwd = tmp_path / "host-cwd"
    host_cwd.mkdir()
    params = StdioServerParameters(command=command, args=config["args"], env=env, cwd=str(host_cwd))
    with anyio.fail_after(280):
        async with Client(params) as client:
            tools = (await client.list_tools()).tools
            assert sorted(tool.name for tool in tools) == sorted(tool["name"] for tool in MANIFEST["tools"])

            # The key from user_config authenticates; a local file from a picked folder is accepted.
            result = await client.call_tool("emo_detect", {"image_url": str(portrait)})
            assert not result.is_error, text_of(result)
            detection = result.structured_content or {}
            assert detection["check_pass"] is True and detection["image_url"] == str(portrait)
            assert all(
                r.headers.get("authorization") == f"Bearer {TEST_KEY}" for r in fake.requests if "/api/" in r.path
            )

            # The ceiling from user_config refuses a job above it; nothing is submitted.
            refused = await client.call_tool(
                "emo_generate",
                {
                    "image_url": str(portrait),
                    "audio_url": str(speech),
                    "face_bbox": detection["face_bbox"],
                    "ext_bbox": detection["ext_bbox"],
                },
            )
            assert refused.is_error and "EMO_MCP_MAX_COST_CNY=0.1" in text_of(refused)
            assert fake.submits() == []
    assert (output / "ledger.sqlite3").exists()
