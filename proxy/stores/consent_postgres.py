"""The shared consent store: PostgreSQL through psycopg 3 (async) and a psycopg_pool pool.

Several sendguard instances point at one database and see each other's writes at once.
The schema is the SQLite one (proxy/stores/migrations/consent.py), migrated on first
connection under an advisory lock. Each connection carries ``statement_timeout`` equal to the
lookup timeout, so a stuck query is ended by the server too, not only abandoned by us; bulk
imports lift it for their own transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.stores.consent_events import STORED_COLUMNS, ConsentEvent, as_utc, event_from_stored, stored_values
from proxy.stores.consent_store import ERASURE_REASON, ConsentStore, ConsentStoreError
from proxy.stores.migrations import Migration, apply_postgres
from proxy.stores.migrations.consent import CONSENT_MIGRATIONS

__all__ = ("PostgresConsentStore", "describe_dsn", "select_sql")

log = logging.getLogger("sendguard.consent")

_COLUMNS = ", ".join(STORED_COLUMNS)
# Queries are built from the constant column list only; values always go as parameters.
_PLACEHOLDERS = ", ".join("%s" for _ in STORED_COLUMNS)
_INSERT = f"INSERT INTO consent_events ({_COLUMNS}) VALUES ({_PLACEHOLDERS}) RETURNING id"  # noqa: S608
#: Erasure: the only UPDATE the table's trigger lets through (migration v3's tombstone rule).
ERASE_SQL = (
    "UPDATE consent_events SET subject = %s, subject_original = 'erased', source = '', ip = NULL, user_agent = NULL,"
    " relation = NULL, reason = NULL, upstream_reply = NULL, note = NULL, erased_at = %s"
    " WHERE subject_kind = 'address' AND subject = %s AND erased_at IS NULL"
)
_TIME_INDEXES = tuple(
    i for i, name in enumerate(STORED_COLUMNS) if name in ("effective_at", "recorded_at", "confirmed_at", "erased_at")
)

Connection = psycopg.AsyncConnection[TupleRow]


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages: never the password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparseable DSN"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"{host}:{port}/{parts.get('dbname') or ''}"


def select_sql(subjects: int, bounded: bool) -> str:
    one = f"SELECT id, {_COLUMNS} FROM consent_events WHERE subject_kind = %s AND subject = %s"  # noqa: S608
    if bounded:
        one += " AND recorded_at <= %s"
    return " UNION ALL ".join(f"({one})" for _ in range(subjects)) + " ORDER BY effective_at, id"


def _from_row(row: Sequence[Any]) -> ConsentEvent:
    values = list(row[1:])
    for index in _TIME_INDEXES:
        if values[index] is not None:
            values[index] = as_utc(values[index])
    return event_from_stored(row[0], values)


class PostgresConsentStore(ConsentStore):
    backend = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float,
        pool_min: int = 1,
        pool_max: int = 10,
        migrations: Sequence[Migration] = CONSENT_MIGRATIONS,
    ) -> None:
        super().__init__(timeout, describe_dsn(dsn))
        self._migrations = tuple(migrations)
        self._ready = False
        self._ready_lock = asyncio.Lock()
        statement_ms = max(1, math.ceil(timeout * 1000))

        async def configure(conn: Connection) -> None:
            await conn.set_autocommit(True)
            await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(statement_ms),))

        self._pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            dsn,
            min_size=pool_min,
            max_size=pool_max,
            open=False,
            configure=configure,
            # Below the lookup bound, so that a dead server reads "unreachable", not "timed out".
            timeout=timeout * 0.8,
            name="sendguard-consent",
            # application_name: so that a DBA sees in pg_stat_activity whose connections these are.
            kwargs={"connect_timeout": max(1, math.ceil(timeout)), "application_name": "sendguard-consent"},
        )

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        lookup_timeout: float,
        pool_min: int = 1,
        pool_max: int = 10,
        connect: bool = True,
        migrations: Sequence[Migration] = CONSENT_MIGRATIONS,
    ) -> PostgresConsentStore:
        """Open the pool; with ``connect`` also connect and migrate now, or raise."""
        store = cls(dsn, timeout=lookup_timeout, pool_min=pool_min, pool_max=pool_max, migrations=migrations)
        await store._pool.open(wait=False)
        if connect:
            try:
                await store._ensure_ready()
            except BaseException:
                await store._pool.close()
                raise
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def _ensure_ready(self) -> None:
        """Migrate once, on the first connection (at open, or at first use when the database
        was down then)."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await self._migrate()
                self._ready = True

    async def _migrate(self) -> None:
        try:
            async with self._pool.connection() as conn:
                # Migrations may wait for another instance's lock: no statement timeout here,
                # then the connection's own limit again (RESET would drop it to the server's 0).
                previous = (await (await conn.execute("SHOW statement_timeout")).fetchone() or ("0",))[0]
                await conn.execute("SET statement_timeout = 0")
                try:
                    applied = await apply_postgres(conn, self._migrations)
                finally:
                    await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(previous),))
        except (psycopg.Error, OSError) as exc:
            raise self._wrap(exc) from exc
        if applied:
            log.info("consent store %s: applied schema migration(s) %s", self.where, applied)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[TupleRow]:
        """A read-only query; retried once on a fresh connection when a pooled one turned out
        dead (the server restarted since), so a restart costs no tempfail."""
        await self._ensure_ready()
        try:
            return await self._read_once(sql, params)
        except (PoolTimeout, psycopg.errors.QueryCanceled):
            raise  # no connection at all, or statement_timeout: a retry would only wait again
        except psycopg.OperationalError:
            return await self._read_once(sql, params)

    async def _read_once(self, sql: str, params: Sequence[Any]) -> list[TupleRow]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

    # -- ConsentStore

    async def _insert(self, events: Sequence[ConsentEvent], now: datetime) -> list[ConsentEvent]:
        await self._ensure_ready()
        stored: list[ConsentEvent] = []
        async with self._pool.connection() as conn, conn.transaction():
            for event in events:
                cursor = await conn.execute(_INSERT, stored_values(event, now))
                row = await cursor.fetchone()
                assert row is not None
                stored.append(dataclasses.replace(event, id=int(row[0]), recorded_at=event.recorded_at or now))
        return stored

    async def _insert_bulk(self, events: Iterable[ConsentEvent], now: datetime) -> int:
        await self._ensure_ready()
        written = 0
        async with self._pool.connection(timeout=max(self.timeout, 30.0)) as conn, conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 0")  # a large COPY takes its time
            async with conn.cursor() as cursor, cursor.copy(f"COPY consent_events ({_COLUMNS}) FROM STDIN") as copy:
                for event in events:
                    await copy.write_row(stored_values(event, now))
                    written += 1
        return written

    async def _erase(
        self, addresses: Sequence[str], tombstone: str, suppression: ConsentEvent, now: datetime
    ) -> tuple[int, ConsentEvent]:
        await self._ensure_ready()
        async with self._pool.connection() as conn:
            async with conn.transaction():
                erased = 0
                for address in addresses:
                    erased += (await conn.execute(ERASE_SQL, (tombstone, now, address))).rowcount
                event = dataclasses.replace(suppression, reason=ERASURE_REASON.format(count=erased))
                row = await (await conn.execute(_INSERT, stored_values(event, now))).fetchone()
                assert row is not None
            # The old row versions stay in the table's pages until vacuumed: vacuum now (outside
            # the transaction; best effort, autovacuum would get there later).
            previous = (await (await conn.execute("SHOW statement_timeout")).fetchone() or ("0",))[0]
            try:
                await conn.execute("SET statement_timeout = 0")
                await conn.execute("VACUUM consent_events")
            except psycopg.Error as exc:
                log.warning("consent store %s: VACUUM after an erasure failed: %s", self.where, exc)
            finally:
                await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(previous),))
        return erased, dataclasses.replace(event, id=int(row[0]), recorded_at=now)

    async def _select(self, keys: Sequence[tuple[str, str]], at: datetime | None) -> list[ConsentEvent]:
        params: list[Any] = []
        for kind, value in keys:
            params.extend((kind, value))
            if at is not None:
                params.append(at)
        rows = await self._read(select_sql(len(keys), at is not None), params)
        return [_from_row(row) for row in rows]

    async def _page(self, after_id: int, limit: int) -> list[ConsentEvent]:
        sql = f"SELECT id, {_COLUMNS} FROM consent_events WHERE id > %s ORDER BY id LIMIT %s"  # noqa: S608
        return [_from_row(row) for row in await self._read(sql, (after_id, limit))]

    async def _count(self) -> int:
        rows = await self._read("SELECT count(*) FROM consent_events", ())
        return int(rows[0][0])

    def _wrap(self, error: Exception) -> ConsentStoreError:
        if isinstance(error, PoolTimeout):
            return ConsentStoreError(
                f"consent store (postgres {self.where}) unreachable: no database connection within "
                f"{self.timeout * 0.8:g}s (server down, or every pooled connection busy)"
            )
        if isinstance(error, ConsentStoreError):
            return error
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ConsentStoreError(f"consent store (postgres {self.where}) failed: {type(error).__name__}: {text}")
