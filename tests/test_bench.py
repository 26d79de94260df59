"""The benchmark suite keeps working: its entry point runs every part in its quick mode.

No timing is asserted (figures on a shared machine are noise); only that each part measured
something and the table was written with a row per figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cluster import Schemas
from bench.cluster_host import NGINX

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_writes_a_table_with_every_part(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = output.read_text(encoding="utf-8")
    assert table == result.stdout
    for row in (
        "Cold start",
        "Per-call overhead, median",
        "Evidence writes",
        "Ledger row",
        "peak RSS growth",
        "throughput",
        "tools/list",
        "Result of task_status",
    ):
        assert row in table, row
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert len(rows) >= 10
    assert all(line.count(" | ") == 6 for line in rows)


def test_bench_refuses_an_unknown_part(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "nope", "--output", str(tmp_path / "x.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown part" in result.stderr
    assert not (tmp_path / "x.md").exists()


CLUSTER_QUICK = (
    *("--tasks", "12", "--window", "2", "--limit-window", "2", "--jobs", "3", "--kills", "4", "--kill-gap", "0.5"),
    *("--polls-to-finish", "4", "--settle", "30", "--detect-workers", "1,2", "--detect-seconds", "1"),
    *("--detect-rounds", "5", "--clients", "2"),
)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)")
def test_cluster_bench_at_a_tiny_scale_writes_every_figure(tmp_path: Path) -> None:
    """bench/cluster.py end to end (workers, nginx, kills, restarts) in about a minute: each figure has
    its row and its parts measured something. No figure is asserted: the cluster tests hold the goals."""
    output = tmp_path / "CLUSTER.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench.cluster", *CLUSTER_QUICK, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = output.read_text(encoding="utf-8")
    assert table == result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    for figure in ("| 1. ", "| 2. ", "| 3. ", "| 4. ", "| 5. "):
        assert any(row.startswith(figure) for row in rows), figure
    assert all(line.count(" | ") == 3 for line in rows), rows
    assert "12 open tasks" in table and "4 kill -9s" in table
    assert "nan" not in table
    assert "5. one detect's own cost, PostgreSQL against SQLite | not measured: no `--database-url`" in table


def test_cluster_bench_falls_back_to_sqlite_when_the_database_cannot_be_used() -> None:
    """An unusable --database-url is not fatal: the parts run on the SQLite ledger and say why."""
    schemas = Schemas("postgresql://bench:secret@127.0.0.1:1/nowhere")
    backend = schemas.fresh()
    assert backend.url is None and backend.label == "SQLite"
    assert backend.why_not and "secret" not in backend.why_not
    assert schemas.fresh().why_not == backend.why_not  # asked once, not per part


def test_tenants_bench_at_a_tiny_scale_refuses_every_attempt_and_writes_every_figure(tmp_path: Path) -> None:
    """bench/tenants.py end to end at a small scale: every cross-tenant attempt refused, each table written."""
    output = tmp_path / "TENANTS.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tenants",
            "--rounds",
            "15",
            "--busy-tasks",
            "8",
            "--trials",
            "2",
            "--interval",
            "1",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = output.read_text()
    assert "**NO**" not in text and "refused or invisible" in text
    for heading in ("Token checks per call", "A quiet tenant beside a busy one"):
        assert heading in text
    assert "identity provider JWT" in text
