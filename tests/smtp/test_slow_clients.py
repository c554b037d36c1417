"""Slow clients (issue 15, part 4): a greeting or a 421 for every accepted connection, a
deadline per command line, a total cap per listener, and stress mode (Postfix's
``${stress?...}``) that sheds tricklers so that a normal client gets served."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import pytest

from proxy.config.settings import ConfigError, load_config_text
from tests.conftest import Proxy, RawClient, eventually, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]


async def connect_from(source: str, port: int) -> RawClient:
    """A client whose socket is bound to ``source`` (any 127.0.0.0/8 address works on Linux)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return RawClient(reader, writer)


def stress_gauge(proxy: Proxy) -> float | None:
    registry = proxy.app.services.metrics.registry
    return registry.get_sample_value("sendguard_listener_stress", {"listener": "local"})


async def test_a_trickled_command_line_is_cut_at_the_command_deadline(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, {"timeouts": {"idle": "30s", "command": "1s"}})
    client = await RawClient.connect(proxy.port)
    # Silence is idle time, not a command: longer than the command deadline is fine.
    await asyncio.sleep(1.3)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    started = asyncio.get_running_loop().time()
    await client.send(b"N")
    await asyncio.sleep(0.6)
    await client.send(b"O")  # a byte does not extend the line's deadline (1 s from its first byte)
    assert await client.reply() == (421, "4.4.2 Command not received in time; closing connection")
    assert (await client.reply())[0] == 0  # closed
    assert asyncio.get_running_loop().time() - started < 5
    await client.close()
    registry = proxy.app.services.metrics.registry
    assert (
        registry.get_sample_value("sendguard_sessions_total", {"listener": "local", "outcome": "command_timeout"}) == 1
    )


async def test_a_command_split_over_packets_in_time_is_served(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, {"timeouts": {"command": "2s"}})
    client = await RawClient.connect(proxy.port)
    for part in (b"EH", b"LO cli", b"ent.test\r\nNO", b"OP\r\n"):
        await client.send(part)
        await asyncio.sleep(0.2)
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    await client.close()


async def test_stress_sheds_tricklers_and_a_normal_client_relays(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sendguard.smtp")
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {
                    "name": "local",
                    "address": "127.0.0.1:0",
                    "trusted_networks": ["127.0.0.0/8"],
                    "max_sessions": 50,
                    "stress_at": 0.8,
                    "stress_sessions_per_ip": 5,
                }
            ],
            "timeouts": {"idle": "60s", "command": "60s", "stress_idle": "2s"},
        },
    )
    assert stress_gauge(proxy) == 0
    sources = [f"127.0.0.{i}" for i in range(2, 10)]
    clients = await asyncio.gather(*(connect_from(sources[i % len(sources)], proxy.port) for i in range(60)))
    # Every accepted connection gets a greeting or a 421 at once: none is left silent.
    firsts = await asyncio.gather(*(client.reply(timeout=5) for client in clients))
    codes = sorted(code for code, _ in firsts)
    # Stress begins at 40 sessions (5 from each address); from then on an address gets no
    # more than its fair share (stress_sessions_per_ip), so the rest are refused at once.
    assert codes.count(220) == 40
    assert codes.count(421) == 20
    busy = "4.7.0 Server busy: too many connections from your address for now; try again later"
    assert {text for code, text in firsts if code == 421} == {busy}
    assert stress_gauge(proxy) == 1

    # A normal client from another address is greeted at once and relays, while the
    # tricklers hold their slots (issue 15 part 4's target).
    started = asyncio.get_running_loop().time()
    normal = await RawClient.connect(proxy.port, greeting=False)
    assert (await normal.reply(timeout=5))[0] == 220
    assert asyncio.get_running_loop().time() - started < 1
    await normal.close()
    assert (await submit(proxy.port))[0] == 250

    greeted = [client for client, (code, _) in zip(clients, firsts, strict=True) if code == 220]

    async def trickle(client: RawClient) -> tuple[int, str]:
        for _ in range(30):  # one byte every 0.5 s, never a whole line
            await client.send(b"X")
            with contextlib.suppress(TimeoutError):
                return await client.reply(timeout=0.5)
        return (0, "still open")

    # Under stress each trickler has stress_idle (2 s) for its line, not 60 s.
    started = asyncio.get_running_loop().time()
    ends = await asyncio.gather(*(trickle(client) for client in greeted))
    assert asyncio.get_running_loop().time() - started < 10
    # Cut at the line's deadline or, quiet since stress began, at the idle limit (both a
    # 421 4.4.2 that says which): none still holds its slot.
    assert set(ends) <= {
        (421, "4.4.2 Command not received in time; closing connection"),
        (421, "4.4.2 Idle for too long; closing connection"),
    }
    for client in clients:
        await client.close()

    assert await eventually(lambda: stress_gauge(proxy) == 0)
    normal = await RawClient.connect(proxy.port, greeting=False)
    assert (await normal.reply(timeout=5))[0] == 220
    await normal.close()
    assert (await submit(proxy.port))[0] == 250
    began = [r for r in caplog.records if "under stress:" in r.getMessage() and "no longer" not in r.getMessage()]
    ended = [r for r in caplog.records if "no longer under stress" in r.getMessage()]
    assert (len(began), len(ended)) == (1, 1)


async def test_a_normal_client_is_served_beside_held_slots(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    """Stress shortens the idle limit of quiet sessions too, and a message body being sent
    under stress keeps the normal bound (its lines arrive in time, the whole takes longer
    than stress_idle)."""
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {
                    "name": "local",
                    "address": "127.0.0.1:0",
                    "max_sessions": 10,
                    "stress_at": 0.5,
                    "stress_sessions_per_ip": 10,
                }
            ],
            "timeouts": {"idle": "60s", "stress_idle": "1s"},
        },
    )
    writer = await RawClient.connect(proxy.port)
    assert (await writer.cmd("EHLO client.test"))[0] == 250
    assert (await writer.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    assert (await writer.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    assert (await writer.cmd("DATA"))[0] == 354
    quiet = [await connect_from("127.0.0.2", proxy.port) for _ in range(6)]
    for client in quiet:
        assert (await client.reply(timeout=5))[0] == 220
    assert stress_gauge(proxy) == 1
    body = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: slow\r\nMessage-ID: <s@example.com>\r\n"
    body += b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n"
    await writer.send(body)
    for i in range(5):  # 2.5 s of body under a 1 s stress limit, each line whole at once
        await asyncio.sleep(0.5)
        await writer.send(b"line %d\r\n" % i)
    for client in quiet:  # the quiet ones were shed at stress_idle, told why
        assert await client.reply(timeout=5) == (421, "4.4.2 Idle for too long; closing connection")
        await client.close()
    assert (await writer.cmd("."))[0] == 250
    await writer.close()
    assert await eventually(lambda: stress_gauge(proxy) == 0)


def test_slow_client_settings_have_postfix_like_defaults_and_are_checked() -> None:
    base = "listeners:\n  - name: local\n    address: 127.0.0.1:2525\n{extra}upstream:\n  address: maildir:var/m\n"
    settings = load_config_text(base.format(extra=""), environ={})
    listener = settings.listeners[0]
    assert (listener.max_sessions, listener.max_sessions_per_ip, listener.stress_at) == (500, 50, 0.8)
    assert (settings.timeouts.command, settings.timeouts.stress_idle) == (60, 10)
    for extra, expected in (
        ("    stres_at: 0.5\n", ["t.yaml:4: listeners[0].stres_at: unknown key; did you mean 'stress_at'?"]),
        (
            "    stress_at: 1.5\n",
            [
                "t.yaml:4: listeners[0].stress_at: must be a share of max_sessions, above 0 and at most 1",
                "t.yaml:7: timeouts.command: must be at least 1s",
                "t.yaml:7: timeouts.stress_idle: must be at least 1s",
            ],
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config_text(
                base.format(extra=extra) + "timeouts: {command: 0s, stress_idle: 0s}\n", "t.yaml", environ={}
            )
        assert [str(issue) for issue in caught.value.issues] == expected
