"""/metrics, /healthz and /readyz over real HTTP; counters move; labels stay bounded."""

from __future__ import annotations

import contextlib
import re

import aiohttp
import aiosmtplib

from tests.conftest import Proxy, message
from tests.fakes import FakeUpstream


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_every_label_pair_is_present_from_the_start(proxy: Proxy) -> None:
    status, content_type, text = await get(proxy.http_port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert sample(text, "sendguard_build_info", version="0.1.0") == 1
    for action in ("accept", "reject", "tempfail", "error"):
        assert (
            sample(text, "sendguard_policy_verdicts_total", policy="required_headers", action=action, mode="enforce")
            == 0
        )
    for klass in ("commercial", "transactional", "unknown"):
        for outcome in ("delivered", "rejected", "tempfailed", "abandoned"):
            assert sample(text, "sendguard_messages_total", listener="local", **{"class": klass}, outcome=outcome) == 0
    assert sample(text, "sendguard_upstream_replies_total", stage="data", **{"class": "5xx"}) == 0
    assert sample(text, "sendguard_config_last_reload_success") == 1


async def test_counters_move_and_never_carry_addresses(proxy: Proxy, upstream: FakeUpstream) -> None:
    await aiosmtplib.send(
        message(),
        sender="alice@example.com",
        recipients=["bob@example.org", "carol@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=10,
    )
    with contextlib.suppress(aiosmtplib.SMTPDataError):
        await aiosmtplib.send(
            b"To: x@example.org\r\n\r\nno from\r\n",
            sender="alice@example.com",
            recipients=["x@example.org"],
            hostname="127.0.0.1",
            port=proxy.port,
            start_tls=False,
            timeout=10,
        )
    await proxy.wait_audit(2)
    _, _, text = await get(proxy.http_port, "/metrics")
    assert (
        sample(text, "sendguard_messages_total", listener="local", outcome="delivered", **{"class": "transactional"})
        == 1
    )
    assert (
        sample(text, "sendguard_messages_total", listener="local", outcome="rejected", **{"class": "transactional"})
        == 1
    )
    assert (
        sample(text, "sendguard_recipients_total", listener="local", outcome="accepted", **{"class": "transactional"})
        == 3
    )
    assert (
        sample(text, "sendguard_policy_verdicts_total", policy="required_headers", action="reject", mode="enforce") == 1
    )
    assert sample(text, "sendguard_upstream_replies_total", stage="data", **{"class": "2xx"}) == 1
    assert sample(text, "sendguard_sessions_total", listener="local", outcome="accepted") == 2
    assert (sample(text, "sendguard_upstream_stage_duration_seconds_count", stage="data") or 0) >= 1
    assert (sample(text, "sendguard_policy_stage_duration_seconds_count", stage="message") or 0) >= 2
    label_values = re.findall(r'="([^"]*)"', text)
    assert not [value for value in label_values if "@" in value]


async def test_health_and_readiness(proxy: Proxy) -> None:
    status, _, text = await get(proxy.http_port, "/healthz")
    assert (status, text) == (200, '{"status": "ok"}')
    status, content_type, text = await get(proxy.http_port, "/readyz")
    assert status == 200
    assert content_type.startswith("application/json")
    assert '"status": "ready"' in text
    assert f'"local": "127.0.0.1:{proxy.port}"' in text
