"""The consent store on both engines: SQLite (a file in tmp_path) and the real PostgreSQL.

Each test runs against both; the PostgreSQL runs use a schema of their own (``postgres_target``)
and skip when the server is down (fail under CI).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import socket
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.schema import Duration
from proxy.stores.consent import (
    ANY,
    ConsentEvent,
    ConsentInputError,
    ConsentStore,
    ConsentStoreConfig,
    ConsentStoreError,
    evaluate,
    event_to_row,
    new_event,
    open_consent_store,
    read_csv,
)
from proxy.stores.consent_postgres import PostgresConsentStore
from proxy.stores.consent_postgres import select_sql as postgres_select_sql
from proxy.stores.consent_sqlite import SQLiteConsentStore
from proxy.stores.consent_sqlite import select_sql as sqlite_select_sql
from proxy.stores.migrations import Migration, apply_postgres, apply_sqlite
from proxy.stores.migrations.consent import CONSENT_MIGRATIONS

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]
T0 = datetime(2024, 1, 10, 9, 0, tzinfo=UTC)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=BACKENDS)
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> ConsentStoreConfig:
    if request.param == "sqlite":
        return ConsentStoreConfig(backend="sqlite", path=str(tmp_path / "var" / "consent.db"))
    target = request.getfixturevalue("postgres_target")
    return ConsentStoreConfig(backend="postgres", dsn=target.dsn, pool_min=1, pool_max=4)


@pytest.fixture
async def store(store_config: ConsentStoreConfig) -> AsyncIterator[ConsentStore]:
    opened = await open_consent_store(store_config)
    yield opened
    await opened.close()


def ev(kind: str, subject: str, at: datetime = T0, **fields: object) -> ConsentEvent:
    return new_event(kind, subject, at=at, **fields)  # type: ignore[arg-type]


def opt_in(subject: str, at: datetime = T0, **fields: object) -> ConsentEvent:
    fields.setdefault("method", "web_form")
    return ev("opted_in", subject, at, **fields)


# ---- recording and reading back ----------------------------------------------------------------


async def test_events_round_trip_with_every_evidence_field(store: ConsentStore) -> None:
    events = [
        opt_in(
            "Bob.Smith@Example.ORG",
            topic="newsletter",
            sender="Shop.Example",
            method="double_opt_in",
            source="https://shop.example/signup",
            ip="2001:db8::1",
            user_agent="Mozilla/5.0 (X11)",
            text_version="v3",
            confirmed_at=T0 + timedelta(minutes=4),
            note="newsletter box ticked",
        ),
        ev(
            "customer",
            "bob.smith@example.org",
            sender="shop.example",
            relation="order 1001",
            product_category="Shoes",
            objection_offered=True,
        ),
        ev("opted_out", "bob.smith@example.org", T0 + timedelta(days=3), method="one_click", source="list-unsub"),
        ev(
            "suppressed",
            "bob.smith@example.org",
            T0 + timedelta(days=4),
            method="hard_bounce",
            reason="user unknown",
            upstream_reply="550 5.1.1 <bob.smith@example.org>:\r\n user unknown",
        ),
    ]
    stored = await store.add(*events)
    ids = [e.id for e in stored]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(ids) and len(set(ids)) == 4
    assert all(e.recorded_at is not None for e in stored)

    history = await store.history("BOB.SMITH@example.org")
    assert [e.id for e in history] == ids
    first = history[0]
    assert (first.subject, first.subject_original, first.subject_kind) == (
        "bob.smith@example.org",
        "Bob.Smith@Example.ORG",
        "address",
    )
    assert (first.topic, first.sender, first.method) == ("newsletter", "shop.example", "double_opt_in")
    assert (first.ip, first.user_agent, first.text_version) == ("2001:db8::1", "Mozilla/5.0 (X11)", "v3")
    assert first.confirmed_at == T0 + timedelta(minutes=4)
    assert first.effective_at == T0 and first.effective_at.tzinfo is not None
    assert (first.source, first.note) == ("https://shop.example/signup", "newsletter box ticked")
    customer = history[1]
    assert (customer.relation, customer.product_category, customer.objection_offered) == ("order 1001", "shoes", True)
    assert history[3].upstream_reply == "550 5.1.1 <bob.smith@example.org>: user unknown"  # one line
    assert history == stored  # what add returned is what is stored


async def test_an_address_history_includes_its_domains_events(store: ConsentStore) -> None:
    await store.add(
        opt_in("@BigCorp.example", topic="offers"),
        opt_in("ann@bigcorp.example"),
        opt_in("zed@other.example"),
    )
    ann = await store.history("ann@bigcorp.example")
    assert [(e.subject_kind, e.subject) for e in ann] == [
        ("domain", "bigcorp.example"),
        ("address", "ann@bigcorp.example"),
    ]
    domain = await store.history("@bigcorp.example")
    assert [(e.subject_kind, e.subject) for e in domain] == [("domain", "bigcorp.example")]
    assert await store.history("nobody@bigcorp.example") == domain


async def test_history_is_ordered_by_effective_time_not_by_recording(store: ConsentStore) -> None:
    await store.add(ev("opted_out", "late@example.org", T0 + timedelta(days=5), method="reply"))
    await store.add(opt_in("late@example.org", T0))  # recorded later, happened earlier
    kinds = [e.kind for e in await store.history("late@example.org")]
    assert kinds == ["opted_in", "opted_out"]
    basis = await store.basis("late@example.org")
    assert (basis.allowed, basis.kind) == (False, "opted_out")


async def test_basis_at_a_past_moment_uses_what_the_store_knew_then(store: ConsentStore) -> None:
    day = timedelta(days=1)
    await store.import_events(
        [
            dataclasses.replace(opt_in("eve@example.org", T0, topic="news"), recorded_at=T0),
            # learned two days after it happened:
            dataclasses.replace(
                ev("opted_out", "eve@example.org", T0 + 10 * day, method="link"), recorded_at=T0 + 12 * day
            ),
        ],
        keep_recorded_at=True,
    )
    before = await store.basis("eve@example.org", "news", at=T0 + 5 * day)
    assert (before.allowed, before.kind) == (True, "opt_in")
    assert before.record is not None and before.record.kind == "opted_in"
    unknown_yet = await store.basis("eve@example.org", "news", at=T0 + 11 * day)
    assert unknown_yet.allowed, "the opt-out was not recorded yet on day 11"
    after = await store.basis("eve@example.org", "news", at=T0 + 13 * day)
    assert (after.allowed, after.kind) == (False, "opted_out")
    now = await store.basis("eve@example.org", "news")
    assert now.kind == "opted_out"
    assert [e.kind for e in await store.history("eve@example.org", at=T0 + day)] == ["opted_in"]


def _fields(event: ConsentEvent) -> dict[str, object]:
    return {name: getattr(event, name) for name in ConsentEvent.__dataclass_fields__}


# ---- append-only, all-or-nothing ---------------------------------------------------------------


async def test_rows_cannot_be_changed_or_deleted(store: ConsentStore, store_config: ConsentStoreConfig) -> None:
    (event,) = await store.add(opt_in("keep@example.org"))
    if store_config.backend == "sqlite":
        conn = sqlite3.connect(store_config.path)
        try:
            for sql in ("UPDATE consent_events SET kind = 'opted_out'", "DELETE FROM consent_events"):
                with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                    conn.execute(sql)
        finally:
            conn.close()
    else:
        assert store_config.dsn is not None
        async with await psycopg.AsyncConnection.connect(store_config.dsn, autocommit=True) as conn:
            for sql in (
                "UPDATE consent_events SET kind = 'opted_out'",
                "DELETE FROM consent_events",
                "TRUNCATE consent_events",
            ):
                with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                    await conn.execute(sql)  # type: ignore[arg-type]
    assert await store.history("keep@example.org") == [event]


async def test_import_is_all_or_nothing(store: ConsentStore) -> None:
    good = [opt_in(f"user{i}@example.org") for i in range(50)]
    broken = ConsentEvent(
        kind="customer",  # a customer relation without a sender breaks the soft opt-in rules
        subject_kind="address",
        subject="bad@example.org",
        effective_at=T0,
        method="sale",
        product_category="shoes",
        objection_offered=True,
    )
    with pytest.raises(ConsentInputError, match=r"event 41 \(customer bad@example.org\).*nothing was imported"):
        await store.import_events([*good[:40], broken, *good[40:]])
    assert await store.count() == 0
    assert await store.import_events(good) == 50
    assert await store.count() == 50


async def test_export_streams_every_event_in_id_order_and_round_trips_through_csv(store: ConsentStore) -> None:
    events = [opt_in(f"u{i}@example.org", topic="news", source=f"form {i}") for i in range(12)]
    events.append(
        ev("customer", "c@example.org", sender="shop.example", product_category="bags", objection_offered=False)
    )
    await store.import_events(events)
    exported = [event async for event in store.export(batch=5)]  # several pages
    assert [e.id for e in exported] == sorted(e.id for e in exported if e.id is not None)
    assert len(exported) == 13
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(event_to_row(exported[0])))
    writer.writeheader()
    for event in exported:
        writer.writerow(event_to_row(event))
    parsed, problems = read_csv(io.StringIO(text.getvalue()))
    assert problems == []
    assert [_comparable(e) for e in parsed] == [_comparable(e) for e in exported]


def _comparable(event: ConsentEvent) -> dict[str, object]:
    data = _fields(event)
    data.pop("id")
    data.pop("recorded_at")
    return data


# ---- several instances -------------------------------------------------------------------------


async def test_two_store_objects_on_one_database_see_each_others_writes(store_config: ConsentStoreConfig) -> None:
    first, second = await asyncio.gather(open_consent_store(store_config), open_consent_store(store_config))
    try:
        await first.add(opt_in("shared@example.org", topic="news"))
        seen = await second.basis("shared@example.org", "news")
        assert seen.allowed and seen.record is not None
        await second.add(ev("opted_out", "shared@example.org", T0 + timedelta(days=1), method="one_click"))
        assert (await first.basis("shared@example.org", "news")).kind == "opted_out"
        assert await first.count() == await second.count() == 2
    finally:
        await first.close()
        await second.close()


async def test_migrations_are_idempotent_and_safe_when_instances_start_together(
    store_config: ConsentStoreConfig,
) -> None:
    stores = await asyncio.gather(*(open_consent_store(store_config) for _ in range(4)))
    for opened in stores:
        await opened.close()
    again = await open_consent_store(store_config)
    await again.close()
    rows = await _schema_versions(store_config)
    assert rows == [("consent", m.version) for m in CONSENT_MIGRATIONS]


async def test_a_new_migration_is_applied_once_on_top_of_the_existing_ones(store_config: ConsentStoreConfig) -> None:
    next_version = max(m.version for m in CONSENT_MIGRATIONS) + 1
    extra = Migration(
        "consent",
        next_version,
        "test: a side table",
        sqlite=("CREATE TABLE consent_test_extra (x INTEGER)",),
        postgres=("CREATE TABLE consent_test_extra (x INTEGER)",),
    )
    migrations = (*CONSENT_MIGRATIONS, extra)
    if store_config.backend == "sqlite":
        base = await SQLiteConsentStore.open(store_config.path, lookup_timeout=2)
        await base.close()
        conn = sqlite3.connect(store_config.path, isolation_level=None)
        try:
            assert apply_sqlite(conn, migrations) == [next_version]
            assert apply_sqlite(conn, migrations) == []
        finally:
            conn.close()
    else:
        assert store_config.dsn is not None
        base_pg = await PostgresConsentStore.open(store_config.dsn, lookup_timeout=2)
        await base_pg.close()
        async with await psycopg.AsyncConnection.connect(store_config.dsn, autocommit=True) as conn:
            assert await apply_postgres(conn, migrations) == [next_version]
            assert await apply_postgres(conn, migrations) == []
    assert await _schema_versions(store_config) == [("consent", m.version) for m in migrations]


async def _schema_versions(config: ConsentStoreConfig) -> list[tuple[str, int]]:
    query = "SELECT component, version FROM schema_version ORDER BY component, version"
    if config.backend == "sqlite":
        conn = sqlite3.connect(config.path)
        try:
            return [(str(c), int(v)) for c, v in conn.execute(query)]
        finally:
            conn.close()
    assert config.dsn is not None
    async with await psycopg.AsyncConnection.connect(config.dsn) as conn:
        cursor = await conn.execute(query)
        return [(str(c), int(v)) for c, v in await cursor.fetchall()]


# ---- lookup cost -----------------------------------------------------------------------------


async def test_the_lookup_descends_the_subject_index(store: ConsentStore, store_config: ConsentStoreConfig) -> None:
    """Lookup cost must not grow with the store: the query plan searches the index for each
    subject instead of scanning the table (bench/consent_store.py measures it at 1M)."""
    await store.import_events(opt_in(f"user{i}@example{i % 50}.org") for i in range(2000))
    params = ("address", "user7@example7.org", "domain", "example7.org")
    if store_config.backend == "sqlite":
        conn = sqlite3.connect(store_config.path)
        try:
            plan = " | ".join(
                str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_select_sql(2, False), params)
            )
        finally:
            conn.close()
        assert plan.count("USING INDEX consent_events_by_subject") == 2, plan
        assert "SCAN consent_events" not in plan, plan
    else:
        assert store_config.dsn is not None
        async with await psycopg.AsyncConnection.connect(store_config.dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE consent_events")
            cursor = await conn.execute("EXPLAIN " + postgres_select_sql(2, False), params)  # type: ignore[operator]
            plan = " | ".join(str(row[0]) for row in await cursor.fetchall())
        assert plan.count("consent_events_by_subject") == 2, plan
        assert "Seq Scan" not in plan, plan


# ---- failures ------------------------------------------------------------------------------------


async def test_postgres_unreachable_raises_instead_of_answering() -> None:
    dsn = f"postgresql://sendguard:secret@127.0.0.1:{closed_port()}/consent"
    config = ConsentStoreConfig(backend="postgres", dsn=dsn, timeout=Duration(0.5))
    with pytest.raises(ConsentStoreError, match=r"unreachable") as caught:
        await open_consent_store(config)
    assert "secret" not in str(caught.value)
    lazy = await open_consent_store(config, connect=False)  # serve: start anyway, fail per lookup
    try:
        with pytest.raises(ConsentStoreError, match=r"postgres 127\.0\.0\.1:\d+/consent\) unreachable"):
            await lazy.basis("bob@example.org", "news")
        with pytest.raises(ConsentStoreError):
            await lazy.add(opt_in("bob@example.org"))
    finally:
        await lazy.close()


@pytest.mark.postgres
async def test_postgres_connections_lost_in_a_restart_cost_no_failed_lookup(postgres_target: Any) -> None:
    store = await PostgresConsentStore.open(postgres_target.dsn, lookup_timeout=3, pool_min=1, pool_max=1)
    try:
        await store.add(opt_in("kept@example.org"))
        async with store._pool.connection() as conn:  # the pool's only connection
            pid = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(postgres_target.dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        basis = await store.basis("kept@example.org")  # dead pooled connection: retried on a new one
        assert basis.allowed
    finally:
        await store.close()


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    opened = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "c.db")))
    await opened.close()
    with pytest.raises(ConsentStoreError, match="closed"):
        await opened.basis("bob@example.org")


async def test_an_unopenable_sqlite_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConsentStoreError, match="cannot open the consent store"):
        await open_consent_store(ConsentStoreConfig(path=str(blocker / "consent.db")))


def test_store_config_rules() -> None:
    assert (ConsentStoreConfig().backend, ConsentStoreConfig().path, ConsentStoreConfig().timeout) == (
        "sqlite",
        "var/consent.db",
        2.0,
    )
    with pytest.raises(ValueError, match="needs a dsn"):
        ConsentStoreConfig(backend="postgres")
    with pytest.raises(ValueError, match="pool sizes"):
        ConsentStoreConfig(backend="postgres", dsn="postgresql://x/y", pool_min=5, pool_max=2)
    with pytest.raises(ValueError, match="timeout"):
        ConsentStoreConfig(timeout=Duration(0))


# ---- input rules (no engine needed) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "subject", "fields", "problem"),
    [
        ("opted_in", "bob@example.org", {"method": "guess"}, "method for opted_in must be one of"),
        ("opted_in", "bob@example.org", {}, "method for opted_in must be one of"),
        ("opted_in", "bob", {"method": "api"}, "is not an address"),
        ("opted_in", "bob@", {"method": "api"}, "is not a domain name"),
        ("opted_in", "@gmail.com", {"method": "api"}, "public mailbox provider"),
        ("opted_in", "bob@example.org", {"method": "api", "topic": "news letter"}, "topic 'news letter' is not valid"),
        ("opted_in", "bob@example.org", {"method": "api", "sender": "a@shop.example"}, "must be a domain"),
        ("opted_in", "bob@example.org", {"method": "api", "ip": "300.1.1.1"}, "is not an IP address"),
        ("opted_in", "bob@example.org", {"method": "api", "at": "2099-01-01"}, "is in the future"),
        ("opted_in", "bob@example.org", {"method": "api", "at": "yesterday"}, "not a time"),
        (
            "opted_in",
            "bob@example.org",
            {"method": "double_opt_in", "at": "2024-02-01", "confirmed_at": "2024-01-01"},
            "confirmed_at is earlier",
        ),
        (
            "customer",
            "bob@example.org",
            {"product_category": "shoes", "objection_offered": True},
            "belongs to one sender",
        ),
        ("customer", "bob@example.org", {"sender": "shop.example", "objection_offered": True}, "product category"),
        ("customer", "bob@example.org", {"sender": "shop.example", "product_category": "shoes"}, "chance to object"),
        (
            "customer",
            "bob@example.org",
            {"sender": "shop.example", "product_category": "shoes", "objection_offered": True, "topic": "news"},
            "has no topic",
        ),
        ("opted_out", "bob@example.org", {"method": "api", "product_category": "shoes"}, "customer events only"),
        ("suppressed", "bob@example.org", {"method": "manual"}, "needs a reason"),
        ("suppressed", "bob@example.org", {"method": "manual", "reason": "x", "topic": "news"}, "every topic"),
        ("unsuppressed", "bob@example.org", {}, "needs a reason"),
        ("maybe", "bob@example.org", {}, "event must be one of"),
    ],
)
def test_malformed_events_are_refused_with_a_useful_message(
    kind: str, subject: str, fields: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConsentInputError, match=problem):
        new_event(kind, subject, **fields)  # type: ignore[arg-type]


def test_dates_and_naive_times_are_utc() -> None:
    event = new_event("opted_in", "<Bob@Example.org>", method="paper", at="2024-03-01")
    assert event.effective_at == datetime(2024, 3, 1, tzinfo=UTC)
    assert new_event("opted_in", "b@example.org", method="paper", at="2024-03-01T10:00").effective_at.hour == 10
    shifted = new_event("opted_in", "b@example.org", method="paper", at="2024-03-01T10:00:00+02:00")
    assert shifted.effective_at == datetime(2024, 3, 1, 8, tzinfo=UTC)
    assert (event.subject, event.subject_original) == ("bob@example.org", "Bob@Example.org")


def test_a_pending_double_opt_in_is_no_basis_until_confirmed() -> None:
    pending = new_event("opted_in", "d@example.org", method="double_opt_in", at=T0)
    basis = evaluate([pending], "d@example.org", ANY, ANY, at=T0 + timedelta(days=1))
    assert (basis.allowed, basis.kind) == (False, "none")
    assert "not confirmed" in basis.explanation
    confirmed = new_event(
        "opted_in", "d@example.org", method="double_opt_in", at=T0, confirmed_at=T0 + timedelta(hours=1)
    )
    assert not evaluate([confirmed], "d@example.org", at=T0 + timedelta(minutes=30)).allowed  # not yet confirmed then
    assert evaluate([confirmed], "d@example.org", at=T0 + timedelta(hours=2)).allowed
