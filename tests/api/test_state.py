"""The API's tables on both engines: idempotency keys claimed, finished, released and purged."""

from __future__ import annotations

import time
from pathlib import Path

from proxy.api.state import ApiState, PostgresApiState, SQLiteApiState
from proxy.stores.consent_sqlite import SQLiteConsentStore
from tests.services import PostgresTarget


async def keys_behave(state: ApiState) -> None:
    now = time.time()
    steps = [
        # (what, call, expected claim state)
        ("first use", ("crm", "k1", "h1"), "new"),
        ("retry while the first is answered", ("crm", "k1", "h1"), "busy"),
        ("same key, another body", ("crm", "k1", "h2"), "mismatch"),
        ("same key, another token", ("form", "k1", "h2"), "new"),
    ]
    for what, (token, key, digest), expected in steps:
        assert (await state.claim(token, key, digest, now)).state == expected, what
    await state.finish("crm", "k1", 201, '{"event": {}}')
    claim = await state.claim("crm", "k1", "h1", now)
    assert (claim.state, claim.status, claim.body) == ("done", 201, '{"event": {}}')
    # A request that failed inside sendguard frees its key; a finished one is not released.
    await state.release("form", "k1")
    assert (await state.claim("form", "k1", "h9", now)).state == "new"
    await state.release("crm", "k1")
    assert (await state.claim("crm", "k1", "h1", now)).state == "done"
    # Past the time to live the key is forgotten, and a new request with it records again.
    assert await state.purge_keys(now + 1) == 2
    assert (await state.claim("crm", "k1", "h1", now)).state == "new"


async def test_sqlite_keys(tmp_path: Path) -> None:
    path = str(tmp_path / "consent.db")
    consent = await SQLiteConsentStore.open(path, lookup_timeout=5)
    state = await SQLiteApiState.open(path)
    try:
        await keys_behave(state)
        assert oct((tmp_path / "consent.db").stat().st_mode & 0o777) == "0o600"
    finally:
        await state.close()
        await consent.close()


async def test_postgres_keys(postgres_target: PostgresTarget) -> None:
    state = await PostgresApiState.open(postgres_target.dsn, 5)
    try:
        await keys_behave(state)
    finally:
        await state.close()
