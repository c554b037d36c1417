"""The whole loop through a real running sendguard: a newsletter relayed with each recipient's
own DKIM-signed one-click headers, a one-click POST as Gmail sends it, and the next commercial
message to that recipient refused at the proxy."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import aiosmtplib
import dkim
import pytest

from proxy.reputation.dkim import generate_private_key, write_private_key
from proxy.stores.consent import OPTED_IN, OPTED_OUT, new_event
from tests.conftest import Proxy, message
from tests.fakes import FakeUpstream
from tests.unsubscribe.harness import Relay, https_link, list_unsubscribe_uris, start_relay, token_of

ProxyFactory = Callable[..., Awaitable[Proxy]]
SENDER = "news@shop.example"


@pytest.fixture
async def relay(
    proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Relay]:
    key = tmp_path / "dkim-ed25519.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    dkim_keys = [{"domain": "shop.example", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}]
    async for running in start_relay(proxy_factory, upstream.address, tmp_path, extra={"dkim": {"keys": dkim_keys}}):
        yield running


def newsletter(to: str, subject: str = "Winter sale") -> bytes:
    return message(
        subject=subject,
        body="New shoes! Unsubscribe: https://shop.example/unsubscribe",
        sender=SENDER,
        to=to,
        extra="X-Sendguard-Topic: newsletter\r\n",
    )


async def send(relay: Relay, content: bytes, recipients: list[str]) -> tuple[int, str]:
    try:
        _, reply = await aiosmtplib.send(
            content,
            sender=SENDER,
            recipients=recipients,
            hostname="127.0.0.1",
            port=relay.proxy.port,
            start_tls=False,
            timeout=20,
        )
    except aiosmtplib.SMTPDataError as error:
        return error.code, error.message
    return 250, reply


def dkim_valid(relay: Relay, content: bytes) -> bool:
    records = {
        f"{k.config.selector}._domainkey.{k.config.domain}.": k.dns_record().encode()
        for k in relay.proxy.app.runtime.signer.keys
    }

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key if key.endswith(".") else key + ".")

    return bool(dkim.DKIM(content).verify(dnsfunc=dnsfunc))


async def test_the_whole_loop(relay: Relay, upstream: FakeUpstream) -> None:
    store = relay.store
    for address in ("bob@example.org", "carol@example.org"):
        await store.add(new_event(OPTED_IN, address, method="web_form", topic="newsletter", sender="shop.example"))

    code, text = await send(
        relay, newsletter("bob@example.org, carol@example.org"), ["bob@example.org", "carol@example.org"]
    )
    assert code == 250 and "2 separate copies" in text
    # The copies go out together (upstream.copy_concurrency), so in either order.
    assert sorted(m.rcpt_tos for m in upstream.messages) == [["bob@example.org"], ["carol@example.org"]]
    links = {}
    for received in upstream.messages:
        (recipient,) = received.rcpt_tos
        content = received.content
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        uris = list_unsubscribe_uris(content)
        assert uris[0].startswith("https://unsubscribe.shop.example/u/") and uris[1].startswith("mailto:")
        assert parsed["X-Sendguard-Topic"] is None, "the instruction header never leaves sendguard"
        token = relay.service.read(token_of(uris[0]))
        assert (token.recipient, token.sender, token.topic) == (recipient, "shop.example", "newsletter")
        # RFC 8058 section 4: a valid DKIM signature that covers both fields
        assert dkim_valid(relay, content)
        signed = re.search(r"h=([^;]+);", content.replace(b"\r\n ", b"").replace(b"\r\n\t", b"").decode())
        assert signed is not None
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= {n.strip().lower() for n in signed.group(1).split(":")}
        links[recipient] = https_link(content)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(
            relay.local(links["bob@example.org"]),
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        ) as response:
            assert response.status == 200

    (opt_out,) = [e for e in await store.history("bob@example.org") if e.kind == OPTED_OUT]
    assert (opt_out.method, opt_out.topic, opt_out.sender) == ("one_click", "newsletter", "shop.example")

    code, text = await send(relay, newsletter("bob@example.org", "Next sale"), ["bob@example.org"])
    assert code == 550
    assert text.startswith("5.7.1 the recipient opted out on ") and "one_click" in text
    assert "bob@example.org" in text
    assert len(upstream.messages) == 2, "nothing more reached the upstream"

    code, _ = await send(relay, newsletter("carol@example.org", "Next sale"), ["carol@example.org"])
    assert code == 250
    assert upstream.messages[-1].rcpt_tos == ["carol@example.org"]

    audit = await relay.proxy.wait_audit(4)
    unsubscribes = [line for line in audit if line.get("event") == "unsubscribe"]
    assert len(unsubscribes) == 1 and unsubscribes[0]["recipient"] == "bob@example.org"
    refused = [line for line in audit if line.get("outcome") == "rejected"]
    assert refused and refused[-1]["recipients"] == ["bob@example.org"]
    registry = relay.proxy.app.services.metrics.registry
    assert (
        registry.get_sample_value(
            "sendguard_unsubscribes_total", {"method": "one_click", "source": "https", "result": "recorded"}
        )
        == 1
    )


# ---- the footer remedy (policies/unsubscribe.py remedy: add_footer, proxy/smtp.py footers) ------------


@pytest.fixture
async def remedy_relay(
    proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Relay]:
    from policies.unsubscribe import UnsubscribePolicy

    monkeypatch.setitem(policies_registry(), "unsubscribe", UnsubscribePolicy)
    key = tmp_path / "dkim-ed25519.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    dkim_keys = [{"domain": "shop.example", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}]
    entries = [
        {"name": "required_headers"},
        {"name": "consent"},
        {"name": "unsubscribe", "require": ["body"], "remedy": "add_footer"},
        {"name": "list_unsubscribe"},
    ]
    async for running in start_relay(
        proxy_factory, upstream.address, tmp_path, policies=entries, extra={"dkim": {"keys": dkim_keys}}
    ):
        yield running


def policies_registry() -> dict[str, object]:
    import policies

    return policies.REGISTRY  # type: ignore[return-value]


async def test_a_missing_body_link_is_added_per_recipient(remedy_relay: Relay, upstream: FakeUpstream) -> None:
    from policies.message import ParsedMessage

    relay = remedy_relay
    for address in ("bob@example.org", "carol@example.org"):
        await relay.store.add(new_event(OPTED_IN, address, method="web_form", topic="offers", sender="shop.example"))
    content = message(
        subject="Offers", body="New shoes, no way out written here.", sender=SENDER,
        to="bob@example.org, carol@example.org", extra="X-Sendguard-Topic: offers\r\n",
    )  # fmt: skip
    code, text = await send(relay, content, ["bob@example.org", "carol@example.org"])
    assert code == 250, text
    assert len(upstream.messages) == 2
    for received in upstream.messages:
        (recipient,) = received.rcpt_tos
        texts = ParsedMessage(received.content).readable_texts
        body = texts[0].text
        assert body.startswith("New shoes, no way out written here.")
        link = body.rsplit(" ", 1)[1].strip()
        token = relay.service.read(token_of(link))
        assert (token.recipient, token.topic) == (recipient, "offers")
        assert "Afmelden" in body, "the footer in the configured language (nl first)"
        assert relay.service.read(token_of(https_link(received.content))).recipient == recipient, "and the header"
        assert dkim_valid(relay, received.content), "the footer is added before signing"


async def test_a_body_that_cannot_carry_the_footer_is_refused(remedy_relay: Relay, upstream: FakeUpstream) -> None:
    relay = remedy_relay
    await relay.store.add(new_event(OPTED_IN, "bob@example.org", method="web_form", topic="*", sender="shop.example"))
    content = (
        f"From: Shop <{SENDER}>\r\nTo: bob@example.org\r\nSubject: x\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <b64@shop.example>\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        "!!!notbase64===\r\n"
    ).encode()
    code, text = await send(relay, content, ["bob@example.org"])
    assert code == 550 and text.startswith("5.6.0 The message has no text/plain or text/html part"), text
    assert upstream.messages == []


@pytest.fixture
async def one_click_relay(proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Relay]:
    entries = [
        {"name": "required_headers"},
        {"name": "unsubscribe", "require": ["body", "one_click"]},
        {"name": "consent"},
        {"name": "list_unsubscribe"},
    ]
    async for running in start_relay(proxy_factory, upstream.address, tmp_path, policies=entries):
        yield running


async def test_one_click_headers_sendguard_adds_count_for_the_unsubscribe_policy(
    one_click_relay: Relay, upstream: FakeUpstream
) -> None:
    """require: [one_click] is met by the headers list_unsubscribe will add: the sender's app
    need not build them (and would get them replaced by each recipient's own anyway)."""
    store = one_click_relay.proxy.app.runtime.consent
    assert store is not None
    await store.add(
        new_event(OPTED_IN, "bob@example.org", method="web_form", topic="newsletter", sender="shop.example")
    )
    code, _ = await send(one_click_relay, newsletter("bob@example.org"), ["bob@example.org"])
    assert code == 250
    assert list_unsubscribe_uris(upstream.messages[0].content)[0].startswith("https://unsubscribe.shop.example/u/")
    audit = (await one_click_relay.proxy.wait_audit(1))[-1]
    (unsubscribe,) = [p for p in audit["policies"] if p["policy"] == "unsubscribe"]
    assert unsubscribe["action"] == "accept"
    assert unsubscribe["evidence"]["one_click_added_by_sendguard"] is True
