"""Release-ready: `python -m build` makes an sdist and a wheel that `twine check` accepts, the wheel installed
in a fresh virtual environment runs a sandbox chain with playable videos, the version lives in pyproject.toml
only (everything else agrees with it), and server.json passes the MCP registry's published schema.

The fresh environment installs the wheel's dependencies through pip's cache, so only the first run downloads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib.resources import files
from pathlib import Path

import av
import jsonschema
import pytest
from mcp import Client

from server.app import create_app, package_version
from server.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
CLIPS = {"emo-1x1.mp4", "emo-3x4.mp4", "emoji.mp4"}


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    (wheel,) = dist.glob(f"dashscope_emo_mcp-{VERSION}-py3-none-any.whl")
    (sdist,) = dist.glob(f"dashscope_emo_mcp-{VERSION}.tar.gz")
    checked = run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist, cwd=dist)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"server/sandbox/clips/{clip}" for clip in CLIPS} <= names
    metadata = zipfile.ZipFile(wheel).read(f"dashscope_emo_mcp-{VERSION}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in metadata and "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.11" in metadata and "Description-Content-Type: text/markdown" in metadata
    with tarfile.open(sdist) as archive:
        members = {member.name.split("/", 1)[1] for member in archive.getmembers() if "/" in member.name}
    assert {"pyproject.toml", "README.md", *(f"server/sandbox/clips/{clip}" for clip in CLIPS)} <= members


def test_the_wheel_runs_from_a_fresh_virtual_environment(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    installed = run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    script = bin_dir / "dashscope-emo-mcp"
    # Nothing of the source tree: a clean environment and a working folder outside it.
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    where = run(bin_dir / "python", "-c", "import server; print(server.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    version = run(script, "--version", cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"dashscope-emo-mcp {VERSION}"

    demo = run(script, "demo", cwd=tmp_path, env=env)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    videos = re.findall(r"^  (?:EMO 1:1|EMO 3:4|Emoji), (\d+)x(\d+) +(\S+\.mp4)$", demo.stdout, flags=re.MULTILINE)
    assert len(videos) == 3
    for width, height, path in videos:
        assert Path(path).is_relative_to(tmp_path / "output")
        with av.open(path) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.width, stream.codec_context.height) == (
                "h264",
                int(width),
                int(height),
            )
            assert next(container.decode(video=0)).width == int(width)


@pytest.mark.anyio
async def test_the_version_lives_in_pyproject_and_everything_agrees(tmp_path: Path) -> None:
    assert package_version() == VERSION
    settings = load_settings({"HOME": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out")}, cwd=tmp_path)
    async with Client(create_app(settings)) as client:
        info = client.server_info
        assert info is not None and info.version == VERSION
    registry = json.loads((ROOT / "server.json").read_text(encoding="utf-8"))
    assert registry["version"] == VERSION and [p["version"] for p in registry["packages"]] == [VERSION]
    assert json.loads((ROOT / "bundle" / "manifest.json").read_text(encoding="utf-8"))["version"] == VERSION
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.findall(r"^## \[?(\d+\.\d+\.\d+)", changelog, flags=re.MULTILINE)[0] == VERSION


def test_server_json_passes_the_registry_schema() -> None:
    """The schema server.json names, as the registry published it (bundled byte-for-byte by skillsaw)."""
    registry = json.loads((ROOT / "server.json").read_text(encoding="utf-8"))
    release = registry["$schema"].split("/schemas/", 1)[1].split("/", 1)[0]  # e.g. 2025-12-11
    package = "skillsaw.schemas.mcp_registry.v" + release.replace("-", "_")
    schema = json.loads(files(package).joinpath("server.schema.json").read_text(encoding="utf-8"))
    assert schema["$id"] == registry["$schema"]
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(registry)]
    assert errors == []
    # And the check bites: a description over the registry's 100 characters is refused.
    assert list(validator.iter_errors({**registry, "description": "x" * 101}))
