"""The lawful basis: the rules that read a recipient's consent events and decide.

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

Pure functions over a list of events: the store (``consent_store``) fetches them, these rules
judge them, and the policy at RCPT time asks ``blanket_refusal`` before the topic is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from proxy.stores.consent_events import (
    ADDRESS,
    ANY,
    CUSTOMER,
    OPTED_IN,
    OPTED_OUT,
    SUPPRESSED,
    UNSUPPRESSED,
    ConsentEvent,
    as_utc,
    format_time,
    utcnow,
)

__all__ = (
    "NO_SOFT_OPT_IN",
    "Basis",
    "BasisKind",
    "SoftOptInRules",
    "active_suppression",
    "blanket_refusal",
    "evaluate",
)


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
    instance's clock (an opt-out must never wait for clocks to agree).

    An erased opt-in or customer relation is no basis any more: its evidence is gone, so it
    can no longer be proven (AVG art. 7(1)); erased objections and suppressions still count."""
    events = [e for e in events if e.erased_at is None or e.kind not in (OPTED_IN, CUSTOMER)]
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


def active_suppression(events: Sequence[ConsentEvent], *, at: datetime | None = None) -> ConsentEvent | None:
    """The suppression in force for an address (or its domain) at ``at``, else None."""
    return _suppression(_visible(events, at))


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
