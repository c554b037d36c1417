"""Erasure through a real running sendguard, on SQLite and the real PostgreSQL: a recipient erases
their data from their own page (behind its CSRF value), the next commercial message to them is
refused at the proxy, and the store keeps no trace of the address or its evidence. The same
from ``sendguard consent erase``, which ``consent show`` then reports."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import psycopg
import pytest

from proxy.cli.consent import build_parser, run_consent
from proxy.reputation.dkim import generate_private_key, write_private_key
from proxy.stores.consent import OPTED_IN, new_event
from tests.conftest import Proxy
from tests.fakes import FakeUpstream
from tests.unsubscribe.harness import Relay, https_link, start_relay, token_of
from tests.unsubscribe.test_end_to_end import newsletter
from tests.unsubscribe.test_end_to_end import send as send_data
from tests.unsubscribe.test_web import csrf_of

ProxyFactory = Callable[..., Awaitable[Proxy]]
KEY = "erasure-key-for-the-relay-test-0123456789"
BOB = "bob@example.org"
EVIDENCE = (BOB, "198.51.100.7", "Mozilla/5.0 (Bob's laptop)", "https://shop.example/signup?ref=bob")
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def consent_store_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"backend": "sqlite", "path": str(tmp_path / "relay-consent.db"), "erasure_key": KEY}
    target = request.getfixturevalue("postgres_target")
    return {"backend": "postgres", "dsn": target.dsn, "erasure_key": KEY}


@pytest.fixture
async def relay(
    proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, consent_store_section: dict[str, Any]
) -> AsyncIterator[Relay]:
    key = tmp_path / "dkim-ed25519.pem"
    write_private_key(key, generate_private_key("ed25519-sha256"))
    extra = {
        "dkim": {
            "keys": [{"domain": "shop.example", "selector": "s1", "key_file": str(key), "algorithm": "ed25519-sha256"}]
        },
        "stores": {"consent": consent_store_section},
    }
    async for running in start_relay(proxy_factory, upstream.address, tmp_path, extra=extra):
        yield running


async def send(relay: Relay, content: bytes, recipients: list[str]) -> tuple[int, str]:
    """The proxy's answer; a suppressed address is refused at RCPT already (its refusal needs no
    message content), a paused sender at MAIL, others after DATA."""
    try:
        return await send_data(relay, content, recipients)
    except aiosmtplib.SMTPRecipientsRefused as error:
        (refusal,) = error.recipients
        return refusal.code, refusal.message
    except aiosmtplib.SMTPSenderRefused as error:  # a paused sender is refused at MAIL
        return error.code, error.message


async def stored_text(section: dict[str, Any], tmp_path: Path) -> str:
    """Everything the store holds, as text: the SQLite files' bytes (free pages and the WAL
    included), or every PostgreSQL row."""
    if section["backend"] == "sqlite":
        return "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("relay-consent.db*"))
    async with await psycopg.AsyncConnection.connect(section["dsn"]) as conn:
        rows = await (await conn.execute("SELECT c::text FROM consent_events c")).fetchall()
    return "\n".join(row[0] for row in rows)


async def opt_in_bob(relay: Relay) -> None:
    await relay.store.add(
        new_event(OPTED_IN, BOB, method="web_form", topic="newsletter", sender="shop.example", ip="198.51.100.7",
                  user_agent="Mozilla/5.0 (Bob's laptop)", source="https://shop.example/signup?ref=bob"),
        new_event(OPTED_IN, "carol@example.org", method="web_form", topic="newsletter", sender="shop.example"),
    )  # fmt: skip


async def test_erased_from_the_recipients_page_then_refused_at_the_proxy(
    relay: Relay, upstream: FakeUpstream, tmp_path: Path, consent_store_section: dict[str, Any]
) -> None:
    await opt_in_bob(relay)
    code, _ = await send(relay, newsletter(BOB), [BOB])
    assert code == 250
    before = await stored_text(consent_store_section, tmp_path)
    assert all(text in before for text in EVIDENCE)
    token = token_of(https_link(upstream.messages[-1].content))
    page_url = relay.local(https_link(upstream.messages[-1].content)).replace("/u/", "/p/")

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(page_url + "?lang=en") as response:
            page = await response.text()
        assert 'id="erase"' in page and "Erase your data" in page
        # Another form's CSRF value does not erase.
        async with http.post(page_url + "/erase", data={"csrf": csrf_of(page, "/withdraw")}) as response:
            assert response.status == 403
        assert not any(e.erased_at for e in await relay.store.history(BOB))
        async with http.post(
            page_url + "/erase", data={"csrf": csrf_of(page, "/erase"), "lang": "en"}, allow_redirects=False
        ) as response:
            assert response.status == 303 and "done=erased" in response.headers["Location"]
        async with http.get(relay.local(response.headers["Location"])) as response:
            after = await response.text()
    assert "Your data is erased." in after and 'id="erased"' in after and 'id="erase"' not in after
    assert re.search(r"erased: \d{4}-\d\d-\d\d \d\d:\d\d UTC", after), "each record says when it was erased"
    assert token  # the link itself keeps working: the person holds it

    code, text = await send(relay, newsletter(BOB, "After the erasure"), [BOB])
    assert code == 550 and "suppressed" in text
    code, _ = await send(relay, newsletter("carol@example.org", "Still for Carol"), ["carol@example.org"])
    assert code == 250

    stored = await stored_text(consent_store_section, tmp_path)
    for text in EVIDENCE:
        assert text not in stored, text
    assert "carol@example.org" in stored
    audit = await relay.proxy.wait_audit(3)
    (erasure,) = [line for line in audit if line.get("event") == "erasure"]
    assert BOB not in str(erasure) and erasure["erased"] == 1
    registry = relay.proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_unsubscribe_consent_changes_total", {"action": "erased"}) == 1


async def test_erased_with_the_command_then_refused_and_shown(
    relay: Relay, upstream: FakeUpstream, tmp_path: Path, consent_store_section: dict[str, Any]
) -> None:
    import yaml

    await opt_in_bob(relay)
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"stores": {"consent": consent_store_section}}))

    async def cli(*argv: str) -> tuple[int, str, str]:
        command, *rest = argv
        args = build_parser().parse_args(["consent", command, "--config", str(config), *rest])
        out, err = io.StringIO(), io.StringIO()
        return await run_consent(args, out=out, err=err), out.getvalue(), err.getvalue()

    code, out, err = await cli("erase", "Bob@Example.org", "--via", "e-mail to privacy@shop.example")
    assert code == 0, err
    assert out.startswith("erased bob@example.org: 1 event(s) made anonymous at ")
    code, text = await send(relay, newsletter(BOB), [BOB])
    assert code == 550 and "suppressed" in text
    assert upstream.messages == []

    code, out, _ = await cli("show", BOB)
    assert re.search(r"^ERASED at \S+ \(record #\d+\): erased on request \(AVG art. 17\)", out, re.MULTILINE)
    assert "[personal data erased " in out and "198.51.100.7" not in out
    code, out, _ = await cli("export")
    for text in EVIDENCE:
        assert text not in out
    stored = await stored_text(consent_store_section, tmp_path)
    for text in EVIDENCE:
        assert text not in stored, text
