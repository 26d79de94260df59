"""The house stays readable: imports follow the layering in pyproject.toml, and the wheel ships its data.

The layering is checked by import-linter (contracts in `[tool.importlinter]`, README "Layout"),
which sees every import, lazy ones inside functions included. A second test plants an upward
import in a copy of the tree, so the check is shown to fail when the rule is broken.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python(*args: str, cwd: Path | None = None, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """This interpreter in a child; `path` first on its import path (and nothing else of ours)."""
    env = None if path is None else {"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the tree at `cwd` (its own pyproject.toml, its own packages first)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return python("-c", code, cwd=cwd, path=cwd)


def test_imports_follow_the_layering() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_import_that_runs_back_up_is_caught(tmp_path: Path) -> None:
    for name in ("server", "tools"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ledger = tmp_path / "server" / "store" / "ledger.py"
    # A lazy import inside a function, the kind that made the old cycle, from the store up to the domain.
    ledger.write_text(
        ledger.read_text(encoding="utf-8") + "\n\ndef _upward() -> object:\n"
        "    from server.domain.service import Service\n\n    return Service\n",
        encoding="utf-8",
    )
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "server.store.ledger -> server.domain.service" in result.stdout


def test_the_installed_wheel_ships_the_templates_and_the_viewer(tmp_path: Path) -> None:
    """Build the wheel, install it apart from the source tree, and read the data files through the package."""
    built = python("-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(ROOT))
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"server/templates.json", "server/viewer/viewer.html", "server/py.typed", "tools/py.typed"} <= set(names)
    assert {n.split("/")[1] for n in names if n.startswith("server/") and n.count("/") == 2} >= {
        "upstream",
        "store",
        "jobs",
        "media",
        "domain",
        "transport",
        "cli",
        "sandbox",
        "viewer",
    }
    site = tmp_path / "site"
    installed = python("-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = (
        "import server, json; from server.models import template_ids; "
        "from server.viewer.extension import viewer_html; "
        "print(json.dumps({'file': server.__file__, 'templates': len(template_ids()), 'html': len(viewer_html())}))"
    )
    # -I would drop PYTHONPATH too; a cwd outside the tree and the wheel's folder first is enough.
    run = python("-c", probe, cwd=tmp_path, path=site)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert Path(seen["file"]).is_relative_to(site), seen
    assert seen["templates"] == 20 and seen["html"] > 1000
