"""Schema of the consent store: one append-only table of events, the same on both engines.

The lookup index is (subject_kind, subject, effective_at, id): a recipient's lookup reads its
own few rows and its domain's, in order, after an O(log n) descent; its cost does not grow
with the number of contacts. Triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL),
so history can only grow. Since v3 one change is allowed: erasure (AVG art. 17) turns a row
about an address into its tombstone (``ConsentStore.erase``), and nothing else.
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

# v3, erasure (AVG art. 17): a row about one address may be changed exactly once, into its
# tombstone: the subject becomes ``erased:<HMAC-SHA256 of the address, hex>``, every personal
# field is emptied, ``erased_at`` is set, and nothing else changes (kind, topic, sender,
# method and times stay, so counts and reports stay true). Any other UPDATE, any DELETE and
# a second erasure are still refused. The rule is written once and used by both engines.
_TOMBSTONE_RULE = """
    OLD.erased_at IS NULL AND NEW.erased_at IS NOT NULL
    AND OLD.subject_kind = 'address' AND NEW.subject_kind = 'address'
    AND NEW.subject LIKE 'erased:%' AND length(NEW.subject) = 71 AND NEW.subject_original = 'erased'
    AND NEW.id = OLD.id AND NEW.kind = OLD.kind AND NEW.topic = OLD.topic AND NEW.sender = OLD.sender
    AND NEW.method = OLD.method AND NEW.effective_at = OLD.effective_at AND NEW.recorded_at = OLD.recorded_at
    AND NEW.source = '' AND NEW.ip IS NULL AND NEW.user_agent IS NULL AND NEW.relation IS NULL
    AND NEW.reason IS NULL AND NEW.upstream_reply IS NULL AND NEW.note IS NULL
"""
_V3_SQLITE = (
    "ALTER TABLE consent_events ADD COLUMN erased_at TEXT",
    "DROP TRIGGER consent_events_no_update",
    f"""
    CREATE TRIGGER consent_events_no_update BEFORE UPDATE ON consent_events
    WHEN NOT ({_TOMBSTONE_RULE})
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END
    """,
)
_V3_POSTGRES = (
    "ALTER TABLE consent_events ADD COLUMN erased_at TIMESTAMPTZ",
    f"""
    CREATE OR REPLACE FUNCTION consent_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND ({_TOMBSTONE_RULE}) THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '{_APPEND_ONLY}';
    END
    $$
    """,
)

CONSENT_MIGRATIONS: tuple[Migration, ...] = (
    Migration("consent", 1, "consent_events: append-only event log with lookup index", _V1_SQLITE, _V1_POSTGRES),
    Migration("consent", 2, "consent_events: no INSERT OR REPLACE over a recorded event", _V2_SQLITE, _V2_POSTGRES),
    Migration("consent", 3, "consent_events: erased_at, erasure tombstones", _V3_SQLITE, _V3_POSTGRES),
)
