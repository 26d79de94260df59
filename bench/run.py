"""Run the benchmark suite, print the table and write it to `bench/RESULTS.md`.

    python -m bench.run              # full run (about a minute): the figures in README and RESULTS.md
    python -m bench.run --quick      # a few iterations of everything, to check the suite works

Every figure is a ratio against a baseline measured in the same run, because absolute times on a
shared machine are noise. `--only cold,call,download,size` runs a subset.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from bench import cold_start, download, per_call, sizes
from bench.common import ROOT, Row

RESULTS = ROOT / "bench" / "RESULTS.md"
PARTS = ("cold", "call", "download", "size")
MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    cold_rounds: int
    call_rounds: int
    download_rounds: int
    download_mb: int


FULL = Plan(cold_rounds=21, call_rounds=300, download_rounds=3, download_mb=200)
QUICK = Plan(cold_rounds=1, call_rounds=5, download_rounds=1, download_mb=2)


NOTES = [
    "Baselines, all measured in the same run: a minimal `MCPServer` with one tool (`bench/minimal_server.py`) for",
    "cold start; the same POST sent directly with `httpx2` to the same loopback fake for per-call overhead, with the",
    "minimal server forwarding that POST as the floor any server on this SDK pays (the SDK's stdio transport, JSON-RPC",
    "dispatch and validation); `curl -o` on the same URL for downloads; the bare schemas / `structuredContent` for",
    "sizes. The fake runs in its own process (`bench/fake_host.py`). Timings on a shared machine are noisy: compare",
    "ratios, not absolute values, and rerun before drawing conclusions from a small difference.",
]


def render(rows: Sequence[Row], command: str, seconds: float, load: tuple[str, str]) -> str:
    marks = {True: "yes", False: "**no**", None: "—"}
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {seconds:.0f} s.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, mcp {version('mcp')}, httpx2 {version('httpx2')}. "
        f"Load average before/after: {load[0]} / {load[1]}.",
        "",
        "| row | figure | baseline | ratio | goal | met | how measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row.name, row.figure, row.baseline, row.ratio, row.goal, marks[row.met], row.how]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join([*lines, "", *NOTES]) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few iterations of each part (a smoke run)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the table (markdown)")
    parser.add_argument("--download-mb", type=int, help="size of the downloaded video in MiB")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    plan = QUICK if args.quick else FULL
    download_mb = args.download_mb or plan.download_mb
    command = "python -m bench.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()

    started, load_before = time.perf_counter(), _load()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="emo-bench-") as tmp:
        work = Path(tmp)
        if "cold" in parts:
            rows += cold_start.measure(plan.cold_rounds, work / "cold", warmup=not args.quick)
        if "call" in parts:
            rows += per_call.measure(plan.call_rounds, work / "call", warmup=2 if args.quick else per_call.WARMUP)
        if "download" in parts:
            rows += download.measure(plan.download_rounds, work / "download", download_mb * MB)
        if "size" in parts:
            rows += sizes.measure(work / "size")
    table = render(rows, command, time.perf_counter() - started, (load_before, _load()))
    sys.stdout.write(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
