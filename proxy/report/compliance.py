"""The compliance report for a period: what was sent commercially, on which lawful basis,
what was refused and why, whether opt-outs were honoured, bounce and complaint rates against
the mailbox providers' thresholds, and the pauses.

Built in one pass over the audit log (``auditlog.AuditFiles``, streamed) after one pass over
the consent store's opt-outs and complaints of the period. What it keeps grows with the
period's opt-outs, sender domains, days and distinct refusal reasons, and with the distinct
commercial recipients (an 8-byte hash each, for the exact count): never with the lines.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy.report.auditlog import RecipientFate, line_time, parse_reply, parse_time, recipient_fates
from proxy.report.redact import tombstone_of
from proxy.stores.consent_events import (
    ANY,
    DOMAIN,
    ERASED_PREFIX,
    OPTED_OUT,
    SUPPRESSED,
    ConsentEvent,
    format_time,
)

__all__ = (
    "BOUNCE_THRESHOLDS",
    "COMPLAINT_THRESHOLDS",
    "HONOUR_WITHIN",
    "REPORT_FORMAT",
    "ComplianceReport",
    "OptOutTrack",
    "Period",
    "normalize_reason",
    "sender_domain_of",
)

REPORT_FORMAT = "sendguard-report"
REPORT_VERSION = 1

#: Gmail's and Yahoo's sender rules (2024): a spam-complaint rate kept below 0.1% and never
#: at 0.3% or above (shared/anchors/field-anchors.md 1c, 3a).
COMPLAINT_THRESHOLDS = {"target": 0.001, "limit": 0.003}
#: Neither Gmail nor Yahoo publishes a bounce number; the field anchors take Amazon SES's:
#: review at 5%, pause at 10% (3a/3b). sendguard's own bounce pause defaults to 5%.
BOUNCE_THRESHOLDS = {"target": 0.05, "limit": 0.10}
#: Gmail: an unsubscribe is honoured within 48 hours; Yahoo: within 2 days.
HONOUR_WITHIN = timedelta(hours=48)
#: How far before the period a complaint's message is looked for (feedback reports arrive
#: within days of the mail; Gmail computes its rate daily).
COMPLAINT_LOOKBACK = timedelta(days=7)
#: Per sender domain, under this many recipients a rate says little; the row says so.
MIN_VOLUME = 100

_ADDRESS = re.compile(r"<?[^\s<>@]+@[^\s<>]+>?")
_RECORD = re.compile(r"record #\d+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T[\d:.]+Z?)?")
_NUMBER = re.compile(r"\d+(\.\d+)?%?")


def normalize_reason(reason: str) -> str:
    """A refusal reason without the parts that differ per recipient (addresses, record ids,
    dates, counts), so that one cause is one row."""
    text = _ADDRESS.sub("<address>", reason)
    text = _RECORD.sub("record #…", text)
    text = _DATE.sub("<date>", text)
    text = _NUMBER.sub("N", text)
    return text[:160]


def sender_domain_of(address: Any) -> str:
    return address.rsplit("@", 1)[1].lower() if isinstance(address, str) and "@" in address else ""


@dataclass(frozen=True)
class Period:
    """``start`` inclusive, ``end`` exclusive, both UTC."""

    start: datetime
    end: datetime

    @classmethod
    def parse(cls, start: str, end: str) -> Period:
        """Dates (YYYY-MM-DD: the whole day, ``end`` included) or ISO times."""
        return cls(_bound(start, end_of_day=False), _bound(end, end_of_day=True))

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def days(self) -> list[date]:
        first, last = self.start.date(), (self.end - timedelta(microseconds=1)).date()
        return [first + timedelta(days=n) for n in range((last - first).days + 1)] if last >= first else []


def _bound(text: str, *, end_of_day: bool) -> datetime:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return day + timedelta(days=1) if end_of_day else day
    moment = parse_time(text)
    if moment is None:
        raise ValueError(f"{text!r} is neither a date (2026-11-30) nor a time (2026-11-30T12:00:00Z)")
    return moment


@dataclass
class OptOutTrack:
    """An opt-out (or suppression) of the period, and the first commercial message to its
    subject after it: that one must have been refused."""

    event: ConsentEvent
    next_time: datetime | None = None
    next_txn: str | None = None
    next_sender: str | None = None
    result: str | None = None  # refused, refused_other, renewed_consent, not_honoured
    detail: str | None = None
    #: A complaint: the sender domain complained about (its own, or that of the last
    #: commercial message delivered to the address before it).
    complained_about: str | None = None

    @property
    def lag(self) -> timedelta | None:
        if self.event.recorded_at is None:
            return None
        return max(self.event.recorded_at - self.event.effective_at, timedelta(0))

    @property
    def honoured(self) -> bool | None:
        if self.result is None:
            return None  # nothing commercial was sent to it since
        return self.result != "not_honoured"

    def covers(self, basis: dict[str, Any] | None, sender: str) -> bool:
        """Whether this opt-out speaks about that message (its topic and sender)."""
        event = self.event
        if event.kind == SUPPRESSED:
            return True
        message_sender = str(basis.get("sender")) if basis and basis.get("sender") else sender
        topic = str(basis.get("topic")) if basis and basis.get("topic") else ANY
        sender_ok = event.sender == ANY or event.sender == message_sender
        topic_ok = event.topic == ANY or topic in (event.topic, ANY)
        return sender_ok and topic_ok

    def as_dict(self) -> dict[str, Any]:
        lag = self.lag
        return {
            "record": self.event.id,
            "subject": self.event.label,
            "kind": self.event.kind,
            "channel": self.event.method,
            "topic": self.event.topic,
            "sender": self.event.sender,
            "effective_at": format_time(self.event.effective_at),
            "recorded_at": format_time(self.event.recorded_at),
            "lag_seconds": round(lag.total_seconds(), 3) if lag is not None else None,
            "recorded_within_48h": lag <= HONOUR_WITHIN if lag is not None else None,
            "next_message": None
            if self.next_time is None
            else {
                "time": format_time(self.next_time),
                "txn": self.next_txn,
                "sender": self.next_sender,
                "result": self.result,
                "detail": self.detail,
            },
            "honoured": self.honoured,
        }


@dataclass
class _Rates:
    tried: int = 0
    hard_bounces: int = 0
    delivered: int = 0


@dataclass
class _Pause:
    """One cause of pauses: the transactions it held (their lines), and the pauses it set (the
    ``pause`` lines the process writes as it sets one, so a pause that held nothing shows)."""

    transactions: int = 0
    first: datetime | None = None
    last: datetime | None = None
    example: str = ""
    set_times: int = 0
    set_first: datetime | None = None
    until: datetime | None = None
    paused: str = ""  # scope:value of the latest pause line

    def as_dict(self, source: str) -> dict[str, Any]:
        return {
            "source": source,
            "paused": self.paused or None,
            "set": self.set_times,
            "set_first": format_time(self.set_first),
            "until": format_time(self.until),
            "transactions": self.transactions,
            "first": format_time(self.first),
            "last": format_time(self.last),
            "reason": self.example,
        }


_ERASED_COUNT = re.compile(r"of (\d+) earlier event")


@dataclass
class ComplianceReport:
    """Feed it the store's events (``add_consent_events``), then the audit lines (``add``);
    ``as_dict`` is the report (the JSON format, version 1; docs in README "Compliance report")."""

    period: Period
    sender_domain: str | None = None
    #: stores.consent.erasure_key: with it, the next message to an erased address is found
    #: by the keyed hash of each recipient (the address itself is gone from the store).
    erasure_key: bytes | None = None
    dead_statuses: tuple[str, ...] = ("5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1")
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    sources: dict[str, Any] = field(default_factory=dict)

    lines_in_period: int = 0
    transactions: int = 0
    commercial_messages: int = 0
    commercial_attempts: int = 0
    commercial_deliveries: int = 0
    commercial_refused: int = 0
    transactional_deliveries: int = 0
    unsubscribe_events: int = 0
    _recipients: set[int] = field(default_factory=set)
    by_day: dict[date, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    basis_delivered: Counter[str] = field(default_factory=Counter)
    basis_refused: Counter[str] = field(default_factory=Counter)
    opt_in_methods: Counter[str] = field(default_factory=Counter)
    opt_in_evidence: Counter[str] = field(default_factory=Counter)
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusal_examples: dict[tuple[str, str], str] = field(default_factory=dict)
    rates: dict[str, _Rates] = field(default_factory=lambda: defaultdict(_Rates))
    pauses: dict[str, _Pause] = field(default_factory=dict)
    opt_outs: list[OptOutTrack] = field(default_factory=list)
    suppressions: Counter[str] = field(default_factory=Counter)
    erasures: list[ConsentEvent] = field(default_factory=list)
    #: The tombstone subjects with an opt-out still waiting for its next message: while there
    #: is one, each commercial recipient is also looked up by its keyed hash (one HMAC).
    _erased_keys: set[str] = field(default_factory=set)
    _pending: dict[str, list[OptOutTrack]] = field(default_factory=lambda: defaultdict(list))
    _unattributed: dict[str, list[OptOutTrack]] = field(default_factory=lambda: defaultdict(list))

    # ---- the consent store ------------------------------------------------------------------

    def add_consent_events(self, events: Iterable[ConsentEvent]) -> None:
        """Opt-outs, suppressions and complaints whose effect began in the period."""
        for event in events:
            if event.kind not in (OPTED_OUT, SUPPRESSED) or event.effective_at not in self.period:
                continue
            if self.sender_domain and event.sender not in (ANY, self.sender_domain):
                continue
            if event.kind == SUPPRESSED:
                self.suppressions[event.method] += 1
                if event.method == "erasure":
                    self.erasures.append(event)
            track = OptOutTrack(event)
            if event.method == "complaint":
                if event.sender != ANY:
                    track.complained_about = event.sender
                elif event.subject_kind != DOMAIN:
                    # A feedback report names the recipient, often not the sender: the
                    # complaint is about the last commercial mail delivered to it.
                    self._unattributed[event.subject].append(track)
            self.opt_outs.append(track)
            key = f"@{event.subject}" if event.subject_kind == DOMAIN else event.subject
            self._pending[key].append(track)
            if key.startswith(ERASED_PREFIX):
                self._erased_keys.add(key)

    # ---- the audit log ----------------------------------------------------------------------

    def add(self, entry: dict[str, Any]) -> None:
        moment = line_time(entry)
        if moment is None:
            return
        if entry.get("event") == "pause" and "txn" not in entry:
            self._pause_line(entry, moment)
            return
        if self.sender_domain and _line_sender(entry) != self.sender_domain:
            return
        if "txn" not in entry:
            if entry.get("event") == "unsubscribe" and moment in self.period:
                self.unsubscribe_events += 1
            return
        in_period = moment in self.period
        commercial = entry.get("class") == "commercial"
        following = commercial and bool(self._pending) and moment >= self.period.start
        attributing = commercial and bool(self._unattributed) and moment >= self.period.start - COMPLAINT_LOOKBACK
        fates = recipient_fates(entry) if (in_period or following or attributing) else []
        if following:
            self._follow_opt_outs(entry, moment, fates)
        if attributing:
            self._attribute_complaints(entry, moment, fates)
        if not in_period:
            return
        self.lines_in_period += 1
        self.transactions += 1
        self._count_pause(entry, moment)
        domain = sender_domain_of(entry.get("sender"))
        day = self.by_day[moment.date()]
        delivered_any = False
        for fate in fates:
            if fate.fate == "delivered":
                delivered_any = True
                self.rates[domain].tried += 1
                if commercial:
                    self.rates[domain].delivered += 1
                    self.commercial_deliveries += 1
                    day["delivered"] += 1
                    self._recipients.add(_digest(fate.recipient))
                    self._count_basis(fate)
                else:
                    self.transactional_deliveries += 1
                    day["transactional"] += 1
            elif fate.fate == "refused_upstream":
                reply = parse_reply(fate.reply)
                if reply is not None and reply.code >= 500:
                    self.rates[domain].tried += 1
                    if any(fnmatch.fnmatchcase(reply.status, s) for s in self.dead_statuses):
                        self.rates[domain].hard_bounces += 1
                self._count_refusal("upstream", _upstream_reason(fate.reply), fate.reply)
                if commercial:
                    self.commercial_refused += 1
                    day["refused"] += 1
            elif fate.fate == "refused_policy":
                self._count_refusal(fate.policy or "unknown", fate.reason or "", fate.reply)
                if commercial:
                    self.commercial_refused += 1
                    day["refused"] += 1
                    if fate.basis and not fate.basis.get("allowed", True):
                        self.basis_refused[str(fate.basis.get("basis"))] += 1
        if commercial:
            self.commercial_attempts += len(fates)
            if delivered_any:
                self.commercial_messages += 1

    def _count_basis(self, fate: RecipientFate) -> None:
        basis = fate.basis
        if basis is None or not basis.get("allowed"):
            # Commercial mail delivered without a consent verdict: the consent policy was
            # off or in monitor mode. The report shows it: the law still asked for a basis.
            self.basis_delivered["no_consent_check"] += 1
            return
        kind = str(basis.get("basis"))
        self.basis_delivered[kind] += 1
        record = basis.get("record")
        if kind == "opt_in" and isinstance(record, dict):
            self.opt_in_methods[str(record.get("method"))] += 1
            for name in ("source", "confirmed_at", "text_version"):
                if record.get(name):
                    self.opt_in_evidence[name] += 1

    def _count_refusal(self, policy: str, reason: str, reply: str | None) -> None:
        # The upstream's code and enhanced status are the reason itself; keep them as they are.
        key = (policy, reason if policy == "upstream" else normalize_reason(reason))
        self.refusals[key] += 1
        if key not in self.refusal_examples and reply:
            self.refusal_examples[key] = reply[:300]

    def _count_pause(self, entry: dict[str, Any], moment: datetime) -> None:
        for result in entry.get("policies") or ():
            if not isinstance(result, dict) or result.get("policy") != "pause":
                continue
            reason = str(result.get("reason") or "")
            source = reason.split(": ", 1)[0] if ": " in reason else "unknown"
            pause = self.pauses.setdefault(source, _Pause(example=reason))
            pause.transactions += 1
            pause.first = min(pause.first or moment, moment)
            pause.last = max(pause.last or moment, moment)
            pause.example = reason  # the latest wording: the state the period ended in

    def _pause_line(self, entry: dict[str, Any], moment: datetime) -> None:
        """A pause set (written by the process when a pause store set it): it counts when it
        held in the period, even if no message came while it did."""
        until = parse_time(str(entry.get("until") or "")) or moment
        if moment >= self.period.end or until <= self.period.start:
            return
        scope, value = str(entry.get("scope") or ""), str(entry.get("value") or "")
        if self.sender_domain and scope == "sender" and value != self.sender_domain:
            return
        reason = str(entry.get("reason") or "")
        pause = self.pauses.setdefault(str(entry.get("source") or "unknown"), _Pause(example=reason))
        pause.set_times += 1
        pause.set_first = min(pause.set_first or moment, moment)
        pause.until = max(pause.until or until, until)
        pause.paused = f"{scope}:{value}"
        if not pause.transactions:
            pause.example = reason

    def _attribute_complaints(self, entry: dict[str, Any], moment: datetime, fates: list[RecipientFate]) -> None:
        for fate in fates:
            if fate.fate != "delivered":
                continue
            for track in self._unattributed.get(fate.recipient.lower(), ()):
                if track.event.effective_at >= moment:
                    track.complained_about = sender_domain_of(entry.get("sender"))

    def _follow_opt_outs(self, entry: dict[str, Any], moment: datetime, fates: list[RecipientFate]) -> None:
        sender = sender_domain_of(entry.get("sender"))
        for fate in fates:
            if fate.fate == "pending":
                continue  # not decided: the client retries, and that try is the next message
            recipient = fate.recipient.lower()
            keys: tuple[str, ...] = (recipient, "@" + sender_domain_of(recipient))
            if self.erasure_key is not None and self._erased_keys:
                tombstone = tombstone_of(self.erasure_key, recipient)
                keys = (*keys, tombstone) if tombstone else keys
            for key in keys:
                tracks = self._pending.get(key)
                if not tracks:
                    continue
                at = parse_time(str(fate.basis.get("at"))) if fate.basis and fate.basis.get("at") else None
                at = at or moment
                for track in list(tracks):
                    if track.event.effective_at > at or track.result is not None:
                        continue
                    if not track.covers(fate.basis, sender):
                        continue
                    self._judge(track, fate, at, entry, sender)
                    tracks.remove(track)
                if not tracks:
                    self._erased_keys.discard(key)  # nothing left to follow by the keyed hash

    @staticmethod
    def _judge(track: OptOutTrack, fate: RecipientFate, at: datetime, entry: dict[str, Any], sender: str) -> None:
        track.next_time, track.next_txn, track.next_sender = at, str(entry.get("txn")), sender
        if fate.fate == "refused_policy" and fate.basis and fate.basis.get("basis") in ("opted_out", "suppressed"):
            track.result, track.detail = "refused", fate.reply
        elif fate.fate in ("refused_policy", "refused_upstream"):
            track.result, track.detail = "refused_other", fate.reply or fate.reason
        else:
            record = fate.basis.get("record") if fate.basis else None
            effective = parse_time(str(record.get("effective_at"))) if isinstance(record, dict) else None
            if effective is not None and effective > track.event.effective_at:
                record_id = record.get("id") if isinstance(record, dict) else "?"
                track.result = "renewed_consent"
                track.detail = f"delivered on record #{record_id}, given after the opt-out"
            else:
                track.result = "not_honoured"
                track.detail = "delivered after the opt-out" + (
                    "" if fate.basis else " without a consent check (consent policy off or in monitor mode)"
                )

    # ---- the result -------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        lags = [t.lag.total_seconds() for t in self.opt_outs if t.lag is not None]
        opt_outs = sorted(self.opt_outs, key=lambda t: (t.event.effective_at, t.event.id or 0))
        channels: Counter[str] = Counter(t.event.method for t in opt_outs if t.event.kind == OPTED_OUT)
        days = (
            sorted(set(self.period.days()) | set(self.by_day))
            if len(self.period.days()) <= 400
            else sorted(self.by_day)
        )
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "generated_at": format_time(self.generated_at),
            "period": {"from": format_time(self.period.start), "to": format_time(self.period.end)},
            "sender_domain": self.sender_domain,
            "sources": self.sources,
            "transactions": self.transactions,
            "commercial": {
                "messages": self.commercial_messages,
                "recipient_deliveries": self.commercial_deliveries,
                "distinct_recipients": len(self._recipients),
                "recipients_refused": self.commercial_refused,
                "recipient_attempts": self.commercial_attempts,
                "transactional_deliveries": self.transactional_deliveries,
                "by_day": [
                    {
                        "date": day.isoformat(),
                        "delivered": self.by_day[day]["delivered"] if day in self.by_day else 0,
                        "refused": self.by_day[day]["refused"] if day in self.by_day else 0,
                        "transactional": self.by_day[day]["transactional"] if day in self.by_day else 0,
                    }
                    for day in days
                ],
            },
            "basis": {
                "delivered": dict(sorted(self.basis_delivered.items())),
                "refused": dict(sorted(self.basis_refused.items())),
                "opt_in_methods": dict(self.opt_in_methods.most_common()),
                "opt_in_evidence": {
                    name: self.opt_in_evidence[name] for name in ("source", "confirmed_at", "text_version")
                },
            },
            "refusals": [
                {
                    "policy": policy,
                    "reason": reason,
                    "recipients": count,
                    "example": self.refusal_examples.get((policy, reason)),
                }
                for (policy, reason), count in sorted(self.refusals.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "opt_outs": {
                "total": sum(1 for t in opt_outs if t.event.kind == OPTED_OUT),
                "by_channel": dict(channels.most_common()),
                "suppressions_by_cause": dict(self.suppressions.most_common()),
                "unsubscribe_requests_logged": self.unsubscribe_events,
                "lag_seconds": {
                    "median": round(statistics.median(lags), 3) if lags else None,
                    "max": round(max(lags), 3) if lags else None,
                },
                "recorded_after_48h": sum(1 for t in opt_outs if t.lag is not None and t.lag > HONOUR_WITHIN),
                "followed_by_a_message": sum(1 for t in opt_outs if t.result is not None),
                "not_honoured": sum(1 for t in opt_outs if t.result == "not_honoured"),
                "events": [t.as_dict() for t in opt_outs],
            },
            "thresholds": {
                "complaint_rate": COMPLAINT_THRESHOLDS,
                "bounce_rate": BOUNCE_THRESHOLDS,
                "min_volume": MIN_VOLUME,
                "honour_within_hours": HONOUR_WITHIN.total_seconds() / 3600,
            },
            "rates": self._rate_rows(),
            "pauses": [
                pause.as_dict(source)
                for source, pause in sorted(
                    self.pauses.items(), key=lambda kv: (-kv[1].transactions, format_time(kv[1].set_first) or "")
                )
            ],
            "erasures": {
                "total": len(self.erasures),
                # When and how much, never whom: the subject is the keyed hash (AVG art. 17).
                "events": [
                    {
                        "record": event.id,
                        "at": format_time(event.recorded_at or event.effective_at),
                        "events_erased": _erased_count(event.reason),
                        "requested": event.note,
                        "commercial_mail": "refused (suppression under the keyed hash)",
                    }
                    for event in sorted(self.erasures, key=lambda e: (e.effective_at, e.id or 0))
                ],
            },
        }

    def _rate_rows(self) -> list[dict[str, Any]]:
        complaints: Counter[str] = Counter(
            track.complained_about or ANY for track in self.opt_outs if track.event.method == "complaint"
        )
        domains = sorted((set(self.rates) | set(complaints)) - {""})
        return [self._rate_row(domain, self.rates.get(domain, _Rates()), complaints[domain]) for domain in domains]

    @staticmethod
    def _rate_row(domain: str, rates: _Rates, complaints: int) -> dict[str, Any]:
        bounce = rates.hard_bounces / rates.tried if rates.tried else None
        complaint = complaints / rates.delivered if rates.delivered else None
        return {
            "sender_domain": domain,
            "recipients_tried": rates.tried,
            "hard_bounces": rates.hard_bounces,
            "bounce_rate": round(bounce, 6) if bounce is not None else None,
            "bounce_status": _status(bounce, BOUNCE_THRESHOLDS, rates.tried),
            "commercial_delivered": rates.delivered,
            "complaints": complaints,
            "complaint_rate": round(complaint, 6) if complaint is not None else None,
            "complaint_status": _status(complaint, COMPLAINT_THRESHOLDS, rates.delivered),
        }


def _erased_count(reason: str | None) -> int | None:
    match = _ERASED_COUNT.search(reason or "")
    return int(match.group(1)) if match else None


def _status(rate: float | None, thresholds: dict[str, float], volume: int) -> str:
    """ok, watch (above the target), over (at or above the limit), or no_data; a small
    volume is marked so (one complaint in ten mails is not a 10% rate to act on)."""
    if rate is None:
        return "no_data"
    status = "over" if rate >= thresholds["limit"] else "watch" if rate > thresholds["target"] else "ok"
    return status if volume >= MIN_VOLUME else f"{status}_low_volume"


def _line_sender(entry: dict[str, Any]) -> str:
    """The sending domain of a line: the envelope sender's for a transaction; an unsubscribe
    line names the sender (a domain) whose mail carried the link."""
    sender = entry.get("sender")
    if "txn" in entry:
        return sender_domain_of(sender)
    return sender.lower() if isinstance(sender, str) and "@" not in sender else sender_domain_of(sender)


def _upstream_reason(reply: str | None) -> str:
    parsed = parse_reply(reply)
    if parsed is None:
        return "upstream refused"
    return f"{parsed.code} {parsed.status}".strip()


def _digest(address: str) -> int:
    # 8 bytes of a hash, not the address: a set of a million ints costs ~70 MB less than
    # the strings would, and a collision among 2^64 values is not a concern at this size.
    return int.from_bytes(hashlib.blake2b(address.lower().encode(), digest_size=8).digest(), "big")
