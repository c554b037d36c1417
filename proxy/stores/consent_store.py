"""The consent store interface: what every backend offers, and the checks and time limits they share.

A backend (``consent_sqlite``, ``consent_postgres``) imports this module and the event model
only; ``proxy.stores.consent`` chooses and opens one (``open_consent_store``).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import ClassVar, TypeVar

from proxy.stores.consent_basis import NO_SOFT_OPT_IN, Basis, SoftOptInRules, evaluate
from proxy.stores.consent_events import (
    ADDRESS,
    ANY,
    ERASED_ORIGINAL,
    FUTURE_SKEW,
    SUPPRESSED,
    ConsentEvent,
    ConsentInputError,
    Subject,
    as_utc,
    erasure_subject,
    event_problems,
    normalize_sender,
    normalize_topic,
    parse_subject,
    utcnow,
)

__all__ = ("ConsentStore", "ConsentStoreError", "Eraser", "Erasure")

#: The reason written on the suppression an erasure leaves; ``consent show`` and the
#: recipient's page recognise an erasure by its method.
ERASURE_REASON = "erased on request (AVG art. 17): the personal data of {count} earlier event(s) removed"


@dataclasses.dataclass(frozen=True, slots=True)
class Erasure:
    """What ``ConsentStore.erase`` did: how many rows became tombstones, and the suppression
    (keyed hash as its subject) that keeps refusing commercial mail to the address."""

    erased: int
    at: datetime
    suppression: ConsentEvent
    #: What the other stores removed (``ConsentStore.erasers``), by what it was: "retry queue
    #: rows": 2, ...
    purged: dict[str, int] = dataclasses.field(default_factory=dict)
    #: The erasers that failed, with why: the address may still be there; erasing again
    #: runs them again.
    failures: tuple[str, ...] = ()


T = TypeVar("T")
log = logging.getLogger("sendguard.consent")

#: Told of every event ``add`` recorded (the webhooks' outbox); bulk imports are not told.
Observer = Callable[[Sequence[ConsentEvent]], Awaitable[None]]
#: Run after an erasure committed, with every stored spelling of the address and its tombstone
#: subject: another store that holds the address (the API's tables, the retry queue, the bounce
#: counters) removes it there and says what it removed ({"retry queue rows": 1}). The store
#: itself knows none of them; the process and the CLI add them.
Eraser = Callable[[Sequence[str], str], Awaitable[dict[str, int]]]


class ConsentStoreError(Exception):
    """The store cannot answer (unreachable, timed out, broken). Never means "no consent"."""


class ConsentStore(abc.ABC):
    """Append-only consent events with a lookup per recipient. Every method may raise
    ``ConsentStoreError`` (store down, timeout) or ``ConsentInputError`` (bad input)."""

    backend: ClassVar[str] = ""

    def __init__(self, timeout: float, where: str) -> None:
        self.timeout = float(timeout)
        self.where = where  # for messages: a path, or host:port/database (never a password)
        self.observers: list[Observer] = []
        self.erasers: list[Eraser] = []
        # The secret of the erasure tombstones' keyed hash (stores.consent.erasure_key). Without
        # it nothing can be erased, and erased rows are not found by their address.
        self.erasure_key: bytes | None = None

    # -- public API

    async def add(self, *events: ConsentEvent) -> list[ConsentEvent]:
        """Record events (one transaction); return them with their ids and recording time."""
        now = utcnow()
        self._check(events, now)
        # Nothing takes effect after it is recorded: an opt-in stamped a few minutes ahead (a
        # skewed clock) must not outrank an opt-out recorded after it.
        events = tuple(dataclasses.replace(e, effective_at=min(e.effective_at, now)) for e in events)
        stored = await self._bounded(self._insert(events, now))
        for observer in self.observers:
            try:
                await observer(stored)
            except Exception:  # the event is on record; telling others must not undo that answer
                log.exception("an observer of recorded consent events failed")
        return stored

    async def import_events(
        self, events: Iterable[ConsentEvent], *, keep_recorded_at: bool = False, checked: bool = False
    ) -> int:
        """Record many events in one transaction: all of them, or none when anything fails.

        The events are consumed as they are written (a million need not sit in memory); one
        that breaks the rules aborts the transaction with ``ConsentInputError``. Not bounded by
        ``timeout``: a large import takes longer than a lookup. ``checked``: the events come
        straight from ``new_event`` (which ran the same checks a moment ago), so the rules are
        not run a second time; a third of a large import's time went there.
        """
        now = utcnow()

        def vetted() -> Iterator[ConsentEvent]:
            for number, event in enumerate(events, 1):
                problems = [] if checked else event_problems(event, now)
                if event.recorded_at is not None and event.recorded_at > now + FUTURE_SKEW:
                    problems.append("recorded_at is in the future")
                if problems:
                    raise ConsentInputError(
                        f"event {number} ({event.kind} {event.label}): {'; '.join(problems)}; nothing was imported"
                    )
                if event.recorded_at is not None and not keep_recorded_at:
                    event = dataclasses.replace(event, recorded_at=None)
                if event.effective_at > now:
                    event = dataclasses.replace(event, effective_at=now)
                yield event

        try:
            return await self._insert_bulk(vetted(), now)
        except (ConsentStoreError, ConsentInputError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._wrap(exc) from exc

    async def history(self, subject: str | Subject, *, at: datetime | None = None) -> list[ConsentEvent]:
        """Every event of a subject, oldest first; for an address, its domain's events too, and
        the tombstones of its erasure (read back as the address asked for, ``erased_at`` set, so
        the rules treat the erasure's suppression as the address's own)."""
        parsed = subject if isinstance(subject, Subject) else parse_subject(subject)
        bound = as_utc(at) if at is not None else None
        keys = parsed.keys
        tombstone = None
        if parsed.kind == ADDRESS and self.erasure_key is not None:
            tombstone = erasure_subject(self.erasure_key, parsed.value)
            keys = (*keys, (ADDRESS, tombstone))
        events = await self._bounded(self._select(keys, bound))
        if tombstone is None:
            return events
        return [
            dataclasses.replace(event, subject=parsed.value) if event.subject == tombstone else event
            for event in events
        ]

    async def erase(self, address: str, *, requested_via: str = "admin") -> Erasure:
        """Erase an address (AVG art. 17) in one transaction: every row about it becomes its
        tombstone (the keyed hash instead of the address, no IP, user agent, source, relation,
        reason, reply or note; kind, topic, sender, method and times kept), and one suppression
        under the same hash is appended, so commercial mail to the address stays refused. The
        domain's rows are about a business, not this person, and stay. Erasing again erases
        what was recorded since, and appends another suppression."""
        subject = parse_subject(address)
        if subject.kind != ADDRESS:
            raise ConsentInputError("erasure is for one person's address, not a domain")
        if self.erasure_key is None:
            raise ConsentInputError(
                "erasure needs stores.consent.erasure_key (a secret, e.g. ${SENDGUARD_ERASURE_KEY}): "
                "the keyed hash that keeps refusing the address is made with it"
            )
        tombstone = erasure_subject(self.erasure_key, subject.value)
        now = utcnow()
        suppression = ConsentEvent(
            kind=SUPPRESSED,
            subject_kind=ADDRESS,
            subject=tombstone,
            subject_original=ERASED_ORIGINAL,
            effective_at=now,
            method="erasure",
            reason="",
            note=f"requested via {requested_via}",
        )
        # Not bounded by the lookup timeout: the clean-up after it (VACUUM) takes its time.
        try:
            # Every spelling the address's records may be stored under (its keys), not only
            # the normalised one: an erasure must reach them all.
            spellings = tuple(value for kind, value in subject.keys if kind == ADDRESS)
            erased, stored = await self._erase(spellings, tombstone, suppression, now)
        except (ConsentStoreError, ConsentInputError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._wrap(exc) from exc
        purged: dict[str, int] = {}
        failures: list[str] = []
        for eraser in self.erasers:
            try:
                for what, count in (await eraser(spellings, tombstone)).items():
                    purged[what] = purged.get(what, 0) + count
            except Exception as exc:  # the tombstones stand; say what is left, erasing again retries
                log.exception("an eraser failed after an erasure")
                failures.append(f"{getattr(eraser, '__name__', eraser)}: {type(exc).__name__}: {exc}")
        return Erasure(erased, now, dataclasses.replace(stored, subject=subject.value), purged, tuple(failures))

    async def basis(
        self,
        address: str,
        topic: str = ANY,
        sender: str = ANY,
        *,
        at: datetime | None = None,
        rules: SoftOptInRules = NO_SOFT_OPT_IN,
    ) -> Basis:
        """The lawful basis for commercial mail to ``address`` now, or as known at ``at``."""
        subject = parse_subject(address)
        if subject.kind != ADDRESS:
            raise ConsentInputError("a basis is looked up for one address, not a domain")
        events = await self.history(subject, at=at)
        return evaluate(events, subject.value, normalize_topic(topic), normalize_sender(sender), at=at, rules=rules)

    async def export(self, *, batch: int = 5000) -> AsyncIterator[ConsentEvent]:
        """Every event in id order, fetched page by page."""
        after = 0
        while True:
            page = await self._bounded(self._page(after, batch))
            for event in page:
                yield event
            if len(page) < batch:
                return
            after = page[-1].id or after

    async def count(self) -> int:
        return await self._bounded(self._count())

    async def since(self, after_id: int, limit: int) -> list[ConsentEvent]:
        """Up to ``limit`` events with an id above ``after_id``, in id order (a reader that
        follows the log, such as the webhooks' sweep, keeps the last id it saw)."""
        return await self._bounded(self._page(after_id, limit))

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- for backends

    @abc.abstractmethod
    async def _insert(self, events: Sequence[ConsentEvent], now: datetime) -> list[ConsentEvent]: ...

    @abc.abstractmethod
    async def _insert_bulk(self, events: Iterable[ConsentEvent], now: datetime) -> int:
        """Write every event of the iterable in one transaction; return how many."""

    @abc.abstractmethod
    async def _erase(
        self, addresses: Sequence[str], tombstone: str, suppression: ConsentEvent, now: datetime
    ) -> tuple[int, ConsentEvent]:
        """In one transaction: turn the rows of the address (each stored spelling of it) into
        tombstones, append the suppression (its reason filled from ``ERASURE_REASON`` with the
        count); the count and the stored suppression. Old row versions must not stay readable
        (SQLite secure_delete and a WAL checkpoint; PostgreSQL VACUUM)."""

    @abc.abstractmethod
    async def _select(self, keys: Sequence[tuple[str, str]], at: datetime | None) -> list[ConsentEvent]: ...

    @abc.abstractmethod
    async def _page(self, after_id: int, limit: int) -> list[ConsentEvent]: ...

    @abc.abstractmethod
    async def _count(self) -> int: ...

    @abc.abstractmethod
    def _wrap(self, error: Exception) -> ConsentStoreError:
        """Turn a driver error into a ConsentStoreError that says what failed."""

    @staticmethod
    def _check(events: Sequence[ConsentEvent], now: datetime) -> None:
        problems: list[str] = []
        for index, event in enumerate(events):
            for problem in event_problems(event, now):
                problems.append(f"event {index + 1} ({event.kind} {event.label}): {problem}")
            if event.recorded_at is not None and event.recorded_at > now + FUTURE_SKEW:
                problems.append(f"event {index + 1}: recorded_at is in the future")
        if problems:
            raise ConsentInputError("; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))

    async def _bounded(self, call: Awaitable[T]) -> T:
        try:
            # asyncio.timeout, not wait_for: no task per call (3.11's wait_for wraps the
            # coroutine in one), on the path of every recipient.
            async with asyncio.timeout(self.timeout):
                return await call
        except (ConsentStoreError, ConsentInputError, asyncio.CancelledError):
            raise
        except TimeoutError as exc:
            raise ConsentStoreError(
                f"consent store ({self.backend} {self.where}) did not answer within {self.timeout:g}s"
            ) from exc
        except Exception as exc:
            raise self._wrap(exc) from exc
