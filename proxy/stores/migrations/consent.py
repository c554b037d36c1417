"""Schema of the consent store: one append-only table of events, the same on both engines.

The lookup index is (subject_kind, subject, effective_at, id): a recipient's lookup reads its
own few rows and its domain's, in order, after an O(log n) descent; its cost does not grow
with the number of contacts. Triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL),
so history can only grow; an admin who must erase a person (AVG art. 17) drops the trigger
deliberately, which shows in the database's own log.
"""

from __future__ import annotations

from proxy.stores.migrations import Migration

__all__ = ("CONSENT_MIGRATIONS",)

_KINDS = "'opted_in', 'customer', 'opted_out', 'suppressed', 'unsuppressed'"
_APPEND_ONLY = "consent_events is append-only: record a new event instead of changing or deleting one"

_V1_SQLITE = (
    f"""
    CREATE TABLE consent_events (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: audit lines cite it
        subject_kind      TEXT    NOT NULL CHECK (subject_kind IN ('address', 'domain')),
        subject           TEXT    NOT NULL,
        subject_original  TEXT    NOT NULL,
        topic             TEXT    NOT NULL,
        sender            TEXT    NOT NULL,
        kind              TEXT    NOT NULL CHECK (kind IN ({_KINDS})),
        effective_at      TEXT    NOT NULL,  -- UTC, fixed width (…T10:00:00.000000+00:00): sorts as text
        recorded_at       TEXT    NOT NULL,
        method            TEXT    NOT NULL,
        source            TEXT    NOT NULL DEFAULT '',
        ip                TEXT,
        user_agent        TEXT,
        text_version      TEXT,
        confirmed_at      TEXT,
        relation          TEXT,
        product_category  TEXT,
        objection_offered INTEGER CHECK (objection_offered IN (0, 1)),
        reason            TEXT,
        upstream_reply    TEXT,
        note              TEXT
    )
    """,
    "CREATE INDEX consent_events_by_subject ON consent_events (subject_kind, subject, effective_at, id)",
    f"""
    CREATE TRIGGER consent_events_no_update BEFORE UPDATE ON consent_events
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END
    """,
    f"""
    CREATE TRIGGER consent_events_no_delete BEFORE DELETE ON consent_events
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END
    """,
)

_V1_POSTGRES = (
    f"""
    CREATE TABLE consent_events (
        id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        subject_kind      TEXT        NOT NULL CHECK (subject_kind IN ('address', 'domain')),
        subject           TEXT        NOT NULL,
        subject_original  TEXT        NOT NULL,
        topic             TEXT        NOT NULL,
        sender            TEXT        NOT NULL,
        kind              TEXT        NOT NULL CHECK (kind IN ({_KINDS})),
        effective_at      TIMESTAMPTZ NOT NULL,
        recorded_at       TIMESTAMPTZ NOT NULL,
        method            TEXT        NOT NULL,
        source            TEXT        NOT NULL DEFAULT '',
        ip                TEXT,
        user_agent        TEXT,
        text_version      TEXT,
        confirmed_at      TIMESTAMPTZ,
        relation          TEXT,
        product_category  TEXT,
        objection_offered BOOLEAN,
        reason            TEXT,
        upstream_reply    TEXT,
        note              TEXT
    )
    """,
    "CREATE INDEX consent_events_by_subject ON consent_events (subject_kind, subject, effective_at, id)",
    f"""
    CREATE FUNCTION consent_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '{_APPEND_ONLY}';
    END
    $$
    """,
    """
    CREATE TRIGGER consent_events_no_change BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION consent_events_append_only()
    """,
    """
    CREATE TRIGGER consent_events_no_truncate BEFORE TRUNCATE ON consent_events
    FOR EACH STATEMENT EXECUTE FUNCTION consent_events_append_only()
    """,
)

# SQLite: INSERT OR REPLACE deletes the old row without firing the DELETE trigger (unless
# recursive triggers are on), so an insert must never reuse an existing id.
_V2_SQLITE = (
    f"""
    CREATE TRIGGER consent_events_no_replace BEFORE INSERT ON consent_events
    WHEN NEW.id IS NOT NULL AND EXISTS (SELECT 1 FROM consent_events WHERE id = NEW.id)
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END
    """,  # noqa: S608 - a constant message, no input
)
_V2_POSTGRES: tuple[str, ...] = ()  # PostgreSQL has no REPLACE; its UPDATE/DELETE trigger covers ON CONFLICT

CONSENT_MIGRATIONS: tuple[Migration, ...] = (
    Migration("consent", 1, "consent_events: append-only event log with lookup index", _V1_SQLITE, _V1_POSTGRES),
    Migration("consent", 2, "consent_events: no INSERT OR REPLACE over a recorded event", _V2_SQLITE, _V2_POSTGRES),
)
