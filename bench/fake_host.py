"""The loopback fake of DashScope in a process of its own, for benchmarks.

A separate process keeps the fake's work off the measured processes' CPU time and GIL: the
server under test and the baseline client then see the same upstream, and neither pays for it.
It prints its base URL as one line on stdout, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from server.sandbox.fake_dashscope import FakeDashScope


async def _serve(fake: FakeDashScope) -> None:
    async with fake.serve() as base_url:
        sys.stdout.write(base_url + "\n")
        sys.stdout.flush()
        # Serve until the parent closes our stdin (or dies).
        await anyio.to_thread.run_sync(sys.stdin.read)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--video-size", type=int, default=64 * 1024, help="bytes of every result video")
    parser.add_argument("--polls-to-finish", type=int, default=1)
    args = parser.parse_args(argv)
    fake = FakeDashScope(api_key=args.api_key, video_size=args.video_size, polls_to_finish=args.polls_to_finish)
    anyio.run(_serve, fake)


if __name__ == "__main__":
    main()
