"""Complaint feedback loops: a mailbox provider's abuse report opts the recipient out, counts
toward the sender domain's complaint rate, and pauses that domain's commercial mail above the
threshold, as bounces do (``bounces.py``).

Providers (Yahoo/AOL's CFL, Microsoft's JMRP, most ISPs) send a report in the Abuse Reporting
Format (RFC 5965) when a person presses "this is spam": ``multipart/report;
report-type=feedback-report`` with a human-readable part, a ``message/feedback-report`` part
(``Feedback-Type: abuse``, ``Original-Rcpt-To``, ``Original-Mail-From``, ``Source-IP``, ...)
and the reported message, whole (``message/rfc822``) or its header (``text/rfc822-headers``).
The reports arrive on the unsubscribe mailto listener (at its address, or at
``complaints.address`` routed to it).

Who complained is read, most trusted first, from the per-recipient one-click token in the
original's ``List-Unsubscribe`` (signed by sendguard, so it cannot name a stranger), then
``Original-Rcpt-To``, then the original's ``To`` (providers often redact both; the token
survives because it is opaque). The opt-out is recorded with method ``complaint`` for every
topic and sender: someone who calls a message spam wants none of it (Gmail asks senders to
treat a complaint as an unsubscribe).

The rate is complaints over the recipients the sender domain (the envelope sender's, as for
bounces) sent to in the same window, from the bounce accounting's count. Gmail wants it below
0.3% and never at 0.3% or more; a minimum volume keeps one complaint among fifty recipients
from pausing anyone. Reports of another type (``not-spam``, ``virus``, ``fraud``) are counted
and acknowledged, and change nothing.
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

from proxy.observability.metrics import Metrics
from proxy.schema import Duration, doc
from proxy.stores.consent import OPTED_OUT, ConsentInputError, ConsentStore, new_event, parse_subject
from proxy.stores.pauses import Pause, PauseStore

__all__ = ("Complaint", "ComplaintConfig", "Complaints", "is_feedback_report", "parse_feedback_report")

log = logging.getLogger("sendguard.complaints")

#: Read a token found in the original's List-Unsubscribe: (recipient, sender domain) or None.
TokenReader = Callable[[str], tuple[str, str] | None]

_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{40,1024}(?![A-Za-z0-9_-])")
_ANGLE = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


@dataclass(frozen=True)
class ComplaintConfig:
    address: str | None = doc(
        "an extra address the unsubscribe mailto listener takes feedback reports at (e.g. fbl@shop.example); "
        "reports to the unsubscribe address itself are read too",
        default=None,
    )
    rate_threshold: float = doc(
        "pause a sender's commercial mail when complaints reach this share of its recipients (0.003 = 0.3%, Gmail)",
        default=0.003,
    )
    rate_window: Duration = doc("the rolling window of the complaint rate", default=Duration(86400))
    min_recipients: int = doc("recipients sent to in the window before the rate counts", default=1000)
    pause: Duration = doc("how long a sender's commercial mail stays paused", default=Duration(86400))

    def __post_init__(self) -> None:
        if not 0 < self.rate_threshold <= 1:
            raise ValueError("rate_threshold is a share between 0 and 1, e.g. 0.003 for 0.3%")
        if self.min_recipients < 1:
            raise ValueError("min_recipients must be at least 1")
        if self.address is not None and "@" not in self.address:
            raise ValueError("address must be a mail address, e.g. fbl@shop.example")


@dataclass(frozen=True)
class Complaint:
    feedback_type: str  # abuse, not-spam, virus, fraud, other (lower-case)
    recipient: str | None  # the address that complained, where found
    found_by: str  # token, original-rcpt-to, to, none
    sender_domain: str | None  # whose complaint rate it counts toward
    topic_sender: str | None  # the sender named in the token (the consent relation), where known
    reporter: str  # User-Agent of the report (the provider's system) or its From
    source_ip: str | None
    message_id: str | None


def is_feedback_report(content: bytes) -> bool:
    """A cheap look at the top header block: multipart/report with report-type=feedback-report."""
    head = content[:16384].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].lower()
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", head)
    match = re.search(rb"^content-type:[ \t]*multipart/report([^\n]*)", unfolded, re.MULTILINE)
    return bool(match and re.search(rb"report-type\s*=\s*\"?feedback-report", match.group(1)))


def _fields(part: Message) -> Message | None:
    """The header fields of a message/feedback-report or rfc822 part, however it was parsed."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str):
        text = part.get_payload(decode=True)
        raw = text if isinstance(text, bytes) else payload.encode("utf-8", "replace")
        return email.message_from_bytes(raw.lstrip(b"\r\n"), policy=email.policy.compat32)
    return None


def _address(value: str | None) -> str | None:
    if not value:
        return None
    text = str(value).strip()
    match = _ANGLE.search(text)
    candidate = match.group(1) if match else text.split()[0] if text.split() else ""
    candidate = candidate.removeprefix("rfc822;").strip().strip("<>")
    try:
        subject = parse_subject(candidate)
    except ConsentInputError:
        return None
    return subject.value if subject.kind == "address" else None


def _domain(address: str | None) -> str | None:
    return address.rpartition("@")[2] if address and "@" in address else None


def parse_feedback_report(content: bytes, read_token: TokenReader) -> Complaint | None:
    """The complaint in an ARF report, or None when the message is not one."""
    if not is_feedback_report(content):
        return None
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    report: Message | None = None
    original: Message | None = None
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/feedback-report" and report is None:
            report = _fields(part)
        elif kind in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _fields(part)
    if report is None:
        return None
    feedback_type = str(report.get("Feedback-Type", "")).strip().lower() or "other"
    recipient: str | None = None
    found_by = "none"
    topic_sender: str | None = None
    if original is not None:
        unsubscribe = urllib.parse.unquote(str(original.get("List-Unsubscribe", "")))
        for candidate in _TOKEN.findall(unsubscribe):
            read = read_token(candidate)
            if read is not None:
                recipient, topic_sender = _address(read[0]), read[1]
                found_by = "token"
                break
    if recipient is None:
        recipient = _address(report.get("Original-Rcpt-To"))
        found_by = "original-rcpt-to" if recipient else found_by
    if recipient is None and original is not None:
        recipient = _address(original.get("To"))
        found_by = "to" if recipient else found_by
    sender_domain = _domain(_address(report.get("Original-Mail-From")))
    if sender_domain is None and original is not None:
        sender_domain = _domain(_address(original.get("Return-Path"))) or _domain(_address(original.get("From")))
    message_id = str(original.get("Message-ID", "")).strip()[:200] if original is not None else ""
    return Complaint(
        feedback_type=feedback_type,
        recipient=recipient,
        found_by=found_by,
        sender_domain=sender_domain,
        topic_sender=topic_sender,
        reporter=str(report.get("User-Agent") or message.get("From") or "")[:200],
        source_ip=str(report.get("Source-IP", "")).strip()[:64] or None,
        message_id=message_id or None,
    )


class Complaints:
    """Records complaints: the opt-out, the rate, the pause."""

    def __init__(
        self, config: ComplaintConfig, consent: ConsentStore | None, pauses: PauseStore, metrics: Metrics | None
    ) -> None:
        self.config = config
        self.consent = consent
        self.pauses = pauses
        self.metrics = metrics

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.complaints.labels(outcome).inc()

    async def receive(self, content: bytes, peer: str, read_token: TokenReader) -> str | None:
        """The SMTP reply to a feedback report, or None when ``content`` is not one. A report
        is acknowledged (250) whatever it holds, except when the store is down (451: the
        provider retries), so a provider never stops sending reports for a refusal."""
        try:
            complaint = parse_feedback_report(content, read_token)
        except Exception as exc:  # a report we cannot read must not kill the session
            log.warning("unreadable feedback report from %s: %s", peer, exc)
            self._count("unreadable")
            return "250 2.0.0 Report received (unreadable; nothing recorded)"
        if complaint is None:
            return None
        if complaint.feedback_type != "abuse":
            self._count("not_abuse")
            return f"250 2.0.0 Report received ({complaint.feedback_type[:40]}; nothing to record)"
        if complaint.recipient is None or self.consent is None:
            self._count("no_recipient")
            log.warning("feedback report from %s names no recipient we can read", peer)
            return "250 2.0.0 Report received; no recipient found in it"
        note = "; ".join(
            part
            for part in (
                f"feedback report from {complaint.reporter}" if complaint.reporter else "feedback report",
                f"recipient found by {complaint.found_by}",
                f"Message-ID {complaint.message_id}" if complaint.message_id else "",
            )
            if part
        )
        try:
            await self.consent.add(
                new_event(
                    OPTED_OUT,
                    complaint.recipient,
                    method="complaint",
                    reason="marked a message as spam (feedback report, RFC 5965)",
                    source=f"feedback loop via {peer}",
                    note=note,
                )
            )
        except Exception as exc:
            self._count("store_error")
            log.error("complaint of %s could not be recorded: %s", complaint.recipient, exc)
            return "451 4.3.0 The report cannot be recorded right now; try again later"
        self._count("recorded")
        if complaint.sender_domain:
            await self._rate(complaint.sender_domain)
        return "250 2.0.0 Complaint recorded; the recipient is unsubscribed"

    async def _rate(self, domain: str) -> None:
        """Count the complaint; pause the domain's commercial mail when the rate reaches the
        threshold over enough recipients. Pauses fail open, like the bounce accounting."""
        config = self.config
        try:
            complaints = await self.pauses.hit(f"complaints:{domain}", config.rate_window)
            # Recipients tried by this sender in the window: counted by the bounce accounting.
            tried = await self.pauses.tallied(f"bounces:tried:{domain}", config.rate_window)
            if tried < config.min_recipients or complaints / tried < config.rate_threshold:
                return
            reason = (
                f"{complaints} complaint(s) about mail from {domain} among its last {tried} recipients "
                f"({complaints / tried:.2%}, at or above {config.rate_threshold:.1%}); check the list's consent"
            )
            await self.pauses.pause(
                Pause("sender", domain, time.time() + config.pause, reason, "complaints", message_class="commercial")
            )
        except Exception as exc:
            log.error("complaint rate of %s not counted: %s", domain, exc)
            if self.metrics is not None:
                self.metrics.state_errors.labels("pauses").inc()
            return
        if self.metrics is not None:
            self.metrics.complaint_pauses.inc()
        log.warning("commercial mail from %s paused: %s", domain, reason)
