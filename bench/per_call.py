"""Per-call overhead: `emo_detect` through the server over stdio against the same HTTP call made directly.

The fake runs in its own process (`bench.fake_host`). Timed in interleaved rounds (the order
rotates every round): the project's server over stdio, a direct `httpx2` POST of the same body to
the same fake (the baseline), `bench.minimal_server --proxy` (the same SDK forwarding the same POST:
the floor any server on this SDK pays) and, where /dev/shm exists, a second server whose OUTPUT_DIR
is in RAM (so the difference is what the evidence and ledger writes cost on the disk, in place).
The writes are also timed on their own, in process, with the data one detection writes.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2

from bench.common import (
    BENCH_KEY,
    MINIMAL_COMMAND,
    PORTRAIT,
    RAW_COMMAND,
    ROOT,
    SERVER_COMMAND,
    Row,
    child_env,
    fake_process,
    median,
    now,
    percentile,
    server_env,
    stdio_session,
)
from server.store.evidence import Evidence, encode
from server.store.ledger import Ledger
from server.upstream.client import DETECT_PATH

GOAL_MS = 1.0
# What this server may add beyond the SDK floor (a minimal MCPServer forwarding the same POST): issue 13.
FLOOR_GOAL_MS = 0.5
# What the ledger and evidence writes may take of that budget: a quarter each.
WRITE_SHARE_MS = 0.25
WARMUP = 20
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


ROUND_PERIOD = 0.25  # one call per server per round: 4/s, under the 5/s detect limit


def _fmt(value: float) -> str:
    return f"{value * 1000:.3f} ms"


def _memory_dir() -> Path | None:
    """A RAM-backed folder (tmpfs), to run a second server whose writes cost no disk time."""
    shm = Path("/dev/shm")  # noqa: S108 (only probed; the folder inside comes from tempfile)
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def measure_calls(rounds: int, workdir: Path, warmup: int = WARMUP) -> dict[str, list[float]]:
    """Seconds per call for: our server, the direct POST, the SDK floor, and our server on tmpfs."""
    arguments = {"image_url": PORTRAIT, "ratio": "1:1"}
    payload = {"model": "emo-detect-v1", "input": {"image_url": PORTRAIT}, "parameters": {"ratio": "1:1"}}
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    with ExitStack() as stack:
        base_url = stack.enter_context(fake_process())
        # TCP_NODELAY as anyio sets it for the server's async client: otherwise Nagle delays the body.
        transport = httpx2.HTTPTransport(socket_options=NODELAY)
        http = stack.enter_context(httpx2.Client(timeout=30.0, transport=transport))
        ours = stack.enter_context(
            stdio_session(SERVER_COMMAND, server_env(workdir / "output", base_url, poll_interval=None), ROOT)
        )
        proxy = [*MINIMAL_COMMAND, "--proxy", base_url, "--api-key", BENCH_KEY]
        floor = stack.enter_context(stdio_session(proxy, child_env(), ROOT))

        def direct() -> None:
            response = http.post(base_url + DETECT_PATH, json=payload, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"direct detect failed: {response.status_code} {response.text[:200]}")

        dispatch = stack.enter_context(stdio_session([*MINIMAL_COMMAND, "--dispatch"], child_env(), ROOT))
        raw = stack.enter_context(stdio_session(RAW_COMMAND, child_env(), ROOT))
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("server", lambda: ours.call_tool("emo_detect", arguments)),
            ("direct", direct),
            ("sdk", lambda: floor.call_tool("emo_detect", arguments)),
            ("dispatch", lambda: dispatch.call_tool("emo_detect", arguments)),
            ("raw", lambda: raw.call_tool("emo_detect", arguments)),
        ]
        memory = _memory_dir()
        if memory is not None:
            ram = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emo-bench-", dir=memory)))
            in_ram = stack.enter_context(
                stdio_session(SERVER_COMMAND, server_env(ram, base_url, poll_interval=None), ROOT)
            )
            calls.append(("tmpfs", lambda: in_ram.call_tool("emo_detect", arguments)))
        for session in (ours, floor, dispatch, *([in_ram] if memory is not None else [])):
            session.initialize()
        times: dict[str, list[float]] = {name: [] for name, _ in calls}
        for _ in range(warmup):
            round_started = now()
            for _, call in calls:
                call()
            _pace(round_started)
        for index in range(rounds):
            shift = index % len(calls)
            round_started = now()
            for name, call in calls[shift:] + calls[:shift]:
                started = now()
                call()
                times[name].append(now() - started)
            _pace(round_started)
    return times


def _pace(round_started: float) -> None:
    """Keep each server under its emo-detect-v1 limit (5/s, server/upstream/limits.py), so the figure is overhead,
    not the rate limiter doing its job."""
    time.sleep(max(0.0, ROUND_PERIOD - (now() - round_started)))


def measure_writes(rounds: int, workdir: Path, warmup: int = WARMUP) -> dict[str, list[float]]:
    """What one emo_detect writes: a detection folder with request.json and response.json, one ledger row."""
    request = {"model": "emo-detect-v1", "input": {"image_url": PORTRAIT}, "parameters": {"ratio": "1:1"}}
    response = {
        "output": {"check_pass": True, "face_bbox": [302, 280, 601, 610], "ext_bbox": [50, 30, 875, 855]},
        "usage": {"image_count": 1},
        "request_id": "9a1c1c66-9b3f-4b1e-9f0e-1c2d3e4f5a6b",
    }
    times: dict[str, list[float]] = {"evidence": [], "ledger": []}
    workdir.mkdir(parents=True, exist_ok=True)
    # The same file system as the server's OUTPUT_DIR in `measure_calls`.
    with tempfile.TemporaryDirectory(prefix="writes-", dir=workdir) as tmp:
        evidence = Evidence(Path(tmp), BENCH_KEY)
        ledger = Ledger(Path(tmp))
        try:
            for _ in range(rounds + warmup):
                started = now()
                # What a detection writes, made here without a spare (spares are made on an event loop):
                # the folder, request.json and an empty response.json (made while the request is in
                # flight), then the answer filled in.
                opened = evidence.open_detection("emo", {"request.json": encode(request)}, "response.json")
                opened.fill(response)
                folder = opened.folder
                middle = now()
                ledger.add_detection(
                    family="emo",
                    model="emo-detect-v1",
                    image_url=PORTRAIT,
                    ratio="1:1",
                    check_pass=True,
                    face_bbox=[302, 280, 601, 610],
                    ext_bbox=[50, 30, 875, 855],
                    code=None,
                    message=None,
                    request_id=str(response["request_id"]),
                    evidence_dir=str(folder),
                )
                ended = now()
                times["evidence"].append(middle - started)
                times["ledger"].append(ended - middle)
        finally:
            ledger.close()
    return {name: values[warmup:] for name, values in times.items()}


def _reported(
    name: str, values: list[float], baseline: list[float], label: str, how: str, *, goal: str = "reported"
) -> Row:
    """A median against a baseline's median, with what it adds, and no goal of its own."""
    return Row(
        name=name,
        figure=f"{_fmt(median(values))} (+{_fmt(median(values) - median(baseline))})",
        baseline=_fmt(median(baseline)) + label,
        ratio=f"{median(values) / median(baseline):.2f}×",
        goal=goal,
        met=None,
        how=how,
    )


def measure(rounds: int, workdir: Path, warmup: int = WARMUP) -> list[Row]:
    calls = measure_calls(rounds, workdir, warmup)
    writes = measure_writes(rounds, workdir, warmup)
    server, direct, sdk = calls["server"], calls["direct"], calls["sdk"]
    dispatch, raw = calls["dispatch"], calls["raw"]
    added = median(server) - median(direct)
    added_p90 = percentile(server, 0.9) - percentile(direct, 0.9)
    how = (
        f"{rounds} interleaved rounds after {warmup} warm-up; fake in its own process; raw JSON-RPC client; "
        "the server with its default settings (no task open, so the watcher is idle)"
    )
    direct_label = " (direct httpx2 POST)"
    rows = [
        Row(
            name="Per-call overhead, median (emo_detect over stdio)",
            figure=f"{_fmt(median(server))} (+{_fmt(added)})",
            baseline=_fmt(median(direct)) + direct_label,
            ratio=f"{median(server) / median(direct):.2f}×",
            goal=f"≤ +{GOAL_MS:.1f} ms",
            met=added * 1000 <= GOAL_MS,
            how=how,
        ),
        Row(
            name="Per-call overhead, p90",
            figure=f"{_fmt(percentile(server, 0.9))} (+{_fmt(added_p90)})",
            baseline=_fmt(percentile(direct, 0.9)) + direct_label,
            ratio=f"{percentile(server, 0.9) / percentile(direct, 0.9):.2f}×",
            goal="reported",
            met=None,
            how="same runs as the median row (nearest-rank p90)",
        ),
        Row(
            name="Per-call beyond the SDK floor, median (emo_detect over stdio)",
            figure=f"+{_fmt(median(server) - median(sdk))}",
            baseline=_fmt(median(sdk)) + " (minimal MCPServer forwarding the same POST)",
            ratio=f"{median(server) / median(sdk):.2f}×",
            goal=f"≤ +{FLOOR_GOAL_MS:.1f} ms",
            met=(median(server) - median(sdk)) * 1000 <= FLOOR_GOAL_MS,
            how="same rounds: this server's median minus the SDK floor's (the row below)",
        ),
        _reported(
            "SDK floor: minimal MCPServer forwarding the same POST",
            sdk,
            direct,
            direct_label,
            "`python -m bench.minimal_server --proxy` (the SDK's own stdio transport, async httpx2), same rounds",
            goal="reported (not ours)",
        ),
        _reported(
            "SDK dispatch alone: no-op async tool on this project's pipe transport",
            dispatch,
            raw,
            " (raw JSON-RPC echo process)",
            "`python -m bench.minimal_server --dispatch` vs `python -m bench.raw_echo`, same rounds: what the "
            "SDK's JSON-RPC dispatch, validation and serialization cost a call before any work is done",
            goal="reported (not ours)",
        ),
    ]
    if "tmpfs" in calls:
        ram = calls["tmpfs"]
        rows.append(
            _reported(
                "Per-call, same server with OUTPUT_DIR on tmpfs",
                ram,
                direct,
                direct_label,
                "a second server, same rounds, evidence and ledger in RAM: the median row minus this "
                f"({_fmt(median(server) - median(ram))}) is what the writes cost on this disk, in place",
            )
        )
    for name, label in (("evidence", "Evidence writes per detection"), ("ledger", "Ledger row per detection")):
        values = writes[name]
        rows.append(
            Row(
                name=label,
                figure=f"{_fmt(median(values))} (p90 {_fmt(percentile(values, 0.9))})",
                baseline=f"{GOAL_MS:.1f} ms budget",
                ratio=f"{median(values) / (GOAL_MS / 1000):.2f}×",
                goal=f"≤ {WRITE_SHARE_MS:.2f} ms",
                met=median(values) * 1000 <= WRITE_SHARE_MS,
                how=(
                    "in process, median of "
                    f"{rounds}: "
                    + (
                        "new detect folder + request.json + response.json (atomic writes; no spare folder, "
                        "so the worst case: on the server most of it is made while the request is in flight)"
                        if name == "evidence"
                        else "one `add_detection` transaction (WAL, synchronous=NORMAL)"
                    )
                ),
            )
        )
    return rows
