"""The report and the evidence pack from the audit log of a real running sendguard, and its
real consent store (SQLite, and PostgreSQL where it runs): commercial mail with and without
consent, a hard bounce from the upstream, transactional mail, an opt-out honoured at the next
message, and an opt-out recorded too late to stop a delivery (flagged)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.main import main
from proxy.stores.consent import OPTED_IN, OPTED_OUT, ConsentStoreConfig, new_event, open_consent_store
from tests.conftest import Proxy, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.services import PostgresTarget

ProxyFactory = Callable[..., Awaitable[Proxy]]
NEWS = "news@shop.example"


def commercial(subject: str) -> bytes:
    return message(subject, "Our autumn offers.", sender=NEWS)


@pytest.fixture(params=["sqlite", "postgres"])
def consent_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "postgres":
        target: PostgresTarget = request.getfixturevalue("postgres_target")
        return {"backend": "postgres", "dsn": target.dsn}
    return {"backend": "sqlite", "path": str(tmp_path / "consent.db")}


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The command as a user runs it (its own event loop: in a thread, beside the test's)."""
    assert await asyncio.to_thread(main, ["report", *argv]) == 0
    return capsys.readouterr().out


async def test_report_and_evidence_pack_from_a_running_proxy(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: ProxyFactory,
    consent_section: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"dead@example.org": "550 5.1.1 no such user"}))
    proxy = await proxy_factory(
        upstream.address,
        {
            "stores": {"consent": consent_section},
            "policies": [{"name": "required_headers"}, {"name": "consent", "topic_header": None}],
            "classes": {"rules": [{"class": "commercial", "mail_from": ["*@shop.example"]}]},
        },
    )
    store = await open_consent_store(ConsentStoreConfig(**consent_section))
    signed_up = datetime.now(UTC) - timedelta(hours=2)
    try:
        await store.add(
            new_event(OPTED_IN, "ann@example.org", method="web_form", source="https://shop.example/signup", ip="198.51.100.7"),
            new_event(OPTED_IN, "carl@example.org", method="double_opt_in", source="https://shop.example/signup",
                      at=signed_up, confirmed_at=signed_up + timedelta(minutes=3)),
            new_event(OPTED_IN, "dead@example.org", method="paper", source="fair 2026, box 3"),
        )  # fmt: skip
        recipients = ["ann@example.org", "bob@example.org", "dead@example.org", "carl@example.org"]
        assert (await submit(proxy.port, commercial("Offers 1"), sender=NEWS, recipients=recipients))[0] == 250
        assert (await submit(proxy.port, message("Receipt"), recipients=["bob@example.org"]))[0] == 250
        await store.add(new_event(OPTED_OUT, "ann@example.org", method="one_click"))
        code, text = await submit(proxy.port, commercial("Offers 2"), sender=NEWS, recipients=["ann@example.org"])
        assert code == 550 and "opted out" in text
        # Carl unsubscribed by replying a minute before the first mailing, but the reply was
        # only recorded now: the mailing reached him after his objection.
        await store.add(
            new_event(OPTED_OUT, "carl@example.org", method="reply", at=datetime.now(UTC) - timedelta(minutes=1))
        )
    finally:
        await store.close()
    await proxy.wait_audit(4)
    config = str(proxy.config_path)
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    report = json.loads(await run(capsys, "--config", config, "--from", today, "--to", today))
    assert report["format"] == "sendguard-report" and report["version"] == 1
    commercial_figures = report["commercial"]
    assert commercial_figures["messages"] == 1
    assert commercial_figures["recipient_deliveries"] == 2  # ann and carl
    assert commercial_figures["distinct_recipients"] == 2
    assert commercial_figures["recipients_refused"] == 3  # bob (no consent), dead (5.1.1), ann (opted out)
    assert commercial_figures["transactional_deliveries"] == 1
    assert report["basis"]["delivered"] == {"opt_in": 2}
    assert report["basis"]["refused"] == {"none": 1, "opted_out": 1}
    assert report["basis"]["opt_in_methods"] == {"web_form": 1, "double_opt_in": 1}
    assert report["basis"]["opt_in_evidence"] == {"source": 2, "confirmed_at": 1, "text_version": 0}
    refusals = {(r["policy"], r["reason"].split(":")[0]): r["recipients"] for r in report["refusals"]}
    assert refusals == {("consent", "none"): 1, ("consent", "opted_out"): 1, ("upstream", "550 5.1.1"): 1}
    rates = {r["sender_domain"]: r for r in report["rates"]}
    shop = rates["shop.example"]
    assert (shop["recipients_tried"], shop["hard_bounces"], shop["commercial_delivered"]) == (3, 1, 2)
    assert shop["bounce_status"] == "over_low_volume"
    opt_outs = report["opt_outs"]
    assert opt_outs["total"] == 2 and opt_outs["by_channel"] == {"reply": 1, "one_click": 1}
    events = {e["subject"]: e for e in opt_outs["events"]}
    assert events["ann@example.org"]["next_message"]["result"] == "refused"
    assert events["ann@example.org"]["honoured"] is True
    assert events["carl@example.org"]["next_message"]["result"] == "not_honoured"
    assert events["carl@example.org"]["honoured"] is False
    assert events["carl@example.org"]["lag_seconds"] >= 59
    assert opt_outs["not_honoured"] == 1

    # The same figures as CSV rows, and a sender domain that sent nothing commercial.
    rows = list(
        csv.DictReader(
            io.StringIO(await run(capsys, "--config", config, "--from", today, "--to", today, "--format", "csv"))
        )
    )
    assert {"section": "commercial", "key": "messages", "detail": "", "value": "1"} in rows
    assert {"section": "opt_out", "key": f"#{events['carl@example.org']['record']} carl@example.org",
            "detail": "result", "value": "not_honoured"} in rows  # fmt: skip
    other = json.loads(
        await run(capsys, "--config", config, "--from", today, "--to", today, "--sender-domain", "example.com")
    )
    assert other["commercial"]["messages"] == 0 and other["commercial"]["transactional_deliveries"] == 1

    pack = json.loads(await run(capsys, "--config", config, "--address", "Ann@Example.org"))
    assert pack["format"] == "sendguard-evidence" and pack["address"] == "ann@example.org"
    assert [e["event"] for e in pack["consent_history"]] == ["opted_in", "opted_out"]
    assert pack["consent_history"][0]["ip"] == "198.51.100.7"
    assert [(m["result"], m["basis"]) for m in pack["messages"]] == [
        ("delivered", "opt_in"),
        ("refused_policy", "opted_out"),
    ]
    assert pack["messages"][0]["record"]["source"] == "https://shop.example/signup"
    assert pack["opt_outs"][0]["refused_after"] == 1 and pack["opt_outs"][0]["not_honoured"] == 0
    assert pack["basis_now"]["basis"] == "opted_out"
    html = await run(capsys, "--config", config, "--address", "ann@example.org", "--format", "html")
    assert "Evidence pack: ann@example.org" in html and "https://shop.example/signup" in html
