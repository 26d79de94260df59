"""Cold start: spawn → `initialize` + `tools/list` answered over stdio.

The project's server (`python -m server`) against `bench.minimal_server` (same SDK, one tool),
spawned alternately so drift on a shared machine hits both alike; one untimed spawn of each first
so both start from a warm page cache and compiled bytecode.

`python -m bench.cold_start --against REV` compares this tree with an earlier revision instead
(checked out in a temporary git worktree, spawned alternately the same way): a restructuring such
as the package layout must not make start-up slower.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
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


def versus_revision(revision: str, rounds: int, workdir: Path) -> tuple[list[float], list[float]]:
    """Cold starts of this tree and of `revision`, alternated; both spawn `python -m server`."""
    old_tree = workdir / "old-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), revision], check=True)
    try:
        upstream = "http://127.0.0.1:9/api/v1"
        ours_env = server_env(workdir / "ours", upstream)
        old_env = {**server_env(workdir / "old", upstream), "PYTHONPATH": str(old_tree)}
        ours: list[float] = []
        old: list[float] = []
        spawn_to_tools(SERVER_COMMAND, ours_env, ROOT)
        spawn_to_tools(SERVER_COMMAND, old_env, old_tree)
        for index in range(rounds):
            pair = [(ours_env, ROOT, ours), (old_env, old_tree, old)]
            for env, cwd, into in pair if index % 2 == 0 else reversed(pair):
                into.append(spawn_to_tools(SERVER_COMMAND, env, cwd))
        return ours, old
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, metavar="REV", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--output", type=Path, help="also write the result (markdown) to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="emo-cold-") as tmp:
        ours, old = versus_revision(args.against, args.rounds, Path(tmp))
    ratio = median(ours) / median(old)
    text = (
        f"# Cold start against {args.against}\n\n"
        f"`python -m bench.cold_start --against {args.against} --rounds {args.rounds}`: spawn → initialize + "
        "tools/list over stdio, both trees spawned alternately.\n\n"
        "| tree | median | min | max |\n|---|---|---|---|\n"
        f"| this tree | {ms(median(ours))} | {ms(min(ours))} | {ms(max(ours))} |\n"
        f"| {args.against} | {ms(median(old))} | {ms(min(old))} | {ms(max(old))} |\n\n"
        f"Ratio (this tree / {args.against}): **{ratio:.3f}×** over {args.rounds} rounds each.\n"
    )
    sys.stdout.write(text)
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
