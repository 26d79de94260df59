"""The query limiter's sustained rate, measured where it matters: at the upstream.

A burst of task queries (far more than the limit) goes through the project's `DashScopeClient`
and its `RateLimiter` to the fake DashScope; the fake records when each request arrived. Reported:
the mean rate over the burst and the largest number of arrivals in any one-second window, for the
counting window in use and for the 1.2 s window of the previous release, side by side.

    python -m bench.rate            # 400 queries per window setting (about 45 s)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import anyio

from bench.common import BENCH_KEY, ROOT, publish
from server.sandbox.fake_dashscope import FakeDashScope
from server.upstream.client import DashScopeClient
from server.upstream.limits import WINDOW, Limits, RateLimiter

RESULTS = ROOT / "bench" / "RATE.md"
LIMIT = 20.0


async def burst(fake: FakeDashScope, base_url: str, window: float, count: int) -> list[float]:
    """Arrival times (monotonic) at the fake of `count` concurrent task queries."""
    limits = Limits(LIMIT)
    limits.queries = RateLimiter(LIMIT, window=window)
    before = len(fake.requests)
    async with DashScopeClient(None, base_url, BENCH_KEY, limits=limits) as client, anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(client.get_task, f"bench-{window}-{index}")
    return sorted(r.at for r in fake.requests[before:] if "/tasks/" in r.path)


def busiest_second(arrivals: Sequence[float]) -> int:
    best, start = 0, 0
    for end, moment in enumerate(arrivals):
        while moment - arrivals[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    fake = FakeDashScope(api_key=BENCH_KEY)
    rows = []
    with fake.serve_in_thread() as base_url:
        for window in (1.2, WINDOW):
            arrivals = anyio.run(burst, fake, base_url, window, args.queries)
            rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            rows.append((window, rate, busiest_second(arrivals)))
    lines = [
        "# Sustained query rate at the upstream",
        "",
        f"`python -m bench.rate --queries {args.queries}`: {args.queries} concurrent task queries through "
        f"`DashScopeClient` and its limiter (limit {LIMIT:g}/s), arrivals timed by the fake.",
        "",
        "| counting window | mean rate | share of the limit | busiest one-second window |",
        "|---|---|---|---|",
    ]
    for window, rate, busiest in rows:
        label = f"{window:g} s" + (" (now)" if window == WINDOW else " (previous release)")
        lines.append(f"| {label} | {rate:.2f}/s | {rate / LIMIT:.1%} | {busiest} |")
    lines.append("")
    publish(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
