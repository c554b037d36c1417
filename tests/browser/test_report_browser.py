"""The HTML compliance report and evidence pack in a real headless Chromium (Debian's
chromium, driven by Playwright, as the unsubscribe pages are): every chart drawn with bars,
every table with rows, nothing fetched from the network, and a printable PDF. The screenshot
goes to the test's tmp dir (and to SENDGUARD_REPORT_EXAMPLE when set: docs/report-example.png
was made so)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.report.render import render
from tests.browser.test_unsubscribe_browser import browser  # noqa: F401 - the Chromium fixture, shared
from tests.report.sample import month_report

TABLES = (
    "#basis-table",
    "#opt-in-evidence",
    "#refusals-table",
    "#opt-outs-table",
    "#rates-table",
    "#pauses-table",
    "#erasures-table",
)
CHARTS = ("daily", "basis", "refusals", "rates")


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:  # noqa: F811 - the imported fixture
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    opened = await context.new_page()
    fetched: list[str] = []

    async def offline(route: Any) -> None:
        # The report must open with no network: anything but the file itself is refused.
        if route.request.url.startswith("file:"):
            await route.continue_()
        else:
            fetched.append(route.request.url)
            await route.abort()

    await opened.route("**/*", offline)
    opened.fetched = fetched
    yield opened
    await context.close()


@pytest.mark.timeout(120)
async def test_the_html_report_draws_its_charts_and_tables_and_prints(page: Any, tmp_path: Path) -> None:
    html_path = tmp_path / "report.html"
    html_path.write_text(render(month_report(), "html"), encoding="utf-8")
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(html_path.as_uri())
    assert await page.text_content("h1") == "Compliance report"
    for chart in CHARTS:
        figure = page.locator(f"#chart-{chart}")
        assert await figure.get_attribute("data-empty") == "false", chart
        assert await figure.locator("svg rect.bar").count() > 0, chart
        box = await figure.locator("svg").bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 30, chart
    for table in TABLES:
        rows = page.locator(f"{table} tbody tr")
        assert await rows.count() > 0, table
        assert (await rows.first.inner_text()).strip(), table
        assert await page.locator(f"{table} td.empty").count() == 0, table
    pauses = await page.inner_text("#pauses-table")
    assert "blocklist:zen" in pauses and "class:commercial" in pauses, "a pause that held no mail is shown"
    assert "2026-11-13T15:00:00Z" in await page.inner_text("#erasures-table")
    flagged = page.locator("#opt-outs-table .bad")
    assert await flagged.count() == 1 and "NOT HONOURED" in await flagged.inner_text()
    screenshot = tmp_path / "report.png"
    await page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    example = os.environ.get("SENDGUARD_REPORT_EXAMPLE")
    if example:
        await page.screenshot(path=example, full_page=False)

    await page.emulate_media(media="print")
    assert await page.evaluate("getComputedStyle(document.querySelector('figure')).breakInside") == "avoid"
    pdf = await page.pdf(format="A4", print_background=True)
    assert (
        pdf.startswith(b"%PDF")
        and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page>") + pdf.count(b"/Type/Page") >= 1
    )
    (tmp_path / "report.pdf").write_bytes(pdf)
    assert page.fetched == [] and problems == []


@pytest.mark.timeout(120)
async def test_the_evidence_pack_page(page: Any, tmp_path: Path) -> None:
    pack = {
        "format": "sendguard-evidence", "version": 1, "generated_at": "2026-12-01T08:00:00Z",
        "address": "ann@example.org", "period": None, "sources": {"consent_store": "sqlite var/consent.db"},
        "basis_now": {"basis": "opted_out", "allowed": False, "explanation": "the recipient opted out on 2026-11-02"},
        "consent_history": [
            {"id": 1, "event": "opted_in", "scope": "address", "topic": "*", "sender": "*", "method": "double_opt_in",
             "effective_at": "2026-06-01T10:00:00Z", "recorded_at": "2026-06-01T10:00:01Z",
             "source": "https://shop.example/signup", "ip": "198.51.100.7", "confirmed_at": "2026-06-01T10:04:00Z"},
            {"id": 2, "event": "opted_out", "scope": "address", "topic": "*", "sender": "*", "method": "one_click",
             "effective_at": "2026-11-02T09:00:00Z", "recorded_at": "2026-11-02T09:00:00Z"},
        ],
        "messages": [
            {"time": "2026-11-01T09:00:00Z", "txn": "t1", "sender": "news@shop.example", "class": "commercial",
             "message_id": "<1@shop.example>", "result": "delivered", "policy": None, "basis": "opt_in", "topic": "*",
             "record": {"id": 1, "method": "double_opt_in", "effective_at": "2026-06-01T10:00:00Z",
                        "source": "https://shop.example/signup"}, "reply": "250 2.0.0 Ok"},
            {"time": "2026-11-03T09:00:00Z", "txn": "t2", "sender": "news@shop.example", "class": "commercial",
             "message_id": None, "result": "refused_policy", "policy": "consent", "basis": "opted_out", "topic": "*",
             "record": {"id": 2, "method": "one_click", "effective_at": "2026-11-02T09:00:00Z"},
             "reply": "550 5.7.1 <ann@example.org>: the recipient opted out"},
        ],
        "opt_outs": [{"record": 2, "kind": "opted_out", "channel": "one_click", "effective_at": "2026-11-02T09:00:00Z",
                      "messages_after": [{"time": "2026-11-03T09:00:00Z", "txn": "t2", "sender": "news@shop.example",
                                          "reply": "550", "basis": "opted_out", "result": "refused"}]}],
        "unsubscribe_requests": [],
    }  # fmt: skip
    html_path = tmp_path / "evidence.html"
    html_path.write_text(render(pack, "html"), encoding="utf-8")
    await page.goto(html_path.as_uri())
    assert await page.text_content("h1") == "Evidence pack: ann@example.org"
    for table in ("#history-table", "#messages-table", "#after-table"):
        assert await page.locator(f"{table} tbody tr").count() > 0
        assert await page.locator(f"{table} td.empty").count() == 0
    assert "198.51.100.7" in await page.inner_text("#history-table")
    assert await page.locator("#after-table .ok").inner_text() == "refused"
    await page.screenshot(path=str(tmp_path / "evidence.png"), full_page=True)
    assert page.fetched == []


@pytest.mark.timeout(120)
async def test_the_evidence_pack_of_an_erased_address(page: Any, tmp_path: Path) -> None:
    """Built by EvidencePack itself: it says the address was erased, when, and that commercial
    mail stays refused, and shows only the refusal that came after."""
    from datetime import UTC, datetime

    from proxy.report.evidence import EvidencePack
    from proxy.stores.consent_basis import evaluate
    from proxy.stores.consent_events import ConsentEvent

    tombstone = "erased:" + "cd" * 32
    at = datetime(2026, 11, 10, 12, tzinfo=UTC)
    erasure = ConsentEvent("suppressed", "address", "ann@example.org", at, "erasure", id=9, recorded_at=at,
                           reason="erased on request (AVG art. 17): the personal data of 2 earlier event(s) removed",
                           note="requested via admin")  # fmt: skip
    pack = EvidencePack("ann@example.org")
    pack.tombstone = tombstone
    pack.set_history([erasure], evaluate([erasure], "ann@example.org", "*", "*"))
    line = {"sender": "news@shop.example", "class": "commercial", "refused": {}, "outcome": "delivered",
            "recipients": ["ann@example.org"], "upstream_reply": "250 ok", "copies": None, "policies": []}  # fmt: skip
    pack.add({**line, "time": "2026-11-01T09:00:00Z", "txn": "before"})
    pack.add({**line, "time": "2026-11-11T09:00:00Z", "txn": "after", "recipients": [], "outcome": "abandoned",
              "refused": {"ann@example.org": "550 5.7.1 address suppressed"},
              "policies": [{"policy": "consent", "stage": "rcpt", "action": "reject", "mode": "enforce",
                            "recipient": "ann@example.org", "reason": "suppressed",
                            "reply": "550 5.7.1 address suppressed"}]})  # fmt: skip
    html_path = tmp_path / "erased.html"
    html_path.write_text(render(pack.as_dict(), "html"), encoding="utf-8")
    await page.goto(html_path.as_uri())
    assert await page.text_content("h1") == f"Evidence pack: {tombstone}"
    banner = await page.inner_text("#erasure")
    assert "2026-11-10T12:00:00Z" in banner and "Commercial mail: refused" in banner
    assert "1 earlier message decision(s)" in banner
    assert await page.locator("#messages-table tbody tr").count() == 1
    assert "after" in await page.inner_text("#messages-table") and "before" not in await page.inner_text(
        "#messages-table"
    )
    assert page.fetched == []
