"""The shared backend: PostgreSQL through psycopg 3 and a `psycopg_pool.ConnectionPool`.

Imported only when `EMO_MCP_DATABASE_URL` is set (`server.store.database.open_database`), so the SQLite
default never loads psycopg.

Why a synchronous pool: the ledger's API is synchronous (the domain calls it between awaits, as it
did SQLite), and a round trip to a nearby server costs about what a SQLite write does. What makes
that safe on an event loop is that no call can wait long: connecting is bounded by `CONNECT_TIMEOUT`,
borrowing a connection by `POOL_TIMEOUT`, each statement by `STATEMENT_TIMEOUT` (and a lock wait by
`LOCK_TIMEOUT`), and TCP keepalives with a user timeout notice a peer that vanished mid-call. A dead
database therefore costs a call a few seconds at most, and the call fails with `LedgerUnavailable`
(the ledger database is unreachable; nothing was sent) instead of hanging the server.

Why a circuit breaker on top: the ledger is called synchronously on the event loop, so while the
database is away every call that waited for a connection would block the whole server (every other
call, the watcher, /healthz) for the pool's timeout. After one failure the breaker is open: every call
fails at once, without touching the network, and a background thread (never the event loop) probes
the server every `PROBE_EVERY` seconds; once a connection succeeds, it checks the pool's idle
connections (dropping those the outage broke) and closes the breaker. So one call pays the timeout,
the others fail in microseconds, and calls succeed again within about a second of the database's
return, without a restart.

`ping()` is what a paid call asks before it is sent (a detect could not be recorded for provenance):
any statement that succeeded in the last `HEALTHY_FOR` seconds counts as a ping, so a healthy worker
pays no extra round trip for it; a worker idle longer pays one `SELECT 1`.

Connections run in autocommit: a read is one statement; a write transaction is explicit
(`conn.transaction()`). Placeholders are the store's portable `?`, translated once per statement.
The password never reaches a message: errors carry `location` (the URL without it) and driver text
is scrubbed of it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import RowMaker

from server.errors import ConfigError, LedgerUnavailable, StorageError
from server.redaction import register_secret
from server.store.database import (
    DATABASE_URL_VARIABLE,
    Dialect,
    NamedRow,
    Row,
    Statement,
    Transaction,
    redact_url,
    url_secrets,
)
from server.store.migrations import migrations

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3  # seconds to open a connection (libpq's connect_timeout)
POOL_TIMEOUT = 3.0  # seconds a call waits to borrow a connection before the database counts as down
# A statement that succeeded this recently stands for a ping (a paid call's check costs nothing then).
HEALTHY_FOR = 1.0
MAX_INDEXES = 1024  # distinct result shapes whose name index is kept (statements are few; a bound anyway)
_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
# While the breaker is open: how often the background thread tries a connection.
PROBE_EVERY = 0.5
# The channel of the 0004 migration's trigger (payload: "<schema> <task id>").
TASK_CHANNEL = "emo_task_changed"
STATEMENT_TIMEOUT_MS = 10_000
LOCK_TIMEOUT_MS = 5_000
POOL_MIN, POOL_MAX = 1, 8
# A schema name this store creates on its own (`_ensure_schema`): a plain identifier, never quoted.
_PLAIN_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# One advisory lock key for migrations (with the schema's hash as the second half): workers starting
# at once take turns, the first applies, the others find nothing left to do.
_MIGRATION_LOCK = 0x454D4F  # "EMO"
_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations"
    " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)
_CONNECTION_OPTIONS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 5_000,
    "application_name": "dashscope-emo-mcp",
}


@lru_cache(maxsize=1)
def local_timezone() -> str | None:
    """This process's time zone, as PostgreSQL names it: `TZ`, the zone `/etc/localtime` links to, or
    else the current UTC offset as a POSIX zone; None if unknown."""
    named = os.environ.get("TZ", "").lstrip(":")
    if named:
        return named
    with contextlib.suppress(OSError):
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    offset = time.localtime().tm_gmtoff
    if offset is None:
        return None
    east, size = offset >= 0, abs(offset)
    hours_minutes = f"{size // 3600:02d}:{size % 3600 // 60:02d}"
    # POSIX form (its offsets count west of Greenwich): "<+08:00>-08:00" is eight hours east.
    return f"<{'+' if east else '-'}{hours_minutes}>{'-' if east else '+'}{hours_minutes}"


def _sql(statement: Statement) -> str:
    return statement[0]


@lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    """The store's `?` placeholders as psycopg's `%s` (a literal `%` doubled first)."""
    return sql.replace("%", "%%").replace("?", "%s")


# Column name -> position, per distinct list of result column names (a few dozen statements).
_INDEXES: dict[tuple[bytes | None, ...], dict[str, int]] = {}


def _named_rows(cursor: psycopg.Cursor[Any]) -> RowMaker[NamedRow]:
    """Rows readable by name. The names come straight from the result (`cursor.description` builds a
    `Column` object per column per statement: a tenth of a busy worker's time with `SELECT *` of tasks),
    and each distinct list of names maps to one shared index."""
    result = cursor.pgresult
    names = tuple(result.fname(position) for position in range(result.nfields)) if result is not None else ()
    index = _INDEXES.get(names)
    if index is None:
        index = {(name or b"").decode(): position for position, name in enumerate(names)}
        if len(_INDEXES) < MAX_INDEXES:
            _INDEXES[names] = index
    return lambda values: NamedRow(index, values)


class _Tx:
    def __init__(self, conn: psycopg.Connection[NamedRow], owner: PostgresDatabase) -> None:
        self._conn = conn
        self._owner = owner

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._owner._run(self._conn, sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None


class PostgresDatabase:
    """A pool of connections to one database (the schema is the URL's `search_path`, `public` by default)."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self._url = url
        self._secrets = url_secrets(url)
        register_secret(*self._secrets)  # every log line, evidence file and result hides the password too
        self.location = redact_url(url)
        self._trace: Callable[[str], object] | None = None
        # The breaker: the reason the database counts as down (None: closed, calls go through).
        self._down: LedgerUnavailable | None = None
        self._breaker = threading.Lock()
        self._probing = False
        self._closed = threading.Event()
        self._last_ok = 0.0  # monotonic time of the last statement that succeeded
        # Pooled connections whose session has `synchronous_commit = off` (`_commit_mode`).
        self._soft: weakref.WeakSet[psycopg.Connection[NamedRow]] = weakref.WeakSet()
        # A first connection straight away: a wrong or unreachable URL fails here, with libpq's reason,
        # not later as a pool timeout.
        with self._guard("connect"):
            first = psycopg.connect(url, autocommit=True, row_factory=_named_rows, **_CONNECTION_OPTIONS)
        try:
            self._configure(first)
            self._ensure_schema(first)
            if migrate:
                self._migrate_on(first)
        finally:
            first.close()
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[NamedRow]] = psycopg_pool.ConnectionPool(
            url,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            timeout=POOL_TIMEOUT,
            kwargs={"autocommit": True, "row_factory": _named_rows, **_CONNECTION_OPTIONS},
            configure=self._configure,
            reconnect_timeout=0,  # keep trying in the background while the database is away
            open=True,
            name="emo-ledger",
        )

    # ------------------------------------------------------------------ Database

    def execute(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        # One statement in autocommit is its own transaction (atomic, committed before it returns): one
        # round trip instead of BEGIN, the statement and COMMIT. The watcher writes after every query.
        with self._guard("write"), self._pool.connection() as conn:
            self._commit_mode(conn, durable=durable)
            return self._run(conn, sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._guard("read"), self._pool.connection() as conn:
            return self._run(conn, sql, params)

    def execute_batch(self, statements: Sequence[Statement], *, durable: bool = True) -> None:
        # Pipeline mode: BEGIN, every statement and COMMIT leave together and their results come back
        # together, one round trip instead of one per statement (the watcher batches a tick's writes).
        if not statements:
            return
        # One cursor for the batch, and each run of one statement with different parameters (the watcher
        # sends its answers together, then its filings) as one `executemany`: prepared once, no cursor
        # per statement (per-statement cursors were a fifth of a busy worker's CPU).
        runs = [(sql, [tuple(params) for _, params in run]) for sql, run in itertools.groupby(statements, key=_sql)]
        with self._guard("write"), self._pool.connection() as conn:
            self._commit_mode(conn, durable=durable)
            with conn.pipeline(), conn.transaction(), conn.cursor() as cursor:
                for sql, params in runs:
                    if self._trace is not None:
                        for _ in params:
                            self._trace(sql)
                    if any(params):
                        cursor.executemany(_translate(sql), params)
                    else:
                        for _ in params:
                            cursor.execute(sql)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._guard("write"), self._pool.connection() as conn:
            self._commit_mode(conn, durable=True)
            with conn.transaction():
                yield _Tx(conn, self)

    def version(self) -> int:
        with self._guard("read"), self._pool.connection() as conn:
            return self._version_on(conn)

    def migrate(self) -> int:
        with self._guard("migrate"), self._pool.connection() as conn:
            return self._migrate_on(conn)

    def ping(self) -> None:
        """Healthy if a statement succeeded within `HEALTHY_FOR` s (no round trip), else `SELECT 1`."""
        if self._down is None and time.monotonic() - self._last_ok < HEALTHY_FOR:
            return
        with self._guard("ping"), self._pool.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    @property
    def down(self) -> bool:
        """Whether the breaker is open (the last call found the database unreachable)."""
        return self._down is not None

    def clock(self) -> float:
        """The database server's clock (epoch seconds): one time for every host of the cluster."""
        with self._guard("read"), self._pool.connection() as conn:
            row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        assert row is not None
        return float(row[0])

    def listen(self, deliver: Callable[[str], object], state: Callable[[bool], object], stop: threading.Event) -> None:
        """Until `stop`: LISTEN on a dedicated connection and `deliver` each changed task id of this schema.

        Blocking (run it on a thread of its own). `state(True)` once listening, `state(False)` when the
        connection is lost (its waiters fall back to reading the row); it reconnects every
        `PROBE_EVERY` seconds until the database answers again.
        """
        while not stop.is_set() and not self._closed.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, **_CONNECTION_OPTIONS) as conn:
                    row = conn.execute("SELECT current_schema()").fetchone()
                    schema = str(row[0]) if row else "public"
                    conn.execute(f"LISTEN {TASK_CHANNEL}")
                    state(True)
                    while not stop.is_set() and not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=64):
                            where, _, task_id = note.payload.partition(" ")
                            if where == schema and task_id:
                                deliver(task_id)
            except psycopg.Error as exc:
                logger.debug("ledger %s: the change listener lost its connection: %s", self.location, exc)
            state(False)
            stop.wait(PROBE_EVERY)

    def trace(self, callback: Callable[[str], object] | None) -> None:
        self._trace = callback

    def close(self) -> None:
        self._closed.set()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close(timeout=2.0)

    # ------------------------------------------------------------------ helpers

    def _commit_mode(self, conn: psycopg.Connection[NamedRow], *, durable: bool) -> None:
        """The session's `synchronous_commit` as this write needs it (`Database.execute`'s `durable`).

        A pooled connection keeps the mode of its last write; it is switched (one `SET`, no commit)
        only when the next write needs the other one, so a watcher's run of soft writes pays it once.
        A new connection is durable (the server's default)."""
        soft = conn in self._soft
        if soft == (not durable):
            return
        conn.execute("SET synchronous_commit = " + ("on" if durable else "off"))
        if durable:
            self._soft.discard(conn)
        else:
            self._soft.add(conn)

    def _run(self, conn: psycopg.Connection[NamedRow], sql: str, params: Sequence[Any]) -> list[Row]:
        if self._trace is not None:
            self._trace(sql)
        # Without parameters psycopg reads the text as it is (no placeholders, `%` needs no doubling).
        cursor = conn.execute(_translate(sql), tuple(params)) if params else conn.execute(sql)
        result = cursor.pgresult  # its status, not `cursor.description` (see `_named_rows`)
        return list(cursor.fetchall()) if result is not None and result.status == _TUPLES_OK else []

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        # Spend's triggers bucket rows by the writer's local day, as SQLite's 'localtime' does.
        zone = local_timezone()
        if zone is not None:
            conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        conn.execute("SET idle_in_transaction_session_timeout = 60000")

    @staticmethod
    def _ensure_schema(conn: psycopg.Connection[NamedRow]) -> None:
        """Create the schema the URL's `search_path` names when it does not exist yet: a tenant's ledger
        (server/tenancy/tenants.py) lives in a schema of its own, made on the tenant's first start.
        Workers starting together may race on the catalog: whoever loses finds it made."""
        row = conn.execute("SELECT current_schema()").fetchone()
        if row is not None and row[0] is not None:
            return
        shown = conn.execute("SHOW search_path").fetchone()
        first = str(shown[0] if shown else "").split(",")[0].strip()
        if not _PLAIN_SCHEMA.fullmatch(first):
            return  # nothing this store may create (the migration then says what is missing)
        try:
            with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {first}")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"The ledger's schema {first} does not exist and this database role may not create it (each "
                f"tenant's ledger lives in a schema of its own): GRANT CREATE ON DATABASE to the role, or create "
                f"the schema as its owner (CREATE SCHEMA {first} AUTHORIZATION <role>)."
            ) from exc

    @staticmethod
    def _version_on(conn: psycopg.Connection[NamedRow]) -> int:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row else 0

    def _migrate_on(self, conn: psycopg.Connection[NamedRow]) -> int:
        """Pending migrations in one transaction under a transaction-scoped advisory lock: workers that
        start together queue on the lock, and each re-reads the version once it holds it."""
        pending = migrations(self.dialect)
        if self._version_on(conn) == len(pending):
            return len(pending)
        self._version_table(conn)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (_MIGRATION_LOCK,))
            # Read through the table itself, not the catalog: locking the relation makes this backend see
            # what the worker that held the lock before just committed (its catalog cache may be stale).
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            current = int(row[0] or 0) if row else 0
            for migration in pending[current:]:
                conn.execute(migration.sql)  # several statements: allowed without parameters
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, time.time()),
                )
                logger.info("ledger %s: migration %04d_%s applied", self.location, migration.version, migration.name)
        return len(pending)

    @staticmethod
    def _version_table(conn: psycopg.Connection[NamedRow]) -> None:
        """The migrations table, before the lock: workers creating it at the same instant may collide
        on the catalog's unique index; one of them wins, and the others find it there."""
        for _ in range(3):
            try:
                conn.execute(_VERSION_TABLE)
                return
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                time.sleep(0.05)
        conn.execute(_VERSION_TABLE)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.replace(self._url, self.location)

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Driver failures as the project's errors: unreachable (connection, pool, timeouts) or storage.

        While the breaker is open the call fails here, before any network I/O."""
        down = self._down
        if down is not None:
            raise LedgerUnavailable(str(down))
        try:
            yield
        except psycopg.errors.LockNotAvailable as exc:  # busy rows, not a lost server: the breaker stays closed
            reason = self._scrub(" ".join(str(exc).split()))[:300]
            raise StorageError(f"The ledger database was busy ({doing}): {reason}; call again.") from exc
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as exc:
            reason = self._scrub(" ".join(str(exc).split()))[:300] or type(exc).__name__
            error = LedgerUnavailable(unreachable(self.location, reason))
            self._trip(error)
            raise error from exc
        except psycopg.Error as exc:
            reason = self._scrub(" ".join(str(exc).split()))[:300]
            raise StorageError(f"The ledger database refused a {doing}: {reason}") from exc
        self._last_ok = time.monotonic()

    def _trip(self, error: LedgerUnavailable) -> None:
        """Open the breaker, and start the one thread that closes it once the database answers."""
        if getattr(self, "_pool", None) is None:
            return  # the first connection failed: there is no server to keep up (start-up exits)
        with self._breaker:
            self._down = error
            if self._probing or self._closed.is_set():
                return
            self._probing = True
        logger.warning("ledger %s: unreachable; calls fail at once until it answers again", self.location)
        threading.Thread(target=self._probe, name="emo-ledger-probe", daemon=True).start()

    def _probe(self) -> None:
        """Off the event loop: a fresh connection every `PROBE_EVERY` s until one works; then the pool's
        idle connections are checked (the outage broke them) and the breaker closes."""
        try:
            while not self._closed.wait(PROBE_EVERY):
                try:
                    with psycopg.connect(self._url, autocommit=True, **_CONNECTION_OPTIONS) as conn:
                        conn.execute("SELECT 1").fetchone()
                    self._pool.check()
                except (psycopg.Error, psycopg_pool.PoolClosed):
                    continue
                with self._breaker:
                    self._down = None
                    self._last_ok = time.monotonic()
                logger.warning("ledger %s: reachable again", self.location)
                return
        finally:
            with self._breaker:
                self._probing = False


def unreachable(location: str, reason: str) -> str:
    """The message every call gets while the database is away: what failed, and that nothing was sent."""
    return (
        f"The ledger database is unreachable ({DATABASE_URL_VARIABLE}={location}): {reason}. Nothing was sent to"
        " DashScope and nothing was billed: no detect or submit is made while the ledger cannot record it."
        " The server reconnects by itself; call again in a few seconds."
    )
