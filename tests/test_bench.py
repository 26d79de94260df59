"""The benchmark suite keeps working: its entry point runs every part in its quick mode.

No timing is asserted (figures on a shared machine are noise); only that each part measured
something and the table was written with a row per figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
