"""The API's own tables in the consent store's database: idempotency keys and the webhook outbox.

They live next to the consent events (the same SQLite file, or the same PostgreSQL database)
so that several instances behind one load balancer agree on both: a retried POST that lands
on another instance finds the first answer, and one outbox row is delivered by one instance
at a time (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` under a lease; SQLite: one writer).

They are migrated as their own component (``api``) of the same ``schema_version`` table, so
the consent schema's versions are not touched. These rows are operational, not evidence:
unlike consent_events they are updated and deleted.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.stores.consent import ConsentStoreConfig
from proxy.stores.consent_events import ERASED_FIELDS
from proxy.stores.migrations import Migration, apply_postgres, apply_sqlite

__all__ = ("ApiState", "Claim", "OutboxRow", "QueuedRow", "open_api_state")

T = TypeVar("T")
log = logging.getLogger("sendguard.api")

_V1_SQLITE = (
    """
    CREATE TABLE api_idempotency (
        token        TEXT    NOT NULL,
        key          TEXT    NOT NULL,
        request_hash TEXT    NOT NULL,
        status       INTEGER,            -- NULL while the first request is being answered
        body         TEXT,
        created_at   REAL    NOT NULL,
        PRIMARY KEY (token, key)
    )
    """,
    """
    CREATE TABLE webhook_outbox (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        endpoint      TEXT    NOT NULL,
        event         TEXT    NOT NULL,
        source        TEXT,               -- consent:<id> for a consent event: queued once per endpoint
        body          TEXT    NOT NULL,   -- the exact bytes signed and sent, every attempt
        created_at    REAL    NOT NULL,
        next_at       REAL    NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        state         TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
        claimed_until REAL,
        last_error    TEXT
    )
    """,
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_at)",
    "CREATE UNIQUE INDEX webhook_outbox_once ON webhook_outbox (source, endpoint)",
    "CREATE TABLE webhook_cursor (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL)",
)
_V1_POSTGRES = (
    """
    CREATE TABLE api_idempotency (
        token        TEXT             NOT NULL,
        key          TEXT             NOT NULL,
        request_hash TEXT             NOT NULL,
        status       INTEGER,
        body         TEXT,
        created_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (token, key)
    )
    """,
    """
    CREATE TABLE webhook_outbox (
        id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        endpoint      TEXT             NOT NULL,
        event         TEXT             NOT NULL,
        source        TEXT,
        body          TEXT             NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL,
        next_at       DOUBLE PRECISION NOT NULL,
        attempts      INTEGER          NOT NULL DEFAULT 0,
        state         TEXT             NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
        claimed_until DOUBLE PRECISION,
        last_error    TEXT
    )
    """,
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_at)",
    "CREATE UNIQUE INDEX webhook_outbox_once ON webhook_outbox (source, endpoint)",
    "CREATE TABLE webhook_cursor (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL)",
)
API_MIGRATIONS: tuple[Migration, ...] = (
    Migration("api", 1, "api_idempotency and webhook_outbox", _V1_SQLITE, _V1_POSTGRES),
)


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to claiming an idempotency key."""

    state: str  # "new": go ahead; "done": replay status/body; "busy": the first is in flight; "mismatch"
    status: int | None = None
    body: str | None = None


@dataclass(frozen=True, slots=True)
class QueuedRow:
    endpoint: str
    event: str
    body: str
    source: str | None = None  # consent:<id>: the same event is queued once, whoever queues it


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    endpoint: str
    event: str
    body: str
    created_at: float
    attempts: int


class ApiState(abc.ABC):
    """Idempotency keys and the outbox; every method is one short transaction."""

    @abc.abstractmethod
    async def claim(self, token: str, key: str, request_hash: str, now: float) -> Claim: ...

    @abc.abstractmethod
    async def finish(self, token: str, key: str, status: int, body: str) -> None: ...

    @abc.abstractmethod
    async def release(self, token: str, key: str) -> None:
        """Forget a claim whose request failed inside sendguard, so that a retry runs again."""

    @abc.abstractmethod
    async def purge_keys(self, older_than: float) -> int: ...

    @abc.abstractmethod
    async def enqueue(self, rows: Sequence[QueuedRow], now: float) -> None:
        """Rows due now; a row whose (source, endpoint) is queued already is left out."""

    @abc.abstractmethod
    async def cursor(self) -> int:
        """The last consent event id the sweep has seen; set to the newest on first use, so
        that turning webhooks on does not send the whole history."""

    @abc.abstractmethod
    async def advance(self, last_id: int) -> None: ...

    @abc.abstractmethod
    async def claim_due(self, now: float, lease: float, limit: int) -> list[OutboxRow]: ...

    @abc.abstractmethod
    async def delivered(self, row_id: int) -> None: ...

    @abc.abstractmethod
    async def retry(self, row_id: int, next_at: float, error: str, *, give_up: bool) -> None: ...

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Rows per state: pending, failed (delivered rows are purged after a while)."""

    @abc.abstractmethod
    async def forget_address(self, spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        """An erasure (``ConsentStore.erasers``): outbox rows whose body names the address are
        deleted, whatever their state (a pending one would carry the address out after its
        erasure; the CRM is not told of an erasure by webhook); idempotency rows keep their key
        (a retry still records nothing twice) but their answer names the tombstone instead and
        their request hash, a plain hash of a body with the address in it, is dropped."""

    @abc.abstractmethod
    async def close(self) -> None: ...


#: The request hash of an idempotency row an erasure rewrote: a retry with its key gets the
#: (anonymised) first answer, whatever its body.
ERASED_REQUEST = "erased"


def needles(spellings: Sequence[str]) -> list[str]:
    """What to look for in stored JSON: each spelling in lower case, and as JSON writes it
    (non-ASCII escaped)."""
    found: list[str] = []
    for spelling in spellings:
        for text in (spelling.lower(), json.dumps(spelling.lower())[1:-1]):
            if text not in found:
                found.append(text)
    return found


def anonymise(text: str, spellings: Sequence[str], tombstone: str) -> str:
    """A stored answer as its tombstone would read: the address replaced by the tombstone
    subject, and in every JSON object that named it the personal fields an erasure empties
    (IP, user agent, source, ...) removed."""
    patterns = [re.compile(re.escape(needle), re.IGNORECASE) for needle in needles(spellings)]

    def replace(value: str) -> str:
        for pattern in patterns:
            value = pattern.sub(tombstone, value)
        return value

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            named = any(isinstance(v, str) and replace(v) != v for v in value.values())
            return {k: walk(v) for k, v in value.items() if not (named and k in ERASED_FIELDS)}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return replace(value) if isinstance(value, str) else value

    try:
        return json.dumps(walk(json.loads(text)), separators=(",", ":"))
    except ValueError:  # not JSON: at least the address goes
        return replace(text)


def _claim_from(row: Sequence[Any] | None, request_hash: str) -> Claim:
    if row is None:
        return Claim("busy")  # it was deleted between our insert and select: treat as in flight
    if row[0] == ERASED_REQUEST and row[1] is not None:
        return Claim("done", int(row[1]), str(row[2]))
    if row[0] != request_hash:
        return Claim("mismatch")
    if row[1] is None:
        return Claim("busy")
    return Claim("done", int(row[1]), str(row[2]))


class SQLiteApiState(ApiState):
    """Its own connection to the consent database file, on its own thread (sqlite3 blocks)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SQLiteApiState:
        state = cls(path)
        await state._call(state._open_sync)
        return state

    def _open_sync(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA synchronous = FULL")  # a queued opt-out webhook must survive a power cut
        apply_sqlite(conn, API_MIGRATIONS)
        self._conn = conn

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    async def claim(self, token: str, key: str, request_hash: str, now: float) -> Claim:
        def work(conn: sqlite3.Connection) -> Claim:
            inserted = conn.execute(
                "INSERT INTO api_idempotency (token, key, request_hash, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (token, key, request_hash, now),
            ).rowcount
            if inserted:
                return Claim("new")
            row = conn.execute(
                "SELECT request_hash, status, body FROM api_idempotency WHERE token = ? AND key = ?", (token, key)
            ).fetchone()
            return _claim_from(row, request_hash)

        return await self._call(self._tx, work)

    async def finish(self, token: str, key: str, status: int, body: str) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.execute(
                "UPDATE api_idempotency SET status = ?, body = ? WHERE token = ? AND key = ?",
                (status, body, token, key),
            ),
        )

    async def release(self, token: str, key: str) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.execute(
                "DELETE FROM api_idempotency WHERE token = ? AND key = ? AND status IS NULL", (token, key)
            ),
        )

    async def purge_keys(self, older_than: float) -> int:
        def work(conn: sqlite3.Connection) -> int:
            gone = conn.execute("DELETE FROM api_idempotency WHERE created_at < ?", (older_than,)).rowcount
            # Delivered rows have done their work; keep a day of them for a look.
            conn.execute(
                "DELETE FROM webhook_outbox WHERE state = 'delivered' AND created_at < ?", (older_than - 86400,)
            )
            return int(gone)

        return await self._call(self._tx, work)

    async def enqueue(self, rows: Sequence[QueuedRow], now: float) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.executemany(
                "INSERT INTO webhook_outbox (endpoint, event, source, body, created_at, next_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(row.endpoint, row.event, row.source, row.body, now, now) for row in rows],
            ),
        )

    async def cursor(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT last_id FROM webhook_cursor WHERE name = 'consent'").fetchone()
            if row is not None:
                return int(row[0])
            newest = int(conn.execute("SELECT coalesce(max(id), 0) FROM consent_events").fetchone()[0])
            conn.execute("INSERT INTO webhook_cursor (name, last_id) VALUES ('consent', ?)", (newest,))
            return newest

        return await self._call(self._tx, work)

    async def advance(self, last_id: int) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.execute(
                "UPDATE webhook_cursor SET last_id = max(last_id, ?) WHERE name = 'consent'", (last_id,)
            ),
        )

    async def claim_due(self, now: float, lease: float, limit: int) -> list[OutboxRow]:
        def work(conn: sqlite3.Connection) -> list[OutboxRow]:
            # BEGIN IMMEDIATE holds the write lock: no other process claims the same rows.
            rows = conn.execute(
                "SELECT id, endpoint, event, body, created_at, attempts FROM webhook_outbox "
                "WHERE state = 'pending' AND next_at <= ? AND (claimed_until IS NULL OR claimed_until < ?) "
                "ORDER BY next_at, id LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE webhook_outbox SET claimed_until = ? WHERE id = ?", [(now + lease, row[0]) for row in rows]
            )
            return [OutboxRow(*row) for row in rows]

        return await self._call(self._tx, work)

    async def delivered(self, row_id: int) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = 'delivered', attempts = attempts + 1, claimed_until = NULL "
                "WHERE id = ?",
                (row_id,),
            ),
        )

    async def retry(self, row_id: int, next_at: float, error: str, *, give_up: bool) -> None:
        await self._call(
            self._tx,
            lambda conn: conn.execute(
                "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, next_at = ?, last_error = ?, "
                "claimed_until = NULL WHERE id = ?",
                ("failed" if give_up else "pending", next_at, error[:500], row_id),
            ),
        )

    async def counts(self) -> dict[str, int]:
        def work() -> dict[str, int]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT state, count(*) FROM webhook_outbox WHERE state != 'delivered' GROUP BY state"
            )
            return {"pending": 0, "failed": 0} | {str(state): int(n) for state, n in rows}

        return await self._call(work)

    async def forget_address(self, spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        def work(conn: sqlite3.Connection) -> dict[str, int]:
            outbox = keys = 0
            for needle in needles(spellings):
                outbox += conn.execute("DELETE FROM webhook_outbox WHERE instr(lower(body), ?) > 0", (needle,)).rowcount
                rows = conn.execute(
                    "SELECT token, key, body FROM api_idempotency WHERE instr(lower(body), ?) > 0", (needle,)
                ).fetchall()
                for token, key, body in rows:
                    conn.execute(
                        "UPDATE api_idempotency SET request_hash = ?, body = ? WHERE token = ? AND key = ?",
                        (ERASED_REQUEST, anonymise(body, spellings, tombstone), token, key),
                    )
                keys += len(rows)
            return {"webhook outbox rows": outbox, "idempotency answers": keys}

        def erase() -> dict[str, int]:
            conn = self._conn
            assert conn is not None
            conn.execute("PRAGMA secure_delete = ON")  # the old rows' bytes go, not just their entries
            result = self._tx(work)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and the WAL's copies of the pages
            return result

        return await self._call(erase)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(shut)
        self._executor.shutdown(wait=False)


class PostgresApiState(ApiState):
    """A small pool of its own on the consent database (the consent store's pool is sized for lookups)."""

    def __init__(self, dsn: str, timeout: float) -> None:
        from psycopg_pool import AsyncConnectionPool

        async def configure(conn: Any) -> None:
            await conn.set_autocommit(True)

        self._pool: Any = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=4,
            open=False,
            configure=configure,
            timeout=timeout,
            name="sendguard-api",
            kwargs={"application_name": "sendguard-api"},
        )
        self._ready = False
        self._ready_lock = asyncio.Lock()

    @classmethod
    async def open(cls, dsn: str, connect_timeout: float) -> PostgresApiState:
        """Open the pool; the tables are made on first use, so that a PostgreSQL that is down
        at start does not stop sendguard (as with the consent store)."""
        state = cls(dsn, connect_timeout)
        await state._pool.open(wait=False)
        return state

    async def _ensure(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                async with self._pool.connection() as conn:
                    await apply_postgres(conn, API_MIGRATIONS)
                self._ready = True

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        await self._ensure()
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall()) if cursor.description else []

    async def claim(self, token: str, key: str, request_hash: str, now: float) -> Claim:
        await self._ensure()
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "INSERT INTO api_idempotency (token, key, request_hash, created_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (token, key, request_hash, now),
            )
            if cursor.rowcount:
                return Claim("new")
            cursor = await conn.execute(
                "SELECT request_hash, status, body FROM api_idempotency WHERE token = %s AND key = %s", (token, key)
            )
            return _claim_from(await cursor.fetchone(), request_hash)

    async def finish(self, token: str, key: str, status: int, body: str) -> None:
        await self._fetch(
            "UPDATE api_idempotency SET status = %s, body = %s WHERE token = %s AND key = %s",
            (status, body, token, key),
        )

    async def release(self, token: str, key: str) -> None:
        await self._fetch("DELETE FROM api_idempotency WHERE token = %s AND key = %s AND status IS NULL", (token, key))

    async def purge_keys(self, older_than: float) -> int:
        rows = await self._fetch(
            "WITH gone AS (DELETE FROM api_idempotency WHERE created_at < %s RETURNING 1) SELECT count(*) FROM gone",
            (older_than,),
        )
        await self._fetch(
            "DELETE FROM webhook_outbox WHERE state = 'delivered' AND created_at < %s", (older_than - 86400,)
        )
        return int(rows[0][0])

    async def enqueue(self, rows: Sequence[QueuedRow], now: float) -> None:
        await self._ensure()
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO webhook_outbox (endpoint, event, source, body, created_at, next_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(row.endpoint, row.event, row.source, row.body, now, now) for row in rows],
            )

    async def cursor(self) -> int:
        await self._fetch(
            "INSERT INTO webhook_cursor (name, last_id) SELECT 'consent', coalesce(max(id), 0) FROM consent_events "
            "ON CONFLICT (name) DO NOTHING",
            (),
        )
        rows = await self._fetch("SELECT last_id FROM webhook_cursor WHERE name = 'consent'", ())
        return int(rows[0][0])

    async def advance(self, last_id: int) -> None:
        await self._fetch(
            "UPDATE webhook_cursor SET last_id = greatest(last_id, %s) WHERE name = 'consent'", (last_id,)
        )

    async def claim_due(self, now: float, lease: float, limit: int) -> list[OutboxRow]:
        # SKIP LOCKED: two instances polling together take different rows, never wait on each
        # other; the lease keeps a row claimed after this short transaction, while it is sent.
        rows = await self._fetch(
            "UPDATE webhook_outbox SET claimed_until = %s WHERE id IN ("
            " SELECT id FROM webhook_outbox WHERE state = 'pending' AND next_at <= %s"
            " AND (claimed_until IS NULL OR claimed_until < %s) ORDER BY next_at, id LIMIT %s"
            " FOR UPDATE SKIP LOCKED) RETURNING id, endpoint, event, body, created_at, attempts",
            (now + lease, now, now, limit),
        )
        return sorted((OutboxRow(*row) for row in rows), key=lambda r: r.id)

    async def delivered(self, row_id: int) -> None:
        await self._fetch(
            "UPDATE webhook_outbox SET state = 'delivered', attempts = attempts + 1, claimed_until = NULL "
            "WHERE id = %s",
            (row_id,),
        )

    async def retry(self, row_id: int, next_at: float, error: str, *, give_up: bool) -> None:
        await self._fetch(
            "UPDATE webhook_outbox SET state = %s, attempts = attempts + 1, next_at = %s, last_error = %s, "
            "claimed_until = NULL WHERE id = %s",
            ("failed" if give_up else "pending", next_at, error[:500], row_id),
        )

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT state, count(*) FROM webhook_outbox WHERE state != 'delivered' GROUP BY state", ()
        )
        return {"pending": 0, "failed": 0} | {str(state): int(n) for state, n in rows}

    async def forget_address(self, spellings: Sequence[str], tombstone: str) -> dict[str, int]:
        await self._ensure()
        outbox = keys = 0
        async with self._pool.connection() as conn:
            async with conn.transaction():
                for needle in needles(spellings):
                    cursor = await conn.execute(
                        "DELETE FROM webhook_outbox WHERE strpos(lower(body), %s) > 0", (needle,)
                    )
                    outbox += cursor.rowcount
                    cursor = await conn.execute(
                        "SELECT token, key, body FROM api_idempotency WHERE strpos(lower(body), %s) > 0 FOR UPDATE",
                        (needle,),
                    )
                    rows = await cursor.fetchall()
                    for token, key, body in rows:
                        await conn.execute(
                            "UPDATE api_idempotency SET request_hash = %s, body = %s WHERE token = %s AND key = %s",
                            (ERASED_REQUEST, anonymise(body, spellings, tombstone), token, key),
                        )
                    keys += len(rows)
            # Dead row versions keep the old bytes until vacuumed (as for the consent events).
            try:
                await conn.execute("VACUUM webhook_outbox, api_idempotency")
            except Exception as exc:  # best effort: autovacuum gets there later
                log.warning("VACUUM after an erasure failed: %s", exc)
        return {"webhook outbox rows": outbox, "idempotency answers": keys}

    async def close(self) -> None:
        await self._pool.close()


async def open_api_state(config: ConsentStoreConfig) -> ApiState:
    if config.backend == "postgres":
        assert config.dsn is not None
        return await PostgresApiState.open(config.dsn, max(float(config.timeout), 5.0))
    return await SQLiteApiState.open(config.path)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def now() -> float:
    return time.time()
