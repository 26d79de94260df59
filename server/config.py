"""Settings read from the environment once, at start-up, and passed down explicitly.

Nothing here runs at import time: `load_settings()` is called by the CLI (or a test) and
the resulting frozen `Settings` is handed to `create_app()`.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.errors import ConfigError
from server.pricing import PriceTable
from server.redaction import register_secret

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"
DEFAULT_POLL_INTERVAL = 15.0
SANDBOX_POLL_INTERVAL = 0.5
DEFAULT_MAX_QUERY_QPS = 20.0
# The HTTP transport's bind (here, so the CLI names them without importing the HTTP stack at start).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# No open task waits longer than this between two queries, whatever its estimate says.
DEFAULT_POLL_MAX_INTERVAL = 60.0
POLL_SCHEDULES = ("adaptive", "fixed")
# How long after an unanswered submit the task list is searched before concluding nothing was created.
DEFAULT_RECONCILE_WINDOW = 600.0
# How long a claimed task is not handed to another poller (the watcher's lease; issue 14 renews it).
DEFAULT_LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 1.0
REQUEST_STATE_KEYS_ENV = "EMO_MCP_REQUEST_STATE_KEYS"
DATABASE_URL_ENV = "EMO_MCP_DATABASE_URL"
MODEL_QPS_ENV = "EMO_MCP_MODEL_QPS"
# The request-state ring's keys: the SDK's AES-GCM codec needs 32 bytes of secret randomness each.
MIN_KEY_BYTES = 32

TENANTS_FILE_ENV = "EMO_MCP_TENANTS_FILE"
PUBLIC_URL_ENV = "EMO_MCP_PUBLIC_URL"
LINK_SECRET_ENV = "EMO_MCP_LINK_SECRET"  # noqa: S105 (a variable name, not a secret)
DEFAULT_LINK_TTL = 86400.0
DEFAULT_TENANT_CLAIM = "tenant"

# The sandbox's key: the fake upstream (server/sandbox/) accepts it, and `--sandbox` sends it.
SANDBOX_API_KEY = "sk-sandbox-0000"

KeySource = Literal["env", "key-file", "credentials-file", "sandbox", "tenant", "none"]

# What an MCP Bundle host passes for an optional setting the user left empty: the manifest's own
# placeholder, unsubstituted (measured with the official mcpb CLI's substitution code).
_UNFILLED = re.compile(r"\$\{user_config\.[^}]*\}")


def is_unfilled(value: str) -> bool:
    """True for a value that is only an unsubstituted `${user_config.NAME}`: the setting was left empty."""
    return _UNFILLED.fullmatch(value.strip()) is not None


def without_unfilled(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the settings a bundle host left as placeholders, so each parser sees them as unset."""
    return {name: value for name, value in env.items() if not is_unfilled(value)}


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know about its environment."""

    api_key: str | None = field(repr=False)
    key_source: KeySource
    base_url: str
    output_dir: Path
    state_dir: Path
    poll_interval: float = DEFAULT_POLL_INTERVAL
    sandbox: bool = False
    # Extra deployment names allowed for the optional `model` argument, per official model.
    model_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Local media (server/media/sources.py), pre-flight checks (server/media/preflight.py), money (server/pricing.py).
    allowed_roots: tuple[Path, ...] = ()
    preflight_remote: bool = False
    prices: PriceTable = field(default_factory=PriceTable)
    max_cost_cny: float | None = None
    confirm_above_cny: float | None = None
    # Upstream task queries per second across all tasks (the documented account limit is 20).
    max_query_qps: float = DEFAULT_MAX_QUERY_QPS
    reconcile_window: float = DEFAULT_RECONCILE_WINDOW
    # Polling (server/jobs/schedule.py): "adaptive" follows each task's expected end, "fixed" polls
    # every poll_interval; neither leaves a task unqueried longer than poll_max_interval.
    poll_schedule: Literal["adaptive", "fixed"] = "adaptive"
    poll_max_interval: float = DEFAULT_POLL_MAX_INTERVAL
    # Operations and the cluster (issue 14; `_cluster` below): per-model detect/submit rates that
    # override server/upstream/limits.py's, the watcher's lease, the request-state key ring (decoded;
    # first seals, all open) and the PostgreSQL ledger's URL (it carries a password: never in a repr).
    model_qps: Mapping[str, float] = field(default_factory=dict)
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    request_state_keys: tuple[bytes, ...] = field(default=(), repr=False)
    database_url: str | None = field(default=None, repr=False)
    # Hosting for many people (issue 15; `_hosting` below). Per tenant (server/tenancy/, set on each
    # tenant's copy of the settings): its name (None: the one implicit tenant), its daily budget and the
    # generate models it may use. Per server: the tenants file, the public base URL and the secret of
    # signed video links, the audit trail, and sign-in through an identity provider (OAuth).
    tenant: str | None = None
    daily_budget_cny: float | None = None
    allowed_models: frozenset[str] | None = None
    tenants_file: Path | None = None
    public_url: str | None = None
    link_secret: bytes | None = field(default=None, repr=False)
    link_ttl: float = DEFAULT_LINK_TTL
    audit_log: Path | None = None
    oauth_issuer: str | None = None
    oauth_audience: str | None = None
    oauth_tenant_claim: str = DEFAULT_TENANT_CLAIM

    @property
    def links_on(self) -> bool:
        """Signed video links are handed out whenever both the public URL and the secret are set."""
        return self.public_url is not None and self.link_secret is not None

    @property
    def is_beijing(self) -> bool:
        return self.base_url.rstrip("/") == DEFAULT_BASE_URL


def _read_key_file(env: Mapping[str, str]) -> str | None:
    """The official SDK's convention: a file holding only the key, named by DASHSCOPE_API_KEY_FILE_PATH."""
    raw = env.get("DASHSCOPE_API_KEY_FILE_PATH")
    if not raw:
        return None
    try:
        value = Path(raw).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        # Not fatal (the server must still start and list its tools), but never silent.
        logger.warning("DASHSCOPE_API_KEY_FILE_PATH=%s cannot be read (%s); trying the credentials file", raw, exc)
        return None
    return value or None


def _read_credentials_file(env: Mapping[str, str]) -> str | None:
    """The seed skills' convention: `dashscope_api_key` in an INI profile section."""
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    default = home / ".alibabacloud" / "credentials"
    path = (
        Path(env["ALIBABA_CLOUD_CREDENTIALS_FILE"]).expanduser()
        if env.get("ALIBABA_CLOUD_CREDENTIALS_FILE")
        else default
    )
    if not path.is_file():
        return None
    profile = env.get("ALIBABA_CLOUD_PROFILE") or env.get("ALICLOUD_PROFILE") or "default"
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    value = parser.get(profile, "dashscope_api_key", fallback="").strip()
    return value or None


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a positive number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    return value


def _poll_schedule(env: Mapping[str, str]) -> Literal["adaptive", "fixed"]:
    raw = (env.get("EMO_MCP_POLL_SCHEDULE") or "adaptive").strip().lower()
    if raw == "fixed":
        return "fixed"
    if raw != "adaptive":
        raise ConfigError(f"EMO_MCP_POLL_SCHEDULE must be one of {', '.join(POLL_SCHEDULES)}, got {raw!r}")
    return "adaptive"


def _parse_aliases(raw: str) -> dict[str, tuple[str, ...]]:
    """`EMO_MCP_MODEL_ALIASES="emo-v1=my-emo-deploy,emoji-v1=my-emoji"`."""
    from server.models import OFFICIAL_MODELS

    aliases: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        official, sep, alias = item.partition("=")
        official, alias = official.strip(), alias.strip()
        if not sep or official not in OFFICIAL_MODELS or not alias:
            raise ConfigError(
                f"EMO_MCP_MODEL_ALIASES entry {item!r} must look like <official model>=<deployment name>, "
                f"with the official model one of {', '.join(sorted(OFFICIAL_MODELS))}"
            )
        aliases.setdefault(official, []).append(alias)
    return {key: tuple(values) for key, values in aliases.items()}


def ensure_writable_dir(path: Path, variable: str) -> Path:
    """Create `path` if needed and prove it is writable, or say which variable to fix."""
    try:
        # Owner-only when made here: the ledger and the evidence hold signed URLs and what was sent.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A probe of its own: workers of a cluster start at once on one folder, and a shared probe name
        # let one worker unlink the file another had just made (seen as ENOENT on a writable folder).
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{variable} points at {str(path)!r}, which cannot be written ({exc.strerror or exc}). "
            f"Set {variable} to a writable folder."
        ) from exc
    return path


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    sandbox: bool = False,
    sandbox_base_url: str | None = None,
    allowed_roots: Sequence[str] = (),
) -> Settings:
    """Read settings from `env` (default: the process environment).

    `allowed_roots` (the command line's `--allowed-root`) replaces EMO_MCP_ALLOWED_ROOTS when it
    names at least one folder; unfilled bundle placeholders are ignored in both.
    """
    env = without_unfilled(os.environ if env is None else env)
    cwd = Path.cwd() if cwd is None else cwd

    key_source: KeySource
    api_key = (env.get("DASHSCOPE_API_KEY") or "").strip() or None
    if sandbox:
        api_key, key_source = SANDBOX_API_KEY, "sandbox"
    elif api_key:
        key_source = "env"
    elif api_key := _read_key_file(env):
        key_source = "key-file"
    else:
        api_key = _read_credentials_file(env)
        key_source = "credentials-file" if api_key else "none"

    base_url = sandbox_base_url or (env.get("DASHSCOPE_HTTP_BASE_URL") or "").strip() or DEFAULT_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"DASHSCOPE_HTTP_BASE_URL must be an http(s) URL, got {base_url!r}")

    output_dir = Path(env.get("OUTPUT_DIR") or "output").expanduser()
    output_dir = ensure_writable_dir((cwd / output_dir).resolve(), "OUTPUT_DIR")
    state_raw = env.get("EMO_MCP_STATE_DIR")
    state_dir = (
        ensure_writable_dir((cwd / Path(state_raw).expanduser()).resolve(), "EMO_MCP_STATE_DIR")
        if state_raw
        else output_dir
    )

    return Settings(
        api_key=api_key,
        key_source=key_source,
        base_url=base_url.rstrip("/"),
        output_dir=output_dir,
        state_dir=state_dir,
        poll_interval=_positive_float(
            env, "EMO_MCP_POLL_INTERVAL", SANDBOX_POLL_INTERVAL if sandbox else DEFAULT_POLL_INTERVAL
        ),
        sandbox=sandbox,
        model_aliases=_parse_aliases(env.get("EMO_MCP_MODEL_ALIASES", "")),
        max_query_qps=_positive_float(env, "EMO_MCP_MAX_QUERY_QPS", DEFAULT_MAX_QUERY_QPS),
        reconcile_window=_positive_float(env, "EMO_MCP_RECONCILE_WINDOW", DEFAULT_RECONCILE_WINDOW),
        poll_schedule=_poll_schedule(env),
        poll_max_interval=_positive_float(env, "EMO_MCP_POLL_MAX_INTERVAL", DEFAULT_POLL_MAX_INTERVAL),
        **_media_and_money(_with_roots(env, allowed_roots, cwd), cwd),
        **_cluster(env),
        **_hosting(env, cwd, output_dir),
    )


def _database_url(env: Mapping[str, str]) -> str | None:
    """EMO_MCP_DATABASE_URL, checked for its scheme only (the value is never echoed: it may hold a password)."""
    url = (env.get(DATABASE_URL_ENV) or "").strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "EMO_MCP_DATABASE_URL must be a PostgreSQL URL (postgresql://user:password@host:5432/database); "
            "unset it to keep the ledger in SQLite in the state folder."
        )
    return url


def _with_roots(env: Mapping[str, str], roots: Sequence[str], cwd: Path) -> Mapping[str, str]:
    """Put `--allowed-root` folders where the media layer reads its roots, each checked first."""
    from server.media.sources import ROOTS_VARIABLE

    given = [root.strip() for root in roots if root.strip() and not is_unfilled(root)]
    for root in given:
        if not (cwd / Path(root).expanduser()).is_dir():
            raise ConfigError(f"--allowed-root {root!r} is not an existing folder: create it or pick another one.")
    return {**env, ROOTS_VARIABLE: os.pathsep.join(given)} if given else env


def _media_and_money(env: Mapping[str, str], cwd: Path) -> dict[str, Any]:
    """Settings of local files, pre-flight and cost control (issue 5), parsed by their own modules."""
    from server.media.preflight import parse_preflight_mode
    from server.media.sources import parse_roots
    from server.pricing import load_prices, parse_cny

    return {
        "allowed_roots": parse_roots(env, cwd),
        "preflight_remote": parse_preflight_mode(env),
        "prices": load_prices(env),
        "max_cost_cny": parse_cny(env, "EMO_MCP_MAX_COST_CNY"),
        "confirm_above_cny": parse_cny(env, "EMO_MCP_CONFIRM_ABOVE_CNY"),
    }


def _cluster(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings of operations and the cluster (issue 14): each refused at start with the variable's name."""
    lease = _positive_float(env, "EMO_MCP_LEASE_SECONDS", DEFAULT_LEASE_SECONDS)
    if not (MIN_LEASE_SECONDS <= lease < math.inf):
        raise ConfigError(
            f"EMO_MCP_LEASE_SECONDS must be a number of seconds from {MIN_LEASE_SECONDS:g} up, got {lease:g}"
        )
    return {
        "model_qps": _parse_model_qps(env.get(MODEL_QPS_ENV, "")),
        "lease_seconds": lease,
        "request_state_keys": _parse_state_keys(env.get(REQUEST_STATE_KEYS_ENV, "")),
        "database_url": _database_url(env),
    }


def _parse_model_qps(raw: str) -> dict[str, float]:
    """`EMO_MCP_MODEL_QPS="emo-detect-v1=5,emo-v1=5"`: official model names only (a deployment alias
    shares its model's limiter, so a rate per alias would be a second, contradicting limit)."""
    from server.models import OFFICIAL_MODELS

    rates: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        model, sep, value = (text.strip() for text in item.partition("="))
        try:
            rate = float(value) if sep else math.nan
        except ValueError:
            rate = math.nan
        if model not in OFFICIAL_MODELS or not (math.isfinite(rate) and rate > 0) or model in rates:
            why = "is given twice" if model in rates else "must look like <official model>=<calls per second>"
            raise ConfigError(
                f"{MODEL_QPS_ENV} entry {item!r} {why}, with the model one of {', '.join(sorted(OFFICIAL_MODELS))} "
                "and the rate a positive number (for example emo-detect-v1=5,emo-v1=5)"
            )
        rates[model] = rate
    return rates


def _decode_key(text: str) -> bytes | None:
    """A ring key as hex (`openssl rand -hex 32`) or base64url, padded or not (`secrets.token_urlsafe(32)`).

    Hex is tried first: an even-length run of hex digits is hex. Either way the same text gives the same
    bytes on every worker, which is all a shared ring needs; the bytes, not the text, go to the SDK, so a
    64-character hex key is the 32 random bytes it spells, not 64 bytes of ASCII that hold half as much.
    """
    if len(text) % 2 == 0 and re.fullmatch(r"[0-9a-fA-F]+", text):
        return bytes.fromhex(text)
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _parse_state_keys(raw: str) -> tuple[bytes, ...]:
    """`EMO_MCP_REQUEST_STATE_KEYS="<new>,<old>"`: the first seals, all open. A key is refused (by its
    position, never its text) unless it decodes to at least 32 bytes that look random: 32 bytes of one
    repeated pattern pass a length check but are guessable."""
    keys: list[bytes] = []
    for position, text in enumerate(filter(None, (part.strip() for part in raw.split(","))), start=1):
        key = _decode_key(text)
        got = _weak_key(key)
        if key is None or got is not None:
            raise ConfigError(
                f"{REQUEST_STATE_KEYS_ENV} key {position} {got}; each key must be at least {MIN_KEY_BYTES} random "
                "bytes, as hex or base64url, for example the output of: openssl rand -hex 32"
            )
        if key in keys:
            raise ConfigError(f"{REQUEST_STATE_KEYS_ENV} key {position} repeats an earlier key of the ring")
        keys.append(key)
    return tuple(keys)


def _weak_key(key: bytes | None) -> str | None:
    """Why a decoded secret (a ring key, the link secret) is not good enough; None when it is. 32 bytes of
    one repeated pattern pass a length check but are guessable."""
    if key is None:
        return "is neither hex nor base64url"
    if len(key) < MIN_KEY_BYTES:
        return f"decodes to {len(key)} bytes"
    if len(set(key)) < MIN_KEY_BYTES // 2:
        return "repeats too few distinct bytes to be random"
    return None


LINK_SECRET_HELP = (
    f"{LINK_SECRET_ENV} must be at least {MIN_KEY_BYTES} random bytes, as hex or base64url, and the same "
    "on every worker; make one with: openssl rand -hex 32"
)


def parse_link_secret(raw: str) -> bytes:
    """`EMO_MCP_LINK_SECRET` as bytes, refused at start unless it is at least 32 bytes that look random.

    The refusal names the variable and how to make a good secret, never the text given (it may be a real
    secret pasted into the wrong place). The accepted text is registered with the redaction, so it never
    reaches a log or a result even if some message quotes the environment."""
    text = raw.strip()
    key = _decode_key(text) if text else None
    got = "is empty" if not text else _weak_key(key)
    if key is None or got is not None:
        raise ConfigError(f"{LINK_SECRET_ENV} {got}; {LINK_SECRET_HELP}")
    register_secret(text)
    return key


def _hosting(env: Mapping[str, str], cwd: Path, output_dir: Path) -> dict[str, Any]:
    """Settings of hosting for many people (issue 15). The tenants file itself is read by
    `server.tenancy.tenants` when the HTTP transport starts (stdio is always the one implicit tenant)."""
    tenants_raw = (env.get(TENANTS_FILE_ENV) or "").strip()
    tenants_file = (cwd / Path(tenants_raw).expanduser()).resolve() if tenants_raw else None
    if tenants_file is not None and not tenants_file.is_file():
        raise ConfigError(f"{TENANTS_FILE_ENV} names {str(tenants_file)!r}, which is not a file")
    public = (env.get(PUBLIC_URL_ENV) or "").strip().rstrip("/") or None
    if public is not None and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", public):
        raise ConfigError(
            f"{PUBLIC_URL_ENV} must be the http(s) address clients reach the server at, such as "
            f"https://mcp.example.com (no query or fragment), got {public!r}"
        )
    secret_raw = (env.get(LINK_SECRET_ENV) or "").strip()
    secret = parse_link_secret(secret_raw) if secret_raw else None
    audit_raw = (env.get("EMO_MCP_AUDIT_LOG") or "").strip()
    audit = (cwd / Path(audit_raw).expanduser()).resolve() if audit_raw else None
    if audit is None and tenants_file is not None:
        audit = output_dir / "audit.jsonl"
    issuer = (env.get("EMO_MCP_OAUTH_ISSUER") or "").strip() or None
    if issuer is not None and not issuer.startswith(("https://", "http://")):
        raise ConfigError(f"EMO_MCP_OAUTH_ISSUER must be the issuer's http(s) URL, got {issuer!r}")
    audience = (env.get("EMO_MCP_OAUTH_AUDIENCE") or "").strip() or None
    if issuer is not None and audience is None:
        if public is None:
            raise ConfigError(
                f"EMO_MCP_OAUTH_ISSUER is set: set EMO_MCP_OAUTH_AUDIENCE, or {PUBLIC_URL_ENV} (the audience is "
                "then that address + /mcp)"
            )
        audience = f"{public}/mcp"
    if issuer is not None and tenants_file is None:
        raise ConfigError(
            f"EMO_MCP_OAUTH_ISSUER is set but {TENANTS_FILE_ENV} is not: a token's tenant claim names a tenant "
            "of the tenants file, which holds its DashScope key and limits"
        )
    return {
        "tenants_file": tenants_file,
        "public_url": public,
        "link_secret": secret,
        "link_ttl": _positive_float(env, "EMO_MCP_LINK_TTL", DEFAULT_LINK_TTL),
        "audit_log": audit,
        "oauth_issuer": issuer,
        "oauth_audience": audience,
        "oauth_tenant_claim": (env.get("EMO_MCP_OAUTH_TENANT_CLAIM") or "").strip() or DEFAULT_TENANT_CLAIM,
    }
