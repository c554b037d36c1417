"""/metrics, /healthz and /readyz over real HTTP; counters move; labels stay bounded."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import aiosmtplib

from tests.conftest import Proxy, message, submit
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
    assert sample(text, "sendguard_upstream_replies_total", stage="data", **{"code_class": "5xx"}) == 0
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
    # Counted when each transaction ended, with its final outcome: two delivered, and one
    # whose message a policy refused after DATA.
    assert (
        sample(text, "sendguard_recipients_total", listener="local", outcome="delivered", **{"class": "transactional"})
        == 2
    )
    assert (
        sample(
            text, "sendguard_recipients_total", listener="local", outcome="refused_policy", **{"class": "transactional"}
        )
        == 1
    )
    assert (
        sample(text, "sendguard_policy_verdicts_total", policy="required_headers", action="reject", mode="enforce") == 1
    )
    assert sample(text, "sendguard_upstream_replies_total", stage="data", **{"code_class": "2xx"}) == 1
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


async def test_readiness_means_the_upstream_and_the_stores_answer(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    """Issue 15 part 6: /readyz is 503 with the reason while the upstream cannot be reached or
    the consent store does not answer; a state store (Redis) that is down is only degraded."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens here once the socket is closed
    proxy = await proxy_factory(
        f"127.0.0.1:{dead_port}",
        {
            "policies": [{"name": "consent"}],
            "stores": {"state": {"backend": "redis", "url": f"redis://127.0.0.1:{dead_port}/0", "timeout": "200ms"}},
        },
    )
    status, _, text = await get(proxy.http_port, "/readyz")
    assert status == 200  # nothing tried yet: nothing known to be wrong
    assert "state store" in json.loads(text)["degraded"][0]
    code, _ = await submit(proxy.port)
    assert code == 451  # the upstream is not reachable
    status, _, text = await get(proxy.http_port, "/readyz")
    body = json.loads(text)
    assert status == 503 and body["status"] == "not ready"
    assert body["problems"][0].startswith("upstream: not reachable")
    # The consent store breaking is a problem too (commercial mail fails closed without it).
    consent = proxy.app.runtime.consent
    assert consent is not None
    await consent.close()
    _, _, text = await get(proxy.http_port, "/readyz")
    assert any(p.startswith("consent store: ") for p in json.loads(text)["problems"])


async def test_readiness_recovers_when_the_upstream_answers_again(
    upstream: FakeUpstream, proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    proxy = await proxy_factory(upstream.address)
    proxy.app._upstream_reply("connect", "error")  # as the pool reports a failed attempt
    assert (await get(proxy.http_port, "/readyz"))[0] == 503
    assert (await submit(proxy.port))[0] == 250
    status, _, text = await get(proxy.http_port, "/readyz")
    assert status == 200, text
