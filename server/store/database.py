"""The ledger's backend interface: one `Database` protocol, a driver per backend behind it.

`server.store.sqlite` (the embedded default, a file in the state folder) and `server.store.postgres`
(a shared server, `EMO_MCP_DATABASE_URL`) implement it; the ledger, the due queue, spend and the upload
cache talk only to this protocol, so nothing above the store knows which backend holds the rows. The
SQL the store writes is portable (`?` placeholders, `ON CONFLICT`, `RETURNING`); what cannot be
(schema types, `SKIP LOCKED`, JSON functions) lives in `server/store/sql/<dialect>/`, as versioned
migrations and named queries, read by `server.store.migrations`.

psycopg is imported only by `open_database` when a URL is given: stdio start-up on SQLite never pays
for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

Dialect = Literal["sqlite", "postgresql"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")
# The variable that selects PostgreSQL (named in every message about an unreachable database).
DATABASE_URL_VARIABLE = "EMO_MCP_DATABASE_URL"


# One statement and its parameters (`Database.execute_batch`).
Statement = tuple[str, Sequence[Any]]


class Row(Protocol):
    """A result row, by column name or by position (`sqlite3.Row` is one; PostgreSQL's rows are too)."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def keys(self) -> list[str]: ...


class Transaction(Protocol):
    """Statements run together: all of them commit, or none does."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...


class Database(Protocol):
    """What the store needs of a backend; every call is synchronous and bounded in time."""

    dialect: Dialect
    # Where the rows live, fit for messages and logs (a file path, or a URL without its password).
    location: str

    def execute(self, sql: str, params: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        """One statement in its own write transaction; returns its rows (`RETURNING`, or none).

        `durable=False`: the commit need not wait for the disk (PostgreSQL's `synchronous_commit = off`:
        visible to everyone at once, but a crash of the database server may forget the last fraction of
        a second). Only for state the watcher re-derives by itself: due times, claims, rate slots,
        heartbeats, the latest answer about a task. Never for a submit, a detection or a video."""
        ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One read without a write transaction (a single statement sees a consistent snapshot)."""
        ...

    def execute_batch(self, statements: Sequence[Statement], *, durable: bool = True) -> None:
        """Statements whose rows nobody reads, as one write transaction sent at once: PostgreSQL pipelines
        them (one round trip for the lot, however many), SQLite runs them in one transaction. For the
        watcher's writes after many queries at a time (`server/jobs/writes.py`); `durable` as in `execute`."""
        ...

    def transaction(self) -> AbstractContextManager[Transaction]:
        """Several statements as one write transaction (SQLite: `BEGIN IMMEDIATE`)."""
        ...

    def migrate(self) -> int:
        """Apply this dialect's pending migrations, safely when several processes start at once; the version."""
        ...

    def version(self) -> int:
        """The newest migration applied (0: none)."""
        ...

    def ping(self) -> None:
        """A cheap round trip; raises `LedgerUnavailable` when the database does not answer."""
        ...

    def trace(self, callback: Callable[[str], object] | None) -> None:
        """See every statement run from now on (tests check SQLite's query plans with it)."""
        ...

    def close(self) -> None: ...


class NamedRow:
    """A row of a driver that gives tuples: read by name or position, like `sqlite3.Row`."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: int | str, /) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"NamedRow({dict(zip(self._index, self._values, strict=True))!r})"


def redact_url(url: str) -> str:
    """The URL without its password (in the netloc and in a `password=` query parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL, to scrub from any driver message before it is shown."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += re.findall(r"(?i)(?:^|&)password=([^&]+)", parts.query)
    return [secret for secret in found if secret]


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in ("postgresql", "postgres")


def open_database(state_dir: Path, url: str | None = None) -> Database:
    """PostgreSQL when `url` is set (psycopg imported only now), else SQLite in `state_dir`; migrated."""
    if url:
        from server.store.postgres import PostgresDatabase

        return PostgresDatabase(url)
    from server.store.sqlite import SQLiteDatabase

    return SQLiteDatabase(state_dir)
