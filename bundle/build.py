"""Build the MCP Bundle (`.mcpb`): stage the files, `mcpb validate`, then `mcpb pack`.

Usage: `python bundle/build.py [--out DIR]` from anywhere; it prints the bundle's path. The mcpb CLI
is the version pinned in package.json (`npm ci --ignore-scripts` installs it); `npx --no-install`
never fetches another one.

The bundle is `server.type` "uv" (manifest 0.4): it ships the sources and pyproject.toml, not the
dependencies, and the host runs `uv run --project <bundle> dashscope-emo-mcp serve ...`, which
installs them for the user's platform (pydantic-core and Pillow are compiled, so a bundled
`server/lib` would only work on the machine that built it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bundle"
# What the host needs to install and run the package: its metadata and its code.
SOURCES = ("pyproject.toml", "README.md", "server", "tools")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache", ".ruff_cache")


def project_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    return str(version)


def stage(into: Path) -> Path:
    """Lay the bundle's files out in `into`; refuse a manifest whose version is not the package's."""
    manifest = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    if manifest["version"] != project_version():
        raise SystemExit(
            f"bundle/manifest.json says version {manifest['version']} but pyproject.toml says {project_version()}: "
            "make them agree (pyproject.toml is the source)."
        )
    into.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "icon.png"):
        shutil.copy2(HERE / name, into / name)
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=IGNORED)
        else:
            shutil.copy2(source, into / name)
    return into


def mcpb(*args: str) -> None:
    """The pinned mcpb CLI; its own output goes to stderr so stdout carries only the bundle's path."""
    done = subprocess.run(["npx", "--no-install", "mcpb", *args], cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(
            f"mcpb {args[0]} failed (exit {done.returncode}); if it is missing, run `npm ci --ignore-scripts`."
        )


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    target = (out / f"dashscope-emo-mcp-{project_version()}.mcpb").resolve()
    with tempfile.TemporaryDirectory(prefix="mcpb-stage-") as scratch:
        staged = stage(Path(scratch) / "dashscope-emo-mcp")
        mcpb("validate", str(staged / "manifest.json"))
        mcpb("pack", str(staged), str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="folder for the .mcpb (default dist/)")
    sys.stdout.write(f"{build(parser.parse_args().out)}\n")


if __name__ == "__main__":
    main()
