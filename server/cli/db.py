"""`dashscope-emo-mcp db ...`: the ledger's database, and the start-up check of it.

`db import-sqlite PATH` copies an existing SQLite ledger into the PostgreSQL ledger named by
EMO_MCP_DATABASE_URL (see `server.store.importer`). `check_ledger` runs before a server starts serving:
an unreachable database stops it at once with one line naming the variable (its password hidden), not
a traceback from inside the MCP lifespan.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import anyio

from server.config import Settings
from server.errors import ConfigError
from server.store.ledger import Ledger


def check_ledger(settings: Settings) -> None:
    """Open (and migrate) the configured ledger once; `LedgerUnavailable` if its database does not answer."""
    if not settings.database_url:
        return  # SQLite: opened by the lifespan as before; nothing to reach
    ledger = Ledger.open(settings)
    try:
        ledger.ping()
    finally:
        ledger.close()
    if settings.tenants_file is not None:
        # Each tenant's schema too (made and migrated here): a role that may not create it is told at start,
        # not by a failed lifespan.
        from server.tenancy.tenants import load_tenants, tenant_settings

        for tenant in load_tenants(settings.tenants_file, os.environ, oauth=settings.oauth_issuer is not None).values():
            Ledger.open(tenant_settings(settings, tenant)).close()


async def import_sqlite(settings: Settings, args: argparse.Namespace) -> int:
    from server.cli.commands import EXIT_OK, emit_json, say
    from server.store.importer import Copied
    from server.store.importer import import_sqlite as copy_ledger

    if not settings.database_url:
        raise ConfigError(
            "db import-sqlite copies into the PostgreSQL ledger named by EMO_MCP_DATABASE_URL, which is not set: "
            "set it to postgresql://user:password@host:5432/database and run this again."
        )

    def copy() -> tuple[list[Copied], str]:
        ledger = Ledger.open(settings)
        try:
            return copy_ledger(Path(args.path).expanduser(), ledger), ledger.location
        finally:
            ledger.close()

    # Off the event loop: a large ledger takes a while, and nothing here needs the loop.
    report, location = await anyio.to_thread.run_sync(copy)
    if args.json:
        emit_json({"target": location, "tables": [asdict(item) for item in report]})
        return EXIT_OK
    for item in report:
        say(f"{item.table}: {item.copied} copied, {item.skipped} skipped (already there)")
    say(f"into {location}")
    return EXIT_OK
