"""A real PostgreSQL for the tests, never a mock: each test gets a fresh schema of its own.

The server comes from EMO_MCP_TEST_DATABASE_URL (`.ci/run` starts Debian's PostgreSQL and sets it).
Without it the PostgreSQL tests are reported as skipped; with EMO_MCP_REQUIRE_POSTGRES=1 (CI) a missing
or unreachable database fails them instead, as EMO_MCP_REQUIRE_INSPECTOR does for the Inspector.

A schema per test (selected with the URL's `options=-csearch_path=...`, which libpq passes to the
server) keeps tests independent without the right to create databases, and is dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

BASE_URL = os.environ.get("EMO_MCP_TEST_DATABASE_URL", "").strip()
REQUIRED = os.environ.get("EMO_MCP_REQUIRE_POSTGRES") == "1"
if REQUIRED and not BASE_URL:
    raise RuntimeError("EMO_MCP_REQUIRE_POSTGRES=1 but EMO_MCP_TEST_DATABASE_URL is not set")

needs_postgres = pytest.mark.skipif(
    not BASE_URL, reason="no PostgreSQL: set EMO_MCP_TEST_DATABASE_URL (EMO_MCP_REQUIRE_POSTGRES=1 makes it required)"
)


def with_schema(url: str, schema: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty schema on the test server (dropped after the test)."""
    if not BASE_URL:
        pytest.skip("no PostgreSQL: set EMO_MCP_TEST_DATABASE_URL")
    import psycopg

    schema = f"emo_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(BASE_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if REQUIRED:
            pytest.fail(f"EMO_MCP_REQUIRE_POSTGRES=1 but the test database does not answer: {exc}")
        pytest.skip(f"the test database does not answer: {exc}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield with_schema(BASE_URL, schema)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            # Tenants' ledgers live in schemas beside the test's own (server/tenancy/tenants.py).
            for (tenant_schema,) in admin.execute(
                "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (f"{schema}_t_",)
            ).fetchall():
                admin.execute(f'DROP SCHEMA "{tenant_schema}" CASCADE')
