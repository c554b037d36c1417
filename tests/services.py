"""The real Redis and PostgreSQL servers the scale-out tests use.

Each test gets its own namespace: a unique Redis key prefix, a fresh PostgreSQL schema
(dropped afterwards), so tests never see each other's data. Where a server is not
running, the tests that need it skip and say why; under CI (CI=true) they fail instead,
because CI must exercise the real engines.

Addresses: SENDGUARD_TEST_REDIS (default redis://127.0.0.1:6379/0) and
SENDGUARD_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

REDIS_URL = os.environ.get("SENDGUARD_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("SENDGUARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({type(error).__name__}: {error})"
    if IN_CI:
        pytest.fail(f"{message}; CI must run this test against the real server")
    pytest.skip(f"{message}; start it to run this test")


@dataclass
class RedisTarget:
    url: str
    prefix: str  # every key a test writes starts with this


@pytest.fixture
async def redis_target() -> AsyncIterator[RedisTarget]:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as error:  # any connection problem means: no Redis here
        await client.aclose()
        unavailable(f"Redis at {REDIS_URL}", error)
    prefix = f"sgtest:{secrets.token_hex(6)}:"
    yield RedisTarget(REDIS_URL, prefix)
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@dataclass
class PostgresTarget:
    dsn: str  # connects with search_path set to the test's own schema
    schema: str


@pytest.fixture
async def postgres_target() -> AsyncIterator[PostgresTarget]:
    import psycopg

    schema = f"sgtest_{secrets.token_hex(6)}"
    try:
        admin = await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5)
    except Exception as error:
        unavailable(f"PostgreSQL at {POSTGRES_DSN}", error)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in POSTGRES_DSN else "?"
    dsn = f"{POSTGRES_DSN}{separator}options={quote(f'-csearch_path={schema}')}"
    yield PostgresTarget(dsn, schema)
    await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await admin.close()
