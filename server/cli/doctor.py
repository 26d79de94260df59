"""`dashscope-emo-mcp doctor`: is this machine ready to animate portraits?

Each check says what it found and what to do. The key is never printed, not even in part: only
where it was found. Whether it is accepted is learnt from a free authenticated call: a query for a
task id that cannot exist answers UNKNOWN under a valid key and 401 under a bad one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from server.config import DEFAULT_BASE_URL, Settings, ensure_writable_dir, load_settings
from server.errors import AuthenticationError, ConfigError, EmoMcpError
from server.runtime import open_service
from server.store.ledger import Ledger
from server.store.migrations import latest
from server.store.spend import spend_today

PACKAGES = ("dashscope-emo-mcp", "mcp", "pydantic", "httpx2", "aiohttp", "starlette", "uvicorn")


Level = Literal["ok", "warn", "fail"]
MARK: dict[str, str] = {"ok": "✓", "warn": "!", "fail": "✗"}


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _key_check(settings: Settings, env: Mapping[str, str]) -> Check:
    where = {
        "env": "the DASHSCOPE_API_KEY environment variable",
        "key-file": "the file named by DASHSCOPE_API_KEY_FILE_PATH",
        "credentials-file": "the credentials file "
        + (env.get("ALIBABA_CLOUD_CREDENTIALS_FILE") or "~/.alibabacloud/credentials")
        + f" [{env.get('ALIBABA_CLOUD_PROFILE') or env.get('ALICLOUD_PROFILE') or 'default'}]",
        "sandbox": "the built-in sandbox (not a real key)",
    }
    if settings.key_source == "none" and settings.tenants_file is not None:
        return Check("key", "ok", "none needed over HTTP: each tenant's key comes from the tenants file")
    if settings.key_source == "none":
        return Check(
            "key",
            "fail",
            "no key found: set DASHSCOPE_API_KEY, or put `dashscope_api_key = sk-...` in ~/.alibabacloud/credentials",
        )
    return Check("key", "ok", f"found in {where[settings.key_source]}")


def _endpoint_check(settings: Settings) -> Check:
    if settings.sandbox:
        return Check("endpoint", "ok", f"{settings.base_url} (sandbox)")
    if settings.is_beijing:
        return Check("endpoint", "ok", f"{settings.base_url} (Beijing, where EMO and Emoji are served)")
    return Check(
        "endpoint",
        "warn",
        f"{settings.base_url} is not the Beijing endpoint {DEFAULT_BASE_URL}; EMO and Emoji are served only "
        "there (fine if this is your own proxy to it). Unset DASHSCOPE_HTTP_BASE_URL otherwise.",
    )


async def _accepted_check(settings: Settings) -> Check:
    if not settings.api_key and settings.tenants_file is not None:
        return Check("key accepted", "ok", "not checked: tenants' keys are used only by their own calls")
    if not settings.api_key:
        return Check("key accepted", "fail", "not checked: no key")
    probe = f"doctor-probe-{uuid.uuid4().hex}"
    try:
        async with open_service(settings, recover=False) as service:
            body = await service.client.get_task(probe)
    except AuthenticationError as exc:
        return Check(
            "key accepted",
            "fail",
            f"DashScope answered 401 ({exc.code}): the key is wrong or belongs to another region; "
            "EMO and Emoji need a Beijing-region (China mainland) Model Studio key.",
        )
    except EmoMcpError as exc:
        return Check("key accepted", "fail", f"could not check: {exc}")
    status = (body.get("output") or {}).get("task_status") if isinstance(body, dict) else None
    return Check("key accepted", "ok", f"yes (a free task query answered {status or 'without a status'})")


def _dir_check(name: str, variable: str, path: Path) -> Check:
    try:
        ensure_writable_dir(path, variable)
    except ConfigError as exc:
        return Check(name, "fail", str(exc))
    return Check(name, "ok", f"{path} is writable")


def _ledger_checks(settings: Settings) -> list[Check]:
    """Which database holds the ledger, its schema version (migrated on open), and today's spend from it."""
    try:
        ledger = Ledger.open(settings)
    except (sqlite3.Error, EmoMcpError) as exc:
        level: Level = "fail" if settings.database_url else "warn"
        return [Check("ledger", level, f"unreadable: {exc}"), Check("spend", "warn", "not read: no ledger")]
    try:
        backend = "PostgreSQL" if ledger.dialect == "postgresql" else "SQLite"
        found = f"{backend} at {ledger.location}, schema version {ledger.version()} of {latest(ledger.dialect)}"
        return [Check("ledger", "ok", found), Check("spend", "ok", spend_today(ledger, settings.prices).line())]
    except (sqlite3.Error, EmoMcpError) as exc:
        return [Check("ledger", "fail", f"{backend} at {ledger.location}: {exc}")]
    finally:
        ledger.close()


def _tenant_checks(settings: Settings, env: Mapping[str, str]) -> list[Check]:
    """With a tenants file: whether it is valid, and each tenant's key source, limits and spend today."""
    if settings.tenants_file is None:
        return []
    from server.domain.budget import budget_view
    from server.tenancy.tenants import load_tenants, tenant_settings

    try:
        tenants = load_tenants(settings.tenants_file, env, oauth=settings.oauth_issuer is not None)
    except ConfigError as exc:
        return [Check("tenants", "fail", str(exc))]
    checks = [Check("tenants", "ok", f"{len(tenants)} tenant(s) in {settings.tenants_file}")]
    for tenant in tenants.values():
        scoped = tenant_settings(settings, tenant)
        try:
            ledger = Ledger.open(scoped)
        except (sqlite3.Error, EmoMcpError) as exc:
            checks.append(Check(f"tenant {tenant.name}", "fail", f"ledger unreadable: {exc}"))
            continue
        try:
            view = budget_view(scoped, ledger)
        finally:
            ledger.close()
        budget = view["daily_budget_cny"]
        checks.append(
            Check(
                f"tenant {tenant.name}",
                "ok",
                f"key from {tenant.key_source}; spent today (UTC) {view['spent_today_utc_cny']:.4f} CNY"
                + (f" of {budget:g}" if budget is not None else " (no daily budget)")
                + (f"; models {', '.join(view['models'])}" if view["models"] is not None else ""),
            )
        )
    return checks


async def run_doctor(env: Mapping[str, str], *, sandbox_base_url: str | None = None) -> tuple[list[Check], bool]:
    """All checks; when the configured folders are unusable the key is still checked from a temp folder."""
    checks: list[Check] = []
    sandbox = sandbox_base_url is not None
    with tempfile.TemporaryDirectory(prefix="emo-mcp-doctor-") as scratch:
        try:
            settings = load_settings(env, sandbox=sandbox, sandbox_base_url=sandbox_base_url)
        except ConfigError as exc:
            checks.append(Check("configuration", "fail", str(exc)))
            fallback = {**env, "OUTPUT_DIR": scratch, "EMO_MCP_STATE_DIR": scratch}
            try:
                settings = load_settings(fallback, sandbox=sandbox, sandbox_base_url=sandbox_base_url)
            except ConfigError:
                return checks, False
        else:
            checks.append(_dir_check("OUTPUT_DIR", "OUTPUT_DIR", settings.output_dir))
            if settings.state_dir != settings.output_dir:
                checks.append(_dir_check("EMO_MCP_STATE_DIR", "EMO_MCP_STATE_DIR", settings.state_dir))
            checks.extend(_ledger_checks(settings))
            checks.extend(_tenant_checks(settings, env))
        checks.insert(0, _key_check(settings, env))
        checks.insert(1, _endpoint_check(settings))
        checks.insert(2, await _accepted_check(settings))
    uvx = shutil.which("uvx")
    if uvx:
        checks.append(Check("uvx", "ok", f"found at {uvx}"))
    else:
        checks.append(Check("uvx", "warn", "not on PATH (only needed for the uvx client configurations)"))
    return checks, all(check.level != "fail" for check in checks)


async def doctor(args: argparse.Namespace, sandbox_base_url: str | None = None) -> int:
    from server.cli.commands import EXIT_FAILURE, EXIT_OK, emit_json, say

    checks, healthy = await run_doctor(os.environ, sandbox_base_url=sandbox_base_url)
    found = versions()
    if args.json:
        emit_json({"ok": healthy, "checks": [asdict(check) for check in checks], "versions": found})
    else:
        for check in checks:
            say(f"{MARK[check.level]} {check.name}: {check.detail}")
        say("versions: " + ", ".join(f"{name} {value}" for name, value in found.items()))
        say("All good." if healthy else "Some checks failed; see above.")
    return EXIT_OK if healthy else EXIT_FAILURE
