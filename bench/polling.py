"""Polling efficiency on a simulated account: `fixed` against `adaptive`, and against the physical limit.

The account (`server.sandbox.account.SimulatedAccount`) runs one task per model at a time, each for
(audio seconds × rate) with ±10% noise, as DashScope does. Thirty EMO tasks of mixed audio lengths
(local WAV files, so the server measures them) are submitted together; the server then follows them
on its own. Per schedule: upstream queries per task, and the time from the moment a task SUCCEEDED
at the account to its video on disk (median and p90). The physical limit is one query per task and
no delay. Both schedules run at the same base interval, one after the other, against fresh accounts.

    python -m bench.polling                 # 30 tasks, base interval 2 s (about 3 minutes)
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
import wave
from collections.abc import Sequence
from pathlib import Path

from bench.common import BENCH_KEY, ROOT, SERVER_COMMAND, percentile, publish, server_env, stdio_session
from server.sandbox.account import SimulatedAccount
from server.sandbox.sample_media import portrait_png

RESULTS = ROOT / "bench" / "POLLING.md"


def _wav(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(8000)
        out.writeframes(bytes([128]) * int(seconds * 8000))
    return path


def _lengths(count: int) -> list[float]:
    """Mixed audio lengths, 1.0 to 6.0 s, in a fixed shuffled order (same for both schedules)."""
    return [1.0 + (index * 7 % count) * 5.0 / max(1, count - 1) for index in range(count)]


def run(schedule: str, count: int, interval: float, rate: float, work: Path) -> dict[str, float]:
    media = work / "media"
    media.mkdir(parents=True)
    portrait = media / "face.png"
    portrait.write_bytes(portrait_png([350, 300, 650, 620], (1000, 1200)))
    audios = [_wav(media / f"speech-{index:02d}.wav", seconds) for index, seconds in enumerate(_lengths(count))]
    account = SimulatedAccount(api_key=BENCH_KEY, rate=rate, noise=0.1, seed=7)
    output = work / "output"
    with account.serve_in_thread() as base_url:
        env = server_env(output, base_url, poll_interval=interval)
        env.update({"EMO_MCP_POLL_SCHEDULE": schedule, "EMO_MCP_ALLOWED_ROOTS": str(media)})
        with stdio_session(SERVER_COMMAND, env, work) as session:
            session.initialize()
            found = session.call_tool("emo_detect", {"image_url": portrait.as_uri()})["structuredContent"]
            boxes = {"face_bbox": found["face_bbox"], "ext_bbox": found["ext_bbox"]}
            task_ids = [
                session.call_tool(
                    "emo_generate", {"image_url": portrait.as_uri(), "audio_url": audio.as_uri(), **boxes}
                )["structuredContent"]["task_id"]
                for audio in audios
            ]
            deadline = time.time() + 60 + count * 6.0 * rate * 3
            videos: dict[str, Path] = {}
            while len(videos) < count and time.time() < deadline:
                time.sleep(0.2)
                videos = _videos(output, task_ids)
            if len(videos) < count:
                raise RuntimeError(f"{schedule}: only {len(videos)} of {count} videos arrived")
    queries = [len(account.queries(task_id)) for task_id in task_ids]
    delays = []
    for task_id in task_ids:
        end = account.tasks[task_id].end_wall
        assert end is not None
        delays.append(os.stat(videos[task_id]).st_mtime - end)
    return {
        "queries per task": statistics.mean(queries),
        "median s to disk": statistics.median(delays),
        "p90 s to disk": percentile(delays, 0.9),
        "total queries": float(sum(queries)),
    }


def _videos(output: Path, task_ids: Sequence[str]) -> dict[str, Path]:
    ledger = output / "ledger.sqlite3"
    if not ledger.is_file():
        return {}
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        marks = ",".join("?" * len(task_ids))
        rows = db.execute(
            f"SELECT task_id, video_path FROM tasks WHERE video_path IS NOT NULL AND task_id IN ({marks})",  # noqa: S608
            tuple(task_ids),
        ).fetchall()
    return {str(task_id): Path(path) for task_id, path in rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0, help="EMO_MCP_POLL_INTERVAL of both runs")
    parser.add_argument("--rate", type=float, default=0.5, help="processing seconds per audio second")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="emo-polling-") as tmp:
        for schedule in ("fixed", "adaptive"):
            results[schedule] = run(schedule, args.tasks, args.interval, args.rate, Path(tmp) / schedule)
    fixed, adaptive = results["fixed"], results["adaptive"]
    q_ratio = adaptive["queries per task"] / fixed["queries per task"]
    d_ratio = adaptive["median s to disk"] / fixed["median s to disk"]
    lines = [
        "# Polling efficiency on a simulated account",
        "",
        f"`python -m bench.polling --tasks {args.tasks} --interval {args.interval:g} --rate {args.rate:g}`: "
        f"{args.tasks} EMO tasks of 1–6 s audio submitted together to an account that runs one at a time "
        f"({args.rate:g} s of processing per audio second, ±10% noise); base interval {args.interval:g} s for both.",
        "",
        "| schedule | queries per task | median SUCCEEDED → on disk | p90 | total queries |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['queries per task']:.2f} | {row['median s to disk']:.2f} s | "
            f"{row['p90 s to disk']:.2f} s | {row['total queries']:.0f} |"
        )
    lines += [
        "| physical limit | 1.00 | 0.00 s | 0.00 s | " + str(args.tasks) + " |",
        "",
        f"Adaptive / fixed: queries **{q_ratio:.2f}×** (goal ≤ 0.5×), median time to disk **{d_ratio:.2f}×** "
        "(goal ≤ 0.25×).",
        "",
    ]
    publish(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
