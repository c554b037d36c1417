"""The unsubscribe pages in a real headless Chromium (Debian's chromium, driven by Playwright).

A newsletter is relayed through a running sendguard; the links in the relayed copies are
opened in the browser, the button pressed (Dutch and English), the recipient's page opened,
the JSON downloaded and a topic changed. Screenshots go to test-artifacts/unsubscribe/.

Needs ``apt-get install chromium`` and ``pip install 'playwright>=1.40'`` (never
``playwright install``: the Debian browser is used). Skips locally without them; fails under
CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from proxy.stores.consent import OPTED_IN, new_event
from tests.conftest import IN_CI, ROOT, Proxy, message
from tests.fakes import FakeUpstream
from tests.unsubscribe.harness import Relay, https_link, start_relay

ProxyFactory = Callable[..., Awaitable[Proxy]]
ARTIFACTS = ROOT / "test-artifacts" / "unsubscribe"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser tests (scripts/install-test-tools installs it)")
    pytest.skip(reason)


def chromium_path() -> str:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("Playwright is not installed (pip install 'playwright>=1.40')")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        _unavailable("Chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture
async def relay(
    proxy_factory: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Relay]:
    async for running in start_relay(proxy_factory, upstream.address, tmp_path):
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def relayed_links(relay: Relay, upstream: FakeUpstream, recipients: list[str]) -> dict[str, str]:
    for address in recipients:
        await relay.store.add(
            new_event(OPTED_IN, address, method="double_opt_in", topic="newsletter", sender="shop.example",
                      source="https://shop.example/signup", ip="198.51.100.20", confirmed_at="2026-03-01T12:05:00Z",
                      at="2026-03-01T12:00:00Z", text_version="signup-v2")
        )  # fmt: skip
    content = message(
        subject="Winter sale",
        body="New shoes! Unsubscribe: https://shop.example/unsubscribe",
        sender="news@shop.example",
        to=", ".join(recipients),
        extra="X-Sendguard-Topic: newsletter\r\n",
    )
    await aiosmtplib.send(
        content,
        sender="news@shop.example",
        recipients=recipients,
        hostname="127.0.0.1",
        port=relay.proxy.port,
        start_tls=False,
        timeout=20,
    )
    return {m.rcpt_tos[0]: relay.local(https_link(m.content)) for m in upstream.messages}


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


@pytest.mark.timeout(120)
async def test_unsubscribe_and_the_recipient_page_in_chromium(
    relay: Relay, upstream: FakeUpstream, browser: Any, tmp_path: Path
) -> None:
    links = await relayed_links(relay, upstream, ["bob@example.org", "carol@example.org"])
    problems: list[str] = []

    # ---- Dutch: the link from bob's copy, the confirmation page, the button
    dutch = await browser.new_context(locale="nl-NL", accept_downloads=True)
    page = await dutch.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    response = await page.goto(links["bob@example.org"])
    assert response is not None and response.status == 200
    assert await page.text_content("h1") == "Afmelden"
    assert "bob@example.org" in (await page.text_content("main") or "")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(244, 245, 247)", "the stylesheet loads under the Content-Security-Policy"
    await shot(page, "01-confirm-nl")
    assert relay.store is not None
    assert not [e for e in await relay.store.history("bob@example.org") if e.kind == "opted_out"], (
        "GET never unsubscribes"
    )
    await page.click("#unsubscribe")
    await page.wait_for_selector("#result")
    assert await page.text_content("h1") == "U bent afgemeld"
    assert "bob@example.org ontvangt geen Nieuwsbrief meer van shop.example" in (
        await page.text_content("#result") or ""
    )
    await shot(page, "02-unsubscribed-nl")
    (event,) = [e for e in await relay.store.history("bob@example.org") if e.kind == "opted_out"]
    assert (event.method, event.topic, event.ip) == ("link", "newsletter", "127.0.0.1")
    assert event.user_agent and "Chrome" in event.user_agent
    await dutch.close()

    # ---- English: carol's copy, then her own page
    english = await browser.new_context(locale="en-US", accept_downloads=True)
    page = await english.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    await page.goto(links["carol@example.org"])
    assert await page.text_content("h1") == "Unsubscribe"
    await page.click("#unsubscribe")
    await page.wait_for_selector("#result")
    assert await page.text_content("h1") == "You are unsubscribed"
    assert "carol@example.org will receive no more Newsletter from shop.example" in (
        await page.text_content("#result") or ""
    )
    await shot(page, "03-unsubscribed-en")

    await page.click("#your-page")
    await page.wait_for_selector("#history")
    assert await page.text_content("h1") == "Your data at Shop BV"
    kinds = await page.eval_on_selector_all("#history tr[data-kind]", "rows => rows.map(r => r.dataset.kind)")
    assert kinds == ["opted_in", "opted_out"]
    history_text = await page.text_content("#history") or ""
    assert "https://shop.example/signup" in history_text and "198.51.100.20" in history_text
    assert await page.get_attribute('#choices tr[data-topic="newsletter"]', "data-status") == "opted_out"
    await shot(page, "04-recipient-page-en")

    async with page.expect_download() as download_info:
        await page.click("#download")
    download = await download_info.value
    saved = tmp_path / download.suggested_filename
    await download.save_as(str(saved))
    document = json.loads(saved.read_text(encoding="utf-8"))
    assert download.suggested_filename.startswith("sendguard-data-") and saved.suffix == ".json"
    assert document["about"] == "carol@example.org"
    assert [(r["event"], r["method"]) for r in document["records"]] == [
        ("opted_in", "double_opt_in"),
        ("opted_out", "link"),
    ]

    await page.click('#choices button[data-topic="offers"][data-action="opt_in"]')
    await page.wait_for_selector("#notice")
    assert await page.text_content("#notice") == "You are subscribed to Offers."
    assert await page.get_attribute('#choices tr[data-topic="offers"]', "data-status") == "opt_in"
    await shot(page, "05-topic-changed-en")
    basis = await relay.store.basis("carol@example.org", "offers", "shop.example")
    assert basis.allowed and basis.record is not None and basis.record.method == "web_form"

    await page.click('nav.lang a[lang="nl"]')
    await page.wait_for_selector("#history")
    assert await page.text_content("h1") == "Uw gegevens bij Shop BV"
    assert await page.text_content('#choices tr[data-topic="offers"] td:nth-child(2)') == "Aangemeld"
    await shot(page, "06-recipient-page-nl")
    await english.close()

    assert problems == [], "no console errors or CSP violations"
