"""Pre-flight of remote URLs and the private-address guard (no outbound connection is ever made)."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from server.config import load_settings
from server.errors import ConfigError, PreflightError
from server.media.addresses import BlockedAddressError, Resolver, blocked_reason, guard_url
from server.media.preflight import Checked, Preflight, check_audio
from server.media.sources import MediaRef
from server.sandbox.fake_dashscope import FakeDashScope
from tests import media_files
from tests.conftest import call_ok, make_env

pytestmark = pytest.mark.anyio

BLOCKED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.20",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",  # noqa: S104 (an address to refuse, not to bind)
    "224.0.0.1",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
]


@pytest.mark.parametrize("address", BLOCKED)
def test_the_guard_refuses_non_public_addresses(address: str) -> None:
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888"])
def test_the_guard_lets_public_addresses_through(address: str) -> None:
    assert blocked_reason(address) is None


def resolver(*addresses: str) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


async def test_every_resolved_address_is_checked() -> None:
    await guard_url("https://media.example.com/a.png", resolver("93.184.216.34"))
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.7"):
        await guard_url("https://media.example.com/a.png", resolver("93.184.216.34", "10.0.0.7"))
    with pytest.raises(BlockedAddressError, match="loopback"):
        await guard_url("http://[::1]:8080/a.png")
    with pytest.raises(BlockedAddressError, match="link-local"):
        await guard_url("http://169.254.169.254/latest/meta-data")


def served(files: dict[str, bytes | tuple[int, str]]) -> httpx2.MockTransport:
    """A transport answering from memory: what a remote host would serve, with no network."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        found = files.get(request.url.path)
        if found is None:
            return httpx2.Response(404)
        if isinstance(found, tuple):
            return httpx2.Response(found[0], headers={"location": found[1]})
        return httpx2.Response(200, content=found)

    return httpx2.MockTransport(handle)


async def test_remote_files_are_checked_when_fetched(tmp_path: Path) -> None:
    wav = media_files.wav(tmp_path / "a.wav", seconds=3).read_bytes()
    files: dict[str, bytes | tuple[int, str]] = {
        "/small.png": media_files.png_bytes((200, 600)),
        "/ok.png": media_files.png_bytes((600, 600)),
        "/a.wav": wav,
        "/moved.wav": (302, "http://10.0.0.5/a.wav"),
    }
    # Served from memory: no connection is made.
    http = served(files)
    preflight = Preflight(remote=True, resolve=resolver("93.184.216.34"), transport=http)
    checked = Checked()
    await preflight.image(MediaRef("u", url="https://media.example.com/ok.png"), "emo", "image_url", checked)
    assert checked.image is not None and (checked.image.width, checked.image.format) == (600, "PNG")
    await preflight.audio(MediaRef("u", url="https://media.example.com/a.wav"), "audio_url", checked)
    assert checked.audio is not None and checked.audio.seconds == pytest.approx(3)
    assert checked.warnings == []
    with pytest.raises(PreflightError, match="200x600"):
        await preflight.image(MediaRef("u", url="https://media.example.com/small.png"), "emo", "image_url", checked)

    # Unreachable from here: a warning, not a refusal; a redirect to a private address is re-guarded.
    for path in ("/missing.png", "/moved.wav"):
        late = Checked()
        await preflight.audio(MediaRef("u", url=f"https://media.example.com{path}"), "audio_url", late)
        assert late.audio is None
        [warning] = late.warnings
        assert "could not be fetched" in warning and "may still reach it" in warning
    assert "10.0.0.5" in warning

    # Off by default: nothing is fetched.
    quiet = Checked()
    off = Preflight(remote=False, resolve=resolver("93.184.216.34"), transport=http)
    await off.image(MediaRef("u", url="https://media.example.com/small.png"), "emo", "image_url", quiet)
    assert quiet == Checked()


async def test_remote_preflight_through_mcp_warns_for_a_loopback_url(fake: FakeDashScope, tmp_path: Path) -> None:
    from mcp import Client

    from server.app import create_app

    settings = load_settings(make_env(fake, tmp_path, EMO_MCP_PREFLIGHT="remote"), cwd=tmp_path)
    url = f"{fake.origin}/files/portrait.png"
    async with Client(create_app(settings)) as client:
        result = await call_ok(client, "emo_detect", {"image_url": url})
    assert result["check_pass"] is True
    [warning] = result["warnings"]
    assert "127.0.0.1" in warning and "loopback" in warning
    assert not any(r.path.startswith("/files/") for r in fake.requests)  # the guard stopped the fetch


def test_preflight_mode_is_validated(tmp_path: Path) -> None:
    env = {"DASHSCOPE_API_KEY": "sk-x", "OUTPUT_DIR": str(tmp_path), "EMO_MCP_PREFLIGHT": "always"}
    with pytest.raises(ConfigError, match="EMO_MCP_PREFLIGHT"):
        load_settings(env, cwd=tmp_path)


def test_an_mp3_is_read_by_content(tmp_path: Path) -> None:
    path = media_files.mp3(tmp_path / "voice.bin", seconds=12)
    info = check_audio(path, path.stat().st_size, "audio_url", str(path))
    assert info.format == "MP3" and info.seconds == pytest.approx(12, abs=0.05)


def test_server_start_up_does_not_import_pillow_or_mutagen(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from server.app import create_app; from server.config import "
        f"load_settings; create_app(load_settings({{'OUTPUT_DIR': {str(tmp_path)!r}}}, cwd=Path({str(tmp_path)!r}))); "
        "print(sorted(m for m in ('PIL', 'mutagen') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
