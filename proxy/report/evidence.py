"""The evidence pack for one address: what answers a complaint (spamklacht.nl, the ACM, the
person themself, AVG art. 15).

* its consent history, every event with its evidence (the store's ``history``: the address's
  own events and its domain's), and the basis it has now;
* every message sent to it (or refused for it) in the audit log, with the basis relied on
  and the record that basis rested on;
* its opt-outs and suppressions, and for each what happened after: refused (as it must be),
  or delivered (flagged, with the reason the consent policy gave, if any).

For an erased address the pack says so (when, how many records, the suppression that keeps
refusing commercial mail) and shows only what happened after the latest erasure: what came
before was erased from the store, and the pack must not rebuild it from the audit log. The
address itself is not written (the CLI also runs the pack through ``redact.Redactor``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.report.auditlog import line_time, parse_time, recipient_fates
from proxy.report.compliance import OptOutTrack, Period, sender_domain_of
from proxy.stores.consent_basis import Basis
from proxy.stores.consent_events import DOMAIN, OPTED_OUT, SUPPRESSED, ConsentEvent, format_time

__all__ = ("EVIDENCE_FORMAT", "EvidencePack")

EVIDENCE_FORMAT = "sendguard-evidence"
EVIDENCE_VERSION = 1


@dataclass
class _AfterOptOut:
    track: OptOutTrack
    after: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvidencePack:
    """Feed it the address's history (``set_history``), then the audit lines (``add``)."""

    address: str
    period: Period | None = None
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    sources: dict[str, Any] = field(default_factory=dict)
    history: list[ConsentEvent] = field(default_factory=list)
    basis_now: Basis | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    unsubscribe_lines: list[dict[str, Any]] = field(default_factory=list)
    #: The tombstone subject and the time of the latest erasure, when the address was erased.
    tombstone: str | None = None
    erased_at: datetime | None = None
    erasures: list[ConsentEvent] = field(default_factory=list)
    before_erasure: int = 0
    _opt_outs: list[_AfterOptOut] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.address = self.address.strip().lower()

    def set_history(self, events: Iterable[ConsentEvent], basis_now: Basis | None) -> None:
        self.history = sorted(events, key=lambda e: e.order)
        self.basis_now = basis_now
        self.erasures = [e for e in self.history if e.kind == SUPPRESSED and e.method == "erasure"]
        if self.erasures:
            self.erased_at = max(e.recorded_at or e.effective_at for e in self.erasures)
        self._opt_outs = [_AfterOptOut(OptOutTrack(e)) for e in self.history if e.kind in (OPTED_OUT, SUPPRESSED)]

    def add(self, entry: dict[str, Any]) -> None:
        moment = line_time(entry)
        if moment is None or (self.period is not None and moment not in self.period):
            return
        if "txn" not in entry:
            if str(entry.get("recipient", "")).lower() == self.address:
                if self.erased_at is not None and moment < self.erased_at:
                    self.before_erasure += 1
                else:
                    self.unsubscribe_lines.append(entry)
            return
        recipients = entry.get("recipients")
        refused = entry.get("refused")
        named = (isinstance(recipients, list) and any(str(r).lower() == self.address for r in recipients)) or (
            isinstance(refused, dict) and any(str(r).lower() == self.address for r in refused)
        )
        if not named:
            return
        for fate in recipient_fates(entry):
            if fate.recipient.lower() != self.address:
                continue
            basis = fate.basis or {}
            record = basis.get("record") if isinstance(basis.get("record"), dict) else None
            at = parse_time(str(basis["at"])) if basis.get("at") else None
            if self.erased_at is not None and (at or moment) < self.erased_at:
                self.before_erasure += 1
                continue
            row = {
                "time": format_time(at or moment),
                "txn": entry.get("txn"),
                "sender": entry.get("sender"),
                "class": entry.get("class"),
                "message_id": entry.get("message_id"),
                "result": fate.fate,
                "policy": fate.policy,
                "basis": basis.get("basis") if basis else None,
                "topic": basis.get("topic") if basis else None,
                "record": record,
                "reply": fate.reply,
            }
            self.messages.append(row)
            if entry.get("class") == "commercial" and fate.fate != "pending":
                self._after_opt_outs(row, at or moment, fate.basis, sender_domain_of(entry.get("sender")))

    def _after_opt_outs(self, row: dict[str, Any], at: datetime, basis: dict[str, Any] | None, sender: str) -> None:
        for item in self._opt_outs:
            event = item.track.event
            if event.effective_at > at or not item.track.covers(basis, sender):
                continue
            refused = row["result"] != "delivered"
            record = row["record"]
            effective = parse_time(str(record.get("effective_at"))) if isinstance(record, dict) else None
            renewed = not refused and effective is not None and effective > event.effective_at
            verdict = "refused" if refused else "renewed_consent" if renewed else "not_honoured"
            if item.track.result is None:  # the first one is the one that had to be refused
                track = item.track
                track.next_time, track.next_txn, track.next_sender = at, str(row["txn"]), sender
                track.result, track.detail = verdict, row["reply"]
            item.after.append({**{k: row[k] for k in ("time", "txn", "sender", "reply", "basis")}, "result": verdict})

    def _erasure(self) -> dict[str, Any] | None:
        if self.erased_at is None:
            return None
        refused = self.basis_now is not None and not self.basis_now.allowed
        return {
            "erased": True,
            "at": format_time(self.erased_at),
            "subject": self.tombstone,
            "erasures": [
                {
                    "record": e.id,
                    "at": format_time(e.recorded_at or e.effective_at),
                    "reason": e.reason,
                    "requested": e.note,
                }
                for e in self.erasures
            ],
            "commercial_mail": "refused" if refused else "allowed",
            "explanation": (
                "the personal data on record was erased; a suppression under the keyed hash of the address "
                "keeps refusing commercial mail to it"
                if refused
                else "erased, but a later consent allows commercial mail again (an admin lifted the suppression)"
            ),
            "decisions_before_erasure": self.before_erasure,
        }

    def as_dict(self) -> dict[str, Any]:
        erased = self.erased_at is not None
        return {
            "format": EVIDENCE_FORMAT,
            "version": EVIDENCE_VERSION,
            "generated_at": format_time(self.generated_at),
            "address": (self.tombstone or "[erased]") if erased else self.address,
            "erasure": self._erasure(),
            "period": None
            if self.period is None
            else {"from": format_time(self.period.start), "to": format_time(self.period.end)},
            "sources": self.sources,
            "basis_now": self.basis_now.as_dict() if self.basis_now is not None else None,
            "consent_history": [
                {
                    **event.as_dict(),
                    "scope": "domain" if event.subject_kind == DOMAIN else "address",
                    **({"address": self.tombstone or "[erased]"} if erased and event.subject_kind != DOMAIN else {}),
                }
                for event in self.history
            ],
            "messages": self.messages,
            "opt_outs": [
                {
                    **item.track.as_dict(),
                    "messages_after": item.after,
                    "refused_after": sum(1 for a in item.after if a["result"] == "refused"),
                    "delivered_after": sum(1 for a in item.after if a["result"] != "refused"),
                    "not_honoured": sum(1 for a in item.after if a["result"] == "not_honoured"),
                }
                for item in self._opt_outs
            ],
            "unsubscribe_requests": self.unsubscribe_lines,
        }
