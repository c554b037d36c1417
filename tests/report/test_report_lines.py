"""The report's reading of crafted audit lines: each edge of a recipient's fate, of following
an opt-out to the next message, of the rates against their thresholds, of a damaged or
rotated log; and that what comes from outside (addresses, replies) stays text in HTML and CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.report.auditlog import AuditFiles, recipient_fates, rotated_files
from proxy.report.compliance import ComplianceReport, Period, normalize_reason
from proxy.report.render import render
from proxy.stores.consent_events import DOMAIN, OPTED_IN, OPTED_OUT, SUPPRESSED, ConsentEvent

DAY = datetime(2026, 11, 20, tzinfo=UTC)
PERIOD = Period.parse("2026-11-01", "2026-11-30")


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def line(
    *,
    at: datetime = DAY,
    sender: str = "news@shop.example",
    recipients: tuple[str, ...] = ("ann@example.org",),
    refused: dict[str, str] | None = None,
    policies: list[dict[str, Any]] | None = None,
    outcome: str = "delivered",
    copies: dict[str, dict[str, Any]] | None = None,
    klass: str = "commercial",
    upstream_reply: str | None = "250 2.0.0 Ok",
    txn: str = "t1",
) -> dict[str, Any]:
    return {
        "time": stamp(at),
        "txn": txn,
        "sender": sender,
        "recipients": list(recipients),
        "refused": refused or {},
        "class": klass,
        "policies": policies or [],
        "upstream_reply": upstream_reply,
        "copies": copies,
        "outcome": outcome,
    }


def consent(
    recipient: str, basis: str, *, at: datetime = DAY, topic: str = "*", record: dict[str, Any] | None = None
) -> dict[str, Any]:
    allowed = basis in ("opt_in", "soft_opt_in")
    result: dict[str, Any] = {
        "policy": "consent",
        "stage": "rcpt",
        "action": "accept" if allowed else "reject",
        "mode": "enforce",
        "reason": f"{basis}: because",
        "recipient": recipient,
        "evidence": {"basis": basis, "allowed": allowed, "recipient": recipient, "topic": topic,
                     "sender": "shop.example", "at": at.isoformat().replace("+00:00", "Z")},
    }  # fmt: skip
    if record is not None:
        result["evidence"]["record"] = record
    if not allowed:
        result["reply"] = f"550 5.7.1 <{recipient}>: {basis}"
    return result


FATES = [
    pytest.param(line(recipients=("a@x.example", "b@x.example")), [("a@x.example", "delivered"), ("b@x.example", "delivered")], id="whole-message"),
    pytest.param(
        line(recipients=("a@x.example", "b@x.example", "c@x.example"), copies={
            "a@x.example": {"fate": "delivered", "reply": "250 ok"},
            "b@x.example": {"fate": "queued", "reply": "451 4.3.0 later", "queue_id": 3},
            "c@x.example": {"fate": "refused", "reply": "550 5.1.1 unknown", "reported": True}}),
        [("a@x.example", "delivered"), ("b@x.example", "delivered"), ("c@x.example", "refused_upstream")],
        id="copies-queued-counts-as-sent",
    ),
    pytest.param(
        line(recipients=("a@x.example", "b@x.example"), copies={
            "a@x.example": {"fate": "delivered", "reply": "250 ok"},
            "b@x.example": {"fate": "refused", "reply": "550 5.7.1 no consent", "reported": True}},
            policies=[consent("b@x.example", "none")]),
        [("a@x.example", "delivered"), ("b@x.example", "refused_policy")],
        id="copy-held-by-a-policy",
    ),
    pytest.param(
        line(outcome="refused", upstream_reply=None, policies=[
            {"policy": "unsubscribe", "stage": "message", "action": "reject", "mode": "enforce", "reason": "no link", "decided": True}]),
        [("ann@example.org", "refused_policy")],
        id="message-stage-refusal",
    ),
    pytest.param(line(outcome="refused", upstream_reply="554 5.7.1 spam"), [("ann@example.org", "refused_upstream")], id="upstream-refused-data"),
    pytest.param(
        line(outcome="tempfailed", upstream_reply=None, policies=[
            {"policy": "pause", "stage": "mail", "action": "tempfail", "mode": "enforce", "reason": "bounces: 9 of 40"}]),
        [("ann@example.org", "pending")],
        id="paused-is-pending",
    ),
    pytest.param(
        line(policies=[{"policy": "consent", "stage": "rcpt", "action": "reject", "mode": "monitor", "reason": "none: x",
                        "recipient": "ann@example.org"}]),
        [("ann@example.org", "delivered")],
        id="monitor-mode-is-no-refusal",
    ),
    pytest.param(
        line(recipients=(), refused={"bob@example.org": "550 5.1.1 no such user"}, outcome="abandoned"),
        [("bob@example.org", "refused_upstream")],
        id="refused-at-rcpt-by-upstream",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("entry", "expected"), FATES)
def test_recipient_fates(entry: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert [(f.recipient, f.fate) for f in recipient_fates(entry)] == expected


def optout(
    subject: str = "ann@example.org",
    *,
    at: datetime = DAY,
    kind: str = OPTED_OUT,
    topic: str = "*",
    method: str = "one_click",
    subject_kind: str = "address",
    record: int = 7,
) -> ConsentEvent:
    return ConsentEvent(kind, subject_kind, subject, at, method, topic=topic, id=record,
                        recorded_at=at + timedelta(minutes=5))  # fmt: skip


LATER = DAY + timedelta(hours=1)
OPT_IN_RECORD_BEFORE = {"id": 1, "method": "web_form", "effective_at": "2026-11-01T00:00:00Z"}
OPT_IN_RECORD_AFTER = {"id": 9, "method": "web_form", "effective_at": "2026-11-20T00:30:00Z"}

FOLLOW = [
    pytest.param(optout(), line(at=LATER, recipients=(), refused={"ann@example.org": "550 5.7.1 x"},
                                policies=[consent("ann@example.org", "opted_out", at=LATER)], outcome="abandoned"), "refused", id="refused"),
    pytest.param(optout(), line(at=LATER, outcome="refused", upstream_reply=None, policies=[
        {"policy": "unsubscribe", "stage": "message", "action": "reject", "mode": "enforce", "reason": "no link", "decided": True}]),
        "refused_other", id="refused-by-another-policy"),
    pytest.param(optout(), line(at=LATER, policies=[consent("ann@example.org", "opt_in", at=LATER, record=OPT_IN_RECORD_AFTER)]),
                 "renewed_consent", id="opted-in-again"),
    pytest.param(optout(), line(at=LATER, policies=[consent("ann@example.org", "opt_in", at=LATER, record=OPT_IN_RECORD_BEFORE)]),
                 "not_honoured", id="delivered-on-the-old-consent"),
    pytest.param(optout(), line(at=LATER), "not_honoured", id="delivered-without-consent-check"),
    pytest.param(optout(topic="news"), line(at=LATER, policies=[consent("ann@example.org", "opt_in", at=LATER, topic="deals",
                                                                       record=OPT_IN_RECORD_BEFORE)]), None, id="other-topic"),
    pytest.param(optout("example.org", subject_kind=DOMAIN), line(at=LATER), "not_honoured", id="domain-opt-out"),
    pytest.param(optout(kind=SUPPRESSED, method="hard_bounce"), line(at=LATER, recipients=(), refused={"ann@example.org": "550"},
                 policies=[consent("ann@example.org", "suppressed", at=LATER)], outcome="abandoned"), "refused", id="suppression"),
    pytest.param(optout(), line(at=DAY - timedelta(hours=1)), None, id="message-before-the-opt-out"),
    pytest.param(optout(), line(at=LATER, klass="transactional"), None, id="transactional-is-not-followed"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "entry", "result"), FOLLOW)
def test_an_opt_out_is_followed_to_the_next_commercial_message(
    event: ConsentEvent, entry: dict[str, Any], result: str | None
) -> None:
    report = ComplianceReport(PERIOD)
    report.add_consent_events([event, ConsentEvent(OPTED_IN, "address", "ann@example.org", DAY, "web_form", id=1)])
    report.add(entry)
    (followed,) = report.as_dict()["opt_outs"]["events"]
    assert (followed["next_message"] or {}).get("result") == result
    assert followed["honoured"] == (None if result is None else result != "not_honoured")
    assert followed["lag_seconds"] == 300.0


def test_only_the_first_message_after_an_opt_out_is_judged() -> None:
    report = ComplianceReport(PERIOD)
    report.add_consent_events([optout()])
    report.add(line(at=LATER, txn="first", recipients=(), refused={"ann@example.org": "550"}, outcome="abandoned",
                    policies=[consent("ann@example.org", "opted_out", at=LATER)]))  # fmt: skip
    report.add(line(at=LATER + timedelta(hours=1), txn="second"))
    (followed,) = report.as_dict()["opt_outs"]["events"]
    assert followed["next_message"]["txn"] == "first" and followed["honoured"] is True


RATES = [
    # tried, hard bounces, delivered, complaints -> bounce status, complaint status
    pytest.param(1000, 10, 990, 0, "ok", "ok", id="clean"),
    pytest.param(1000, 60, 940, 2, "watch", "watch", id="above-target"),
    pytest.param(1000, 100, 900, 3, "over", "over", id="at-the-limit"),
    pytest.param(1000, 20, 900, 0, "ok", "ok", id="other-upstream-refusals-count-as-tried"),
    pytest.param(10, 5, 5, 1, "over_low_volume", "over_low_volume", id="low-volume"),
    pytest.param(0, 0, 0, 0, None, None, id="nothing-sent"),
]


@pytest.mark.parametrize(("tried", "bounced", "delivered", "complaints", "bounce", "complaint"), RATES)
def test_rates_against_the_thresholds(
    tried: int, bounced: int, delivered: int, complaints: int, bounce: str | None, complaint: str | None
) -> None:
    report = ComplianceReport(PERIOD)
    report.add_consent_events(
        ConsentEvent(OPTED_OUT, "address", f"c{i}@example.org", DAY, "complaint", sender="shop.example", id=i)
        for i in range(complaints)
    )
    for i in range(delivered):
        report.add(line(recipients=(f"r{i}@example.org",), policies=[consent(f"r{i}@example.org", "opt_in")]))
    for i in range(bounced):
        report.add(line(recipients=(), refused={f"d{i}@example.org": "550 5.1.1 unknown"}, outcome="abandoned"))
    for i in range(tried - delivered - bounced):
        report.add(line(recipients=(), refused={f"f{i}@example.org": "550 5.7.1 policy"}, outcome="abandoned"))
    rows = {r["sender_domain"]: r for r in report.as_dict()["rates"]}
    if bounce is None:
        assert "shop.example" not in rows or rows["shop.example"]["bounce_status"] == "no_data"
        return
    assert (rows["shop.example"]["bounce_status"], rows["shop.example"]["complaint_status"]) == (bounce, complaint)


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [
        ("2026-11-01", "2026-11-30", "2026-11-30T23:59:59Z", "2026-12-01T00:00:00Z"),
        ("2026-11-01T12:00:00Z", "2026-11-01T13:00:00Z", "2026-11-01T12:00:00Z", "2026-11-01T13:00:00Z"),
        ("2026-11-01T12:00:00+01:00", "2026-11-02", "2026-11-01T11:00:00Z", "2026-11-01T10:59:59Z"),
    ],
)
def test_period_bounds(start: str, end: str, inside: str, outside: str) -> None:
    period = Period.parse(start, end)
    assert datetime.fromisoformat(inside.replace("Z", "+00:00")) in period
    assert datetime.fromisoformat(outside.replace("Z", "+00:00")) not in period


@pytest.mark.parametrize(
    ("reason", "normalized"),
    [
        ("opted_out: the recipient opted out on 2026-11-02 (topic *, sender *, one_click; record #12)",
         "opted_out: the recipient opted out on <date> (topic *, sender *, one_click; record #…)"),
        ("none: no recorded consent for <bob@example.org>", "none: no recorded consent for <address>"),
        ("42 recipients over 30/min", "N recipients over N/min"),
    ],
)  # fmt: skip
def test_refusal_reasons_group_by_cause(reason: str, normalized: str) -> None:
    assert normalize_reason(reason) == normalized


def test_rotated_files_are_read_oldest_first_and_damage_is_skipped(tmp_path: Path) -> None:
    live = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.2").write_text(json.dumps(line(txn="oldest")) + "\n")
    (tmp_path / "audit.jsonl.1").write_bytes(json.dumps(line(txn="older")).encode() + b'\n{"time": "cut sh\n\xff\xfe\n')
    live.write_text(json.dumps(line(txn="newest")) + "\n[1, 2]\n\n" + json.dumps({"no": "time"}) + "\n")
    (tmp_path / "audit.jsonl.bak").write_text("not a rotation\n")
    assert [p.name for p in rotated_files(live)] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    files = AuditFiles.at(live)
    assert [entry["txn"] for entry in files] == ["oldest", "older", "newest"]
    assert (files.lines_read, files.lines_skipped) == (7, 4)


def test_pauses_are_counted_by_cause() -> None:
    report = ComplianceReport(PERIOD)
    for minutes, reason in (
        (0, "bounces: 9 of 40 hard-bounced"),
        (30, "bounces: 12 of 50 hard-bounced"),
        (10, "blocklist: listed"),
    ):
        report.add(line(at=DAY + timedelta(minutes=minutes), outcome="tempfailed", upstream_reply=None, policies=[
            {"policy": "pause", "stage": "mail", "action": "tempfail", "mode": "enforce", "reason": reason}]))  # fmt: skip
    pauses = report.as_dict()["pauses"]
    assert [(p["source"], p["transactions"]) for p in pauses] == [("bounces", 2), ("blocklist", 1)]
    assert pauses[0]["first"].startswith("2026-11-20T00:00") and pauses[0]["last"].startswith("2026-11-20T00:30")


def test_outside_text_stays_text_in_html_and_csv() -> None:
    hostile = '"><script>alert(1)</script>@evil.example'
    report = ComplianceReport(PERIOD)
    report.add_consent_events([optout(hostile)])
    report.add(line(at=LATER, recipients=(), refused={hostile: "550 =HYPERLINK(\"http://evil\")"}, outcome="abandoned",
                    policies=[consent(hostile, "opted_out", at=LATER)]))  # fmt: skip
    data = report.as_dict()
    html = render(data, "html")
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    rows = list(csv.reader(io.StringIO(render(data, "csv"))))
    assert rows[0] == ["section", "key", "detail", "value"]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


@pytest.mark.parametrize(
    ("delivered_before", "sender", "domain"),
    [
        pytest.param(DAY - timedelta(days=3), "*", "shop.example", id="the-last-mail-before-it"),
        pytest.param(None, "*", "*", id="no-mail-found"),
        pytest.param(None, "other.example", "other.example", id="named-by-the-report"),
        pytest.param(DAY + timedelta(hours=1), "*", "*", id="mail-after-the-complaint-is-not-its-cause"),
    ],
)
def test_a_complaint_counts_against_the_sender_complained_about(
    delivered_before: datetime | None, sender: str, domain: str
) -> None:
    report = ComplianceReport(PERIOD)
    event = ConsentEvent(OPTED_OUT, "address", "ann@example.org", DAY, "complaint", sender=sender, id=3)
    report.add_consent_events([event])
    if delivered_before is not None:
        report.add(line(at=delivered_before, policies=[consent("ann@example.org", "opt_in", at=delivered_before)]))
    rows = {r["sender_domain"]: r["complaints"] for r in report.as_dict()["rates"]}
    assert rows[domain] == 1 and sum(rows.values()) == 1


def pause_line(at: datetime, until: datetime, scope: str = "class", value: str = "commercial",
               source: str = "blocklist:zen") -> dict[str, Any]:  # fmt: skip
    return {"time": stamp(at), "event": "pause", "scope": scope, "value": value, "class": "commercial",
            "until": stamp(until), "reason": f"{value} paused", "source": source}  # fmt: skip


def test_pauses_that_held_no_mail_are_shown_when_they_held_in_the_period() -> None:
    start = PERIOD.start
    report = ComplianceReport(PERIOD, sender_domain="shop.example")
    report.add(pause_line(start - timedelta(hours=2), start + timedelta(hours=1)))  # set before, held into it
    report.add(pause_line(start - timedelta(days=2), start - timedelta(days=1), source="old"))  # over before
    report.add(pause_line(DAY, DAY + timedelta(hours=1), "sender", "other.example", "backoff:x"))  # another sender
    report.add(pause_line(DAY, DAY + timedelta(hours=1), "sender", "shop.example", "bounces"))
    report.add(pause_line(DAY + timedelta(minutes=40), DAY + timedelta(hours=2), "sender", "shop.example", "bounces"))
    report.add(line(at=DAY + timedelta(minutes=5), outcome="tempfailed", upstream_reply=None, policies=[
        {"policy": "pause", "stage": "mail", "action": "tempfail", "mode": "enforce",
         "reason": "bounces: 9 of 40 hard-bounced"}]))  # fmt: skip
    pauses = {p["source"]: p for p in report.as_dict()["pauses"]}
    assert set(pauses) == {"blocklist:zen", "bounces"}
    zen, bounces = pauses["blocklist:zen"], pauses["bounces"]
    assert (zen["transactions"], zen["set"], zen["paused"], zen["first"]) == (0, 1, "class:commercial", None)
    assert zen["until"] == "2026-11-01T01:00:00Z" and zen["reason"] == "commercial paused"
    assert (bounces["transactions"], bounces["set"], bounces["until"]) == (1, 2, "2026-11-20T02:00:00Z")
    assert bounces["reason"] == "bounces: 9 of 40 hard-bounced", "a held transaction's words are the example"
    rows = list(csv.reader(io.StringIO(render(report.as_dict(), "csv"))))
    assert ["pause", "blocklist:zen", "transactions", "0"] in rows


def test_erasures_are_shown_without_whom_and_their_next_message_is_followed() -> None:
    from proxy.report.redact import Redactor
    from proxy.stores.consent_events import erasure_subject

    key = b"k" * 32
    tombstone = erasure_subject(key, "ann@example.org")
    erasure = ConsentEvent(SUPPRESSED, "address", tombstone, DAY, "erasure", id=12, recorded_at=DAY,
                           subject_original="erased", note="requested via admin",
                           reason="erased on request (AVG art. 17): the personal data of 3 earlier event(s) removed")  # fmt: skip
    report = ComplianceReport(PERIOD, erasure_key=key)
    report.add_consent_events([erasure])
    refusal = "550 5.7.1 <Ann@Example.org>: address suppressed"
    report.add(line(at=LATER, recipients=(), refused={"Ann@Example.org": refusal}, outcome="abandoned",
                    policies=[consent("Ann@Example.org", "suppressed", at=LATER)]))  # fmt: skip
    data = report.as_dict()
    assert data["erasures"] == {"total": 1, "events": [{"record": 12, "at": "2026-11-20T00:00:00Z", "events_erased": 3,
                                "requested": "requested via admin",
                                "commercial_mail": "refused (suppression under the keyed hash)"}]}  # fmt: skip
    (track,) = data["opt_outs"]["events"]
    assert track["subject"] == tombstone and track["next_message"]["result"] == "refused"
    assert "ann@example.org" in json.dumps(data).lower(), "the audit log's reply still names her"
    scrubbed = Redactor(key, [tombstone]).scrub(data)
    assert "ann@example.org" not in json.dumps(scrubbed).lower()
    assert "<[erased]>: address suppressed" in json.dumps(scrubbed)
    # Without the key nothing is matched (and nothing can be redacted): the report says so by
    # leaving the erasure's next message open.
    blind = ComplianceReport(PERIOD)
    blind.add_consent_events([erasure])
    blind.add(line(at=LATER, recipients=(), refused={"Ann@Example.org": refusal}, outcome="abandoned",
                   policies=[consent("Ann@Example.org", "suppressed", at=LATER)]))  # fmt: skip
    assert blind.as_dict()["opt_outs"]["events"][0]["next_message"] is None
