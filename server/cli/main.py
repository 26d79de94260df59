"""The `dashscope-emo-mcp` console script: the parser and dispatcher.

With no arguments it serves MCP over stdio (stdout carries only protocol messages; logs go to
stderr); `--transport http` serves Streamable HTTP instead (see `server/transport/http.py`). `--sandbox`
runs everything against the built-in loopback fake of DashScope. The subcommands (`detect`,
`generate`, `status`, `templates`, `doctor`, `demo`) are implemented in `server/cli/commands.py`,
`server/cli/doctor.py` and `server/cli/demo.py` on the same domain layer as the tools; `install`
(`server/cli/install.py`) writes this server into an MCP client's configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from server.cli.clients import CLIENTS
from server.cli.commands import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    FOREVER_SECONDS,
    box_arg,
    exit_code_for,
    url_arg,
)
from server.config import DEFAULT_HOST, DEFAULT_PORT, Settings, load_settings
from server.errors import ConfigError, EmoMcpError
from server.models import template_ids
from server.redaction import install_log_redaction, redact

EXIT_CONFIG = EXIT_USAGE  # kept for callers of the first version

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "main"]


def _common() -> argparse.ArgumentParser:
    """Options every subcommand also accepts after its name (SUPPRESS keeps the top-level value)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sandbox", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    return common


def _wait_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=FOREVER_SECONDS,
        default=None,
        metavar="SECONDS",
        help="wait for the task to end (optionally at most SECONDS), with a progress bar on stderr",
    )


def _transport_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after `serve`, the option lands once; defaults come from set_defaults.
    parser.add_argument("--transport", choices=("stdio", "http"), default=argparse.SUPPRESS, help="default: stdio")
    parser.add_argument("--host", default=argparse.SUPPRESS, help=f"HTTP bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=argparse.SUPPRESS, help=f"HTTP port (default {DEFAULT_PORT})")


def _allowed_root_option(parser: argparse.ArgumentParser) -> None:
    # Several folders after one flag too: an MCP Bundle expands a multi-folder setting into separate
    # arguments only. A value left as the bundle's `${user_config...}` placeholder counts as none.
    parser.add_argument(
        "--allowed-root",
        action="extend",
        nargs="*",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="a folder local media may be read from (repeatable; replaces EMO_MCP_ALLOWED_ROOTS)",
    )


def _install_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    install = sub.add_parser(
        "install",
        parents=[common],
        help="write this server into an MCP client's configuration (claude-desktop, cursor, vscode, claude-code)",
    )
    install.add_argument("client", choices=CLIENTS)
    install.add_argument("--dry-run", action="store_true", help="show the file and the entry, write nothing")
    install.add_argument(
        "--force", action="store_true", help="replace an entry of the same name that runs another server"
    )
    install.add_argument("--name", default="dashscope-emo", help="the entry's name (default dashscope-emo)")
    install.add_argument("--output-dir", metavar="DIR", help="OUTPUT_DIR for videos (default ~/dashscope-emo-output)")
    install.add_argument(
        "--uvx-from",
        metavar="SOURCE",
        help="run through the absolute uvx with --from SOURCE (a path, git URL or package) instead of this install",
    )
    _allowed_root_option(install)


def _parser() -> argparse.ArgumentParser:
    from server.app import package_version

    parser = argparse.ArgumentParser(
        prog="dashscope-emo-mcp",
        description="MCP server and command line for DashScope portrait animation (EMO talking heads, Emoji clips).",
        epilog="Exit codes: 0 done, 1 negative answer (check failed, task failed, doctor problem), "
        "2 usage/configuration/refused input, 3 DashScope error or unreachable, 4 task not finished yet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="use a built-in loopback fake of DashScope (no key, no network, nothing billed)",
    )
    _transport_options(parser)
    parser.set_defaults(transport="stdio", host=None, port=None, json=False, allowed_root=[], open=False)

    common = _common()
    sub = parser.add_subparsers(dest="command", metavar="command")
    serve = sub.add_parser("serve", help="serve MCP (the default; stdio unless --transport http)")
    _transport_options(serve)
    serve.add_argument("--sandbox", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _allowed_root_option(serve)
    demo = sub.add_parser("demo", help="run the chains through an MCP client against the sandbox and print each step")
    demo.add_argument("--open", action="store_true", help="open the resulting videos with the platform's viewer")

    detect = sub.add_parser("detect", parents=[common], help="check a portrait and print the boxes generate needs")
    detect.add_argument("family", choices=("emo", "emoji"))
    detect.add_argument("image_url", type=url_arg, help="public http(s) URL of the portrait")
    detect.add_argument("--ratio", choices=("1:1", "3:4"), default="1:1", help="EMO only: 1:1 head, 3:4 half body")
    detect.add_argument("--model", default=None, help="official model name or a configured deployment name")

    generate = sub.add_parser("generate", parents=[common], help="start a (paid) video task; --wait to follow it")
    generate.add_argument("family", choices=("emo", "emoji"))
    generate.add_argument("image_url", type=url_arg, help="public http(s) URL of the portrait")
    generate.add_argument("--audio-url", type=url_arg, help="EMO: public URL of WAV/MP3 speech (< 60 s, < 15 MB)")
    generate.add_argument(
        "--template-id",
        choices=template_ids(),
        metavar="TEMPLATE_ID",
        help="Emoji: an official template (see `templates`); checked before anything is billed",
    )
    generate.add_argument("--style-level", choices=("normal", "calm", "active"), default="normal", help="EMO only")
    generate.add_argument("--ratio", choices=("1:1", "3:4"), default="1:1", help="EMO, when detecting first")
    generate.add_argument("--face-bbox", type=box_arg, metavar="X1,Y1,X2,Y2", help="from detect (else detect first)")
    generate.add_argument("--ext-bbox", type=box_arg, metavar="X1,Y1,X2,Y2", help="from detect (else detect first)")
    generate.add_argument("--model", default=None, help="official model name or a configured deployment name")
    _wait_option(generate)

    status = sub.add_parser("status", parents=[common], help="a task's status (downloads a finished video)")
    status.add_argument("task_id", nargs="?", help="omit to list the ledger's recent tasks")
    status.add_argument("--limit", type=int, default=20, help="how many recent tasks to list")
    _wait_option(status)

    sub.add_parser("templates", parents=[common], help="the official Emoji templates")
    sub.add_parser("doctor", parents=[common], help="check key, endpoint, folders, ledger database and versions")
    db = sub.add_parser("db", help="the ledger's database (EMO_MCP_DATABASE_URL)")
    db_sub = db.add_subparsers(dest="db_command", metavar="action", required=True)
    imported = db_sub.add_parser(
        "import-sqlite",
        parents=[common],
        help="copy an existing SQLite ledger (detections, tasks, spend, uploads) into EMO_MCP_DATABASE_URL",
    )
    imported.add_argument(
        "path", metavar="PATH", help="the ledger.sqlite3 file to copy (read only; run it again safely)"
    )
    _install_parser(sub, common)
    return parser


def _configure_logging(command: str | None) -> None:
    # httpx2 logs every request URL at INFO; signed result URLs do not belong in logs.
    # The command line keeps its own output readable: warnings only, unless asked otherwise.
    default = "INFO" if command in (None, "serve") else "WARNING"
    level = os.environ.get("EMO_MCP_LOG_LEVEL", default).upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else default,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    # Every log line passes the one redaction (keys, Authorization values, bearer tokens).
    install_log_redaction()


async def _with_settings(
    sandbox: bool, job: Callable[[Settings], Awaitable[int]], allowed_roots: Sequence[str] = ()
) -> int:
    """Run `job` with the environment's settings, or against a sandbox that lives as long as the job."""
    if not sandbox:
        return await job(load_settings(allowed_roots=allowed_roots))
    from server.sandbox.clips import sandbox_upstream

    async with sandbox_upstream().serve() as base_url:
        return await job(load_settings(sandbox=True, sandbox_base_url=base_url, allowed_roots=allowed_roots))


async def _serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.cli.db import check_ledger

    if args.transport == "http":
        from server.transport.http import http_security, serve_http

        host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT
        security = http_security(host, os.environ)  # refuses an unsafe bind before anything starts

        async def run_http(settings: Settings) -> int:
            check_ledger(settings)
            await serve_http(settings, host, port, security)
            return EXIT_OK

        return await _with_settings(args.sandbox, run_http, args.allowed_root)
    if args.host is not None or args.port is not None:
        raise ConfigError("--host and --port apply to --transport http only.")

    async def run_stdio(settings: Settings) -> int:
        from server.transport.stdio import serve_stdio

        # stdio is one person's, the one implicit tenant, and serves no /videos: no tenants, no links.
        local = dataclasses.replace(settings, tenants_file=None, public_url=None, link_secret=None)
        check_ledger(local)
        await serve_stdio(create_app(local))
        return EXIT_OK

    return await _with_settings(args.sandbox, run_stdio, args.allowed_root)


async def _dispatch(args: argparse.Namespace) -> int:
    from server.cli import commands

    if args.command in (None, "serve"):
        return await _serve(args)
    if args.command == "demo":
        from server.cli.demo import run_demo

        return await run_demo(open_videos=args.open)
    if args.command == "templates":
        return commands.templates(args)
    if args.command == "doctor":
        from server.cli.doctor import doctor

        if not args.sandbox:
            return await doctor(args)
        from server.sandbox.clips import sandbox_upstream

        async with sandbox_upstream().serve() as base_url:
            return await doctor(args, sandbox_base_url=base_url)
    if args.command == "install":
        return _install(args)
    if args.command == "db":
        from server.cli.db import import_sqlite

        return await _with_settings(False, lambda settings: import_sqlite(settings, args))
    job = {"detect": commands.detect, "generate": commands.generate, "status": commands.status}[args.command]
    return await _with_settings(args.sandbox, lambda settings: job(settings, args))


def _install(args: argparse.Namespace) -> int:
    import getpass

    from server.cli.clients import Platform
    from server.cli.commands import emit_json, say
    from server.cli.install import install, request_from, show

    # Ask only a person at a terminal; a script gets "not stored" and the reason instead of a hang.
    prompt = getpass.getpass if sys.stdin is not None and sys.stdin.isatty() else None
    outcome = install(request_from(args), platform=Platform.current(), prompt=prompt)
    if args.json:
        emit_json(
            {
                "client": outcome.client,
                "path": str(outcome.path),
                "change": outcome.change,
                "written": outcome.written,
                "backup": None if outcome.backup is None else str(outcome.backup),
                "entry": outcome.entry,
                "key": outcome.key,
            }
        )
    else:
        show(outcome, say)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.command)
    try:
        return anyio.run(_dispatch, args)
    except EmoMcpError as exc:
        said = redact(str(exc))
        sys.stderr.write(f"dashscope-emo-mcp: {said}\n")
        if args.json:
            sys.stdout.write(json.dumps({"error": {"type": type(exc).__name__, "message": said}}) + "\n")
        return exit_code_for(exc)
    except KeyboardInterrupt:
        if args.command in (None, "serve"):
            return EXIT_OK  # Ctrl+C is how a server is stopped
        sys.stderr.write("dashscope-emo-mcp: interrupted (a submitted task keeps running upstream)\n")
        return EXIT_INTERRUPTED
