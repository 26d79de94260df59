"""Cold start: spawn → `initialize` + `tools/list` answered over stdio.

The project's server (`python -m server`) against `bench.minimal_server` (same SDK, one tool),
spawned alternately so drift on a shared machine hits both alike; one untimed spawn of each first
so both start from a warm page cache and compiled bytecode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    MINIMAL_COMMAND,
    ROOT,
    SERVER_COMMAND,
    Row,
    child_env,
    median,
    ms,
    now,
    server_env,
    stdio_session,
)

GOAL = 1.15


def spawn_to_tools(command: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from spawn until the `tools/list` answer has arrived."""
    started = now()
    with stdio_session(command, env, cwd) as session:
        session.initialize()
        tools = session.request("tools/list", {})
        elapsed = now() - started
    if not tools.get("tools"):
        raise RuntimeError(f"{command} listed no tools")
    return elapsed


def measure(rounds: int, workdir: Path, warmup: bool = True) -> list[Row]:
    # The upstream is never contacted by initialize/tools/list; a closed loopback port keeps it so.
    ours_env = server_env(workdir / "output", "http://127.0.0.1:9/api/v1")
    base_env = child_env()
    ours: list[float] = []
    base: list[float] = []
    if warmup:
        spawn_to_tools(SERVER_COMMAND, ours_env, ROOT)
        spawn_to_tools(MINIMAL_COMMAND, base_env, ROOT)
    for index in range(rounds):
        pair = [(SERVER_COMMAND, ours_env, ours), (MINIMAL_COMMAND, base_env, base)]
        for command, env, into in pair if index % 2 == 0 else reversed(pair):
            into.append(spawn_to_tools(command, env, ROOT))
    ratio = median(ours) / median(base)
    return [
        Row(
            name="Cold start (spawn → initialize + tools/list)",
            figure=ms(median(ours)),
            baseline=ms(median(base)) + " (minimal MCPServer, 1 tool)",
            ratio=f"{ratio:.2f}×",
            goal=f"≤ {GOAL:.2f}×",
            met=ratio <= GOAL,
            how=f"median of {rounds} alternated spawns of `python -m server` vs `python -m bench.minimal_server`",
        )
    ]
