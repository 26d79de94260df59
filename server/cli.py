"""The `dashscope-emo-mcp` console script.

With no arguments it serves MCP over stdio (stdout carries only protocol messages; logs go to
stderr). `--sandbox` serves against the built-in loopback fake of DashScope; `demo` runs both
chains through a real MCP client session against that sandbox and prints each step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from server.config import load_settings
from server.errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from server.app import package_version

    parser = argparse.ArgumentParser(
        prog="dashscope-emo-mcp",
        description="MCP server for DashScope portrait animation (EMO talking heads, Emoji clips).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="serve against a built-in loopback fake of DashScope (no key, no network, nothing billed)",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve MCP over stdio (the default)")
    sub.add_parser("demo", help="run both chains through an MCP client against the sandbox and print each step")
    return parser


def _configure_logging() -> None:
    # httpx2 logs every request URL at INFO; signed result URLs do not belong in logs.
    level = os.environ.get("EMO_MCP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)


async def _serve(sandbox: bool) -> None:
    from server.app import create_app

    if not sandbox:
        await create_app(load_settings()).run_stdio_async()
        return
    from server.fake_dashscope import FakeDashScope

    async with FakeDashScope().serve() as base_url:
        settings = load_settings(sandbox=True, sandbox_base_url=base_url)
        await create_app(settings).run_stdio_async()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        if args.command == "demo":
            from server.demo import run_demo

            return anyio.run(run_demo)
        anyio.run(_serve, bool(args.sandbox))
    except ConfigError as exc:
        sys.stderr.write(f"dashscope-emo-mcp: {exc}\n")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK
