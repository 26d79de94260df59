"""The tenants file (`EMO_MCP_TENANTS_FILE`): who may call this server over HTTP, with which DashScope key,
under which limits; re-read while the server runs, so a token is revoked by removing its hash.

Why TOML through `tomllib`: it is in the standard library, and a file an operator edits by hand needs
clear errors, so every field is checked here and a mistake names the tenant and the field. Unknown
fields are refused too: a misspelt `daily_budget_cny` would otherwise silently lift a limit.

A key is never in the file itself: `dashscope_key_env` names an environment variable, or
`dashscope_key_file` a file (a mounted secret). Tokens are listed as their SHA-256, so the file holds
nothing that opens the server.

While running, a file that turns malformed is refused and the last good one stays in force (logged
as an error); a tenant added while running is served from the next request on (see
`server/runtime.py`); a changed key of a running tenant applies at the next start (logged), because
its open tasks are followed with the key that created them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from server.config import TENANTS_FILE_ENV, Settings, ensure_writable_dir
from server.errors import ConfigError
from server.models import EMO_GENERATE, EMOJI_GENERATE

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
GENERATE_MODELS = (EMO_GENERATE, EMOJI_GENERATE)
FIELDS = frozenset(
    {"dashscope_key_env", "dashscope_key_file", "token_sha256", "max_cost_cny", "daily_budget_cny", "models"}
)


@dataclass(frozen=True)
class Tenant:
    """One table of the tenants file, checked, with its key read."""

    name: str
    api_key: str = field(repr=False)
    key_source: str  # where the key came from ("env ALICE_KEY", "file /run/secrets/alice"), never the key
    token_sha256: frozenset[str] = frozenset()
    max_cost_cny: float | None = None
    daily_budget_cny: float | None = None
    models: frozenset[str] | None = None  # allowed generate models; None: all

    @property
    def key_id(self) -> str:
        """Names the key without revealing it: tenants with one key share its account's limits."""
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tenants(text: str, env: Mapping[str, str], *, origin: str, oauth: bool = False) -> dict[str, Tenant]:
    """Every tenant of a tenants file's text, or a `ConfigError` naming the tenant and field at fault.

    `oauth`: sign-in through an identity provider is configured, so a tenant may have no static token."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from exc
    extra = sorted(set(data) - {"tenants"})
    if extra:
        raise ConfigError(f"{origin}: unknown top-level key(s) {', '.join(extra)}; only [tenants.<name>] tables")
    tables = data.get("tenants")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{origin} defines no tenant: add a table such as [tenants.alice]")
    tenants: dict[str, Tenant] = {}
    owners: dict[str, str] = {}
    for name, table in tables.items():
        tenant = _tenant(name, table, env, origin=origin, oauth=oauth)
        for digest in tenant.token_sha256:
            if digest in owners:
                raise ConfigError(
                    f"{origin}: tenants {owners[digest]!r} and {name!r} list the same token_sha256; "
                    "a token names exactly one tenant"
                )
            owners[digest] = name
        tenants[name] = tenant
    return tenants


def load_tenants(path: Path, env: Mapping[str, str], *, oauth: bool = False) -> dict[str, Tenant]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{TENANTS_FILE_ENV}={str(path)!r} cannot be read ({exc})") from exc
    return parse_tenants(text, env, origin=f"{TENANTS_FILE_ENV} {str(path)!r}", oauth=oauth)


def _tenant(name: object, table: object, env: Mapping[str, str], *, origin: str, oauth: bool) -> Tenant:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"{origin}: tenant name {name!r} must be 1-32 characters of a-z, 0-9, '-' and '_' "
            "(it becomes a folder name and part of links)"
        )
    where = f"{origin}, tenant {name!r}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table ([tenants.{name}])")
    unknown = sorted(set(table) - FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    api_key, source = _key(table, env, where)
    hashes = _hashes(table.get("token_sha256"), where)
    if "token_sha256" not in table and not oauth:
        # An empty list is allowed: removing a tenant's last hash is how its last token is revoked.
        raise ConfigError(
            f"{where}: token_sha256 is missing (a list of the hex SHA-256 of each access token, e.g. from "
            '`printf %s "$TOKEN" | sha256sum`); it may be left out only when EMO_MCP_OAUTH_ISSUER is set'
        )
    return Tenant(
        name=name,
        api_key=api_key,
        key_source=source,
        token_sha256=hashes,
        max_cost_cny=_cny(table.get("max_cost_cny"), where, "max_cost_cny"),
        daily_budget_cny=_cny(table.get("daily_budget_cny"), where, "daily_budget_cny"),
        models=_models(table.get("models"), where),
    )


def _key(table: dict[str, Any], env: Mapping[str, str], where: str) -> tuple[str, str]:
    variable, file = table.get("dashscope_key_env"), table.get("dashscope_key_file")
    if (variable is None) == (file is None):
        raise ConfigError(
            f"{where}: set exactly one of dashscope_key_env (the name of an environment variable holding the "
            "key) or dashscope_key_file (a file holding only the key); never the key itself"
        )
    if variable is not None:
        if not isinstance(variable, str) or not variable.strip():
            raise ConfigError(f"{where}: dashscope_key_env must be the name of an environment variable")
        value = (env.get(variable) or "").strip()
        if not value:
            raise ConfigError(f"{where}: dashscope_key_env names {variable}, which is not set (or empty)")
        return value, f"env {variable}"
    if not isinstance(file, str) or not file.strip():
        raise ConfigError(f"{where}: dashscope_key_file must be a path")
    path = Path(file).expanduser()
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: dashscope_key_file {file!r} cannot be read ({exc})") from exc
    if not value:
        raise ConfigError(f"{where}: dashscope_key_file {file!r} is empty")
    return value, f"file {path}"


def _hashes(raw: object, where: str) -> frozenset[str]:
    if raw is None:
        return frozenset()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{where}: token_sha256 must be a list of hex SHA-256 strings")
    for item in items:
        if not isinstance(item, str) or HASH_PATTERN.fullmatch(item) is None:
            shown = "a value that is not text" if not isinstance(item, str) else f"{len(item)} characters"
            raise ConfigError(
                f"{where}: token_sha256 entries must be 64 lowercase hex characters (a SHA-256), got {shown}"
            )
    return frozenset(items)


def _cny(raw: object, where: str, name: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
        raise ConfigError(f"{where}: {name} must be a positive number of CNY, got {raw!r}")
    return float(raw)


def _models(raw: object, where: str) -> frozenset[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise ConfigError(f'{where}: models must be a list such as ["emo-v1", "emoji-v1"]')
    unknown = sorted(set(raw) - set(GENERATE_MODELS))
    if unknown:
        raise ConfigError(
            f"{where}: models lists {', '.join(unknown)}; allowed generate models are {', '.join(GENERATE_MODELS)}"
        )
    return frozenset(raw)


class TenantsFile:
    """The tenants in force: the file as last read well, re-read when it changes (`refresh`)."""

    def __init__(self, path: Path, env: Mapping[str, str] | None = None, *, oauth: bool = False) -> None:
        self.path = path
        self._env = dict(os.environ if env is None else env)
        self._oauth = oauth
        self._seen = self._stamp()
        self.tenants: dict[str, Tenant] = load_tenants(path, self._env, oauth=oauth)  # at start: errors stop it
        self.hashes: dict[str, str] = self._index(self.tenants)
        self.generation = 0  # counts reloads that took effect

    @staticmethod
    def _index(tenants: Mapping[str, Tenant]) -> dict[str, str]:
        return {digest: t.name for t in tenants.values() for digest in t.token_sha256}

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new set of tenants took effect."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            tenants = load_tenants(self.path, self._env, oauth=self._oauth)
        except ConfigError as exc:
            logger.error("the tenants file changed but is refused, the last good one stays in force: %s", exc)
            return False
        for name, tenant in tenants.items():
            old = self.tenants.get(name)
            if old is not None and old.api_key != tenant.api_key:
                logger.warning("tenant %s: a new DashScope key applies at the next start of the server", name)
        added = sorted(set(tenants) - set(self.tenants))
        removed = sorted(set(self.tenants) - set(tenants))
        self.tenants, self.hashes = tenants, self._index(tenants)
        self.generation += 1
        logger.info(
            "tenants file re-read: %d tenant(s)%s%s",
            len(tenants),
            f", added {', '.join(added)}" if added else "",
            f", removed {', '.join(removed)}" if removed else "",
        )
        return True


def tenant_schema(url: str, name: str) -> str:
    """The PostgreSQL schema holding a tenant's ledger: beside the URL's own (`search_path`, else
    `public`), a plain identifier (no quoting anywhere), unique per tenant name."""
    base = _search_path(url) or "public"
    prefix = "emo_tenant_" if base == "public" else f"{base}_t_"
    plain = name.replace("-", "_")
    schema = f"{prefix}{plain}" if plain == name else f"{prefix}{plain}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    if len(schema) > 63:  # PostgreSQL's identifier limit
        schema = f"{prefix[:30]}{hashlib.sha256(name.encode()).hexdigest()[:24]}"
    return schema


def tenant_database_url(url: str, name: str) -> str:
    """`url` with its `search_path` set to the tenant's schema (the store creates it on first use)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "options"]
    options = [o for o in _options(url) if not o.startswith("-csearch_path=")]
    options.append(f"-csearch_path={tenant_schema(url, name)}")
    query.append(("options", " ".join(options)))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def _options(url: str) -> list[str]:
    raw = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True)).get("options", "")
    return [o for o in raw.split() if o]


def _search_path(url: str) -> str | None:
    for option in _options(url):
        if option.startswith("-csearch_path="):
            first = option.removeprefix("-csearch_path=").split(",")[0].strip().strip('"')
            return first or None
    return None


def tenant_settings(base: Settings, tenant: Tenant) -> Settings:
    """The settings one tenant's service runs with: its key, folders, ledger schema and limits.

    Its evidence and videos go under `OUTPUT_DIR/tenants/<name>/`, its SQLite ledger under the state
    folder's `tenants/<name>/`, its PostgreSQL ledger in a schema of its own: walls by construction,
    so no query of one tenant can see another's rows. The stricter per-job ceiling applies."""
    scoped = replace(
        base,
        api_key=tenant.api_key,
        key_source="tenant",
        tenant=tenant.name,
        output_dir=ensure_writable_dir(base.output_dir / "tenants" / tenant.name, "OUTPUT_DIR"),
        state_dir=ensure_writable_dir(base.state_dir / "tenants" / tenant.name, "EMO_MCP_STATE_DIR"),
        database_url=tenant_database_url(base.database_url, tenant.name) if base.database_url else None,
    )
    return tenant_policy(base, scoped, tenant)


def tenant_policy(base: Settings, settings: Settings, tenant: Tenant) -> Settings:
    """`settings` with the tenant's limits: the stricter per-job ceiling, its daily budget, its models
    (also what a re-read tenants file applies to a running tenant's service)."""
    ceilings = [c for c in (base.max_cost_cny, tenant.max_cost_cny) if c is not None]
    return replace(
        settings,
        max_cost_cny=min(ceilings) if ceilings else None,
        daily_budget_cny=tenant.daily_budget_cny,
        allowed_models=tenant.models,
    )
