"""Versioned schema migrations for the stores, for SQLite and PostgreSQL, and their runners.

Each migration has a component (``consent``), a version and the statements for each engine.
Applied versions are recorded in ``schema_version``; opening a store applies the missing ones,
in version order, in one transaction, under a lock so two instances starting together never
apply a step twice: ``BEGIN IMMEDIATE`` on SQLite (the database write lock), a transaction
advisory lock on PostgreSQL (keyed by the schema, so tenants in one database do not wait on
each other). Running the runner again changes nothing.

Migrations are Python data rather than ``.sql`` files so that they ship inside the package
without package-data rules.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

__all__ = ("Migration", "apply_postgres", "apply_sqlite")

#: First key of the PostgreSQL advisory lock (pg_advisory_xact_lock(int, int)); the second
#: is a hash of the current schema.
ADVISORY_LOCK_CLASS = 0x5E6D  # "sendguard migrations"

SCHEMA_VERSION_SQLITE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    description TEXT    NOT NULL,
    applied_at  TEXT    NOT NULL,
    PRIMARY KEY (component, version)
)
"""

SCHEMA_VERSION_POSTGRES = """
CREATE TABLE IF NOT EXISTS schema_version (
    component   TEXT        NOT NULL,
    version     INTEGER     NOT NULL,
    description TEXT        NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    component: str
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


def _check_order(migrations: Sequence[Migration]) -> None:
    versions = [(m.component, m.version) for m in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")


def apply_sqlite(conn: sqlite3.Connection, migrations: Sequence[Migration]) -> list[int]:
    """Apply the missing migrations; return the versions applied now (empty when up to date).

    ``conn`` must be in autocommit mode (``isolation_level=None``): the transaction is ours.
    """
    _check_order(migrations)
    conn.execute("BEGIN IMMEDIATE")  # the write lock: a second instance waits here (busy_timeout)
    try:
        conn.execute(SCHEMA_VERSION_SQLITE)
        applied = {
            (component, version) for component, version in conn.execute("SELECT component, version FROM schema_version")
        }
        done: list[int] = []
        for migration in sorted(migrations, key=lambda m: (m.component, m.version)):
            if (migration.component, migration.version) in applied:
                continue
            for statement in migration.sqlite:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (component, version, description, applied_at) VALUES (?, ?, ?, ?)",
                (migration.component, migration.version, migration.description, datetime.now(UTC).isoformat()),
            )
            done.append(migration.version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return done


async def apply_postgres(conn: psycopg.AsyncConnection[TupleRow], migrations: Sequence[Migration]) -> list[int]:
    """Apply the missing migrations under an advisory lock; return the versions applied now."""
    _check_order(migrations)
    async with conn.transaction():
        # Taken before anything else: CREATE TABLE IF NOT EXISTS itself races between two
        # sessions (a unique violation in pg_type), so it must run under the lock too.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(current_schema(), '')))", (ADVISORY_LOCK_CLASS,)
        )
        await conn.execute(SCHEMA_VERSION_POSTGRES)
        cursor = await conn.execute("SELECT component, version FROM schema_version")
        applied = {(str(row[0]), int(row[1])) for row in await cursor.fetchall()}
        done: list[int] = []
        for migration in sorted(migrations, key=lambda m: (m.component, m.version)):
            if (migration.component, migration.version) in applied:
                continue
            for statement in migration.postgres:
                await conn.execute(statement)  # literal SQL from this package
            await conn.execute(
                "INSERT INTO schema_version (component, version, description) VALUES (%s, %s, %s)",
                (migration.component, migration.version, migration.description),
            )
            done.append(migration.version)
    return done
