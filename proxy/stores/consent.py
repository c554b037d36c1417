"""The consent store: an append-only log of consent events per address or domain, and the rules that read it.

Commercial e-mail needs consent the sender can prove, or the soft opt-in, and an objection
always wins (the legal frame is in ``consent_events``). This module is the one the rest of
sendguard imports: it gathers the names of the modules that do the work, holds the store's
configuration and opens the configured backend.

- ``consent_events``: the vocabulary, one event (``ConsentEvent``, ``new_event``) and its checks,
  subjects, topics, senders, times, the stored row.
- ``consent_basis``: the rules (``evaluate``, ``blanket_refusal``) and their answer (``Basis``).
- ``consent_csv``: import and export files.
- ``consent_store``: the interface every backend implements (``ConsentStore``).
- ``consent_sqlite``, ``consent_postgres``: the backends. They import the interface and the
  event model, never this module; ``open_consent_store`` imports them, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.schema import Duration, doc
from proxy.stores.consent_basis import (
    NO_SOFT_OPT_IN,
    Basis,
    SoftOptInRules,
    active_suppression,
    blanket_refusal,
    evaluate,
)
from proxy.stores.consent_csv import CSV_COLUMNS, CSV_EXPORT_ONLY, CsvProblem, event_from_row, iter_csv, read_csv
from proxy.stores.consent_events import (
    ADDRESS,
    ANY,
    CUSTOMER,
    DOMAIN,
    EVENT_KINDS,
    METHODS,
    OPTED_IN,
    OPTED_OUT,
    STORED_COLUMNS,
    SUPPRESSED,
    UNSUPPRESSED,
    ConsentEvent,
    ConsentInputError,
    Subject,
    as_utc,
    erasure_subject,
    event_from_stored,
    event_to_row,
    format_time,
    new_event,
    normalize_category,
    normalize_sender,
    normalize_topic,
    parse_subject,
    parse_time,
    stored_values,
    utcnow,
)
from proxy.stores.consent_store import ConsentStore, ConsentStoreError, Eraser, Erasure

__all__ = (
    "ADDRESS",
    "ANY",
    "CSV_COLUMNS",
    "CSV_EXPORT_ONLY",
    "CUSTOMER",
    "DOMAIN",
    "EVENT_KINDS",
    "Eraser",
    "Erasure",
    "METHODS",
    "NO_SOFT_OPT_IN",
    "OPTED_IN",
    "OPTED_OUT",
    "STORED_COLUMNS",
    "SUPPRESSED",
    "UNSUPPRESSED",
    "Basis",
    "ConsentEvent",
    "ConsentInputError",
    "ConsentStore",
    "ConsentStoreConfig",
    "ConsentStoreError",
    "CsvProblem",
    "SoftOptInRules",
    "Subject",
    "as_utc",
    "active_suppression",
    "blanket_refusal",
    "erasure_subject",
    "evaluate",
    "event_from_row",
    "event_from_stored",
    "event_to_row",
    "format_time",
    "iter_csv",
    "new_event",
    "normalize_category",
    "normalize_sender",
    "normalize_topic",
    "open_consent_store",
    "parse_subject",
    "parse_time",
    "read_csv",
    "stored_values",
    "utcnow",
)


@dataclass(frozen=True)
class ConsentStoreConfig:
    backend: Literal["sqlite", "postgres"] = doc(
        "sqlite: one file, for one instance; postgres: shared by several instances", default="sqlite"
    )
    path: str = doc("sqlite: the database file (created with its directory)", default="var/consent.db")
    dsn: str | None = doc(
        "postgres: connection string, e.g. postgresql://sendguard:${SENDGUARD_PG_PASSWORD}@db/sendguard",
        default=None,
    )
    pool_min: int = doc("postgres: connections kept open", default=1)
    pool_max: int = doc("postgres: connections at most", default=10)
    timeout: Duration = doc("time limit of one lookup or write; beyond it the check fails (451)", default=Duration(2))
    erasure_key: str | None = doc(
        "secret of the keyed hash (HMAC-SHA256) that replaces an erased address (sendguard consent erase), "
        "at least 32 characters, e.g. ${SENDGUARD_ERASURE_KEY}; never change it: erased addresses are found by it",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("backend postgres needs a dsn (postgresql://user:password@host/database)")
        if not 0 <= self.pool_min <= self.pool_max or self.pool_max < 1:
            raise ValueError("pool sizes need 0 <= pool_min <= pool_max and pool_max >= 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.backend == "sqlite" and not self.path:
            raise ValueError("backend sqlite needs a path")
        if self.erasure_key is not None and len(self.erasure_key) < 32:
            raise ValueError("erasure_key must be at least 32 characters (sendguard unsubscribe keygen makes one)")


async def open_consent_store(config: ConsentStoreConfig, *, connect: bool = True) -> ConsentStore:
    """Open the configured store and bring its schema up to date.

    ``connect=False`` (for ``serve``) lets PostgreSQL be down at start: the store then connects
    and migrates on first use, and each lookup fails (451 for commercial mail) until it can,
    while transactional mail keeps flowing. The backend modules are imported here, lazily.
    """
    if config.backend == "postgres":
        from proxy.stores.consent_postgres import PostgresConsentStore

        assert config.dsn is not None
        store: ConsentStore = await PostgresConsentStore.open(
            config.dsn,
            lookup_timeout=config.timeout,
            pool_min=config.pool_min,
            pool_max=config.pool_max,
            connect=connect,
        )
    else:
        from proxy.stores.consent_sqlite import SQLiteConsentStore

        store = await SQLiteConsentStore.open(config.path, lookup_timeout=config.timeout)
    if config.erasure_key is not None:
        store.erasure_key = config.erasure_key.encode("utf-8")
    return store
