"""Download: a large result streamed from the loopback fake to disk by the server, against `curl`.

The fake runs in its own process serving `size` bytes per video and finishes a task on its first
query. Each round submits one EMO task; the server's background watcher queries it, sees SUCCEEDED
and downloads the video while `task_status` waits. The transfer time is the one the server records
in `video.json` (GET to rename); `curl` then fetches the same URL to disk with the server idle. The
server's peak RSS growth over the round is read from /proc: VmHWM is reset first (`clear_refs` 5)
and VmRSS is also sampled every few ms, so either way the peak is seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path

from bench.common import (
    PORTRAIT,
    ROOT,
    SERVER_COMMAND,
    SPEECH,
    Row,
    StdioSession,
    fake_process,
    median,
    now,
    server_env,
    stdio_session,
)
from server.media.sources import file_sha256

MB = 1024 * 1024
RSS_GOAL_MB = 16.0
THROUGHPUT_GOAL = 0.8


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/{pid}/status")


class PeakRss:
    """Peak resident set of `pid` while the block runs, in KiB above its size at the start."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self.pid = pid
        self.interval = interval
        self.start_kb = 0
        self.peak_kb = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))

    def __enter__(self) -> PeakRss:
        try:  # "5" resets VmHWM to the current RSS (Linux ≥ 4.0); needs to own the process or be root.
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start_kb = self.peak_kb = _status_kb(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
        if self.hwm_reset:
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmHWM"))

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.start_kb) / 1024


def _submit(session: StdioSession) -> str:
    detected = session.call_tool("emo_detect", {"image_url": PORTRAIT, "ratio": "1:1"})["structuredContent"]
    submitted = session.call_tool(
        "emo_generate",
        {
            "image_url": PORTRAIT,
            "audio_url": SPEECH,
            "face_bbox": detected["face_bbox"],
            "ext_bbox": detected["ext_bbox"],
            # Every round submits the same request: without this the server (rightly) returns the
            # first round's task instead of billing a new one.
            "allow_duplicate": True,
        },
    )
    return str(submitted["structuredContent"]["task_id"])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _curl(url: str, destination: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `curl -o` fetching `url`."""
    started = now()
    process = subprocess.Popen(["curl", "--silent", "--show-error", "--fail", "--output", str(destination), url])
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = now() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"curl failed with exit code {process.returncode}")
    destination.unlink()
    return elapsed, usage.ru_utime + usage.ru_stime


def _record(measured: tuple[float, float], times: list[float], cpu: list[float]) -> None:
    times.append(measured[0])
    cpu.append(measured[1])


def measure(rounds: int, workdir: Path, size: int) -> list[Row]:
    have_curl = shutil.which("curl") is not None  # without it the throughput rows say so instead of failing
    output = workdir / "output"
    server_times: list[float] = []
    curl_times: list[float] = []
    growth: list[float] = []
    server_cpu: list[float] = []
    curl_cpu: list[float] = []
    with (
        fake_process(video_size=size) as base_url,
        stdio_session(SERVER_COMMAND, server_env(output, base_url), ROOT) as session,
    ):
        session.initialize()
        for _ in range(rounds):
            # The server's background watcher downloads the video as soon as the task succeeds (the fake
            # finishes it on the first query); task_status waits for that. The transfer's own time is the
            # one the server records in video.json (request to rename), so nothing else runs during
            # either transfer: curl goes after, with the server idle.
            with PeakRss(session.pid) as rss:
                cpu = _cpu_seconds(session.pid)
                task_id = _submit(session)
                status = session.call_tool("task_status", {"task_id": task_id, "wait_seconds": 30})
                server_cpu.append(_cpu_seconds(session.pid) - cpu)
            growth.append(rss.growth_mb)
            result = status["structuredContent"]
            video = Path(result["video_path"])
            if result["video_bytes"] != size or file_sha256(video) != result["video_sha256"]:
                raise RuntimeError(f"the downloaded video of {task_id} is wrong: {result}")
            record = json.loads((video.parent / "video.json").read_text(encoding="utf-8"))
            server_times.append(float(record["seconds"]))
            if have_curl:
                _record(_curl(str(result["video_url"]), workdir / "curl.mp4"), curl_times, curl_cpu)
    if not have_curl:
        curl_times, curl_cpu = [math.nan], [math.nan]
    throughput = median(curl_times) / median(server_times)  # same bytes, so the time ratio is the rate ratio
    mb = size / MB
    how = f"{rounds} round(s), {mb:.0f} MB each, curl after each server download; fake in its own process"
    return [
        Row(
            name=f"Download {mb:.0f} MB: server peak RSS growth",
            figure=f"{max(growth):.1f} MB",
            baseline=f"{mb:.0f} MB (the video)",
            ratio=f"{max(growth) / mb:.3f}×",
            goal=f"≤ {RSS_GOAL_MB:.0f} MB",
            met=max(growth) <= RSS_GOAL_MB,
            how=how + "; /proc VmHWM (reset by clear_refs) and VmRSS sampled every 2 ms; worst round",
        ),
        Row(
            name=f"Download {mb:.0f} MB: throughput (server transfer)",
            figure=f"{mb / median(server_times):.0f} MB/s",
            baseline=f"{mb / median(curl_times):.0f} MB/s (curl to disk)" if have_curl else "curl not installed",
            ratio=f"{throughput:.2f}×",
            goal=f"≥ {THROUGHPUT_GOAL:.1f}×",
            met=throughput >= THROUGHPUT_GOAL if have_curl else None,
            how=how + "; the server's own transfer time from video.json (GET to rename: stream, sha256 while "
            "streaming, Content-Length check, fsync) vs `curl -o` right after, server idle",
        ),
        Row(
            name=f"Download {mb:.0f} MB: CPU time per MB",
            figure=f"{median(server_cpu) * 1000 / mb:.2f} ms/MB",
            baseline=f"{median(curl_cpu) * 1000 / mb:.2f} ms/MB (curl)" if have_curl else "curl not installed",
            ratio=f"{median(server_cpu) / max(median(curl_cpu), 1e-9):.1f}×",
            goal="reported",
            met=None,
            how="utime+stime of the server (/proc/<pid>/stat) from detect to settled (one detect, one submit, "
            "polls, download) vs curl's rusage; less load-sensitive",
        ),
    ]
