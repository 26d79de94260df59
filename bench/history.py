"""Growth with history: the same server on an empty ledger and on a long one, side by side.

The history is built through the project's own storage API (`Ledger`, `Evidence`), as months of
use would leave it: detections with their evidence folders, finished tasks with their evidence,
spend estimates and (small) videos, and open tasks that the fake DashScope knows as RUNNING and
never finishes. Then, against each history in turn: cold start (spawn → tools/list) and peak RSS,
per-call times of `task_status` on a finished task, an `emo_generate` dry run after a detect,
`tasks://recent` and `spend://today`; and, with the open tasks, the server's CPU while idle and how
many open tasks were never queried within a window.

    python -m bench.history                      # 100,000 / 100,000 / 2,000 (about 10 minutes)
    python -m bench.history --scale 0.05         # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BENCH_KEY, PORTRAIT, ROOT, SERVER_COMMAND, SPEECH, publish, server_env, stdio_session
from server.sandbox.fake_dashscope import EMO_MODEL, FakeDashScope, FakeTask
from server.store.evidence import Evidence
from server.store.ledger import Ledger
from server.store.spend import record_estimate

RESULTS = ROOT / "bench" / "HISTORY.md"
SMALL = 50
VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 1000


@dataclass(frozen=True)
class Size:
    detections: int
    finished: int
    open: int


def build_history(output_dir: Path, size: Size, fake: FakeDashScope) -> str:
    """Fill `output_dir` through the storage API; returns the id of one finished task."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(output_dir)
    evidence = Evidence(output_dir, BENCH_KEY)
    sample = ""
    try:
        for index in range(size.detections):
            folder = evidence.new_detection_dir("emo")
            image = f"https://images.example.com/history/{index}.jpg"
            evidence.write_json(folder / "request.json", {"model": "emo-detect-v1", "input": {"image_url": image}})
            evidence.write_json(folder / "response.json", {"output": {"check_pass": True}})
            ledger.add_detection(
                family="emo",
                model="emo-detect-v1",
                image_url=image,
                ratio="1:1",
                check_pass=True,
                face_bbox=[10, 10, 100, 100],
                ext_bbox=[0, 0, 200, 200],
                code=None,
                message=None,
                request_id=str(uuid.uuid4()),
                evidence_dir=str(folder),
            )
        for index in range(size.finished):
            task_id = str(uuid.uuid4())
            sample = sample or task_id
            folder = evidence.task_dir("emo", task_id)
            payload = {"model": EMO_MODEL, "input": {"image_url": f"https://images.example.com/history/{index}.jpg"}}
            evidence.write_json(folder / "request.json", payload)
            ledger.add_task(
                task_id=task_id,
                family="emo",
                model=EMO_MODEL,
                payload=payload,
                ratio="1:1",
                status="SUCCEEDED",
                request_id=None,
                evidence_dir=str(folder),
                fingerprint=hashlib.sha256(task_id.encode()).hexdigest(),
            )
            video = folder / f"{task_id}.mp4"
            video.write_bytes(VIDEO)
            evidence.write_json(folder / "result.json", {"output": {"task_status": "SUCCEEDED"}})
            ledger.update_task(
                task_id,
                video_url="https://oss.example.com/gone.mp4",
                video_path=str(video),
                video_sha256=hashlib.sha256(VIDEO).hexdigest(),
                video_bytes=len(VIDEO),
                usage={"video_duration": 5.0, "video_ratio": "1:1"},
                end_time="2026-11-01 10:00:00.000",
                polls=3,
            )
            record_estimate(ledger, task_id, "emo", 0.4, "5.0 s of audio at 0.08 CNY/s")
        for index in range(size.open):
            task_id = str(uuid.uuid4())
            # As the account runs them: one at a time, the rest queued behind it.
            fake.tasks[task_id] = FakeTask(
                task_id=task_id,
                model=EMO_MODEL,
                status="RUNNING" if index == 0 else "PENDING",
                input={"image_url": PORTRAIT, "audio_url": SPEECH},
                parameters=None,
                submitted_at=time.monotonic(),
                submit_wall=time.time(),
                request_id=str(uuid.uuid4()),
                scheduled_wall=time.time() if index == 0 else None,
            )
            folder = evidence.task_dir("emo", task_id)
            ledger.add_task(
                task_id=task_id,
                family="emo",
                model=EMO_MODEL,
                payload={"model": EMO_MODEL},
                ratio="1:1",
                status="RUNNING" if index == 0 else "PENDING",
                request_id=None,
                evidence_dir=str(folder),
                fingerprint=hashlib.sha256(task_id.encode()).hexdigest(),
            )
            # Followed before, as an open task of a real history is: its first answer is on record.
            status = "RUNNING" if index == 0 else "PENDING"
            evidence.write_poll(folder, 1, status, {"output": {"task_id": task_id, "task_status": status}})
            ledger.update_task(task_id, polls=1)
        # Months of use, not one afternoon: the finished history spread over the 100 days before today.
        ledger.execute(
            "UPDATE tasks SET created_at = created_at - (1 + rowid % 100) * 86400.0 WHERE status = 'SUCCEEDED'"
        )
        ledger.execute("UPDATE detections SET created_at = created_at - (1 + id % 100) * 86400.0")
    finally:
        ledger.close()
    return sample


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_start(env: dict[str, str], rounds: int) -> tuple[float, float]:
    """Median seconds spawn → tools/list answered, and the largest peak RSS seen (MB)."""
    times: list[float] = []
    peak = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        with stdio_session(SERVER_COMMAND, env, ROOT) as session:
            session.initialize()
            session.request("tools/list", {})
            times.append(time.perf_counter() - started)
            peak = max(peak, _rss_peak_mb(session.pid))
    return statistics.median(times), peak


def per_call(env: dict[str, str], finished_id: str, rounds: int) -> dict[str, float]:
    """Median milliseconds of each call, in one session (after one untimed call of each)."""
    timings: dict[str, list[float]] = {}
    with stdio_session(SERVER_COMMAND, env, ROOT) as session:
        session.initialize()
        detection = session.call_tool("emo_detect", {"image_url": PORTRAIT})["structuredContent"]
        dry = {
            "image_url": PORTRAIT,
            "audio_url": SPEECH,
            "face_bbox": detection["face_bbox"],
            "ext_bbox": detection["ext_bbox"],
            "dry_run": True,
        }
        calls: dict[str, tuple[str, dict[str, Any]]] = {
            "task_status (finished)": ("tools/call", {"name": "task_status", "arguments": {"task_id": finished_id}}),
            "emo_generate dry run": ("tools/call", {"name": "emo_generate", "arguments": dry}),
            "tasks://recent": ("resources/read", {"uri": "tasks://recent"}),
            "spend://today": ("resources/read", {"uri": "spend://today"}),
        }
        for index in range(rounds + 1):
            for name, (method, params) in calls.items():
                started = time.perf_counter()
                session.request(method, params)
                if index:
                    timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in timings.items()}


def idle(env: dict[str, str], fake: FakeDashScope, open_ids: Sequence[str], window: float) -> tuple[float, int]:
    """Share of one core the server used over `window` seconds, and open tasks never queried in it."""
    before = {task_id: fake.tasks[task_id].query_count for task_id in open_ids}
    with stdio_session(SERVER_COMMAND, env, ROOT) as session:
        session.initialize()
        cpu0, wall0 = _cpu_seconds(session.pid), time.perf_counter()
        time.sleep(window)
        share = (_cpu_seconds(session.pid) - cpu0) / (time.perf_counter() - wall0)
    never = sum(1 for task_id in open_ids if fake.tasks[task_id].query_count == before[task_id])
    return share, never


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 100,000 / 100,000 / 2,000")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls of each kind")
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=115.0, help="seconds of the idle window")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = Size(int(100_000 * args.scale), int(100_000 * args.scale), max(1, int(2_000 * args.scale)))
    fake = FakeDashScope(api_key=BENCH_KEY, auto_progress=False)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="emo-history-") as tmp, fake.serve_in_thread() as base_url:
        work = Path(tmp)
        built: dict[str, tuple[Path, str, float]] = {}
        # The baseline holds enough to fill every answer (tasks://recent lists 20): each call returns
        # the same amount in both runs, so a ratio measures the history, not the size of an answer.
        for label, history in (("empty", Size(SMALL, SMALL, 0)), ("full", size)):
            started = time.perf_counter()
            known = set(fake.tasks)
            sample = build_history(work / label, history, fake)
            built[label] = (work / label, sample, time.perf_counter() - started)
            if label == "full":
                open_ids = sorted(set(fake.tasks) - known)
        for label, (folder, sample, _) in built.items():
            env = server_env(folder, base_url, poll_interval=None)
            seconds, peak = cold_start(env, args.cold_rounds)
            rows[label] = {"cold start (s)": seconds, "peak RSS at start (MB)": peak}
            rows[label].update(per_call(env, sample, args.rounds))
        share, never = idle(server_env(built["full"][0], base_url, poll_interval=None), fake, open_ids, args.window)
    lines = [
        "# Growth with history",
        "",
        f"`python -m bench.history --scale {args.scale:g}`: history of {size.detections:,} detections, "
        f"{size.finished:,} finished tasks (evidence, spend estimates and videos) and {size.open:,} open tasks, "
        f"built through `Ledger`/`Evidence` in {built['full'][2]:.0f} s; the small history holds {SMALL} of each. "
        f"Per-call figures are medians of {args.rounds} calls in one stdio session; cold start the median of "
        f"{args.cold_rounds} spawns.",
        "",
        "| figure | small history | full history | ratio |",
        "|---|---|---|---|",
    ]
    for name in rows["empty"]:
        empty, full = rows["empty"][name], rows["full"][name]
        unit = "" if name.endswith(("(s)", "(MB)")) else " ms"
        lines.append(f"| {name} | {empty:.2f}{unit} | {full:.2f}{unit} | {full / empty:.2f}× |")
    lines += [
        f"| idle CPU with {size.open:,} open tasks (default 15 s interval), share of one core | – | "
        f"{share * 100:.1f}% | |",
        f"| open tasks never queried in {args.window:.0f} s | – | {never:,} of {size.open:,} | |",
        "",
    ]
    publish(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
