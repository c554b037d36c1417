"""The embedded consent store: one SQLite file in WAL mode, used from one worker thread.

sqlite3 blocks, so every call runs on a dedicated single thread (which also owns the
connection, as sqlite3 requires); the event loop only awaits futures. WAL lets lookups go on
while another process (``sendguard consent import``) writes; ``synchronous=FULL`` because an
opt-out that was acknowledged must survive a power cut, and writes are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from proxy.stores.consent_events import STORED_COLUMNS, ConsentEvent, as_utc, event_from_stored, stored_values
from proxy.stores.consent_store import ERASURE_REASON, ConsentStore, ConsentStoreError
from proxy.stores.migrations import Migration, apply_sqlite
from proxy.stores.migrations.consent import CONSENT_MIGRATIONS

__all__ = ("SQLiteConsentStore", "select_sql")

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 64 * 1024
WAL_LIMIT_BYTES = 64 * 1024 * 1024
_TIME_COLUMNS = frozenset({"effective_at", "recorded_at", "confirmed_at", "erased_at"})
_TIME_INDEXES = tuple(i for i, name in enumerate(STORED_COLUMNS) if name in _TIME_COLUMNS)
_BOOL_INDEX = STORED_COLUMNS.index("objection_offered")
_COLUMNS = ", ".join(STORED_COLUMNS)
# Queries are built from the constant column list only; values always go as parameters.
_PLACEHOLDERS = ", ".join("?" for _ in STORED_COLUMNS)
_INSERT = f"INSERT INTO consent_events ({_COLUMNS}) VALUES ({_PLACEHOLDERS})"  # noqa: S608
#: Erasure: the only UPDATE the table's trigger lets through (migration v3's tombstone rule).
ERASE_SQL = (
    "UPDATE consent_events SET subject = ?, subject_original = 'erased', source = '', ip = NULL, user_agent = NULL,"
    " relation = NULL, reason = NULL, upstream_reply = NULL, note = NULL, erased_at = ?"
    " WHERE subject_kind = 'address' AND subject = ? AND erased_at IS NULL"
)


@functools.lru_cache(maxsize=4096)  # an import writes one recorded_at and few distinct times
def _to_text(moment: datetime) -> str:
    """Fixed-width UTC text (``2024-05-01T10:00:00.000000+00:00``): comparing strings compares times."""
    utc = moment if moment.tzinfo is UTC else as_utc(moment)
    return utc.isoformat(timespec="microseconds")


def _to_row(values: Sequence[Any]) -> tuple[Any, ...]:
    row = list(values)
    for index in _TIME_INDEXES:
        if row[index] is not None:
            row[index] = _to_text(row[index])
    if row[_BOOL_INDEX] is not None:
        row[_BOOL_INDEX] = int(row[_BOOL_INDEX])
    return tuple(row)


def _from_row(row: Sequence[Any]) -> ConsentEvent:
    values = list(row[1:])
    for index in _TIME_INDEXES:
        if values[index] is not None:
            values[index] = datetime.fromisoformat(values[index])
    return event_from_stored(row[0], values)


def select_sql(subjects: int, bounded: bool) -> str:
    """The lookup: the rows of each subject through the index, merged in effective order."""
    one = f"SELECT id, {_COLUMNS} FROM consent_events WHERE subject_kind = ? AND subject = ?"  # noqa: S608
    if bounded:
        one += " AND recorded_at <= ?"
    return " UNION ALL ".join([one] * subjects) + " ORDER BY effective_at, id"


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode = WAL``, retried: the switch answers "database is locked" at once,
    without waiting for the busy timeout, while another process opens the same new file (two
    instances starting together, or the CLI next to a running proxy)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SQLiteConsentStore(ConsentStore):
    backend = "sqlite"

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(timeout, path)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, path: str, *, lookup_timeout: float, migrations: Sequence[Migration] = CONSENT_MIGRATIONS
    ) -> SQLiteConsentStore:
        store = cls(path, lookup_timeout)
        try:
            await store._call(store._open_sync, migrations)
        except (sqlite3.Error, OSError) as exc:
            store._executor.shutdown(wait=False)
            raise ConsentStoreError(f"cannot open the consent store {path}: {exc}") from exc
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)
        finally:
            self._executor.shutdown(wait=False)

    # -- the worker thread

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise ConsentStoreError("the consent store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    def _open_sync(self, migrations: Sequence[Migration]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        _private_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            # Erasure must not leave the old row readable in a free page of the file.
            conn.execute("PRAGMA secure_delete = ON")
            # A page cache that holds the upper levels of the lookup index at a million contacts
            # (the default is 2 MiB), and a WAL that shrinks back after a large import.
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            apply_sqlite(conn, migrations)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConsentStoreError("the consent store is closed")
        return self._conn

    def _write(self, rows: Iterator[tuple[Any, ...]], *, many: bool) -> list[int]:
        """Insert in one transaction; the new ids (``many``: executemany, no ids needed)."""
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        ids: list[int] = []
        try:
            if many:
                conn.executemany(_INSERT, rows)
            else:
                for row in rows:
                    cursor = conn.execute(_INSERT, row)
                    assert cursor.lastrowid is not None
                    ids.append(cursor.lastrowid)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return ids

    def _query(self, sql: str, params: Sequence[Any]) -> list[ConsentEvent]:
        return [_from_row(row) for row in self._db.execute(sql, params)]

    # -- ConsentStore

    async def _insert(self, events: Sequence[ConsentEvent], now: datetime) -> list[ConsentEvent]:
        rows = iter([_to_row(stored_values(e, now)) for e in events])
        ids = await self._call(functools.partial(self._write, rows, many=False))
        return [
            dataclasses.replace(event, id=record_id, recorded_at=event.recorded_at or now)
            for event, record_id in zip(events, ids, strict=True)
        ]

    async def _insert_bulk(self, events: Iterable[ConsentEvent], now: datetime) -> int:
        written = 0

        def rows() -> Iterator[tuple[Any, ...]]:
            nonlocal written
            for event in events:
                written += 1
                yield _to_row(stored_values(event, now))

        await self._call(functools.partial(self._write, rows(), many=True))
        await self._call(self._checkpoint)
        return written

    async def _erase(
        self, addresses: Sequence[str], tombstone: str, suppression: ConsentEvent, now: datetime
    ) -> tuple[int, ConsentEvent]:
        def run() -> tuple[int, int]:
            conn = self._db
            conn.execute("BEGIN IMMEDIATE")
            try:
                erased = sum(conn.execute(ERASE_SQL, (tombstone, _to_text(now), a)).rowcount for a in addresses)
                event = dataclasses.replace(suppression, reason=ERASURE_REASON.format(count=erased))
                cursor = conn.execute(_INSERT, _to_row(stored_values(event, now)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            assert cursor.lastrowid is not None
            # The WAL still holds the pages as they were before: fold it in and empty it.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return erased, cursor.lastrowid

        erased, record_id = await self._call(run)
        reason = ERASURE_REASON.format(count=erased)
        return erased, dataclasses.replace(suppression, id=record_id, recorded_at=now, reason=reason)

    def _checkpoint(self) -> None:
        """Fold a large import back into the database file so the WAL does not stay as big as
        the import (best effort: a reader that is still busy just postpones it)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _select(self, keys: Sequence[tuple[str, str]], at: datetime | None) -> list[ConsentEvent]:
        params: list[Any] = []
        for kind, value in keys:
            params.extend((kind, value))
            if at is not None:
                params.append(_to_text(at))
        return await self._call(self._query, select_sql(len(keys), at is not None), params)

    async def _page(self, after_id: int, limit: int) -> list[ConsentEvent]:
        sql = f"SELECT id, {_COLUMNS} FROM consent_events WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608
        return await self._call(self._query, sql, (after_id, limit))

    async def _count(self) -> int:
        def count() -> int:
            return int(self._db.execute("SELECT count(*) FROM consent_events").fetchone()[0])

        return await self._call(count)

    def _wrap(self, error: Exception) -> ConsentStoreError:
        return ConsentStoreError(f"consent store (sqlite {self.where}) failed: {type(error).__name__}: {error}")


def _private_file(path: str) -> None:
    """Consent records are personal data (AVG art. 32): the database is created readable by
    its owner only (SQLite gives its -wal and -shm files the same mode), and an existing
    one loses any access by others."""
    if path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o007:
            with contextlib.suppress(OSError):
                os.fchmod(fd, mode & ~0o007)
    finally:
        os.close(fd)
