"""Shared by the tenancy tests (tests/test_tenants.py, tests/test_tenant_signin.py): the accounts' keys,
the tenants' tokens, and the fixtures (`database`: SQLite, then a fresh PostgreSQL schema; `accounts`: the
fake of DashScope accepting every account's key, each seeing only its own tasks)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest

from server.sandbox.fake_dashscope import FakeDashScope
from tests.postgres import BASE_URL

KEYS = {"alice": "sk-alice-000000000001", "bob": "sk-bob-00000000000002", "shared": "sk-shared-0000000003"}
TOKENS = {name: f"token-of-{name}-{'x' * 24}" for name in ("alice", "bob", "carol", "dave")}
PUBLIC = "https://mcp.example.com"
SECRET = "6a1f0c9e2b7d4a8351c0e6f9b2d7a4c18e5f3b9d0a6c2e7f41b8d5a3c9e0f627"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    if not BASE_URL:
        pytest.skip("no PostgreSQL: set EMO_MCP_TEST_DATABASE_URL")
    yield request.getfixturevalue("pg_url")


@pytest.fixture
async def accounts() -> AsyncIterator[FakeDashScope]:
    fake = FakeDashScope(api_key=KEYS["alice"], polls_to_finish=2)
    fake.extra_keys |= {KEYS["bob"], KEYS["shared"]}
    async with fake.serve():
        yield fake
