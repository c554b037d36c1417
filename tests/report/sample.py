"""A month of audit lines as a running sendguard writes them (the shapes of
tests/report/test_report_relay.py's real lines), for the browser test and the example
screenshot: deliveries on opt-in and soft opt-in, refusals by several policies, hard
bounces, pauses, opt-outs honoured and one that was not."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.report.compliance import ComplianceReport, Period
from proxy.stores.consent_events import OPTED_OUT, SUPPRESSED, ConsentEvent

START = datetime(2026, 11, 1, tzinfo=UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _consent(recipient: str, basis: str, at: datetime, method: str = "web_form") -> dict[str, Any]:
    allowed = basis in ("opt_in", "soft_opt_in")
    evidence: dict[str, Any] = {"basis": basis, "allowed": allowed, "recipient": recipient, "topic": "*",
                                "sender": "shop.example", "at": _stamp(at)}  # fmt: skip
    if basis != "none":
        evidence["record"] = {
            "id": abs(hash(recipient)) % 10_000,
            "kind": {"opt_in": "opted_in", "soft_opt_in": "customer"}.get(basis, basis),
            "method": method if basis == "opt_in" else "sale" if basis == "soft_opt_in" else "one_click",
            "effective_at": "2026-06-01T10:00:00Z",
            "source": "https://shop.example/signup",
        }
        if method == "double_opt_in":
            evidence["record"]["confirmed_at"] = "2026-06-01T10:04:00Z"
    result: dict[str, Any] = {"policy": "consent", "stage": "rcpt", "action": "accept" if allowed else "reject",
                              "mode": "enforce", "reason": f"{basis}: see record", "recipient": recipient,
                              "evidence": evidence}  # fmt: skip
    if not allowed:
        result["reply"] = f"550 5.7.1 <{recipient}>: {basis}"
    return result


def month(seed: int = 11) -> tuple[list[ConsentEvent], list[dict[str, Any]]]:
    rng = random.Random(seed)
    lines: list[dict[str, Any]] = []
    events: list[ConsentEvent] = []
    opted_out: dict[str, datetime] = {}
    for day in range(30):
        base = START + timedelta(days=day, hours=9)
        for n in range(rng.randint(20, 60) if day % 7 not in (5, 6) else rng.randint(3, 10)):
            at = base + timedelta(minutes=n * 7)
            recipient = f"r{rng.randint(1, 400)}@example.org"
            roll = rng.random()
            entry: dict[str, Any] = {"time": _stamp(at), "txn": f"d{day}n{n}", "sender": "news@shop.example",
                                     "recipients": [recipient], "refused": {}, "class": "commercial",
                                     "upstream_reply": "250 2.0.0 Ok", "copies": None, "outcome": "delivered"}  # fmt: skip
            if recipient in opted_out and opted_out[recipient] < at:
                entry.update(recipients=[], outcome="abandoned", upstream_reply=None)
                entry["policies"] = [_consent(recipient, "opted_out", at)]
                entry["refused"] = {recipient: entry["policies"][0]["reply"]}
            elif roll < 0.70:
                method = "double_opt_in" if rng.random() < 0.6 else "web_form"
                entry["policies"] = [_consent(recipient, "opt_in", at, method)]
            elif roll < 0.80:
                entry["policies"] = [_consent(recipient, "soft_opt_in", at)]
            elif roll < 0.88:
                entry.update(recipients=[], outcome="abandoned", upstream_reply=None)
                entry["policies"] = [_consent(recipient, "none", at)]
                entry["refused"] = {recipient: entry["policies"][0]["reply"]}
            elif roll < 0.93:
                entry.update(outcome="refused", upstream_reply=None)
                entry["policies"] = [_consent(recipient, "opt_in", at), {
                    "policy": "unsubscribe", "stage": "message", "action": "reject", "mode": "enforce",
                    "reason": "no visible unsubscribe link", "decided": True,
                    "reply": "550 5.7.1 Commercial mail needs an unsubscribe option"}]  # fmt: skip
            elif roll < 0.97:
                entry.update(recipients=[], outcome="abandoned", upstream_reply=None)
                entry["policies"] = [_consent(recipient, "opt_in", at)]
                entry["refused"] = {recipient: f"550 5.1.1 <{recipient}>: no such user"}
            else:
                entry.update(recipients=[recipient], outcome="tempfailed", upstream_reply=None)
                entry["policies"] = [{"policy": "pause", "stage": "mail", "action": "tempfail", "mode": "enforce",
                                      "reason": "bounces: 9 of the last 120 recipients of shop.example hard-bounced "
                                                "(7.5%, more than 5%); clean the list"}]  # fmt: skip
            lines.append(entry)
        if day % 3 == 1:
            who = f"r{rng.randint(1, 400)}@example.org"
            moment = base + timedelta(hours=8)  # after the day's mailings (09:00-16:00)
            method = rng.choice(["one_click", "one_click", "link", "reply", "complaint"])
            events.append(ConsentEvent(OPTED_OUT, "address", who, moment, method, id=1000 + day,
                                       recorded_at=moment + timedelta(seconds=rng.randint(1, 90))))  # fmt: skip
            opted_out[who] = moment
    # One opt-out by reply, typed in three days late: a mailing reached the person meanwhile.
    late = START + timedelta(days=20, hours=8)
    events.append(ConsentEvent(OPTED_OUT, "address", "late@example.org", late, "reply", id=2000,
                               recorded_at=late + timedelta(days=3)))  # fmt: skip
    lines.append({"time": _stamp(late + timedelta(hours=3)), "txn": "late1", "sender": "news@shop.example",
                  "recipients": ["late@example.org"], "refused": {}, "class": "commercial",
                  "policies": [_consent("late@example.org", "opt_in", late + timedelta(hours=3))],
                  "upstream_reply": "250 2.0.0 Ok", "copies": None, "outcome": "delivered"})  # fmt: skip
    events.append(ConsentEvent(SUPPRESSED, "address", "gone@example.org", START + timedelta(days=4), "hard_bounce",
                               id=2001, recorded_at=START + timedelta(days=4)))  # fmt: skip
    # An erasure (its suppression under the keyed hash), and a pause that held no message: a
    # blocklist listing over a weekend, when nothing was sent.
    erased_at = START + timedelta(days=12, hours=15)
    events.append(ConsentEvent(SUPPRESSED, "address", "erased:" + "ab" * 32, erased_at, "erasure", id=2002,
                               recorded_at=erased_at, subject_original="erased", note="requested via admin",
                               reason="erased on request (AVG art. 17): the personal data of 3 earlier event(s) "
                                      "removed"))  # fmt: skip
    listed = START + timedelta(days=13, hours=2)
    lines.append({"time": _stamp(listed), "event": "pause", "scope": "class", "value": "commercial",
                  "class": "commercial", "until": _stamp(listed + timedelta(hours=6)),
                  "reason": "192.0.2.25 is listed on zen.spamhaus.org", "source": "blocklist:zen"})  # fmt: skip
    lines.sort(key=lambda entry: entry["time"])
    return events, lines


def month_report() -> dict[str, Any]:
    events, lines = month()
    report = ComplianceReport(
        Period.parse("2026-11-01", "2026-11-30"), generated_at=datetime(2026, 12, 1, 8, tzinfo=UTC)
    )
    report.add_consent_events(events)
    for entry in lines:
        report.add(entry)
    report.sources = {"lines_read": len(lines), "lines_skipped": 0, "consent_store": "sqlite var/consent.db"}
    return report.as_dict()
