"""Regressions for what the security review found in the unsubscribe service and the stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import pytest

from proxy.config.settings import ConfigError, load_config_text
from proxy.smtp.auth import AuthFailureTracker
from proxy.stores.consent import OPTED_IN, OPTED_OUT, new_event
from proxy.unsubscribe.footer import append_footer
from tests.unsubscribe.harness import Running, open_store


def link(running: Running, token: str) -> str:
    return f"{running.base}/u/{token}"


async def test_a_persons_own_opt_out_is_recorded_even_when_their_domain_opted_out(
    running_factory: object, http: aiohttp.ClientSession
) -> None:
    """Otherwise a later domain-level opt-in would lift the domain's opt-out and with it hers."""
    running: Running = await running_factory()  # type: ignore[operator]
    await running.store.add(new_event(OPTED_OUT, "@corp.example", method="admin", sender="shop.example"))
    token = running.service.issue("alice@corp.example", "shop.example", "*")
    async with http.post(link(running, token), data={"List-Unsubscribe": "One-Click"}) as response:
        assert response.status == 200
    own = [e for e in await running.store.history("alice@corp.example") if e.subject_kind == "address"]
    assert [(e.kind, e.method) for e in own] == [(OPTED_OUT, "one_click")]
    await running.store.add(new_event(OPTED_IN, "@corp.example", method="web_form", sender="shop.example"))
    basis = await running.store.basis("alice@corp.example", topic="*", sender="shop.example")
    assert not basis.allowed


async def test_an_opt_in_stamped_ahead_does_not_outrank_a_later_opt_out(tmp_path: Path) -> None:
    from datetime import timedelta

    from proxy.stores.consent import utcnow

    store = await open_store(tmp_path)
    try:
        await store.add(new_event(OPTED_IN, "bob@example.org", method="web_form", at=utcnow() + timedelta(minutes=4)))
        await store.add(new_event(OPTED_OUT, "bob@example.org", method="one_click"))
        assert not (await store.basis("bob@example.org")).allowed
    finally:
        await store.close()


async def test_insert_or_replace_cannot_rewrite_a_recorded_event(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    (event,) = await store.add(new_event(OPTED_OUT, "bob@example.org", method="one_click"))
    await store.close()
    conn = sqlite3.connect(tmp_path / "consent.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(
                "INSERT OR REPLACE INTO consent_events (id, subject_kind, subject, kind) "
                "VALUES (?, 'address', 'bob@example.org', 'opted_in')",
                (event.id,),
            )
    finally:
        conn.close()


async def test_a_non_ascii_csrf_value_is_refused_not_a_crash(
    running_factory: object, http: aiohttp.ClientSession
) -> None:
    running: Running = await running_factory()  # type: ignore[operator]
    token = running.service.issue("bob@example.org", "shop.example", "*")
    async with http.post(link(running, token), data={"csrf": "ä.ä", "action": "unsubscribe"}) as response:
        assert response.status in (400, 403)


def test_a_body_end_inside_a_comment_does_not_hide_the_footer() -> None:
    message = (
        b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n"
        b"<html><body><p>hi</p></body></html>\r\n<!-- </body> -->\r\n"
    )
    out = append_footer(message, "text", "<p>FOOTER</p>")
    assert out.index(b"FOOTER") < out.index(b"<!--")


def test_the_consent_check_cannot_be_configured_to_fail_open() -> None:
    text = "listeners:\n  - {name: l, address: 127.0.0.1:25}\npolicies:\n  - {name: consent, on_error: accept}\n"
    with pytest.raises(ConfigError, match="must not pass mail it cannot check"):
        load_config_text(text, environ={})
    load_config_text(text.replace("on_error: accept", "on_error: accept, mode: monitor"), environ={})


@pytest.mark.parametrize("network", ["2000::/8", "2a00::/12", "::/0"])
def test_wide_ipv6_trusted_networks_are_an_open_relay(network: str) -> None:
    text = f'listeners:\n  - {{name: l, address: 127.0.0.1:25, trusted_networks: ["{network}"]}}\n'
    with pytest.raises(ConfigError, match="open relay"):
        load_config_text(text, environ={})


def test_auth_failures_count_an_ipv6_client_per_64_and_stay_bounded() -> None:
    tracker = AuthFailureTracker(limit=3)
    for host in range(3):
        tracker.failed(f"2001:db8:1:2::{host + 1}")  # one client rotating its interface id
    assert tracker.blocked("2001:db8:1:2::99")
    assert not tracker.blocked("2001:db8:1:3::1")
    tracker.max_clients = 50
    for n in range(200):
        tracker.failed(f"198.51.100.{n % 250}" if n < 250 else "x")
    assert len(tracker._failures) <= 50
