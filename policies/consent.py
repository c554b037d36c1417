"""consent: commercial mail goes only to recipients with a lawful basis the sender can prove.

Telecommunicatiewet art. 11.7 / ePrivacy Directive art. 13: prior opt-in consent, or the soft
opt-in for existing customers of the *same* sender about *similar* products, provided the chance
to object was offered when the address was collected; objections and suppressions always win.
The rules themselves live with the store (proxy/stores/consent_basis.py, ``evaluate``); this policy
decides *when* to ask and what to answer.

* **Topic.** The message's topic comes from ``topic_header`` (default ``X-Sendguard-Topic``;
  the proxy strips it before relaying), else ``default_topic``. ``*`` means "unknown": it needs
  consent for every topic and is stopped by an opt-out of any topic.
* **Sender.** The sender that holds the relation is the From domain. At RCPT time, before the
  headers exist, the envelope sender's domain stands in for it; after DATA, if the From domain
  turns out different, every recipient accepted at RCPT time is judged again for the From domain
  (``check_message``), so the envelope cannot borrow another brand's customers.
* **When.** With ``topic_header: null`` everything is known from the envelope, so each
  recipient is decided at RCPT time and refused on its own (``550 5.7.1`` for that RCPT; the
  others go through). With a topic header the topic is only known after DATA: at RCPT time the
  policy refuses only what no topic can save (a suppressed address, or an opt-out of every topic
  from every sender) and otherwise returns None, so the pipeline asks again after DATA; there the
  refusals are merged into one ``550 5.7.1`` naming the recipients, and the message is refused.
* **Store down.** A lookup that fails raises ``PolicyError``: ``on_error: tempfail`` (the
  default) answers ``451 4.3.0``; never a silent pass.

Every verdict, accept and reject, carries ``evidence`` naming the record it relied on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from policies.base import Policy, PolicyError, Transaction, Verdict
from policies.message import ParsedMessage
from proxy.schema import Duration, doc
from proxy.stores.consent import (
    ANY,
    Basis,
    ConsentInputError,
    ConsentStore,
    ConsentStoreError,
    SoftOptInRules,
    blanket_refusal,
    normalize_category,
    normalize_sender,
    normalize_topic,
    parse_subject,
)

__all__ = ("ConsentPolicy", "SoftOptInOptions")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with the code and CRLF; the
#: pipeline may still append the list of recipients.
_MAX_TEXT = 400

_ADVICE = {
    "none": "record the recipient's consent first, with its evidence (sendguard consent add or import)",
    "opted_out": "remove the address from this mailing",
    "suppressed": "remove the address from your list",
}


@dataclass(frozen=True)
class SoftOptInOptions:
    enabled: bool = doc("let existing customers receive mail about similar products (Tw 11.7 lid 3)", default=False)
    max_age: Duration | None = doc("a sale older than this no longer counts (e.g. 730d); null: no limit", default=None)
    topics: dict[str, tuple[str, ...]] = doc(
        "topic -> product categories of earlier sales that topic may advertise, e.g. {newsletter: [shoes, bags]};"
        " the key * covers every topic",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        topics: dict[str, tuple[str, ...]] = {}
        for topic, categories in self.topics.items():
            topics[normalize_topic(topic)] = tuple(normalize_category(c) for c in categories)
        object.__setattr__(self, "topics", topics)
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("soft_opt_in.max_age must be positive")
        if self.enabled and not any(topics.values()):
            raise ValueError(
                "soft_opt_in is enabled but no topic lists the product categories it may advertise; "
                "add e.g. topics: {newsletter: [shoes, bags]}"
            )

    def rules(self) -> SoftOptInRules:
        return SoftOptInRules(
            enabled=self.enabled,
            max_age=timedelta(seconds=float(self.max_age)) if self.max_age is not None else None,
            topics={topic: frozenset(categories) for topic, categories in self.topics.items()},
        )


class ConsentPolicy(Policy):
    name = "consent"
    description = "commercial mail only to recipients with recorded consent or soft opt-in (Tw 11.7, ePrivacy 13)"
    default_classes = ("commercial",)
    needs = ("consent",)
    fails_closed = True  # commercial mail without a provable basis is what the law forbids

    @dataclass(frozen=True)
    class Options:
        topic_header: str | None = doc(
            "header naming the message's topic (removed before relaying); null: every message has default_topic",
            default="X-Sendguard-Topic",
        )
        default_topic: str = doc("topic of a message that names none; * needs consent for all topics", default="*")
        soft_opt_in: SoftOptInOptions = doc("the soft opt-in for existing customers", default_factory=SoftOptInOptions)

        def __post_init__(self) -> None:
            object.__setattr__(self, "default_topic", normalize_topic(self.default_topic))
            if self.topic_header is not None and not re.fullmatch(r"[!-9;-~]+", self.topic_header):
                raise ValueError(f"topic_header {self.topic_header!r} is not a header field name")

    @classmethod
    def instruction_headers(cls, options: Any) -> tuple[str, ...]:
        return (options.topic_header,) if options.topic_header else ()

    def __init__(self, options: Any, resources: Mapping[str, Any] | None = None) -> None:
        super().__init__(options, resources)
        self._rules = self.options.soft_opt_in.rules()
        self._state_key = f"{self.name}:{id(self):x}"

    # ---- checks ------------------------------------------------------------------------------

    async def check_rcpt(self, txn: Transaction, recipient: str) -> Verdict | None:
        options: ConsentPolicy.Options = self.options
        if txn.message is None:
            if options.topic_header is not None:
                return await self._blanket_check(recipient)
            sender = _domain_of(txn.mail_from)
            basis = await self._basis(recipient, options.default_topic, sender)
            if basis is None:
                return _not_an_address(recipient, after_data=False)
            if basis.allowed:
                accepted = txn.state.setdefault(self._state_key, {"sender": sender, "accepted": []})
                accepted["accepted"].append(recipient)
            return _verdict(basis, recipient, after_data=False)

        topic = self._topic(txn.message)
        if isinstance(topic, Verdict):
            return topic
        basis = await self._basis(recipient, topic, message_sender(txn))
        if basis is None:
            return _not_an_address(recipient, after_data=True)
        return _verdict(basis, recipient, after_data=True)

    async def check_message(self, txn: Transaction) -> Verdict | None:
        """Recipients accepted at RCPT time for the envelope's domain, judged again when the
        From domain differs: the relation belongs to the brand in From."""
        remembered = txn.state.get(self._state_key)
        if not remembered or txn.message is None:
            return None
        sender = message_sender(txn)
        if sender == remembered["sender"]:
            return None
        refused: list[tuple[str, Basis]] = []
        judged: list[dict[str, Any]] = []
        for recipient in remembered["accepted"]:
            if recipient not in txn.recipients:
                continue
            basis = await self._basis(recipient, self.options.default_topic, sender)
            if basis is None:
                continue
            judged.append(basis.evidence())
            if not basis.allowed:
                refused.append((recipient, basis))
        evidence = {"from_domain": sender, "envelope_domain": remembered["sender"], "rejudged": judged}
        if not refused:
            return Verdict.accept(f"From domain {sender} differs from the envelope; all bases hold", evidence=evidence)
        first = refused[0][1]
        names = ", ".join(recipient for recipient, _ in refused[:10])
        more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
        text = _one_line(
            f"From domain {sender} is not the envelope sender's {remembered['sender']}, and for {sender}: "
            f"{first.explanation}; {_ADVICE[first.kind]}"
        )
        return Verdict.reject(
            f"{len(refused)} recipient(s) have no basis for From domain {sender}",
            f"{text} (recipients: {names}{more})",
            evidence=evidence,
        )

    # ---- helpers -----------------------------------------------------------------------------

    def _count_lookup(self, operation: str, started: float, ok: bool) -> None:
        """Latency and errors of the store as the policy sees them (the resource
        ``metrics_consent_lookup``: operation, seconds, ok)."""
        hook = self.resources.get("metrics_consent_lookup")
        if hook is not None:
            hook(operation, time.perf_counter() - started, ok)

    def _store(self) -> ConsentStore:
        store = self.resources.get("consent")
        if not isinstance(store, ConsentStore):
            raise PolicyError("the consent policy has no store: configure stores.consent")
        return store

    async def _basis(self, recipient: str, topic: str, sender: str) -> Basis | None:
        """The basis, or None when the recipient is not an address a consent can name."""
        store = self._store()
        try:
            subject = parse_subject(recipient)
        except ConsentInputError:
            return None
        started, ok = time.perf_counter(), False
        try:
            basis = await store.basis(subject.value, topic, sender, rules=self._rules)
            ok = True
            return basis
        except ConsentStoreError as exc:
            raise PolicyError(str(exc)) from exc
        finally:
            self._count_lookup("basis", started, ok)

    async def _blanket_check(self, recipient: str) -> Verdict | None:
        store = self._store()
        try:
            subject = parse_subject(recipient)
        except ConsentInputError:
            return _not_an_address(recipient, after_data=False)
        started, ok = time.perf_counter(), False
        try:
            events = await store.history(subject)
            ok = True
        except ConsentStoreError as exc:
            raise PolicyError(str(exc)) from exc
        finally:
            self._count_lookup("history", started, ok)
        refusal = blanket_refusal(events, subject.value)
        if refusal is None:
            return None  # depends on the topic: asked again after DATA
        return _verdict(refusal, recipient, after_data=False)

    def _topic(self, message: ParsedMessage) -> str | Verdict:
        options: ConsentPolicy.Options = self.options
        if options.topic_header is None:
            return options.default_topic
        values = {v.strip().lower() for v in message.header_values(options.topic_header) if v.strip()}
        if not values:
            return options.default_topic
        if len(values) > 1:
            return Verdict.reject(
                f"several {options.topic_header} values",
                _one_line(f"{options.topic_header}: names several topics ({', '.join(sorted(values))}); give one"),
                status="5.6.0",
            )
        value = values.pop()
        try:
            return normalize_topic(value)
        except ConsentInputError as exc:
            return Verdict.reject(
                f"bad {options.topic_header}", _one_line(f"{options.topic_header}: {exc}"), status="5.6.0"
            )


def message_sender(txn: Transaction) -> str:
    """The sender that holds the relation: the From domain, else the envelope sender's domain
    (list_unsubscribe labels its tokens with the same rule, so an opt-out matches this check)."""
    if txn.message is not None:
        for address in txn.message.addresses("From"):
            domain = _domain_of(address.addr_spec)
            if domain != ANY:
                return domain
    return _domain_of(txn.mail_from)


def _domain_of(address: str) -> str:
    if "@" not in address:
        return ANY
    try:
        return normalize_sender(address.rpartition("@")[2])
    except ConsentInputError:
        return ANY


def _one_line(text: str) -> str:
    cleaned = _CONTROL.sub(" ", text).strip()
    return cleaned if len(cleaned) <= _MAX_TEXT else cleaned[: _MAX_TEXT - 3] + "..."


def _verdict(basis: Basis, recipient: str, *, after_data: bool) -> Verdict:
    evidence = basis.evidence()
    if basis.allowed:
        return Verdict.accept(f"{basis.kind}: {basis.explanation}", evidence=evidence)
    core = f"{basis.explanation}; {_ADVICE[basis.kind]}"
    # After DATA the pipeline names the refused recipients itself, in one reply.
    text = core if after_data else f"<{recipient}>: {core}"
    return Verdict.reject(f"{basis.kind}: {basis.explanation}", _one_line(text), evidence=evidence)


def _not_an_address(recipient: str, *, after_data: bool) -> Verdict:
    core = "no consent can be recorded for a recipient without a domain; use a full address (name@domain)"
    text = core if after_data else f"<{recipient}>: {core}"
    return Verdict.reject(
        "recipient is not an address", _one_line(text), evidence={"basis": "none", "recipient": recipient}
    )
