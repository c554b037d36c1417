"""Erasure (AVG art. 17) in the consent store, on SQLite and the real PostgreSQL: an erased
address's rows become tombstones with no personal data left, its commercial mail stays refused
through the keyed hash, and the table still refuses every other change."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.stores.consent import (
    STORED_COLUMNS,
    ConsentInputError,
    ConsentStore,
    ConsentStoreConfig,
    ConsentStoreError,
    erasure_subject,
    open_consent_store,
    stored_values,
    utcnow,
)
from proxy.stores.consent_sqlite import SQLiteConsentStore
from proxy.stores.migrations.consent import CONSENT_MIGRATIONS
from tests.stores.test_consent_store import BACKENDS, T0, ev, opt_in

KEY = "erasure-key-for-tests-0123456789abcdef"
BOB = "Bob.Jansen@Example.org"
PERSONAL = ("bob.jansen", "Bob.Jansen", "198.51.100.7", "Mozilla/5.0 Bob", "order 4711", "signup?u=bob")

Raw = Callable[[str, tuple[Any, ...]], Awaitable[list[tuple[Any, ...]]]]


@dataclass
class Backend:
    config: ConsentStoreConfig
    raw: Raw  # a statement outside the store: what a DBA (or an attacker with the file) sees
    dump: Callable[[], Awaitable[str]]  # every stored byte we can read, as text


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "consent.db"

        async def raw_sqlite(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as db:
                return db.execute(sql.replace("%s", "?"), params).fetchall()

        async def dump_sqlite() -> str:
            # The file and its WAL as bytes: free pages and old page images count too.
            return "".join(
                p.read_bytes().decode("latin-1") for p in tmp_path.iterdir() if p.name.startswith("consent.db")
            )

        return Backend(ConsentStoreConfig(path=str(path), erasure_key=KEY), raw_sqlite, dump_sqlite)
    target = request.getfixturevalue("postgres_target")

    async def raw_postgres(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(target.dsn, autocommit=True) as conn:
            cursor = await conn.execute(sql, params or None)  # type: ignore[arg-type]
            return await cursor.fetchall() if cursor.description else []

    async def dump_postgres() -> str:
        rows = await raw_postgres("SELECT c::text FROM consent_events c", ())
        return "\n".join(str(row[0]) for row in rows)

    return Backend(ConsentStoreConfig(backend="postgres", dsn=target.dsn, erasure_key=KEY), raw_postgres, dump_postgres)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[ConsentStore]:
    opened = await open_consent_store(backend.config)
    yield opened
    await opened.close()


async def record_bob(store: ConsentStore) -> None:
    await store.add(
        opt_in(BOB, topic="news", sender="shop.example", source="https://shop.example/signup?u=bob",
               ip="198.51.100.7", user_agent="Mozilla/5.0 Bob", text_version="v3"),
        ev("customer", BOB, T0 + timedelta(days=1), sender="shop.example", product_category="shoes",
           objection_offered=True, relation="order 4711"),
        ev("opted_out", BOB, T0 + timedelta(days=2), method="reply", topic="news", reason="Bob.Jansen wrote: stop"),
        ev("suppressed", BOB, T0 + timedelta(days=3), method="hard_bounce", reason="bounce",
           upstream_reply="550 5.1.1 <bob.jansen@example.org> unknown"),
        opt_in("@example.org", topic="b2b", method="paper", source="contract 2024-17"),
        opt_in("carol@example.org", topic="news", ip="203.0.113.9"),
    )  # fmt: skip


async def test_an_erasure_leaves_no_personal_data_and_still_refuses(store: ConsentStore, backend: Backend) -> None:
    await record_bob(store)
    erasure = await store.erase(BOB, requested_via="a letter")
    assert erasure.erased == 4
    assert erasure.suppression.method == "erasure" and erasure.suppression.subject == "bob.jansen@example.org"

    dump = await backend.dump()
    for text in PERSONAL:
        assert text not in dump, text
    assert "carol@example.org" in dump and "203.0.113.9" in dump, "nobody else is erased"
    assert "contract 2024-17" in dump, "the domain's business relation stays"
    tombstone = erasure_subject(KEY.encode(), "bob.jansen@example.org")
    rows = await backend.raw(
        "SELECT kind, method, topic, sender, subject_original, ip, user_agent, source, relation, reason, "
        "upstream_reply, note, erased_at IS NOT NULL FROM consent_events WHERE subject = %s ORDER BY id",
        (tombstone,),
    )
    assert [row[:4] for row in rows] == [
        ("opted_in", "web_form", "news", "shop.example"),
        ("customer", "sale", "*", "shop.example"),
        ("opted_out", "reply", "news", "*"),
        ("suppressed", "hard_bounce", "*", "*"),
        ("suppressed", "erasure", "*", "*"),
    ], "what happened, and when, stays countable"
    assert all(row[4] == "erased" and row[5:8] == (None, None, "") and row[8:10] == (None, None) for row in rows[:4])
    assert [bool(row[12]) for row in rows] == [True, True, True, True, False]

    # Found again by the address it was given, read back as that address, and refused.
    for spelling in (BOB, "bob.jansen@example.org", "<BOB.JANSEN@EXAMPLE.ORG>"):
        basis = await store.basis(spelling, "news", "shop.example")
        assert (basis.allowed, basis.kind) == (False, "suppressed")
        assert basis.record is not None and basis.record.method == "erasure"
    history = await store.history(BOB)
    assert [e.erased_at is not None for e in history if e.subject_kind == "address"] == [True] * 4 + [False]
    assert all(e.ip is None and e.user_agent is None for e in history if e.erased_at is not None)


async def test_consent_given_again_after_an_erasure_counts_once_the_block_is_lifted(store: ConsentStore) -> None:
    dave = "dave@example.org"
    await store.add(opt_in(dave, topic="news", ip="198.51.100.8"))
    assert (await store.basis(dave, "news")).allowed
    await store.erase(dave)
    later = utcnow()  # after the erasure
    await store.add(ev("unsuppressed", dave, later, reason="asked to be mailed again"))
    lifted = await store.basis(dave, "news")
    assert not lifted.allowed, "an erased opt-in proves nothing any more: its evidence is gone"
    await store.add(opt_in(dave, later + timedelta(seconds=1), topic="news", source="https://shop.example/signup"))
    assert (await store.basis(dave, "news")).allowed
    assert (await store.erase(dave)).erased == 2, "a second erasure takes what was recorded since"
    assert not (await store.basis(dave, "news")).allowed


@dataclass(frozen=True)
class Tamper:
    name: str
    sql: str


# Every change but the tombstone itself is refused by the table (migration v3's trigger).
A64 = "a" * 64
TAMPERING = [
    Tamper("change the evidence", "UPDATE consent_events SET ip = '192.0.2.1' WHERE subject = 'carol@example.org'"),
    Tamper(
        "a tombstone that keeps the IP",
        "UPDATE consent_events SET subject = 'erased:{A64}', subject_original = 'erased', "
        "source = '', erased_at = recorded_at WHERE subject = 'carol@example.org'",
    ),
    Tamper(
        "a tombstone that turns an opt-out into an opt-in",
        "UPDATE consent_events SET subject = 'erased:{A64}', subject_original = 'erased', "
        "source = '', ip = NULL, user_agent = NULL, relation = NULL, reason = NULL, upstream_reply = NULL, "
        "note = NULL, kind = 'opted_in', erased_at = recorded_at WHERE kind = 'opted_out'",
    ),
    Tamper(
        "a tombstone that moves the time",
        "UPDATE consent_events SET subject = 'erased:{A64}', subject_original = 'erased', "
        "source = '', ip = NULL, user_agent = NULL, relation = NULL, reason = NULL, upstream_reply = NULL, "
        "note = NULL, effective_at = recorded_at, erased_at = recorded_at WHERE subject = 'carol@example.org'",
    ),
    Tamper("a domain's row made a tombstone", "UPDATE consent_events SET erased_at = recorded_at WHERE subject = 'example.org'"),
    Tamper("an erased row changed again", "UPDATE consent_events SET topic = 'x' WHERE subject LIKE 'erased:%'"),
    Tamper("an erased row un-erased", "UPDATE consent_events SET erased_at = NULL WHERE subject LIKE 'erased:%'"),
    Tamper("delete", "DELETE FROM consent_events WHERE subject LIKE 'erased:%'"),
]  # fmt: skip


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda t: t.name)
async def test_the_table_refuses_any_other_change(tamper: Tamper, store: ConsentStore, backend: Backend) -> None:
    await record_bob(store)
    await store.erase(BOB)
    before = await backend.dump()
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        await backend.raw(tamper.sql.replace("{A64}", A64), ())
    assert await backend.dump() == before


async def test_erasure_needs_the_key_and_one_address(backend: Backend) -> None:
    from dataclasses import replace

    keyless = await open_consent_store(replace(backend.config, erasure_key=None))
    try:
        with pytest.raises(ConsentInputError, match="erasure_key"):
            await keyless.erase(BOB)
    finally:
        await keyless.close()
    store = await open_consent_store(backend.config)
    try:
        with pytest.raises(ConsentInputError, match="not a domain"):
            await store.erase("@example.org")
    finally:
        await store.close()
    with pytest.raises(ValueError, match="at least 32"):
        ConsentStoreConfig(erasure_key="short")


async def test_a_version_2_store_is_migrated_and_its_old_rows_can_be_erased(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    old = await SQLiteConsentStore.open(path, lookup_timeout=5, migrations=CONSENT_MIGRATIONS[:2])
    await old.close()
    # Rows as version 2 wrote them: every column but erased_at.
    columns = [name for name in STORED_COLUMNS if name != "erased_at"]
    event = opt_in(BOB, topic="news", sender="shop.example", ip="198.51.100.7")
    values = dict(zip(STORED_COLUMNS, stored_values(event, T0), strict=True))
    row = [values[name].isoformat() if hasattr(values[name], "isoformat") else values[name] for name in columns]
    with sqlite3.connect(path) as db:
        db.executemany(
            f"INSERT INTO consent_events ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
            [row, row, row, row],
        )
    store = await open_consent_store(ConsentStoreConfig(path=path, erasure_key=KEY))
    try:
        assert (await store.erase(BOB)).erased == 4
        assert not (await store.basis(BOB, "news", "shop.example")).allowed
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT max(version) FROM schema_version WHERE component = 'consent'").fetchone() == (3,)


async def test_a_store_error_during_erasure_is_a_store_error(backend: Backend) -> None:
    store = await open_consent_store(backend.config)
    await store.close()
    with pytest.raises(ConsentStoreError):
        await store.erase(BOB)


async def test_an_eraser_that_fails_is_reported_and_the_others_still_run(store: ConsentStore) -> None:
    """The erasers run after the tombstones are committed: one that fails is named in the answer
    (the caller says "run it again"), the others still run, and the store's own erasure stands."""
    seen: list[tuple[tuple[str, ...], str]] = []

    async def erase_nowhere(spellings: Any, tombstone: str) -> dict[str, int]:
        raise ConnectionError("the retry queue's disk is gone")

    async def erase_somewhere(spellings: Any, tombstone: str) -> dict[str, int]:
        seen.append((tuple(spellings), tombstone))
        return {"rows": 2}

    store.erasers.extend([erase_nowhere, erase_somewhere])
    await store.add(opt_in(BOB))
    erasure = await store.erase(BOB)
    assert erasure.erased == 1 and erasure.purged == {"rows": 2}
    assert erasure.failures == ("erase_nowhere: ConnectionError: the retry queue's disk is gone",)
    assert seen == [(("bob.jansen@example.org",), erasure_subject(KEY.encode(), "bob.jansen@example.org"))]
    assert all(e.erased_at is not None or e.method == "erasure" for e in await store.history(BOB))


async def test_the_command_erases_nothing_when_the_retry_queue_cannot_be_opened(tmp_path: Path) -> None:
    import io

    import yaml

    from proxy.cli.consent import EXIT_STORE_DOWN, build_parser, run_consent

    spool = tmp_path / "spool.db"
    spool.write_bytes(b"this is not a database" * 100)
    config = tmp_path / "sendguard.yaml"
    store_config = {"path": str(tmp_path / "consent.db"), "erasure_key": KEY}
    config.write_text(yaml.safe_dump({"stores": {"consent": store_config}, "spool": {"path": str(spool)}}))
    opened = await open_consent_store(ConsentStoreConfig(**store_config))
    try:
        await opened.add(opt_in(BOB))
    finally:
        await opened.close()
    args = build_parser().parse_args(["consent", "erase", "--config", str(config), BOB])
    out, err = io.StringIO(), io.StringIO()
    assert await run_consent(args, out=out, err=err) == EXIT_STORE_DOWN
    assert "cannot open the retry queue" in err.getvalue() and "nothing was erased" in err.getvalue()
    with sqlite3.connect(tmp_path / "consent.db") as db:
        assert db.execute("SELECT count(*) FROM consent_events WHERE erased_at IS NOT NULL").fetchone() == (0,)
