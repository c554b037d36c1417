"""Consent events: the vocabulary, one event of the log, and the checks every event must pass.

Legal frame (Dutch Telecommunicatiewet art. 11.7, ePrivacy Directive 2002/58 art. 13, AVG/GDPR art. 7):
commercial e-mail needs prior consent that the sender can prove, or the "soft opt-in" for
existing customers, and an objection always wins. The store therefore keeps *events*, never
states: every opt-in, customer relation, opt-out, suppression and lifted suppression is a new
row with its evidence, nothing is changed or deleted, and the basis on any past date can be
shown again (``ConsentStore.basis(..., at=...)``).

Subjects are an address (``bob@example.org``, compared lower-case, the original spelling kept)
or a whole domain for business relations (``@bigcorp.example``). Events carry a topic (``*`` =
every topic) and the sender that holds the relation (the From domain; ``*`` = any sender).

Here too are the two flat shapes of an event: the stored row the backends write and read
(``STORED_COLUMNS``) and the text fields of a CSV row and of JSON (``event_to_row``). The rules
that read the events are in ``consent_basis``, CSV files in ``consent_csv``, the store in
``consent_store``; ``proxy.stores.consent`` gathers them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy.addresses import address_key, domain_key, domain_spellings

__all__ = (
    "ADDRESS",
    "ANY",
    "CUSTOMER",
    "DOMAIN",
    "ERASED_FIELDS",
    "ERASED_ORIGINAL",
    "ERASED_PREFIX",
    "EVENT_KINDS",
    "FUTURE_SKEW",
    "METHODS",
    "OPTED_IN",
    "OPTED_OUT",
    "STORED_COLUMNS",
    "SUPPRESSED",
    "UNSUPPRESSED",
    "ConsentEvent",
    "ConsentInputError",
    "Subject",
    "as_utc",
    "event_from_stored",
    "event_problems",
    "erasure_subject",
    "event_to_row",
    "format_time",
    "new_event",
    "normalize_category",
    "normalize_sender",
    "normalize_topic",
    "parse_subject",
    "parse_time",
    "stored_values",
    "utcnow",
)

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
    SUPPRESSED: ("hard_bounce", "complaint", "manual", "api", "import", "erasure"),
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


# ---- time --------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; ``Z`` or an offset; a time without offset is taken as UTC."""
    return _parse_time(text)


# Cached: an import repeats the same times (a form's batch, a tool's day-stamped rows) a lot,
# and datetimes are immutable. Errors are not cached; they are rare.
@functools.lru_cache(maxsize=65536)
def _parse_time(text: str) -> datetime:
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
    #: ``proxy.addresses.address_key`` / ``domain_key``: the one key the proxy, ``sendguard
    #: check`` and the counter use (lower case, needless quotes dropped, no trailing dot, IDN
    #: as A-labels).
    value: str
    original: str

    @property
    def domain(self) -> str:
        return self.value if self.kind == DOMAIN else self.value.rsplit("@", 1)[1]

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        """The subjects whose events bear on this one: an address also inherits its domain's.

        An internationalised domain is also looked up in its Unicode spelling, the key records
        written before keys were A-labels have (lower case, as typed): an opt-out recorded then
        must still win."""
        spellings = domain_spellings(self.domain)
        domains = tuple((DOMAIN, spelling) for spelling in spellings)
        if self.kind == DOMAIN:
            return domains
        local = self.value.rsplit("@", 1)[0]
        return tuple((ADDRESS, f"{local}@{spelling}") for spelling in spellings) + domains

    def __str__(self) -> str:
        return self.value if self.kind == ADDRESS else f"@{self.value}"


@functools.lru_cache(maxsize=65536)  # an import has far fewer domains than addresses
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
        _normalize_domain(original[1:], "domain")  # a domain name at all (raises with the reason)
        return Subject(DOMAIN, domain_key(original[1:]), original)
    if "@" not in original:
        raise ConsentInputError(f"{text!r} is not an address; write user@example.com, or @example.com for a domain")
    local, _, domain = original.rpartition("@")
    if not _LOCAL_PART.match(local):
        raise ConsentInputError(f"{text!r} is not an address: the part before @ is empty or has spaces")
    _normalize_domain(domain, "the domain of")  # a domain name at all (raises with the reason)
    # One key with the proxy's RCPT and sendguard check: "Bob2"@Example.NET. is bob2@example.net.
    return Subject(ADDRESS, address_key(original), original)


@functools.lru_cache(maxsize=4096)
def normalize_topic(text: str | None) -> str:
    """A topic is a short token (``newsletter``, ``offers.shoes``) or ``*`` for every topic."""
    topic = (text or ANY).strip().lower() or ANY
    if topic != ANY and not _TOKEN.match(topic):
        raise ConsentInputError(
            f"topic {text!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64), or * for all topics"
        )
    return topic


@functools.lru_cache(maxsize=4096)
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
    # isprintable() is False for every control character: the common case skips the regex.
    cleaned = value.strip() if value.isprintable() else _CONTROL.sub(" ", value).strip()
    return cleaned[:MAX_TEXT] if cleaned else None


# ---- erasure ---------------------------------------------------------------------------------

#: An erased row's subject: this prefix and the keyed hash of the normalised address. The hash
#: lets the store still find, and refuse, the address it was given; without the key it says
#: nothing about who it was (a plain hash of an address is reversed by trying addresses).
ERASED_PREFIX = "erased:"
ERASED_ORIGINAL = "erased"
#: The personal fields an erasure empties (migration v3's tombstone rule); what is left (kind,
#: topic, sender, method, times) says what happened, not to whom.
ERASED_FIELDS = ("source", "ip", "user_agent", "relation", "reason", "upstream_reply", "note")


def erasure_subject(key: bytes, address: str) -> str:
    """``erased:`` and HMAC-SHA256(key, normalised address) in hex (71 characters)."""
    return ERASED_PREFIX + hmac.new(key, address.encode("utf-8"), hashlib.sha256).hexdigest()


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
    erased_at: datetime | None = None  # set by ConsentStore.erase: the row is a tombstone since then

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
        if self.erased_at is not None:
            out["erased_at"] = format_time(self.erased_at)
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
    if event.ip is not None and not _is_ip(event.ip):
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


@functools.lru_cache(maxsize=65536)  # a form's imports share a few server or proxy addresses
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    "erased_at",
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
        event.erased_at,
    )


def event_from_stored(record_id: int, values: Sequence[Any]) -> ConsentEvent:
    """The inverse of ``stored_values``: a row read back (datetimes already converted)."""
    data = dict(zip(STORED_COLUMNS, values, strict=True))
    if data["objection_offered"] is not None:
        data["objection_offered"] = bool(data["objection_offered"])
    return ConsentEvent(id=int(record_id), **data)


def event_to_row(event: ConsentEvent) -> dict[str, str]:
    """The event as text fields, in ``consent_csv.CSV_COLUMNS`` order: a CSV row, and ``as_dict``'s base."""
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
