"""The consent store: an append-only log of consent events per address or domain, and the rules that read it.

Legal frame (Dutch Telecommunicatiewet art. 11.7, ePrivacy Directive 2002/58 art. 13, AVG/GDPR art. 7):
commercial e-mail needs prior consent that the sender can prove, or the "soft opt-in" for
existing customers, and an objection always wins. The store therefore keeps *events*, never
states: every opt-in, customer relation, opt-out, suppression and lifted suppression is a new
row with its evidence, nothing is changed or deleted, and the basis on any past date can be
shown again (``ConsentStore.basis(..., at=...)``).

Subjects are an address (``bob@example.org``, compared lower-case, the original spelling kept)
or a whole domain for business relations (``@bigcorp.example``). Events carry a topic (``*`` =
every topic) and the sender that holds the relation (the From domain; ``*`` = any sender).

The rules (``evaluate``), in order:

1. A suppression (hard bounce, complaint, manual) of the address or of its domain blocks all
   commercial mail, whatever the topic or sender, until an admin records ``unsuppressed``.
2. An opt-out that covers the message (same topic or ``*``, same sender or ``*``; an unknown
   topic or sender is covered by *every* opt-out) blocks it, unless a *later explicit* opt-in
   lifts it: an ``opted_in`` event effective after the opt-out, at the same level or a more
   specific one (an address-level opt-out is never lifted by a domain-level consent), that
   covers the message, that is valid (a double opt-in must be confirmed) and that is not a
   bulk ``import`` (an old list imported again must not re-subscribe people who objected).
   A new purchase (``customer``) never lifts an opt-out.
3. A valid opt-in that covers the message and is later than every opt-out that covers it.
4. The soft opt-in (art. 11.7 lid 3), when enabled: a ``customer`` event of the *same* sender,
   whose product category is one the message's topic may advertise, where the chance to object
   was offered when the address was collected, and (optionally) not older than ``max_age``.
5. Otherwise there is no basis.

``at`` means "as the store knew it then": only events *recorded* by ``at`` count, ordered by
when they took effect. That reproduces the decision sendguard made at that moment.
"""

from __future__ import annotations

import abc
import asyncio
import csv
import dataclasses
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, Literal, TextIO, TypeVar

from proxy.schema import Duration, doc

__all__ = (
    "ADDRESS",
    "ANY",
    "CSV_COLUMNS",
    "CUSTOMER",
    "DOMAIN",
    "EVENT_KINDS",
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
    "blanket_refusal",
    "evaluate",
    "event_from_row",
    "event_from_stored",
    "event_to_row",
    "format_time",
    "iter_csv",
    "new_event",
    "normalize_sender",
    "normalize_topic",
    "open_consent_store",
    "parse_subject",
    "parse_time",
    "read_csv",
    "stored_values",
    "utcnow",
)

T = TypeVar("T")

# ---- vocabulary ------------------------------------------------------------------------------

ADDRESS, DOMAIN = "address", "domain"
ANY = "*"
OPTED_IN, CUSTOMER, OPTED_OUT, SUPPRESSED, UNSUPPRESSED = (
    "opted_in",
    "customer",
    "opted_out",
    "suppressed",
    "unsuppressed",
)
EVENT_KINDS: tuple[str, ...] = (OPTED_IN, CUSTOMER, OPTED_OUT, SUPPRESSED, UNSUPPRESSED)

#: How each kind of event can come about. A closed list, so that a typo is an error and the
#: evidence stays comparable across senders.
METHODS: Mapping[str, tuple[str, ...]] = {
    OPTED_IN: ("web_form", "double_opt_in", "paper", "api", "admin", "import"),
    CUSTOMER: ("sale", "api", "admin", "import"),
    OPTED_OUT: ("one_click", "link", "reply", "complaint", "preference_center", "admin", "api", "import"),
    SUPPRESSED: ("hard_bounce", "complaint", "manual", "api", "import"),
    UNSUPPRESSED: ("admin",),
}
DEFAULT_METHOD: Mapping[str, str] = {CUSTOMER: "sale", UNSUPPRESSED: "admin"}

#: An opt-in of this method never lifts an earlier opt-out (rule 2 in the module docstring).
NOT_EXPLICIT_METHODS = frozenset({"import"})

#: Mailbox providers whose domain is shared by unrelated people: a domain-level consent or
#: customer relation for them would cover millions of strangers, so it is refused.
PUBLIC_MAIL_DOMAINS = frozenset(
    {
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com", "yahoo.com",
        "ymail.com", "icloud.com", "me.com", "mac.com", "aol.com", "gmx.com", "gmx.net", "gmx.de", "web.de",
        "proton.me", "protonmail.com", "mail.com", "zoho.com", "yandex.com", "hotmail.nl", "live.nl",
        "outlook.nl", "ziggo.nl", "kpnmail.nl", "planet.nl", "home.nl", "hetnet.nl", "xs4all.nl", "telfort.nl",
        "quicknet.nl", "online.nl", "t-online.de", "orange.fr", "free.fr", "laposte.net", "libero.it",
        "skynet.be", "telenet.be",
    }
)  # fmt: skip

#: Clock skew tolerated between the machine recording an event and the store.
FUTURE_SKEW = timedelta(minutes=5)
MAX_TEXT = 2000

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[^\s@.\x00-\x1f\x7f]+(\.[^\s@.\x00-\x1f\x7f]+)+$")
_LOCAL_PART = re.compile(r"^[^\s@\x00-\x1f\x7f]{1,64}$")
_CONTROL = re.compile(r"\s*[\x00-\x1f\x7f]+\s*")


class ConsentInputError(ValueError):
    """An event or a query is malformed; the message says what to write instead."""


class ConsentStoreError(Exception):
    """The store cannot answer (unreachable, timed out, broken). Never means "no consent"."""


# ---- time --------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; ``Z`` or an offset; a time without offset is taken as UTC."""
    value = text.strip()
    if not value:
        raise ConsentInputError("a time is required (ISO 8601, e.g. 2024-05-01 or 2024-05-01T10:00:00Z)")
    try:
        if len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            parsed = datetime.fromisoformat(value.replace(" ", "T", 1))
    except ValueError:
        raise ConsentInputError(
            f"not a time: {text!r} (use ISO 8601, e.g. 2024-05-01 or 2024-05-01T10:00:00Z)"
        ) from None
    return as_utc(parsed)


def as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_time(moment: datetime | None) -> str | None:
    """UTC, microseconds, ``Z``: the shape shown to people and written to JSON and CSV."""
    if moment is None:
        return None
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


# ---- subjects, topics, senders -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """Who an event is about: one address, or everyone at a domain (a business relation)."""

    kind: str  # ADDRESS or DOMAIN
    value: str  # normalised: lower-case, no angle brackets, no trailing dot
    original: str

    @property
    def domain(self) -> str:
        return self.value if self.kind == DOMAIN else self.value.rsplit("@", 1)[1]

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        """The subjects whose events bear on this one: an address also inherits its domain's."""
        if self.kind == DOMAIN:
            return ((DOMAIN, self.value),)
        return ((ADDRESS, self.value), (DOMAIN, self.domain))

    def __str__(self) -> str:
        return self.value if self.kind == ADDRESS else f"@{self.value}"


def _normalize_domain(text: str, what: str) -> str:
    domain = text.strip().rstrip(".").lower()
    if not _DOMAIN.match(domain):
        raise ConsentInputError(f"{what} {text!r} is not a domain name (e.g. example.com)")
    return domain


def parse_subject(text: str) -> Subject:
    """``user@example.com`` for one address, ``@example.com`` for a whole domain."""
    original = text.strip()
    if original.startswith("<") and original.endswith(">"):
        original = original[1:-1].strip()
    if original.startswith("@"):
        return Subject(DOMAIN, _normalize_domain(original[1:], "domain"), original)
    if "@" not in original:
        raise ConsentInputError(f"{text!r} is not an address; write user@example.com, or @example.com for a domain")
    local, _, domain = original.rpartition("@")
    if not _LOCAL_PART.match(local):
        raise ConsentInputError(f"{text!r} is not an address: the part before @ is empty or has spaces")
    return Subject(ADDRESS, f"{local.lower()}@{_normalize_domain(domain, 'the domain of')}", original)


def normalize_topic(text: str | None) -> str:
    """A topic is a short token (``newsletter``, ``offers.shoes``) or ``*`` for every topic."""
    topic = (text or ANY).strip().lower() or ANY
    if topic != ANY and not _TOKEN.match(topic):
        raise ConsentInputError(
            f"topic {text!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64), or * for all topics"
        )
    return topic


def normalize_sender(text: str | None) -> str:
    """The sender holding the relation: its From domain (``shop.example``), or ``*`` for any sender."""
    sender = (text or ANY).strip().lower() or ANY
    if sender == ANY:
        return ANY
    if "@" in sender:
        raise ConsentInputError(
            f"sender {text!r} must be a domain (the From domain, e.g. shop.example), not an address"
        )
    return _normalize_domain(sender, "sender")


def normalize_category(text: str) -> str:
    category = text.strip().lower()
    if not _TOKEN.match(category):
        raise ConsentInputError(
            f"product category {text!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return category


def _clean_text(value: str | None) -> str | None:
    """Free text as one line: control characters (CR, LF in a multi-line SMTP reply) become spaces."""
    if value is None:
        return None
    cleaned = _CONTROL.sub(" ", value).strip()
    return cleaned[:MAX_TEXT] if cleaned else None


# ---- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    """One row of the log. ``id`` and ``recorded_at`` are set by the store when it is written.

    ``effective_at`` is when it happened in the world (the form was sent, the sale was made,
    the bounce came back); ``recorded_at`` is when the store learned it.
    """

    kind: str
    subject_kind: str
    subject: str
    effective_at: datetime
    method: str
    topic: str = ANY
    sender: str = ANY
    subject_original: str = ""
    source: str = ""  # where the proof lives: form URL, system, file, paper archive reference
    ip: str | None = None
    user_agent: str | None = None
    text_version: str | None = None  # version of the consent text agreed to
    confirmed_at: datetime | None = None  # double opt-in: when the confirmation link was followed
    relation: str | None = None  # customer: order or customer number
    product_category: str | None = None  # customer: what was bought
    objection_offered: bool | None = None  # customer: was the chance to object given at collection?
    reason: str | None = None  # suppression, opt-out: why
    upstream_reply: str | None = None  # suppression after a bounce: the reply that caused it
    note: str | None = None
    id: int | None = None
    recorded_at: datetime | None = None

    @property
    def level(self) -> int:
        """Specificity of the subject: an address (2) says more than its domain (1)."""
        return 2 if self.subject_kind == ADDRESS else 1

    @property
    def label(self) -> str:
        return self.subject if self.subject_kind == ADDRESS else f"@{self.subject}"

    @property
    def order(self) -> tuple[datetime, int]:
        return (self.effective_at, self.id or 0)

    def valid_at(self, at: datetime) -> bool:
        """A double opt-in counts only once confirmed (before ``at``)."""
        if self.kind == OPTED_IN and self.method == "double_opt_in":
            return self.confirmed_at is not None and self.confirmed_at <= at
        return True

    @property
    def explicit(self) -> bool:
        return self.kind == OPTED_IN and self.method not in NOT_EXPLICIT_METHODS

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "recorded_at": format_time(self.recorded_at)}
        out.update((name, value) for name, value in event_to_row(self).items() if value != "")
        if self.objection_offered is not None:
            out["objection_offered"] = self.objection_offered
        return out

    def evidence(self) -> dict[str, Any]:
        """What an audit line needs to find and judge this record."""
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "subject": self.label,
            "topic": self.topic,
            "sender": self.sender,
            "method": self.method,
            "effective_at": format_time(self.effective_at),
            "recorded_at": format_time(self.recorded_at),
        }
        for name in ("source", "text_version", "relation", "product_category", "reason"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.confirmed_at is not None:
            out["confirmed_at"] = format_time(self.confirmed_at)
        if self.objection_offered is not None:
            out["objection_offered"] = self.objection_offered
        return out


def new_event(
    kind: str,
    subject: str | Subject,
    *,
    at: datetime | str | None = None,
    method: str | None = None,
    topic: str | None = None,
    sender: str | None = None,
    source: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    text_version: str | None = None,
    confirmed_at: datetime | str | None = None,
    relation: str | None = None,
    product_category: str | None = None,
    objection_offered: bool | None = None,
    reason: str | None = None,
    upstream_reply: str | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> ConsentEvent:
    """Build a normalised, checked event; raise ``ConsentInputError`` naming every problem."""
    problems: list[str] = []

    def attempt(call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except ConsentInputError as exc:
            problems.append(str(exc))
            return None

    kind = (kind or "").strip().lower()
    if kind not in EVENT_KINDS:
        raise ConsentInputError(f"event must be one of {', '.join(EVENT_KINDS)}, not {kind!r}")
    parsed_subject = subject if isinstance(subject, Subject) else attempt(parse_subject, subject)
    moment = now or utcnow()
    effective = as_utc(at) if isinstance(at, datetime) else (attempt(parse_time, at) if at else moment)
    confirmed = (
        as_utc(confirmed_at)
        if isinstance(confirmed_at, datetime)
        else (attempt(parse_time, confirmed_at) if confirmed_at else None)
    )
    chosen_method = (method or DEFAULT_METHOD.get(kind, "")).strip().lower()
    event_topic = attempt(normalize_topic, topic)
    event_sender = attempt(normalize_sender, sender)
    category = attempt(normalize_category, product_category) if product_category else None
    if problems or parsed_subject is None or effective is None:
        raise ConsentInputError("; ".join(problems))
    event = ConsentEvent(
        kind=kind,
        subject_kind=parsed_subject.kind,
        subject=parsed_subject.value,
        subject_original=parsed_subject.original,
        effective_at=effective,
        method=chosen_method,
        topic=event_topic,
        sender=event_sender,
        source=_clean_text(source) or "",
        ip=(ip or "").strip() or None,
        user_agent=_clean_text(user_agent),
        text_version=_clean_text(text_version),
        confirmed_at=confirmed,
        relation=_clean_text(relation),
        product_category=category,
        objection_offered=objection_offered,
        reason=_clean_text(reason),
        upstream_reply=_clean_text(upstream_reply),
        note=_clean_text(note),
    )
    problems = event_problems(event, moment)
    if problems:
        raise ConsentInputError("; ".join(problems))
    return event


def event_problems(event: ConsentEvent, now: datetime) -> list[str]:
    """The rules every event must meet before it is written (empty list: fine)."""
    problems: list[str] = []
    kind = event.kind
    if kind not in EVENT_KINDS:
        return [f"event must be one of {', '.join(EVENT_KINDS)}, not {kind!r}"]
    if event.subject_kind not in (ADDRESS, DOMAIN) or not event.subject:
        problems.append("the subject must be an address or a domain")
    if event.method not in METHODS[kind]:
        given = f"{event.method!r}" if event.method else "missing"
        problems.append(f"method for {kind} must be one of {', '.join(METHODS[kind])} ({given})")
    for name, shown in (("effective_at", "at"), ("confirmed_at", "confirmed_at")):
        moment = getattr(event, name)
        if moment is not None and moment.tzinfo is None:
            problems.append(f"{shown} must carry a time zone")
        elif moment is not None and moment > now + FUTURE_SKEW:
            problems.append(f"{shown} {format_time(moment)} is in the future")
    if event.ip is not None:
        try:
            ipaddress.ip_address(event.ip)
        except ValueError:
            problems.append(f"ip {event.ip!r} is not an IP address")
    if event.confirmed_at is not None:
        if kind != OPTED_IN:
            problems.append("confirmed_at belongs to opted_in events (double opt-in) only")
        elif event.confirmed_at < event.effective_at:
            problems.append("confirmed_at is earlier than the opt-in itself")
    customer_fields = (event.relation, event.product_category, event.objection_offered)
    if kind == CUSTOMER:
        if event.sender == ANY:
            problems.append("a customer relation belongs to one sender: give the sender's domain (soft opt-in)")
        if event.topic != ANY:
            problems.append("a customer relation has no topic; the policy maps topics to product categories")
        if not event.product_category:
            problems.append("a customer relation needs the product category that was bought")
        if event.objection_offered is None:
            problems.append("a customer relation must say whether the chance to object was offered (yes or no)")
    elif any(value is not None for value in customer_fields):
        problems.append("relation, product_category and objection_offered belong to customer events only")
    if kind in (SUPPRESSED, UNSUPPRESSED):
        if event.topic != ANY or event.sender != ANY:
            problems.append(f"{kind} applies to every topic and sender; leave topic and sender as *")
        if not event.reason:
            problems.append(f"{kind} needs a reason")
    if event.upstream_reply is not None and kind != SUPPRESSED:
        problems.append("upstream_reply belongs to suppressed events only")
    if event.subject_kind == DOMAIN and kind in (OPTED_IN, CUSTOMER) and event.subject in PUBLIC_MAIL_DOMAINS:
        problems.append(
            f"@{event.subject} is a public mailbox provider: a domain-level {kind} would cover strangers; "
            "record the addresses one by one"
        )
    return problems


#: The table's columns besides ``id``, in the order the backends read and write them.
STORED_COLUMNS: tuple[str, ...] = (
    "subject_kind",
    "subject",
    "subject_original",
    "topic",
    "sender",
    "kind",
    "effective_at",
    "recorded_at",
    "method",
    "source",
    "ip",
    "user_agent",
    "text_version",
    "confirmed_at",
    "relation",
    "product_category",
    "objection_offered",
    "reason",
    "upstream_reply",
    "note",
)


def stored_values(event: ConsentEvent, recorded_at: datetime) -> tuple[Any, ...]:
    """The row for ``event`` in STORED_COLUMNS order (datetimes and bools as Python objects)."""
    return (
        event.subject_kind,
        event.subject,
        event.subject_original or event.label,
        event.topic,
        event.sender,
        event.kind,
        event.effective_at,
        event.recorded_at or recorded_at,
        event.method,
        event.source,
        event.ip,
        event.user_agent,
        event.text_version,
        event.confirmed_at,
        event.relation,
        event.product_category,
        event.objection_offered,
        event.reason,
        event.upstream_reply,
        event.note,
    )


def event_from_stored(record_id: int, values: Sequence[Any]) -> ConsentEvent:
    """The inverse of ``stored_values``: a row read back (datetimes already converted)."""
    data = dict(zip(STORED_COLUMNS, values, strict=True))
    if data["objection_offered"] is not None:
        data["objection_offered"] = bool(data["objection_offered"])
    return ConsentEvent(id=int(record_id), **data)


# ---- CSV ---------------------------------------------------------------------------------------

#: Columns of ``sendguard consent import`` and ``export``. Only ``address`` and ``event`` are
#: required; see bench/README-consent.md and ``sendguard consent import --help``.
CSV_COLUMNS: tuple[str, ...] = (
    "address",
    "event",
    "at",
    "topic",
    "sender",
    "method",
    "source",
    "ip",
    "user_agent",
    "text_version",
    "confirmed_at",
    "relation",
    "product_category",
    "objection_offered",
    "reason",
    "upstream_reply",
    "note",
)
#: Written by export, accepted (and ignored, or honoured on request) by import.
CSV_EXPORT_ONLY: tuple[str, ...] = ("id", "recorded_at")

_YES = {"yes", "y", "true", "1", "ja", "j"}
_NO = {"no", "n", "false", "0", "nee"}


def event_to_row(event: ConsentEvent) -> dict[str, str]:
    flag = event.objection_offered
    return {
        "address": event.subject_original or event.label,
        "event": event.kind,
        "at": format_time(event.effective_at) or "",
        "topic": event.topic,
        "sender": event.sender,
        "method": event.method,
        "source": event.source,
        "ip": event.ip or "",
        "user_agent": event.user_agent or "",
        "text_version": event.text_version or "",
        "confirmed_at": format_time(event.confirmed_at) or "",
        "relation": event.relation or "",
        "product_category": event.product_category or "",
        "objection_offered": "" if flag is None else ("yes" if flag else "no"),
        "reason": event.reason or "",
        "upstream_reply": event.upstream_reply or "",
        "note": event.note or "",
    }


def event_from_row(row: Mapping[str, str | None], *, now: datetime | None = None) -> ConsentEvent:
    """One CSV row (column name -> text) to a checked event."""

    def get(name: str) -> str | None:
        value = row.get(name)
        return value.strip() if value and value.strip() else None

    flag_text = (get("objection_offered") or "").lower()
    objection: bool | None = None
    if flag_text in _YES:
        objection = True
    elif flag_text in _NO:
        objection = False
    elif flag_text:
        raise ConsentInputError(f"objection_offered must be yes or no, not {flag_text!r}")
    if not get("address"):
        raise ConsentInputError("address is empty")
    return new_event(
        get("event") or "",
        get("address") or "",
        at=get("at"),
        method=get("method"),
        topic=get("topic"),
        sender=get("sender"),
        source=get("source"),
        ip=get("ip"),
        user_agent=get("user_agent"),
        text_version=get("text_version"),
        confirmed_at=get("confirmed_at"),
        relation=get("relation"),
        product_category=get("product_category"),
        objection_offered=objection,
        reason=get("reason"),
        upstream_reply=get("upstream_reply"),
        note=get("note"),
        now=now,
    )


@dataclass(frozen=True, slots=True)
class CsvProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def iter_csv(
    stream: TextIO, *, keep_recorded_at: bool = False, now: datetime | None = None
) -> Iterator[ConsentEvent | CsvProblem]:
    """Parse a CSV file row by row: each row gives an event or a problem with its line number."""
    reader = csv.DictReader(stream)
    header = [name.strip().lower() for name in (reader.fieldnames or [])]
    if not header:
        yield CsvProblem(1, "the file is empty; the first line must name the columns")
        return
    reader.fieldnames = header
    known = set(CSV_COLUMNS) | set(CSV_EXPORT_ONLY)
    unknown = [name for name in header if name not in known]
    missing = [name for name in ("address", "event") if name not in header]
    if unknown:
        yield CsvProblem(1, f"unknown column(s): {', '.join(unknown)}; known: {', '.join(CSV_COLUMNS)}")
    if missing:
        yield CsvProblem(1, f"required column(s) missing: {', '.join(missing)}")
    if unknown or missing:
        return
    moment = now or utcnow()
    for row in reader:
        line = reader.line_num
        if None in row:  # DictReader files surplus fields under the key None
            yield CsvProblem(line, f"more fields than the {len(header)} columns of the header")
            continue
        if not any((value or "").strip() for value in row.values()):
            continue  # blank line
        try:
            event = event_from_row(row, now=moment)
            if keep_recorded_at and (row.get("recorded_at") or "").strip():
                recorded = parse_time(row["recorded_at"] or "")
                if recorded < event.effective_at:
                    raise ConsentInputError("recorded_at is earlier than at")
                event = dataclasses.replace(event, recorded_at=recorded)
        except ConsentInputError as exc:
            yield CsvProblem(line, str(exc))
            continue
        yield event


def read_csv(
    stream: TextIO, *, keep_recorded_at: bool = False, now: datetime | None = None
) -> tuple[list[ConsentEvent], list[CsvProblem]]:
    """Parse a whole CSV file; return the events and *every* problem with its line number."""
    events: list[ConsentEvent] = []
    problems: list[CsvProblem] = []
    for item in iter_csv(stream, keep_recorded_at=keep_recorded_at, now=now):
        if isinstance(item, CsvProblem):
            problems.append(item)
        else:
            events.append(item)
    return events, problems


# ---- the decision --------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftOptInRules:
    """The soft opt-in scope (Tw 11.7 lid 3): which product categories each topic may advertise."""

    enabled: bool = False
    max_age: timedelta | None = None
    #: topic -> product categories of earlier sales it may advertise; ``*`` for any topic.
    topics: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def categories_for(self, topic: str) -> frozenset[str]:
        if topic in self.topics:
            return self.topics[topic]
        return self.topics.get(ANY, frozenset())


NO_SOFT_OPT_IN = SoftOptInRules()

BasisKind = Literal["opt_in", "soft_opt_in", "suppressed", "opted_out", "none"]


@dataclass(frozen=True, slots=True)
class Basis:
    """The answer for one recipient, topic and sender at one moment, with the record it rests on."""

    allowed: bool
    kind: BasisKind
    explanation: str  # one line, fit for an SMTP reply after the recipient's address
    address: str
    topic: str
    sender: str
    at: datetime
    record: ConsentEvent | None = None
    #: A record that came close but does not count (e.g. a customer relation out of scope).
    near_miss: ConsentEvent | None = None

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "basis": self.kind,
            "allowed": self.allowed,
            "recipient": self.address,
            "topic": self.topic,
            "sender": self.sender,
            "at": format_time(self.at),
        }
        if self.record is not None:
            out["record"] = self.record.evidence()
        elif self.near_miss is not None:
            out["near_miss"] = self.near_miss.evidence()
        return out

    def as_dict(self) -> dict[str, Any]:
        out = self.evidence()
        out["explanation"] = self.explanation
        return out


def _day(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%d")


def _record_ref(event: ConsentEvent) -> str:
    return f"record #{event.id}" if event.id is not None else "unsaved record"


def _covers(event: ConsentEvent, topic: str, sender: str, *, objection: bool) -> bool:
    """Whether an event speaks about mail of this topic from this sender.

    Consent must name the topic (or ``*``); an unknown topic (``*``) needs consent for every
    topic. An objection covers what it names and, when the topic or sender is unknown,
    everything: an unlabelled message might be exactly what the person refused.
    """
    if objection:
        topic_ok = event.topic in (ANY, topic) or topic == ANY
        sender_ok = event.sender in (ANY, sender) or sender == ANY
    else:
        topic_ok = event.topic in (ANY, topic)
        sender_ok = event.sender in (ANY, sender)
    return topic_ok and sender_ok


def _suppression(events: Sequence[ConsentEvent]) -> ConsentEvent | None:
    """The suppression in force for the address or its domain, if any (the address's first)."""
    latest: dict[tuple[str, str], ConsentEvent] = {}
    for event in events:  # in order, so the last one per subject wins
        if event.kind in (SUPPRESSED, UNSUPPRESSED):
            latest[(event.subject_kind, event.subject)] = event
    active = [e for e in latest.values() if e.kind == SUPPRESSED]
    active.sort(key=lambda e: (-e.level, e.order))
    return active[0] if active else None


def _suppressed_basis(record: ConsentEvent, address: str, topic: str, sender: str, at: datetime) -> Basis:
    why = record.method + (f": {record.reason}" if record.reason else "")
    scope = "address" if record.subject_kind == ADDRESS else f"domain @{record.subject}"
    return Basis(
        False,
        "suppressed",
        f"{scope} suppressed since {_day(record.effective_at)} ({why[:120]}; {_record_ref(record)})",
        address,
        topic,
        sender,
        at,
        record,
    )


def _opted_out_basis(record: ConsentEvent, address: str, topic: str, sender: str, at: datetime) -> Basis:
    who = "the recipient" if record.subject_kind == ADDRESS else f"the domain @{record.subject}"
    return Basis(
        False,
        "opted_out",
        f"{who} opted out on {_day(record.effective_at)} (topic {record.topic}, sender {record.sender}, "
        f"{record.method}; {_record_ref(record)})",
        address,
        topic,
        sender,
        at,
        record,
    )


def _visible(events: Sequence[ConsentEvent], at: datetime | None) -> list[ConsentEvent]:
    """The events in effective order; with ``at``, only those recorded by then. Without it,
    everything recorded so far counts, even a row stamped a moment ahead by another
    instance's clock (an opt-out must never wait for clocks to agree)."""
    if at is None:
        return sorted(events, key=lambda e: e.order)
    bound = as_utc(at)
    return sorted((e for e in events if e.recorded_at is None or e.recorded_at <= bound), key=lambda e: e.order)


def _lifted(opt_out: ConsentEvent, opt_ins: Sequence[ConsentEvent], at: datetime) -> bool:
    return any(i.order > opt_out.order and i.level >= opt_out.level and i.explicit and i.valid_at(at) for i in opt_ins)


def evaluate(
    events: Sequence[ConsentEvent],
    address: str,
    topic: str = ANY,
    sender: str = ANY,
    *,
    at: datetime | None = None,
    rules: SoftOptInRules = NO_SOFT_OPT_IN,
) -> Basis:
    """Apply the rules of the module docstring to the events of an address and its domain."""
    moment = as_utc(at) if at is not None else utcnow()
    visible = _visible(events, at)
    suppression = _suppression(visible)
    if suppression is not None:
        return _suppressed_basis(suppression, address, topic, sender, moment)

    opt_outs = [e for e in visible if e.kind == OPTED_OUT and _covers(e, topic, sender, objection=True)]
    opt_ins = [e for e in visible if e.kind == OPTED_IN and _covers(e, topic, sender, objection=False)]
    standing = [o for o in opt_outs if not _lifted(o, opt_ins, moment)]
    if standing:
        # Report the most specific objection (the address's own), the latest of them.
        objection = max(standing, key=lambda e: (e.level, e.order))
        return _opted_out_basis(objection, address, topic, sender, moment)

    last_objection = max((o.order for o in opt_outs), default=None)
    later = [i for i in opt_ins if last_objection is None or i.order > last_objection]
    valid = [i for i in later if i.valid_at(moment)]
    if valid:
        # The most specific record is the most convincing evidence: address before domain,
        # named topic and sender before wildcards, then the most recent.
        best = max(valid, key=lambda e: (e.level, e.topic != ANY, e.sender != ANY, e.order))
        how = best.method + (f", confirmed {_day(best.confirmed_at)}" if best.confirmed_at else "")
        scope = "" if best.subject_kind == ADDRESS else f" for the domain @{best.subject}"
        return Basis(
            True,
            "opt_in",
            f"opt-in{scope} on {_day(best.effective_at)} ({how}; topic {best.topic}, sender {best.sender}; "
            f"{_record_ref(best)})",
            address,
            topic,
            sender,
            moment,
            best,
        )

    soft = _soft_opt_in(visible, last_objection, address, topic, sender, moment, rules)
    if soft.allowed:
        return soft
    pending = next((i for i in reversed(later) if not i.valid_at(moment)), None)
    if pending is not None:
        return Basis(
            False,
            "none",
            f"double opt-in requested on {_day(pending.effective_at)} but not confirmed ({_record_ref(pending)}) "
            f"for commercial mail (topic {topic}, sender {sender})",
            address,
            topic,
            sender,
            moment,
            near_miss=pending,
        )
    return soft


def _soft_opt_in(
    visible: Sequence[ConsentEvent],
    last_objection: tuple[datetime, int] | None,
    address: str,
    topic: str,
    sender: str,
    at: datetime,
    rules: SoftOptInRules,
) -> Basis:
    missing = f"no recorded consent for commercial mail (topic {topic}, sender {sender})"
    customers = [e for e in visible if e.kind == CUSTOMER and (last_objection is None or e.order > last_objection)]
    if not customers:
        return Basis(False, "none", missing, address, topic, sender, at)
    own = [c for c in customers if sender != ANY and c.sender == sender]
    if not own:
        other = customers[-1]
        return Basis(
            False,
            "none",
            f"{missing}; the customer relation ({_record_ref(other)}) is with {other.sender}, and soft opt-in "
            "covers the same sender only",
            address,
            topic,
            sender,
            at,
            near_miss=other,
        )
    if not rules.enabled:
        return Basis(
            False,
            "none",
            f"{missing}; a customer relation exists ({_record_ref(own[-1])}) but soft opt-in is not enabled",
            address,
            topic,
            sender,
            at,
            near_miss=own[-1],
        )
    categories = rules.categories_for(topic)
    failures: list[tuple[int, str, ConsentEvent]] = []
    for customer in reversed(own):  # the most recent sale first
        if not customer.objection_offered:
            failures.append((3, "the chance to object was not offered when the address was collected", customer))
            continue
        if customer.product_category not in categories:
            allowed = ", ".join(sorted(categories)) or "none"
            failures.append((2, f"topic {topic} may advertise {allowed}, not {customer.product_category}", customer))
            continue
        if rules.max_age is not None and at - customer.effective_at > rules.max_age:
            failures.append(
                (1, f"the sale of {_day(customer.effective_at)} is older than {rules.max_age.days} days", customer)
            )
            continue
        return Basis(
            True,
            "soft_opt_in",
            f"existing customer of {sender} (sale {_day(customer.effective_at)}, category "
            f"{customer.product_category}, objection offered; {_record_ref(customer)})",
            address,
            topic,
            sender,
            at,
            customer,
        )
    failures.sort(key=lambda f: f[0])  # report the cause closest to passing
    _, why, customer = failures[0]
    return Basis(
        False,
        "none",
        f"{missing}; soft opt-in does not apply ({_record_ref(customer)}): {why}",
        address,
        topic,
        sender,
        at,
        near_miss=customer,
    )


def blanket_refusal(events: Sequence[ConsentEvent], address: str, *, at: datetime | None = None) -> Basis | None:
    """A refusal that holds whatever the topic and sender turn out to be, else None.

    Used at RCPT time when the topic is only known after DATA: a suppressed address, or one
    that opted out of every topic from every sender without any later explicit opt-in, can be
    refused at once, recipient by recipient.
    """
    moment = as_utc(at) if at is not None else utcnow()
    visible = _visible(events, at)
    suppression = _suppression(visible)
    if suppression is not None:
        return _suppressed_basis(suppression, address, ANY, ANY, moment)
    opt_ins = [e for e in visible if e.kind == OPTED_IN]
    for opt_out in reversed(visible):
        everything = opt_out.kind == OPTED_OUT and opt_out.topic == ANY and opt_out.sender == ANY
        if everything and not _lifted(opt_out, opt_ins, moment):
            return _opted_out_basis(opt_out, address, ANY, ANY, moment)
    return None


# ---- the store interface -------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("backend postgres needs a dsn (postgresql://user:password@host/database)")
        if not 0 <= self.pool_min <= self.pool_max or self.pool_max < 1:
            raise ValueError("pool sizes need 0 <= pool_min <= pool_max and pool_max >= 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.backend == "sqlite" and not self.path:
            raise ValueError("backend sqlite needs a path")


class ConsentStore(abc.ABC):
    """Append-only consent events with a lookup per recipient. Every method may raise
    ``ConsentStoreError`` (store down, timeout) or ``ConsentInputError`` (bad input)."""

    backend: ClassVar[str] = ""

    def __init__(self, timeout: float, where: str) -> None:
        self.timeout = float(timeout)
        self.where = where  # for messages: a path, or host:port/database (never a password)

    # -- public API

    async def add(self, *events: ConsentEvent) -> list[ConsentEvent]:
        """Record events (one transaction); return them with their ids and recording time."""
        now = utcnow()
        self._check(events, now)
        # Nothing takes effect after it is recorded: an opt-in stamped a few minutes ahead (a
        # skewed clock) must not outrank an opt-out recorded after it.
        events = tuple(dataclasses.replace(e, effective_at=min(e.effective_at, now)) for e in events)
        return await self._bounded(self._insert(events, now))

    async def import_events(self, events: Iterable[ConsentEvent], *, keep_recorded_at: bool = False) -> int:
        """Record many events in one transaction: all of them, or none when anything fails.

        The events are consumed as they are written (a million need not sit in memory); one
        that breaks the rules aborts the transaction with ``ConsentInputError``. Not bounded by
        ``timeout``: a large import takes longer than a lookup.
        """
        now = utcnow()

        def checked() -> Iterator[ConsentEvent]:
            for number, event in enumerate(events, 1):
                problems = event_problems(event, now)
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
            return await self._insert_bulk(checked(), now)
        except (ConsentStoreError, ConsentInputError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._wrap(exc) from exc

    async def history(self, subject: str | Subject, *, at: datetime | None = None) -> list[ConsentEvent]:
        """Every event of a subject, oldest first; for an address, its domain's events too."""
        parsed = subject if isinstance(subject, Subject) else parse_subject(subject)
        bound = as_utc(at) if at is not None else None
        return await self._bounded(self._select(parsed.keys, bound))

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

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- for backends

    @abc.abstractmethod
    async def _insert(self, events: Sequence[ConsentEvent], now: datetime) -> list[ConsentEvent]: ...

    @abc.abstractmethod
    async def _insert_bulk(self, events: Iterable[ConsentEvent], now: datetime) -> int:
        """Write every event of the iterable in one transaction; return how many."""

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
            return await asyncio.wait_for(call, self.timeout)
        except (ConsentStoreError, ConsentInputError, asyncio.CancelledError):
            raise
        except TimeoutError as exc:
            raise ConsentStoreError(
                f"consent store ({self.backend} {self.where}) did not answer within {self.timeout:g}s"
            ) from exc
        except Exception as exc:
            raise self._wrap(exc) from exc


async def open_consent_store(config: ConsentStoreConfig, *, connect: bool = True) -> ConsentStore:
    """Open the configured store and bring its schema up to date.

    ``connect=False`` (for ``serve``) lets PostgreSQL be down at start: the store then connects
    and migrates on first use, and each lookup fails (451 for commercial mail) until it can,
    while transactional mail keeps flowing. The backend modules are imported here, lazily.
    """
    if config.backend == "postgres":
        from proxy.stores.consent_postgres import PostgresConsentStore

        assert config.dsn is not None
        return await PostgresConsentStore.open(
            config.dsn,
            lookup_timeout=config.timeout,
            pool_min=config.pool_min,
            pool_max=config.pool_max,
            connect=connect,
        )
    from proxy.stores.consent_sqlite import SQLiteConsentStore

    return await SQLiteConsentStore.open(config.path, lookup_timeout=config.timeout)
