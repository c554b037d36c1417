"""One-click unsubscribe and the recipient's own page, for every app that sends through sendguard.

The parts:

* ``tokens``     - the sealed per-recipient token in every link (AES-256-GCM, rotating keys);
* ``policies/list_unsubscribe.py`` - adds ``List-Unsubscribe`` (https first, then mailto) and
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` to commercial mail, one token per
  recipient, before DKIM signing (RFC 8058 section 3.1, 4);
* ``web``        - the HTTP service: the RFC 8058 one-click POST, a confirmation page for people
  (a GET never unsubscribes: link scanners prefetch), and the recipient's page (AVG/GDPR art.
  15, 16, 20 and 21: see, correct, download, object);
* ``mailto``     - an SMTP listener for the ``mailto:`` URI (RFC 2369);
* ``footer``     - a visible unsubscribe link added to the body where one is missing;
* ``config``     - the config section (``UnsubscribeConfig``) and ``sendguard unsubscribe keygen``.

This module holds the metrics, the in-memory rate limiter and ``UnsubscribeService``: the
object policies get as ``resources["unsubscribe"]``, and that records every opt-out in the
consent store, the audit log and the metrics.

Opt-outs and token age: ``token_ttl`` (default 400 days) limits how long a link shows the
recipient's data (``/p/``). An objection is never refused for age: the one-click POST, the
unsubscribe button and the mailto address still work with an expired but authentic token,
because the law wants a way out in every message and people click unsubscribe in mail that is
a year old. Gmail must see the unsubscribe honoured within 48 hours; sendguard records it at
once and the next commercial message to that recipient is refused at the proxy.

Repeated opt-outs (a mailbox provider that retries, a person who clicks twice) are answered
like the first but recorded once: a new event is written only when no standing opt-out of
the same address (or its domain) already covers the whole scope (topic and sender), and no
later opt-in touches any part of it.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, Counter

from proxy.schema import Rate
from proxy.stores.consent import (
    ADDRESS,
    ANY,
    NO_SOFT_OPT_IN,
    OPTED_IN,
    OPTED_OUT,
    Basis,
    ConsentEvent,
    ConsentInputError,
    ConsentStore,
    ConsentStoreError,
    Erasure,
    SoftOptInRules,
    Subject,
    evaluate,
    format_time,
    new_event,
    normalize_sender,
    normalize_topic,
    parse_subject,
)
from proxy.unsubscribe.config import (
    LANGUAGES,
    MailtoConfig,
    TopicConfig,
    UnsubscribeConfig,
    UnsubscribeKeyConfig,
    UnsubscribeRateLimits,
    add_unsubscribe_parser,
    keygen,
    run_unsubscribe_command,
)
from proxy.unsubscribe.footer import footer_for
from proxy.unsubscribe.tokens import (
    TokenCodec,
    TokenError,
    TokenKey,
    UnsubscribeToken,
)

__all__ = (
    "LANGUAGES",
    "MailtoConfig",
    "OptOutResult",
    "RateLimiter",
    "TopicConfig",
    "UnsubscribeConfig",
    "UnsubscribeKeyConfig",
    "UnsubscribeMetrics",
    "UnsubscribeRateLimits",
    "UnsubscribeService",
    "UnsubscribeToken",
    "add_unsubscribe_parser",
    "keygen",
    "run_unsubscribe_command",
    "standing_opt_out",
)

log = logging.getLogger("sendguard.unsubscribe")

ONE_CLICK_VALUE = "List-Unsubscribe=One-Click"
#: Version of the consent text on the recipient's page, stored with each opt-in made there.
PREFERENCES_TEXT_VERSION = "sendguard-preferences-1"


# ---- metrics ---------------------------------------------------------------------------------

OPT_OUT_METHODS = ("one_click", "link", "preference_center", "reply")
CHANNELS = ("https", "mailto")
ENDPOINTS = (
    "one_click", "confirm_page", "confirm_post", "recipient_page", "topics", "withdraw", "erase", "download", "mailto",
)  # fmt: skip
#: consent_changes' action for an erasure from the recipient's page.
ERASED = "erased"
REQUEST_OUTCOMES = ("ok", "invalid_token", "expired_token", "csrf", "rate_limited", "bad_request", "store_error")


class UnsubscribeMetrics:
    """The unsubscribe counters; labels from the bounded sets above, never addresses."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, UnsubscribeMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.unsubscribes = Counter(
            "sendguard_unsubscribes_total",
            "Opt-outs honoured, by method (one_click, link, preference_center, reply), channel and whether "
            "a new record was written or an earlier opt-out already covered it",
            ["method", "source", "result"],
            registry=registry,
        )
        self.consent_changes = Counter(
            "sendguard_unsubscribe_consent_changes_total",
            "Topic choices and erasures made on the recipient's page",
            ["action"],
            registry=registry,
        )
        self.requests = Counter(
            "sendguard_unsubscribe_requests_total",
            "Requests to the unsubscribe endpoints by outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        for method in OPT_OUT_METHODS:
            for channel in CHANNELS:
                for result in ("recorded", "repeated"):
                    self.unsubscribes.labels(method, channel, result)
        for action in (OPTED_IN, OPTED_OUT, ERASED):
            self.consent_changes.labels(action)
        for endpoint in ENDPOINTS:
            for outcome in REQUEST_OUTCOMES:
                self.requests.labels(endpoint, outcome)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> UnsubscribeMetrics:
        """One set per registry: a registry refuses the same metric name twice."""
        existing = cls._by_registry.get(registry)
        if existing is None:
            existing = cls._by_registry[registry] = cls(registry)
        return existing


# ---- rate limits -----------------------------------------------------------------------------


class RateLimiter:
    """Token buckets in memory, one per key, least recently used first out beyond ``max_keys``.

    Per process: behind a load balancer each instance counts its own share, which is what a
    limit against one client hammering one endpoint needs.
    """

    def __init__(self, rate: Rate, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = float(max(rate.count, 1))
        self.refill = rate.count / rate.period  # tokens per second
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _level(self, key: str, now: float) -> float:
        level, stamp = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, level + (now - stamp) * self.refill)

    def hit(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` from the key's bucket: 0.0 when allowed, else the seconds to wait."""
        now = self.clock()
        level = self._level(key, now)
        if level < cost:
            self._remember(key, level, now)
            return (cost - level) / self.refill if self.refill > 0 else math.inf
        self._remember(key, level - cost, now)
        return 0.0

    def blocked(self, key: str) -> float:
        """Seconds until one unit is available again (0.0: not blocked); takes nothing."""
        now = self.clock()
        level = self._level(key, now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.refill

    def _remember(self, key: str, level: float, now: float) -> None:
        self._buckets[key] = (level, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


# ---- opt-out bookkeeping ---------------------------------------------------------------------


def _overlaps(a: str, b: str) -> bool:
    return ANY in (a, b) or a == b


def standing_opt_out(events: Sequence[ConsentEvent], topic: str, sender: str) -> ConsentEvent | None:
    """An opt-out already in the log that covers all of (topic, sender) and that no later
    explicit, valid opt-in touches; None when a new opt-out must be written."""
    ordered = sorted(events, key=lambda e: e.order)
    now = datetime.now(UTC)
    for index, event in enumerate(ordered):
        if event.kind != OPTED_OUT or event.topic not in (ANY, topic) or event.sender not in (ANY, sender):
            continue
        if event.subject_kind != ADDRESS:
            continue  # a domain's opt-out can be lifted for the domain: the person's own must be on record
        lifted = any(
            later.kind == OPTED_IN
            and later.level >= event.level
            and later.explicit
            and later.valid_at(now)
            and _overlaps(later.topic, topic)
            and _overlaps(later.sender, sender)
            for later in ordered[index + 1 :]
        )
        if not lifted:
            return event
    return None


@dataclass(frozen=True, slots=True)
class OptOutResult:
    """What an opt-out request did: the new record, or the earlier one that already covered it."""

    record: ConsentEvent
    recorded: bool


def _valid_ip(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


class UnsubscribeService:
    """Tokens, links, footers and the recording of opt-outs and topic choices.

    Lives for the life of the process (like the metrics and the audit log); ``update`` takes
    a reloaded config, so rotated keys apply without a restart. ``consent`` is a callable
    that returns the consent store in use, so a reload that swaps the store is followed.
    """

    def __init__(
        self,
        config: UnsubscribeConfig,
        consent: Callable[[], ConsentStore | None],
        *,
        audit: Any = None,
        registry: CollectorRegistry | None = None,
        rules: SoftOptInRules = NO_SOFT_OPT_IN,
    ) -> None:
        self._consent = consent
        self.audit = audit  # proxy.observability.logsetup.AuditLog (anything with .write(dict))
        # Feedback reports (ARF) that reach the mailto listener, handled by the process
        # (proxy/reputation/complaints.py through App): the reply, or None when not a report.
        self.complaints: Callable[[bytes, str], Awaitable[str | None]] | None = None
        self.complaints_address: str | None = None  # complaints.address: the listener takes it too
        self.metrics = UnsubscribeMetrics.for_registry(registry or CollectorRegistry())
        self.rules = rules
        self.config = config
        self.codec = self._codec(config)
        self.limits = self._limiters(config.rate_limits)

    @staticmethod
    def _codec(config: UnsubscribeConfig) -> TokenCodec:
        if not config.keys:
            raise ValueError("the unsubscribe service needs at least one key")
        return TokenCodec([TokenKey.from_base64(k.id, k.secret) for k in config.keys], config.token_ttl)

    @staticmethod
    def _limiters(limits: UnsubscribeRateLimits) -> dict[str, RateLimiter]:
        return {
            "ip": RateLimiter(limits.per_ip),
            "token": RateLimiter(limits.per_token),
            "invalid": RateLimiter(limits.invalid_per_ip),
        }

    def update(self, config: UnsubscribeConfig, rules: SoftOptInRules | None = None) -> None:
        """Take a reloaded config (new keys, texts, limits). The listen addresses need a restart."""
        codec = self._codec(config)  # a bad key raises before anything changes
        if config.rate_limits != self.config.rate_limits:
            self.limits = self._limiters(config.rate_limits)
        self.config, self.codec = config, codec
        if rules is not None:
            self.rules = rules

    # ---- links ------------------------------------------------------------------------------

    def issue(self, recipient: str, sender: str, topic: str) -> str:
        return self.codec.issue(recipient, sender, topic)

    def read(self, token: str, *, allow_expired: bool = False) -> UnsubscribeToken:
        return self.codec.read(token, allow_expired=allow_expired)

    def is_token(self, text: str) -> bool:
        """Made by one of our keys (expired or not): cheap (one AES-GCM check), for rate limits."""
        try:
            self.codec.read(text, allow_expired=True)
        except TokenError:
            return False
        return True

    def expired(self, token: UnsubscribeToken) -> bool:
        """Older than token_ttl: it still unsubscribes, but no longer shows the recipient's page."""
        return time.time() - token.issued_at > self.codec.ttl

    def https_url(self, token: str) -> str:
        assert self.config.base_url is not None
        return f"{self.config.base_url}/u/{token}"

    def path(self, kind: str, token: str = "") -> str:
        """The server-relative path of a page: /u/TOKEN, /p/TOKEN ... under base_url's path."""
        return f"{self.config.base_path}/{kind}/{token}" if token else f"{self.config.base_path}/{kind}"

    def mailto_uri(self, token: str) -> str | None:
        """``mailto:ADDRESS?subject=unsubscribe%20TOKEN``. The token goes in the subject, not in
        ``unsubscribe+TOKEN@…``: a token is longer than the 64 octets RFC 5321 4.5.3.1.1 allows a
        local part, and mail systems refuse longer ones."""
        if self.config.mailto is None:
            return None
        return f"mailto:{self.config.mailto.address}?subject=" + urllib.parse.quote(f"unsubscribe {token}")

    def list_unsubscribe(self, recipient: str, sender: str, topic: str) -> tuple[tuple[str, str], ...]:
        """The two RFC 8058 header fields for one recipient: https first (Gmail uses the first
        URI, RFC 8058 section 3.1), then mailto. Kept on one line below 998 octets, because a
        folded List-Unsubscribe broke DKIM in nodemailer#1654."""
        token = self.issue(recipient, sender, topic)
        uris = [f"<{self.https_url(token)}>"]
        mailto = self.mailto_uri(token)
        if mailto is not None and len(uris[0]) + len(mailto) + 24 < 990:
            uris.append(f"<{mailto}>")
        return (("List-Unsubscribe", ", ".join(uris)), ("List-Unsubscribe-Post", ONE_CLICK_VALUE))

    def footer(self, recipient: str, sender: str, topic: str) -> tuple[str, str]:
        """The (plain text, HTML) unsubscribe footer with this recipient's own link."""
        url = self.https_url(self.issue(recipient, sender, topic))
        return footer_for(url, self.config.company, self.config.footer_languages)

    # ---- the store --------------------------------------------------------------------------

    def store(self) -> ConsentStore:
        store = self._consent()
        if store is None:
            raise ConsentStoreError("no consent store is open (stores.consent)")
        return store

    @staticmethod
    def subject(token: UnsubscribeToken) -> Subject:
        """The consent subject of a token; ``TokenError`` when it names no address."""
        try:
            subject = parse_subject(token.recipient)
        except ConsentInputError:
            raise TokenError("the token names no address") from None
        if subject.kind != "address":
            raise TokenError("the token names no address")
        return subject

    async def history(self, token: UnsubscribeToken) -> list[ConsentEvent]:
        return await self.store().history(self.subject(token))

    def topics(self, token: UnsubscribeToken, events: Sequence[ConsentEvent]) -> list[str]:
        """The topics to show: the configured ones, those in the history, the token's own."""
        seen: dict[str, None] = {topic.id: None for topic in self.config.topics}
        for event in events:
            if event.topic != ANY and event.kind in (OPTED_IN, OPTED_OUT):
                seen.setdefault(event.topic, None)
        if token.topic != ANY:
            seen.setdefault(token.topic, None)
        return list(seen)

    def basis(self, token: UnsubscribeToken, events: Sequence[ConsentEvent], topic: str) -> Basis:
        return evaluate(events, self.subject(token).value, topic, _sender_of(token), rules=self.rules)

    # ---- recording --------------------------------------------------------------------------

    async def opt_out(
        self,
        token: UnsubscribeToken,
        *,
        method: str,
        channel: str,
        ip: str | None,
        user_agent: str | None = None,
        topic: str | None = None,
        note: str | None = None,
    ) -> OptOutResult:
        """Record an objection now (no batching: RFC 8058 mailbox providers and Gmail's 48 h)."""
        subject = self.subject(token)
        scope = normalize_topic(topic if topic is not None else token.topic)
        sender = _sender_of(token)
        store = self.store()
        events = await store.history(subject)
        standing = standing_opt_out(events, scope, sender)
        if standing is not None:
            result = OptOutResult(standing, recorded=False)
        else:
            event = new_event(
                OPTED_OUT,
                subject,
                method=method,
                topic=scope,
                sender=sender,
                source=self._source(token, channel),
                ip=_valid_ip(ip),
                user_agent=user_agent,
                reason=_REASONS[method],
                note=note,
            )
            (stored,) = await store.add(event)
            result = OptOutResult(stored, recorded=True)
        self.metrics.unsubscribes.labels(method, channel, "recorded" if result.recorded else "repeated").inc()
        self._audit(
            "unsubscribe",
            token,
            action=OPTED_OUT,
            topic=scope,
            method=method,
            channel=channel,
            ip=ip,
            user_agent=user_agent,
            record=result.record,
            recorded=result.recorded,
            note=note,
        )
        log.info(
            "opt-out %s via %s (%s, key %s)",
            "recorded" if result.recorded else "already on record",
            method,
            channel,
            token.key_id,
            extra={"fields": {"record": result.record.id, "topic": scope, "sender": sender}},
        )
        return result

    async def opt_in(self, token: UnsubscribeToken, topic: str, *, ip: str | None, user_agent: str | None) -> None:
        """A topic chosen on the recipient's page: the page was reached through the link in a
        message to this address, which shows the person controls it."""
        subject = self.subject(token)
        event = new_event(
            OPTED_IN,
            subject,
            method="web_form",
            topic=normalize_topic(topic),
            sender=_sender_of(token),
            source=self._source(token, "https"),
            ip=_valid_ip(ip),
            user_agent=user_agent,
            text_version=PREFERENCES_TEXT_VERSION,
        )
        (stored,) = await self.store().add(event)
        self.metrics.consent_changes.labels(OPTED_IN).inc()
        self._audit(
            "consent_change",
            token,
            action=OPTED_IN,
            topic=stored.topic,
            method="web_form",
            channel="https",
            ip=ip,
            user_agent=user_agent,
            record=stored,
            recorded=True,
        )

    async def topic_opt_out(
        self, token: UnsubscribeToken, topic: str, *, ip: str | None, user_agent: str | None
    ) -> OptOutResult:
        result = await self.opt_out(
            token, method="preference_center", channel="https", ip=ip, user_agent=user_agent, topic=topic
        )
        if result.recorded:
            self.metrics.consent_changes.labels(OPTED_OUT).inc()
        return result

    async def erase(self, token: UnsubscribeToken) -> Erasure:
        """Erasure asked for on the recipient's page (AVG art. 17): the page was reached through
        the link in a message to this address. The audit line names no address: it would undo
        the erasure (the record number and the count are enough to find it in the store)."""
        erasure = await self.store().erase(self.subject(token).value, requested_via="the recipient's page")
        self.metrics.consent_changes.labels(ERASED).inc()
        if self.audit is not None:
            self.audit.write(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "event": "erasure",
                    "source": "https",
                    "record": erasure.suppression.id,
                    "erased": erasure.erased,
                    "key_id": token.key_id,
                }
            )
        return erasure

    def _source(self, token: UnsubscribeToken, channel: str) -> str:
        issued = datetime.fromtimestamp(token.issued_at, UTC).strftime("%Y-%m-%d")
        where = "mailto unsubscribe address" if channel == "mailto" else "sendguard unsubscribe pages"
        return f"{where}; link of {issued}, token key {token.key_id}"

    def _audit(
        self,
        event: str,
        token: UnsubscribeToken,
        *,
        action: str,
        topic: str,
        method: str,
        channel: str,
        ip: str | None,
        user_agent: str | None,
        record: ConsentEvent,
        recorded: bool,
        note: str | None = None,
    ) -> None:
        if self.audit is None:
            return
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "action": action,
            "recipient": token.recipient,
            "sender": _sender_of(token),
            "topic": topic,
            "method": method,
            "source": channel,
            "client": ip,
            "user_agent": (user_agent or "")[:300] or None,
            "key_id": token.key_id,
            "token_issued": format_time(datetime.fromtimestamp(token.issued_at, UTC)),
            "record": record.id,
            "result": "recorded" if recorded else "already_on_record",
        }
        if note:
            entry["note"] = note
        self.audit.write(entry)


_REASONS = {
    "one_click": "one-click unsubscribe (RFC 8058) from the List-Unsubscribe header",
    "link": "unsubscribe button on the page behind the unsubscribe link",
    "preference_center": "choice on the recipient's own page",
    "reply": "mail to the unsubscribe address (List-Unsubscribe mailto)",
}


def _sender_of(token: UnsubscribeToken) -> str:
    try:
        return normalize_sender(token.sender)
    except ConsentInputError:
        return ANY
