"""PROXY protocol (v1 and v2) on a listener, through the real proxy: the address a trusted
balancer carries is the client's for trusted networks, AUTH, per-IP limits, rate limits,
the audit line and the Received field; a PROXY header from anyone else is refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import ConfigError
from proxy.smtp.auth import add_user
from tests.conftest import Proxy, RawClient, dns_section, foreground, need_program
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream
from tests.test_external_clients import free_port

ProxyFactory = Callable[..., Awaitable[Proxy]]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client} {server} {port} 25\r\n".encode()


def v2(client: str | None, port: int = 40000) -> bytes:
    """A v2 header: PROXY over TCP from ``client``, or LOCAL (a balancer's own check) for None."""
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    address = ipaddress.ip_address(client)
    if address.version == 4:
        body = address.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", port, 25)
        family = 0x11
    else:
        body = address.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", port, 25)
        family = 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def balanced(dns_server: DNSServer, **listener: Any) -> dict[str, Any]:
    """A listener behind a balancer on 127.0.0.1; its own clients are 198.51.100.0/24. The
    Received field's PTR lookups go to the test's DNS server, never off this machine."""
    config: dict[str, Any] = {
        "name": "lb",
        "address": "127.0.0.1:0",
        "trusted_networks": ["198.51.100.0/24"],
        "proxy_protocol": {"trusted": ["127.0.0.1/32"], "timeout": "3s"},
        "hostname": "relay.example.com",
    }
    config.update(listener)
    return {"listeners": [config], "dns": dns_section(dns_server)}


async def through_balancer(port: int, header: bytes) -> RawClient:
    client = await RawClient.connect(port, greeting=False)
    await client.send(header)
    return client


async def send_one(client: RawClient, *, sender: str = "alice@example.com") -> tuple[int, str]:
    """EHLO, MAIL; when MAIL passes, the rest of a one-recipient message. The deciding reply."""
    assert (await client.cmd("EHLO client.example"))[0] == 250
    return await client.transaction(sender=sender)


@pytest.mark.parametrize(
    ("header", "client", "literal"),
    [
        (v1("198.51.100.7"), "198.51.100.7", "[198.51.100.7]"),
        (v1("2001:db8::7"), "2001:db8::7", "[IPv6:2001:db8::7]"),
        (v2("198.51.100.8"), "198.51.100.8", "[198.51.100.8]"),
        (v2("2001:db8::8"), "2001:db8::8", "[IPv6:2001:db8::8]"),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"],
)
async def test_the_carried_address_is_the_client(
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    dns_server: DNSServer,
    header: bytes,
    client: str,
    literal: str,
) -> None:
    trusted = ["198.51.100.0/24", "2001:db8::/64"]
    proxy = await proxy_factory(upstream.address, balanced(dns_server, trusted_networks=trusted))
    session = await through_balancer(proxy.port, header)
    assert (await session.reply())[0] == 220
    code, text = await send_one(session)
    assert code == 250, text  # relayed: the carried address is in trusted_networks
    await session.close()
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["client"] == client
    received = upstream.messages[0].content.split(b"\r\n\tby", 1)[0].decode()
    assert received == f"Received: from client.example (unknown {literal})"


async def test_a_balancer_health_check_keeps_the_balancers_address(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    """v2 LOCAL (HAProxy's health checks) carries no client: the connection's own address
    counts, here the balancer's, which is not allowed to relay."""
    proxy = await proxy_factory(upstream.address, balanced(dns_server))
    session = await through_balancer(proxy.port, v2(None))
    assert (await session.reply())[0] == 220
    code, text = await send_one(session)
    assert (code, text.split(" ")[0]) == (550, "5.7.1")  # 127.0.0.1 is not a trusted network here
    await session.close()


@pytest.mark.parametrize(
    ("proxies", "header"),
    [
        # A valid header from an address that is not a listed balancer: refused, never greeted.
        (["192.0.2.10/32"], v1("198.51.100.7")),
        (["192.0.2.10/32"], v2("198.51.100.7")),
        # From the balancer, but no PROXY header (a client that skipped it), or a broken one.
        (["127.0.0.1/32"], b"EHLO client.example\r\n"),
        (["127.0.0.1/32"], b"PROXY TCP4 198.51.100.7\r\n"),
        (["127.0.0.1/32"], b"PROXY TCP4 999.1.1.1 127.0.0.1 1 25\r\n"),
        (["127.0.0.1/32"], V2_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x02]) + b"xx"),
    ],
    ids=["v1-untrusted", "v2-untrusted", "no-header", "v1-short", "v1-bad-address", "v2-short"],
)
async def test_a_proxy_header_from_anyone_else_or_a_bad_one_is_refused(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, proxies: list[str], header: bytes
) -> None:
    proxy = await proxy_factory(
        upstream.address, balanced(dns_server, proxy_protocol={"trusted": proxies, "timeout": "3s"})
    )
    session = await through_balancer(proxy.port, header)
    assert await session.reply(timeout=5) == (0, "<EOF>")  # closed without a greeting
    await session.close()
    registry = proxy.app.services.metrics.registry
    value = registry.get_sample_value("sendguard_sessions_total", {"listener": "lb", "outcome": "refused_proxy"})
    assert value == 1
    assert upstream.connections == 0


async def test_a_balancer_that_says_nothing_is_closed_after_the_timeout(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, balanced(dns_server))
    started = asyncio.get_running_loop().time()
    session = await RawClient.connect(proxy.port, greeting=False)
    code, _ = await session.reply(timeout=10)
    assert code == 0  # closed, and no SMTP reply is written to a balancer
    assert asyncio.get_running_loop().time() - started < 5
    await session.close()


async def test_per_ip_session_caps_count_the_carried_address(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, balanced(dns_server, max_sessions_per_ip=2))
    same = [await through_balancer(proxy.port, v1("198.51.100.7", 40000 + i)) for i in range(3)]
    greetings = [await client.reply() for client in same]
    assert [code for code, _ in greetings] == [220, 220, 421]
    assert greetings[2][1].startswith("4.7.0 Too many connections from your address")
    other = await through_balancer(proxy.port, v1("198.51.100.8"))
    assert (await other.reply())[0] == 220  # another client behind the same balancer
    for client in [*same, other]:
        await client.close()


async def test_auth_lockout_and_plaintext_auth_follow_the_carried_address(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    add_user(str(tmp_path / "users"), "alice", "right")
    proxy = await proxy_factory(
        upstream.address,
        balanced(
            dns_server,
            trusted_networks=[],
            auth="required",
            max_auth_failures=2,
            plaintext_auth_networks=["198.51.100.0/24"],  # clients of the office network may AUTH without TLS
        ),
    )

    def plain(password: str) -> str:
        return "AUTH PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()).decode()

    guesser = await through_balancer(proxy.port, v1("198.51.100.66"))
    await guesser.reply()
    assert (await guesser.cmd("EHLO guesser.example"))[0] == 250
    assert [(await guesser.cmd(plain("wrong")))[0] for _ in range(2)] == [535, 535]
    assert (await guesser.cmd(plain("right")))[0] == 454  # this address is locked out
    await guesser.close()

    colleague = await through_balancer(proxy.port, v1("198.51.100.67"))
    await colleague.reply()
    assert (await colleague.cmd("EHLO colleague.example"))[0] == 250
    assert (await colleague.cmd(plain("right")))[0] == 235  # another address behind the same balancer
    await colleague.close()

    outsider = await through_balancer(proxy.port, v1("203.0.113.9"))
    await outsider.reply()
    assert (await outsider.cmd("EHLO outsider.example"))[0] == 250
    assert (await outsider.cmd(plain("right")))[0] == 538  # not in plaintext_auth_networks: TLS first
    await outsider.close()


async def test_rate_limits_by_client_ip_count_the_carried_address(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    changes = balanced(dns_server)
    changes["policies"] = [
        {
            "name": "rate_limit",
            "limits": [{"key": "client_ip", "name": "per_client", "count": "messages", "rates": ["1/h"]}],
        }
    ]
    proxy = await proxy_factory(upstream.address, changes)
    outcomes = []
    for client in ("198.51.100.7", "198.51.100.7", "198.51.100.8"):
        session = await through_balancer(proxy.port, v2(client))
        await session.reply()
        code, text = await send_one(session)
        outcomes.append((code, text.split(" ")[0]))
        await session.close()
    assert outcomes == [(250, "2.0.0"), (451, "4.7.1"), (250, "2.0.0")]
    audit = await proxy.wait_audit(3)
    assert [line["client"] for line in audit] == ["198.51.100.7", "198.51.100.7", "198.51.100.8"]


@pytest.mark.parametrize(
    ("listener", "problem"),
    [
        ({"proxy_protocol": {"trusted": ["0.0.0.0/0"]}}, "would let anyone choose the client address"),
        (
            {"proxy_protocol": {"trusted": ["127.0.0.1/32"]}, "tls": {"mode": "implicit", "cert": "c", "key": "k"}},
            "cannot be combined with implicit TLS",
        ),
    ],
)
async def test_proxy_protocol_config_mistakes_are_refused(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, listener: dict[str, Any], problem: str
) -> None:
    config = {"listeners": [{"name": "lb", "address": "127.0.0.1:0", **listener}]}
    with pytest.raises(ConfigError) as caught:
        await proxy_factory(upstream.address, config)
    assert problem in str(caught.value) + " ".join(str(i) for i in caught.value.issues)


# ---- a real PROXY sender: HAProxy in TCP mode ---------------------------------------------------


@contextlib.asynccontextmanager
async def haproxy(tmp_path: Path, backend_port: int, send_proxy: str) -> AsyncIterator[int]:
    """HAProxy on 127.0.0.1 in TCP mode in front of sendguard, sending PROXY v1 or v2; yields
    its port. Runs in the foreground (-db) and is stopped with the test."""
    program = need_program("haproxy")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend smtp\n  bind 127.0.0.1:{port}\n  default_backend sendguard\n"
        f"backend sendguard\n  server sg 127.0.0.1:{backend_port} {send_proxy}\n"
    )
    async with foreground(program, "-db", "-f", str(config), port=port):
        yield port


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
async def test_behind_haproxy_each_client_is_itself(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, tmp_path: Path, send_proxy: str
) -> None:
    """Clients on 127.0.0.2, .3 and .4 reach sendguard through HAProxy on 127.0.0.1: each is
    judged by its own address (relay rights, per-IP cap, the consent policy's refusal in the
    audit), and a client that goes round the balancer is refused."""
    changes = balanced(dns_server, trusted_networks=["127.0.0.2/32", "127.0.0.3/32"], max_sessions_per_ip=1)
    changes["policies"] = [{"name": "consent"}]
    changes["classes"] = {"rules": [{"class": "commercial", "mail_from": ["news@*"]}]}
    proxy = await proxy_factory(upstream.address, changes)
    async with haproxy(tmp_path, proxy.port, send_proxy) as port:
        first = await RawClient.connect(port, greeting=False, local="127.0.0.2")
        assert (await first.reply())[0] == 220
        second = await RawClient.connect(port, greeting=False, local="127.0.0.2")
        code, text = await second.reply()
        assert (code, text.split(" ")[0]) == (421, "4.7.0")  # one session per client address
        await second.close()
        other = await RawClient.connect(port, greeting=False, local="127.0.0.3")
        assert (await other.reply())[0] == 220  # another client behind the same balancer
        assert (await send_one(first))[0] == 250
        code, text = await send_one(other, sender="news@example.com")
        assert (code, text.split(" ")[0]) == (550, "5.7.1")  # no consent: refused for this client
        assert "no recorded consent" in text  # sendguard's own words, through the balancer
        stranger = await RawClient.connect(port, greeting=False, local="127.0.0.4")
        assert (await stranger.reply())[0] == 220
        code, text = await send_one(stranger)
        assert (code, text.split(" ")[0]) == (550, "5.7.1")  # 127.0.0.4 may not relay
        for client in (first, other, stranger):
            await client.close()
        direct = await RawClient.connect(proxy.port, greeting=False)  # round the balancer: no PROXY header
        assert await direct.reply(timeout=5) == (0, "<EOF>")
        await direct.close()
    audit = await proxy.wait_audit(2)  # (a relay refusal at MAIL starts no transaction)
    assert sorted((line["client"], line["outcome"]) for line in audit) == [
        ("127.0.0.2", "delivered"),
        ("127.0.0.3", "rejected"),
    ]
    consent = next(line for line in audit if line["client"] == "127.0.0.3")
    assert any(p["policy"] == "consent" and p["action"] == "reject" for p in consent["policies"])
    assert consent["helo"] == "client.example"
    assert b"(localhost [127.0.0.2])" in upstream.messages[0].content
