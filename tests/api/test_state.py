"""The API's tables on both engines: idempotency keys claimed, finished, released and purged."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.api.state import ApiState, PostgresApiState, QueuedRow, SQLiteApiState
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


TOMBSTONE = "erased:" + "0f" * 32


async def erasure_behaves(state: ApiState, rows: Any) -> None:
    """An erasure deletes the outbox rows that name the address (pending or delivered), rewrites
    the idempotency answers that name it (a retry replays the anonymised answer), and leaves
    everyone else's rows alone."""
    now = time.time()
    await state.enqueue(
        [
            QueuedRow(
                "https://crm.example/hook", "opted_out", '{"record":{"address":"Anna.Jansen@Example.nl"}}', "c:1"
            ),
            QueuedRow("https://crm.example/hook", "opted_out", '{"record":{"address":"piet@example.org"}}', "c:2"),
            QueuedRow(
                "https://crm.example/hook", "complaint", '{"record":{"address":"anna.jansen@example.nl"}}', "c:3"
            ),
        ],
        now,
    )
    (first, *_) = await state.claim_due(now + 1, 30, 10)
    await state.delivered(first.id)  # delivered rows are kept a day: they name her too
    for key, body in (("k-1", '{"event":{"address":"ANNA.JANSEN@example.nl","ip":"198.51.100.23"}}'),
                      ("k-2", '{"event":{"address":"piet@example.org"}}')):  # fmt: skip
        assert (await state.claim("crm", key, "h-" + key, now)).state == "new"
        await state.finish("crm", key, 201, body)

    purged = await state.forget_address(["anna.jansen@example.nl"], TOMBSTONE)
    assert purged == {"webhook outbox rows": 2, "idempotency answers": 1}
    left = "\n".join(str(row) for row in await rows())
    assert "anna" not in left.lower() and "piet@example.org" in left and TOMBSTONE in left
    # The CRM retries its request: the key still holds, the answer names no one.
    claim = await state.claim("crm", "k-1", "h-k-1", now)
    assert claim.state == "done" and claim.status == 201 and claim.body is not None
    assert TOMBSTONE in claim.body and "198.51.100.23" not in claim.body  # her IP went with her address
    assert (await state.claim("crm", "k-2", "other", now)).state == "mismatch"
    assert await state.forget_address(["anna.jansen@example.nl"], TOMBSTONE) == {
        "webhook outbox rows": 0,
        "idempotency answers": 0,
    }


async def test_sqlite_erasure(tmp_path: Path) -> None:
    path = str(tmp_path / "consent.db")
    consent = await SQLiteConsentStore.open(path, lookup_timeout=5)
    state = await SQLiteApiState.open(path)

    async def rows() -> list[Any]:
        with sqlite3.connect(path) as db:
            return [*db.execute("SELECT * FROM webhook_outbox"), *db.execute("SELECT * FROM api_idempotency")]

    try:
        await erasure_behaves(state, rows)
        files = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("consent.db*"))
        assert "anna.jansen" not in files.lower(), "no old row left readable in the file or its WAL"
    finally:
        await state.close()
        await consent.close()


@pytest.mark.postgres
async def test_postgres_erasure(postgres_target: PostgresTarget) -> None:
    state = await PostgresApiState.open(postgres_target.dsn, 5)

    async def rows() -> list[Any]:
        async with await psycopg.AsyncConnection.connect(postgres_target.dsn) as conn:
            found = await (await conn.execute("SELECT w::text FROM webhook_outbox w")).fetchall()
            return found + await (await conn.execute("SELECT i::text FROM api_idempotency i")).fetchall()

    try:
        await erasure_behaves(state, rows)
    finally:
        await state.close()
