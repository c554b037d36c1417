"""The evidence pack for one address: what answers a complaint (spamklacht.nl, the ACM, the
person themself, AVG art. 15).

* its consent history, every event with its evidence (the store's ``history``: the address's
  own events and its domain's), and the basis it has now;
* every message sent to it (or refused for it) in the audit log, with the basis relied on
  and the record that basis rested on;
* its opt-outs and suppressions, and for each what happened after: refused (as it must be),
  or delivered (flagged, with the reason the consent policy gave, if any).
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
    _opt_outs: list[_AfterOptOut] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.address = self.address.strip().lower()

    def set_history(self, events: Iterable[ConsentEvent], basis_now: Basis | None) -> None:
        self.history = sorted(events, key=lambda e: e.order)
        self.basis_now = basis_now
        self._opt_outs = [_AfterOptOut(OptOutTrack(e)) for e in self.history if e.kind in (OPTED_OUT, SUPPRESSED)]

    def add(self, entry: dict[str, Any]) -> None:
        moment = line_time(entry)
        if moment is None or (self.period is not None and moment not in self.period):
            return
        if "txn" not in entry:
            if str(entry.get("recipient", "")).lower() == self.address:
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": EVIDENCE_FORMAT,
            "version": EVIDENCE_VERSION,
            "generated_at": format_time(self.generated_at),
            "address": self.address,
            "period": None
            if self.period is None
            else {"from": format_time(self.period.start), "to": format_time(self.period.end)},
            "sources": self.sources,
            "basis_now": self.basis_now.as_dict() if self.basis_now is not None else None,
            "consent_history": [
                {**event.as_dict(), "scope": "domain" if event.subject_kind == DOMAIN else "address"}
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
