"""Figure 1 of bench/cluster.py side by side: this checkout's workers against a baseline checkout's.

The engine's cost per query is what bounds figure 1 at 500 open tasks on a small host (the workers,
PostgreSQL and the fake share its CPUs), and a host's speed drifts by a factor of two within a day
on a shared VM. So a change is judged by rounds that alternate between the two server builds on the
same host, the same fake and the same harness (`bench.cluster`'s `measure_polling`), never by
figures taken on different days. Reported per build: upstream queries per second in all (and per
task per interval), duplicate polls, and what each query costs: ledger transactions and rows read
(PostgreSQL's `pg_stat_database`), and the CPUs the workers and the database used.

    git worktree add ../baseline <commit>          # the build to compare against
    python -m bench.polling_ab --baseline ../baseline --database-url postgresql://u:p@127.0.0.1:5432/db
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench.cluster import HIGH_QPS, INTERVAL, Schemas, _psycopg, cpu_seconds, measure_polling, submit_many, worker_env
from bench.cluster_host import Cluster, FakeHost
from bench.common import BENCH_KEY, ROOT, publish

RESULTS = ROOT / "bench" / "POLLING_AB.md"


@dataclass
class Round:
    build: str
    rate: float
    per_task_per_interval: float
    duplicates: int
    xacts: float  # ledger transactions per upstream query
    rows_read: float  # rows PostgreSQL returned to scans, per query
    workers_cpu: float
    database_cpu: float


def database_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True, check=False).stdout.split()
    return [int(pid) for pid in found]


def database_counters(url: str) -> tuple[float, float]:
    """(transactions committed, rows returned) of the database so far."""
    with _psycopg().connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT xact_commit, tup_returned FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return float(row[0]), float(row[1])


async def submit_all(base: str, tasks: int) -> list[str]:
    """The open tasks; a failed batch is sent again whole (identical generates are deduplicated by the
    server, so a retry adds no task): a baseline may refuse a few calls under this load."""
    for _ in range(2):
        try:
            return await submit_many(base, "open", range(tasks), 8)
        except Exception as exc:  # any refusal: the same requests again
            sys.stderr.write(f"submits refused ({type(exc).__name__}); sending them again\n")
    return await submit_many(base, "open", range(tasks), 8)


async def one_round(build: str, root: Path, url: str, tasks: int, workers: int, window: float) -> Round:
    work = Path(tempfile.mkdtemp(prefix="emo-ab-"))
    schemas = Schemas(url)
    fake = FakeHost(BENCH_KEY, auto_progress=False, ports=workers)
    try:
        backend = schemas.fresh()
        env = worker_env(fake.base_url, work, backend, query_qps=HIGH_QPS)
        env["PYTHONPATH"] = str(root)  # the build under test: its `server` package, run as `python -m server`
        cluster = Cluster(env, work, workers, upstreams=fake.worker_urls)
        try:
            await cluster.start()
            task_ids = await submit_all(cluster.base, tasks)
            xacts, rows = database_counters(url)
            database = cpu_seconds(database_pids())
            began = time.monotonic()
            polling = await measure_polling(fake, cluster, task_ids, window)
            seconds = time.monotonic() - began
            queries = polling.rate * seconds
            xacts_after, rows_after = database_counters(url)
            database = (cpu_seconds(database_pids()) - database) / seconds
        finally:
            cluster.close()
        return Round(
            build=build,
            rate=polling.rate,
            per_task_per_interval=polling.per_task_per_interval,
            duplicates=polling.duplicates,
            xacts=(xacts_after - xacts) / queries,
            rows_read=(rows_after - rows) / queries,
            workers_cpu=polling.workers_cpu,
            database_cpu=database,
        )
    finally:
        fake.close()
        schemas.drop_all()
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, rounds: Sequence[Round], baseline: str) -> list[str]:
    lines = [
        "# Figure 1 side by side",
        "",
        f"`python -m bench.polling_ab --baseline {args.baseline} --database-url postgresql://…`: {args.workers} "
        f"workers, {args.tasks} open tasks, {INTERVAL:g} s fixed interval, `EMO_MCP_MAX_QUERY_QPS={HIGH_QPS}` (not "
        f"binding), {args.window:g} s windows, {args.rounds} alternating rounds per build on one host; the baseline "
        f"is {baseline}. Each row is the median of its build's rounds (ranges in brackets).",
        "",
        "| build | queries/s in all | per task per interval | duplicate polls | ledger transactions per query "
        "| rows read per query | workers' CPUs | database's CPUs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for build in ("baseline", "this checkout"):
        mine = [r for r in rounds if r.build == build]

        def cell(values: list[float], form: str) -> str:
            return f"{statistics.median(values):{form}} [{min(values):{form}}–{max(values):{form}}]"

        per_interval = cell([r.per_task_per_interval for r in mine], ".2f")
        lines.append(
            f"| {build} | {cell([r.rate for r in mine], '.0f')} | {per_interval} "
            f"| {sum(r.duplicates for r in mine)} | {cell([r.xacts for r in mine], '.2f')} "
            f"| {cell([r.rows_read for r in mine], '.0f')} | {cell([r.workers_cpu for r in mine], '.2f')} "
            f"| {cell([r.database_cpu for r in mine], '.2f')} |"
        )
    base = statistics.median(r.rate for r in rounds if r.build == "baseline")
    now = statistics.median(r.rate for r in rounds if r.build == "this checkout")
    lines += ["", f"This checkout / baseline, queries per second: **{now / base:.2f}×**."]
    return lines


def describe(checkout: Path) -> str:
    """The checkout's commit, for the report (its path if it is not a git checkout)."""
    described = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"`{described[:60]}`" if described else str(checkout)


async def run(args: argparse.Namespace, baseline: Path) -> list[str]:
    rounds: list[Round] = []
    for _ in range(args.rounds):
        for build, root in (("baseline", baseline), ("this checkout", ROOT)):
            rounds.append(await one_round(build, root, args.database_url, args.tasks, args.workers, args.window))
    return report(args, rounds, describe(baseline))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.polling_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the build to compare against")
    parser.add_argument("--database-url", required=True, help="a PostgreSQL server (a fresh schema per round)")
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    publish(anyio.run(run, args, Path(args.baseline).resolve()), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
