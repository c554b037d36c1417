"""The durable retry queue: per-recipient copies the upstream refused for now, and DSNs.

sendguard relays in lockstep and queues nothing, except where one client transaction
becomes several upstream ones (one copy per recipient, ``proxy.relay.copies``): there the
client's single reply cannot say "two delivered, one try again", so a copy the upstream
refused temporarily is written here, and the client gets 250 only after the row is
committed. ``PRAGMA synchronous=FULL`` makes each commit an fsync of the WAL, so a row that
was committed survives a crash or power loss. The DSNs sendguard sends wait here too.

One row per message to one recipient, with the exact bytes to send (already signed: each
copy differs). The running process drains it (``proxy.relay.drain``); ``sendguard queue``
lists, retries and drops rows. A worker takes a row by setting ``claimed_until`` in a write
transaction (SQLite's one writer), so two workers, in one process or in several, never send
the same row at once; a worker that dies leaves the row to be taken again when the lease ends.

The calls here block (disk, fsync): the async ones run them in a worker thread, so the
event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ("KINDS", "Queued", "Spool", "SpoolEntry", "retry_delay")

KINDS = ("copy", "dsn")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created       REAL NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('copy', 'dsn')),
    txn_id        TEXT NOT NULL,
    sender        TEXT NOT NULL,
    recipient     TEXT NOT NULL,
    options       TEXT NOT NULL DEFAULT '',
    content       BLOB NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL,
    last_reply    TEXT NOT NULL DEFAULT '',
    claimed_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (next_attempt);
"""

_LISTED = "SELECT id, created, kind, txn_id, sender, recipient, options, attempts, next_attempt, last_reply"
_LIST = _LISTED + " FROM queue ORDER BY next_attempt, id"
_DUE = _LISTED + ", content FROM queue WHERE next_attempt <= ? AND claimed_until <= ? ORDER BY next_attempt, id LIMIT 1"


@dataclass(frozen=True, slots=True)
class Queued:
    """A message to queue: ``attempts`` made so far, ``last_reply`` the last answer."""

    kind: str
    txn_id: str
    sender: str
    recipient: str
    content: bytes
    next_attempt: float
    options: tuple[str, ...] = ()
    attempts: int = 0
    last_reply: str = ""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """A row of the queue; ``content`` is empty in listings."""

    id: int
    created: float
    kind: str
    txn_id: str
    sender: str
    recipient: str
    options: tuple[str, ...]
    attempts: int
    next_attempt: float
    last_reply: str
    content: bytes = b""

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.created


def retry_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """The wait after ``attempts`` failed tries: retry_min, doubling each time, at most retry_max."""
    return float(min(retry_max, retry_min * 2 ** max(0, min(attempts - 1, 40))))


def _entry(row: sqlite3.Row, content: bytes = b"") -> SpoolEntry:
    return SpoolEntry(
        id=row["id"],
        created=row["created"],
        kind=row["kind"],
        txn_id=row["txn_id"],
        sender=row["sender"],
        recipient=row["recipient"],
        options=tuple(row["options"].split()),
        attempts=row["attempts"],
        next_attempt=row["next_attempt"],
        last_reply=row["last_reply"],
        content=content,
    )


def _insert(db: sqlite3.Connection, messages: Sequence[Queued], created: float) -> list[int]:
    ids = []
    for m in messages:
        cursor = db.execute(
            "INSERT INTO queue (created, kind, txn_id, sender, recipient, options, content, attempts,"
            " next_attempt, last_reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                created,
                m.kind,
                m.txn_id,
                m.sender,
                m.recipient,
                " ".join(m.options),
                m.content,
                m.attempts,
                m.next_attempt,
                m.last_reply,
            ),
        )
        ids.append(int(cursor.lastrowid or 0))
    return ids


class Spool:
    """The queue file. Each call opens its own connection (calls run in worker threads)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: Set when a row was added that is due now: the drainer wakes up at once.
        self.wakeup = asyncio.Event()
        self._create()

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: the rows hold whole messages (personal data).
        # SQLite gives the -wal and -shm files the database file's permissions.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")  # every commit is on disk before it returns
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE: no other writer meanwhile)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- blocking calls (the CLI uses these; the proxy their async twins) -------------------

    def add_sync(self, messages: Sequence[Queued], now: float | None = None) -> list[int]:
        """Queue all of them or none (one transaction); their row ids."""
        with self._write() as db:
            return _insert(db, messages, time.time() if now is None else now)

    def claim_sync(self, lease: float, now: float | None = None) -> SpoolEntry | None:
        """The next row due that nobody holds, now held by us for ``lease`` seconds."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute(_DUE, (now, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE queue SET claimed_until = ? WHERE id = ?", (now + lease, row["id"]))
        return _entry(row, bytes(row["content"]))

    def delivered_sync(self, entry_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM queue WHERE id = ?", (entry_id,))

    def defer_sync(self, entry_id: int, reply: str, next_attempt: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE queue SET attempts = attempts + 1, last_reply = ?, next_attempt = ?, claimed_until = 0"
                " WHERE id = ?",
                (reply, next_attempt, entry_id),
            )

    def release_sync(self, entry_id: int) -> None:
        """Give a claimed row back untried, due now (its worker is stopping)."""
        with self._write() as db:
            db.execute("UPDATE queue SET claimed_until = 0 WHERE id = ?", (entry_id,))

    def replace_sync(self, entry_id: int, messages: Sequence[Queued]) -> list[int]:
        """Delete a row and queue others in its place, in one transaction (a copy given up on
        becomes its DSN: never one without the other)."""
        with self._write() as db:
            db.execute("DELETE FROM queue WHERE id = ?", (entry_id,))
            return _insert(db, messages, time.time())

    def list_sync(self) -> list[SpoolEntry]:
        with self._connect() as db:
            rows = db.execute(_LIST).fetchall()
        return [_entry(row) for row in rows]

    def retry_sync(self, ids: Sequence[int] | None, now: float | None = None) -> int:
        """Make rows due now (``None``: every row); how many changed."""
        now = time.time() if now is None else now
        with self._write() as db:
            if ids is None:
                return db.execute("UPDATE queue SET next_attempt = ?, claimed_until = 0", (now,)).rowcount
            return sum(
                db.execute(
                    "UPDATE queue SET next_attempt = ?, claimed_until = 0 WHERE id = ?", (now, entry_id)
                ).rowcount
                for entry_id in ids
            )

    def drop_sync(self, ids: Sequence[int] | None) -> int:
        """Delete rows (``None``: every row); how many were deleted."""
        with self._write() as db:
            if ids is None:
                return db.execute("DELETE FROM queue").rowcount
            return sum(db.execute("DELETE FROM queue WHERE id = ?", (entry_id,)).rowcount for entry_id in ids)

    def forget_sync(self, spellings: Sequence[str]) -> list[str]:
        """An erasure (AVG art. 17): delete the copies queued for the address, and the DSNs
        whose text names it (a DSN goes to the sender and quotes the recipient); the
        transaction ids of the rows deleted. Copies for other recipients of the same message
        stay: they are someone else's mail, and it is theirs to have, even where its header
        names the address. The old bytes are overwritten (``secure_delete``) and the WAL
        folded in, as for the consent store."""
        lowered = sorted({spelling.lower() for spelling in spellings})
        with self._write() as db:
            db.execute("PRAGMA secure_delete = ON")
            gone: list[str] = []
            for spelling in lowered:
                rows = db.execute(
                    "DELETE FROM queue WHERE (kind = 'copy' AND lower(recipient) = ?)"
                    " OR (kind = 'dsn' AND instr(lower(CAST(content AS TEXT)), ?) > 0) RETURNING txn_id",
                    (spelling, spelling),
                ).fetchall()
                gone.extend(str(row["txn_id"]) for row in rows)
        with self._connect() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    def stats_sync(self) -> tuple[dict[str, int], float | None]:
        """Rows by kind and the creation time of the oldest row (None when empty)."""
        with self._connect() as db:
            counts = {kind: 0 for kind in KINDS}
            for row in db.execute("SELECT kind, count(*) AS n FROM queue GROUP BY kind"):
                counts[row["kind"]] = row["n"]
            oldest = db.execute("SELECT min(created) AS oldest FROM queue").fetchone()["oldest"]
        return counts, oldest

    # ---- the same, off the event loop ------------------------------------------------------

    async def add(self, messages: Sequence[Queued]) -> list[int]:
        ids = await asyncio.to_thread(self.add_sync, messages)
        if any(m.next_attempt <= time.time() for m in messages):
            self.wakeup.set()
        return ids

    async def claim(self, lease: float) -> SpoolEntry | None:
        return await asyncio.to_thread(self.claim_sync, lease)

    async def delivered(self, entry_id: int) -> None:
        await asyncio.to_thread(self.delivered_sync, entry_id)

    async def defer(self, entry_id: int, reply: str, next_attempt: float) -> None:
        await asyncio.to_thread(self.defer_sync, entry_id, reply, next_attempt)

    async def replace(self, entry_id: int, messages: Sequence[Queued]) -> list[int]:
        ids = await asyncio.to_thread(self.replace_sync, entry_id, messages)
        self.wakeup.set()
        return ids

    async def stats(self) -> tuple[dict[str, int], float | None]:
        return await asyncio.to_thread(self.stats_sync)

    async def forget(self, spellings: Sequence[str]) -> list[str]:
        return await asyncio.to_thread(self.forget_sync, spellings)
