"""Complaint feedback loops through a real running sendguard: abuse reports (ARF, RFC 5965) as
Yahoo/AOL, Microsoft (JMRP) and an ISP send them, delivered over SMTP to the unsubscribe mailto
listener; the recipient is opted out, the next commercial message to them refused, and a
sender whose complaint rate reaches the threshold has its commercial mail paused.

The reports are written in the shape those programs use (the report part's fields, the
original attached whole or as headers, the recipient redacted where they redact it); they are
not captured mail.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from proxy.reputation.dkim import generate_private_key, write_private_key
from proxy.stores.consent import OPTED_IN, OPTED_OUT, new_event
from tests.conftest import Proxy
from tests.fakes import FakeUpstream
from tests.unsubscribe.harness import Relay, start_relay
from tests.unsubscribe.test_end_to_end import newsletter
from tests.unsubscribe.test_erasure_relay import send

ProxyFactory = Callable[..., Awaitable[Proxy]]
FBL = "fbl@shop.example"


def relayed_headers(content: bytes, *, redact_to: bool) -> str:
    """The header block of a message as the provider received it (CRLF), To redacted or not."""
    head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    if redact_to:
        lines = [("To: redacted@yahoo.com" if line.lower().startswith("to:") else line) for line in head.split("\r\n")]
        head = "\r\n".join(lines)
    return head


def yahoo_report(original: bytes) -> bytes:
    """Yahoo/AOL Complaint Feedback Loop: no Original-Rcpt-To, the recipient redacted in the
    attached original; only sendguard's opaque one-click token is left to name them."""
    attached = relayed_headers(original, redact_to=True) + "\r\n\r\n" + original.split(b"\r\n\r\n", 1)[1].decode()
    return (
        "Return-Path: <>\r\n"
        "From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.com>\r\n"
        f"To: {FBL}\r\n"
        "Subject: FW: Winter sale\r\n"
        "Date: Thu, 03 Dec 2026 10:14:02 +0000\r\n"
        "Message-ID: <1701598442.7727@arf.mail.yahoo.com>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="----=_Part_4417_1"\r\n'
        "\r\n"
        "------=_Part_4417_1\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "This is an email abuse report for an email message received from IP 192.0.2.25 on "
        "Thu, 03 Dec 2026 10:02:11 +0000.\r\n"
        "For more information about this format please see http://www.mipassoc.org/arf/.\r\n"
        "\r\n"
        "------=_Part_4417_1\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: Yahoo!-Mail-Feedback/2.0\r\n"
        "Version: 0.1\r\n"
        "Original-Mail-From: <news@shop.example>\r\n"
        "Arrival-Date: Thu, 03 Dec 2026 10:02:11 +0000\r\n"
        "Source-IP: 192.0.2.25\r\n"
        "Reported-Domain: shop.example\r\n"
        "Authentication-Results: mta1001.mail.gq1.yahoo.com  from=shop.example; domainkeys=neutral; "
        "from=shop.example; dkim=pass (ok)\r\n"
        "\r\n"
        "------=_Part_4417_1\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n" + attached + "\r\n"
        "------=_Part_4417_1--\r\n"
    ).encode()


def microsoft_report(recipient: str) -> bytes:
    """Microsoft JMRP style: the original attached whole (an older message without one-click
    headers), the recipient in Original-Rcpt-To."""
    return (
        "From: staff@hotmail.com\r\n"
        f"To: {FBL}\r\n"
        "Subject: complaint about message from 192.0.2.25\r\n"
        "Date: Thu, 03 Dec 2026 11:20:31 -0800\r\n"
        "Message-ID: <JMRP-2026120311203100@hotmail.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=feedback-report;\r\n"
        '\tboundary="--JMRP_BOUNDARY_0001"\r\n'
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        "\r\n"
        "----JMRP_BOUNDARY_0001\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "This is an email abuse report for an email message received from IP 192.0.2.25.\r\n"
        "\r\n"
        "----JMRP_BOUNDARY_0001\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: Microsoft Junk Mail Reporting Program/1.0\r\n"
        "Version: 1\r\n"
        "Original-Mail-From: <news@shop.example>\r\n"
        f"Original-Rcpt-To: <{recipient}>\r\n"
        "Source-IP: 192.0.2.25\r\n"
        "Arrival-Date: Thu, 03 Dec 2026 19:18:02 +0000\r\n"
        "\r\n"
        "----JMRP_BOUNDARY_0001\r\n"
        "Content-Type: message/rfc822\r\n"
        "Content-Disposition: inline\r\n"
        "\r\n"
        "From: Shop <news@shop.example>\r\n"
        "To: xxxxxxxxxx@hotmail.com\r\n"
        "Subject: Autumn sale\r\n"
        "Message-ID: <autumn-1@shop.example>\r\n"
        "Date: Mon, 02 Nov 2026 09:00:00 +0000\r\n"
        "\r\n"
        "Big deals!\r\n"
        "\r\n"
        "----JMRP_BOUNDARY_0001--\r\n"
    ).encode()


def isp_headers_report(recipient: str, feedback_type: str = "abuse") -> bytes:
    """A smaller provider: the original's header only (text/rfc822-headers), its To intact."""
    return (
        "From: abuse-reports@isp.example\r\n"
        f"To: {FBL}\r\n"
        "Subject: Abuse report\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type="feedback-report"; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "A user marked the message below as spam.\r\n"
        "--b1\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        f"Feedback-Type: {feedback_type}\r\n"
        "User-Agent: ISP-FBL/1.0\r\n"
        "Version: 1\r\n"
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "Return-Path: <news@shop.example>\r\n"
        "From: Shop <news@shop.example>\r\n"
        f"To: {recipient}\r\n"
        "Subject: Winter sale\r\n"
        "\r\n"
        "--b1--\r\n"
    ).encode()


@pytest.fixture
async def relay(proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Relay]:
    key = tmp_path / "dkim-ed25519.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    extra = {
        "dkim": {
            "keys": [{"domain": "shop.example", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}]
        },
        # A small threshold volume, so that a handful of test messages make a rate.
        "complaints": {"address": FBL, "min_recipients": 4, "rate_threshold": 0.2},
    }
    async for running in start_relay(proxy_factory, upstream.address, tmp_path, extra=extra):
        yield running


async def report(relay: Relay, content: bytes, rcpt: str = FBL) -> tuple[int, str]:
    servers = relay.proxy.app.unsubscribe_servers
    assert servers is not None and servers.mailto_bound is not None
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=servers.mailto_bound[1], start_tls=False, timeout=20)
    await client.connect()
    try:
        # Reports come from the null sender (MAIL FROM:<>), as automatic mail does.
        _, reply = await client.sendmail("", [rcpt], content)
    except aiosmtplib.SMTPRecipientsRefused as error:
        (refusal,) = error.recipients
        return refusal.code, refusal.message
    except aiosmtplib.SMTPResponseException as error:
        return error.code, error.message
    finally:
        client.close()
    return 250, reply


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[bytes], bytes]  # from the message bob received
    found_by: str


CASES = [
    Case("yahoo-cfl-redacted-token", yahoo_report, "token"),
    Case("microsoft-jmrp-original-rcpt-to", lambda _: microsoft_report("bob@example.org"), "original-rcpt-to"),
    Case("isp-rfc822-headers-to", lambda _: isp_headers_report("bob@example.org"), "to"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_a_complaint_opts_the_recipient_out(case: Case, relay: Relay, upstream: FakeUpstream) -> None:
    for address in ("bob@example.org", "carol@example.org"):
        await relay.store.add(
            new_event(OPTED_IN, address, method="web_form", topic="newsletter", sender="shop.example")
        )
    code, _ = await send(relay, newsletter("bob@example.org"), ["bob@example.org"])
    assert code == 250
    received = upstream.messages[-1].content

    code, text = await report(relay, case.build(received))
    assert code == 250 and "Complaint recorded" in text, text
    (opt_out,) = [e for e in await relay.store.history("bob@example.org") if e.kind == OPTED_OUT]
    assert (opt_out.method, opt_out.topic, opt_out.sender) == ("complaint", "*", "*")
    assert opt_out.note is not None and f"recipient found by {case.found_by}" in opt_out.note

    code, text = await send(relay, newsletter("bob@example.org", "Next sale"), ["bob@example.org"])
    assert code == 550 and "opted out" in text
    registry = relay.proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_complaints_total", {"outcome": "recorded"}) == 1
    assert not (await relay.proxy.app.runtime.pauses.active()), "1 complaint among 2 recipients: below the volume"


async def test_the_complaint_rate_pauses_the_senders_commercial_mail(relay: Relay, upstream: FakeUpstream) -> None:
    people = [f"p{i}@example.org" for i in range(5)]
    for address in people:
        await relay.store.add(
            new_event(OPTED_IN, address, method="web_form", topic="newsletter", sender="shop.example")
        )
    for address in people[:4]:
        assert (await send(relay, newsletter(address), [address]))[0] == 250
    pauses = relay.proxy.app.runtime.pauses
    # 1 of 4 recipients complained: 25%, at or above the configured 20%.
    code, _ = await report(relay, yahoo_report(upstream.messages[0].content))
    assert code == 250
    (pause,) = await pauses.active()
    assert (pause.scope, pause.value, pause.source) == ("sender", "shop.example", "complaints")
    assert "1 complaint(s) about mail from shop.example among its last 4 recipients" in pause.reason
    code, text = await send(relay, newsletter(people[4]), [people[4]])
    assert code == 451 and "Commercial mail from shop.example is paused" in text, text
    registry = relay.proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_complaint_pauses_total") == 1


@pytest.mark.parametrize(
    ("content", "outcome", "reply"),
    [
        (isp_headers_report("bob@example.org", "not-spam"), "not_abuse", "nothing to record"),
        (isp_headers_report("redacted"), "no_recipient", "no recipient found"),
    ],
    ids=["not-spam", "no-recipient"],
)
async def test_other_reports_are_acknowledged_and_change_nothing(
    relay: Relay, content: bytes, outcome: str, reply: str
) -> None:
    code, text = await report(relay, content)
    assert code == 250 and reply in text
    assert await relay.store.count() == 0
    registry = relay.proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_complaints_total", {"outcome": outcome}) == 1


async def test_reports_to_the_unsubscribe_address_count_too_and_strangers_are_refused(relay: Relay) -> None:
    code, text = await report(relay, isp_headers_report("bob@example.org"), rcpt="unsubscribe@shop.example")
    assert code == 250 and "Complaint recorded" in text
    code, _ = await report(relay, isp_headers_report("carol@example.org"), rcpt="someone@shop.example")
    assert code == 550
    parsed = email.message_from_bytes(isp_headers_report("x@example.org"), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
