"""Versioned schema migrations and named queries, one folder of SQL per dialect.

`server/store/sql/<dialect>/NNNN_<what>.sql` are the migrations, applied in order and recorded in
`schema_migrations` (one row per version), so a ledger of any age is brought up to date at start and a
change of schema is a new file, never an edit of an applied one. `queries.sql` holds the few queries
that cannot be written once for both dialects (`-- name: claim` starts one), so the Python that uses
them stays the same for every backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from server.store.database import Dialect

_MIGRATION = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _folder(dialect: Dialect) -> Traversable:
    return files("server.store").joinpath("sql", dialect)


@cache
def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """Every migration of `dialect`, oldest first (versions are 1, 2, 3, ... without gaps)."""
    found = []
    for entry in _folder(dialect).iterdir():
        match = _MIGRATION.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    if [migration.version for migration in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the {dialect} migrations are not numbered 1..{len(found)}")
    return tuple(found)


def latest(dialect: Dialect) -> int:
    return len(migrations(dialect))


@cache
def named_queries(dialect: Dialect) -> dict[str, str]:
    """`queries.sql` of `dialect`, by name."""
    text = _folder(dialect).joinpath("queries.sql").read_text(encoding="utf-8")
    marks = list(_NAME.finditer(text))
    queries: dict[str, str] = {}
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        body = "\n".join(line for line in text[mark.end() : end].splitlines() if not line.strip().startswith("--"))
        queries[mark[1]] = " ".join(body.split()).rstrip(";")
    return queries
