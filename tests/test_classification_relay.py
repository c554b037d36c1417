"""Commercial-mail detection through the running proxy: a promotion without list headers is
refused for lack of consent with a reply that says why it was judged commercial; a
transactional declaration from an unnamed sender is not believed; a named sender's
declaration on clearly commercial mail is refused; monitor mode decides nothing; receipts
flow; every decision is explained in the audit line and counted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.stores.consent import new_event
from tests.conftest import Proxy, eventually, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]

PROMOTION = (
    "From: Winkel De Hoek <info@dehoek.example>\r\nTo: klant@example.org\r\nSubject: Zomeractie: 25% korting\r\n"
    "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <promo-1@dehoek.example>\r\nX-Mailer: Microsoft Outlook 16.0\r\n"
    "{extra}\r\n"
    "Beste klant,\r\n\r\nAlleen dit weekend: 25% korting op alle tuinmeubelen en gratis bezorging vanaf 50 euro.\r\n"
    "Bestel nu in onze webwinkel. Op = op!\r\n\r\nAfmelden? https://dehoek.example/afmelden?u=klant\r\n"
)
RECEIPT = (
    b"From: De Hoek <bestellingen@dehoek.example>\r\nTo: klant@example.org\r\nSubject: Bevestiging bestelling 2024-88113"
    b"\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <order-1@dehoek.example>\r\n\r\n"
    b"Bedankt voor je bestelling!\r\nBestelnummer: 2024-88113\r\n1x Tuinstoel   EUR 49,95\r\nTotaal EUR 49,95 (incl. btw)"
    b"\r\nJe ontvangt een e-mail zodra je pakket is verzonden.\r\n"
)


def promotion(extra: str = "") -> bytes:
    return PROMOTION.format(extra=extra).encode()


def compliance(tmp_path: Path, classes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stores": {"consent": {"backend": "sqlite", "path": str(tmp_path / "consent.db")}},
        "policies": [{"name": "required_headers"}, {"name": "unsubscribe"}, {"name": "consent"}],
        **({"classes": classes} if classes is not None else {}),
    }


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.app.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_promotion_without_list_headers_needs_consent_and_the_reply_says_why(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, compliance(tmp_path))
    code, text = await submit(proxy.port, promotion(), sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 550
    assert text.startswith("5.7.1 ")
    assert "consent" in text
    assert "judged commercial: score " in text and "korting" in text
    assert "as transactional" not in text  # no hint how to skip the checks
    assert upstream.messages == []
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class"] == "commercial"
    reason = audit["class_reason"]
    assert reason["source"] == "detector" and reason["decided_by"] == "promotion"
    assert reason["score"] >= 4 and any(s.startswith("discount (25% korting") for s in reason["signals"])
    assert sample(proxy, "sendguard_classifications_total", **{"class": "commercial", "decided_by": "promotion"}) == 1
    assert sample(proxy, "sendguard_detector_verdicts_total", verdict="commercial", mode="enforce") == 1


async def test_a_receipt_flows_without_consent(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, compliance(tmp_path))
    code, _ = await submit(proxy.port, RECEIPT, sender="bestellingen@dehoek.example", recipients=["klant@example.org"])
    assert code == 250
    assert len(upstream.messages) == 1
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class"] == "transactional"
    assert audit["class_reason"]["decided_by"] == "transactional"
    assert (
        sample(proxy, "sendguard_classifications_total", **{"class": "transactional", "decided_by": "transactional"})
        == 1
    )
    assert (
        sample(proxy, "sendguard_recipients_total", listener="local", outcome="delivered", **{"class": "transactional"})
        == 1
    )


async def test_a_transactional_declaration_from_loopback_is_not_believed(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, compliance(tmp_path))
    declared = promotion("X-Sendguard-Class: transactional\r\n")
    code, text = await submit(proxy.port, declared, sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 550 and "consent" in text
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class"] == "commercial"
    assert audit["class_reason"]["declared"].endswith("not believed (sender not trusted)")


async def test_a_named_senders_declaration_on_clearly_commercial_mail_is_refused(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    classes = {"header": {"trusted_listeners": ["local"]}}
    proxy = await proxy_factory(upstream.address, compliance(tmp_path, classes))
    declared = promotion("X-Sendguard-Class: transactional\r\n")
    code, text = await submit(proxy.port, declared, sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 550
    assert text.startswith(
        "5.7.1 declared transactional (X-Sendguard-Class header), but the message reads as commercial"
    )
    assert upstream.messages == []
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class_reason"]["declared_transactional"] == "refuse"
    assert sample(proxy, "sendguard_declared_transactional_total", action="refuse") == 1
    # A receipt with the same declaration is believed and relayed, the header removed.
    code, _ = await submit(
        proxy.port, b"X-Sendguard-Class: transactional\r\n" + RECEIPT, recipients=["klant@example.org"]
    )
    assert code == 250
    assert b"X-Sendguard-Class" not in upstream.messages[-1].content


async def test_monitor_mode_logs_what_it_would_decide_and_lets_the_rules_decide(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, compliance(tmp_path, {"detector": {"mode": "monitor"}}))
    code, _ = await submit(proxy.port, promotion(), sender="info@dehoek.example", recipients=["klant@example.org"])
    assert code == 250  # enforcement unchanged: no rule says commercial, the default is transactional
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class"] == "transactional"
    reason = audit["class_reason"]
    assert (reason["source"], reason["verdict"], reason["mode"]) == ("default", "commercial", "monitor")
    assert sample(proxy, "sendguard_detector_verdicts_total", verdict="commercial", mode="monitor") == 1
    assert sample(proxy, "sendguard_classifications_total", **{"class": "transactional", "decided_by": "default"}) == 1


async def test_a_promotion_reaches_who_consented_and_the_others_are_reported(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Issue 14: the class is known only after DATA, so consent is judged then; the recipient
    with consent gets the message, the one without is refused and reported to the sender."""
    proxy = await proxy_factory(upstream.address, compliance(tmp_path))
    store = proxy.app.runtime.consent
    assert store is not None
    await store.add(new_event("opted_in", "klant@example.org", method="web_form", source="https://dehoek.example/"))
    recipients = ["klant@example.org", "buurman@example.org"]
    code, text = await submit(proxy.port, promotion(), sender="info@dehoek.example", recipients=recipients)
    assert code == 250, text
    assert "1 refused, reported to the sender" in text
    assert [m.rcpt_tos for m in upstream.messages if m.rcpt_tos != ["info@dehoek.example"]] == [["klant@example.org"]]
    assert await eventually(lambda: any(m.rcpt_tos == ["info@dehoek.example"] for m in upstream.messages))
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["copies"]["buurman@example.org"]["fate"] == "refused"
