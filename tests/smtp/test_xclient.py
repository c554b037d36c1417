"""XCLIENT and XFORWARD on raw sockets, through the real proxy: only listed hosts may use them
(and only they see them in EHLO), their syntax, xtext and [UNAVAILABLE], XCLIENT's fresh
session and XFORWARD's one transaction, and what the forwarded client drives: relay
authorization (XCLIENT only), per-IP session caps, rate limits, the audit line and the
Received field."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import ConfigError
from proxy.smtp.auth import add_user
from proxy.smtp.forwarding import ForwardSyntaxError, parse_attributes
from tests.conftest import Proxy, RawClient, dns_section
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]

FRONT = "127.0.0.1"  # the MTA in front: listed in xclient_hosts and xforward_hosts
STRANGER = "127.0.0.5"  # any other client


def front_listener(dns_server: DNSServer, **listener: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "front",
        "address": "127.0.0.1:0",
        "trusted_networks": ["127.0.0.1/32", "198.51.100.0/25"],
        "xclient_hosts": ["127.0.0.1/32"],
        "xforward_hosts": ["127.0.0.1/32"],
        "hostname": "relay.example.com",
    }
    config.update(listener)
    return {"listeners": [config], "dns": dns_section(dns_server)}


async def connect_from(port: int, local: str) -> RawClient:
    return await RawClient.connect(port, local=local)


def status(reply: tuple[int, str]) -> tuple[int, str]:
    return reply[0], reply[1].split(" ")[0]


def received_from(content: bytes) -> str:
    return content.split(b"\r\n\tby", 1)[0].decode()


# ---- reading the commands -------------------------------------------------------------------


def test_attributes_are_xtext_decoded_and_unavailable_is_none() -> None:
    told = parse_attributes(
        "XCLIENT", "name=mx.example ADDR=IPV6:2001:db8::7 PORT=4711 proto=esmtp HELO=[UNAVAILABLE] LOGIN=al+2Bice+3D"
    )
    assert told == {
        "NAME": "mx.example",
        "ADDR": "2001:db8::7",
        "PORT": "4711",
        "PROTO": "ESMTP",
        "HELO": None,
        "LOGIN": "al+ice=",
    }
    assert parse_attributes("XCLIENT", "NAME=[TEMPUNAVAIL] ADDR=[UNAVAILABLE]") == {"NAME": None, "ADDR": None}
    # a decoded control character is masked, never passed on
    assert parse_attributes("XFORWARD", "HELO=a+0Db IDENT=Q1 SOURCE=REMOTE") == {
        "HELO": "a?b",
        "IDENT": "Q1",
        "SOURCE": "REMOTE",
    }


@pytest.mark.parametrize(
    ("command", "arg", "text"),
    [
        ("XCLIENT", "", "Syntax: XCLIENT attribute=value..."),
        ("XCLIENT", "ADDR", "Error: attribute=value expected"),
        ("XCLIENT", "ADDR=", "Error: attribute=value expected"),
        ("XCLIENT", "FOO=1", "Bad XCLIENT attribute name: FOO"),
        ("XCLIENT", "IDENT=1", "Bad XCLIENT attribute name: IDENT"),  # an XFORWARD attribute
        ("XFORWARD", "LOGIN=alice", "Bad XFORWARD attribute name: LOGIN"),  # an XCLIENT attribute
        ("XCLIENT", "ADDR=192.0.2.300", "Bad XCLIENT ADDR syntax: 192.0.2.300"),
        ("XCLIENT", "PORT=65536", "Bad XCLIENT PORT syntax: 65536"),
        ("XCLIENT", "PROTO=LMTP", "Bad XCLIENT PROTO syntax: LMTP"),
        ("XCLIENT", "NAME=bad_name.example", "Bad XCLIENT NAME syntax: bad_name.example"),
        ("XCLIENT", "ADDR=[TEMPUNAVAIL]", "Bad XCLIENT ADDR syntax: [TEMPUNAVAIL]"),
        ("XCLIENT", "HELO=a+2", "Bad XCLIENT HELO syntax: not xtext"),
        ("XFORWARD", "SOURCE=ELSEWHERE", "Bad XFORWARD SOURCE syntax: ELSEWHERE"),
        ("XFORWARD", "HELO=" + "a" * 256, "Error: attribute value too long"),
    ],
)
def test_malformed_commands_are_501_5_5_4(command: str, arg: str, text: str) -> None:
    with pytest.raises(ForwardSyntaxError) as caught:
        parse_attributes(command, arg)
    assert caught.value.reply.line() == f"501 5.5.4 {text}"


# ---- who may use them -------------------------------------------------------------------------


async def test_ehlo_offers_them_only_to_the_listed_hosts(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server, xclient_hosts=[]))
    front = await connect_from(proxy.port, FRONT)
    code, text = await front.cmd("EHLO front.example")
    assert code == 250
    lines = text.split("\n")
    assert "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in lines
    assert not any(line.startswith("XCLIENT") for line in lines)  # only XFORWARD is configured
    stranger = await connect_from(proxy.port, STRANGER)
    code, text = await stranger.cmd("EHLO stranger.example")
    assert code == 250 and "XFORWARD" not in text and "XCLIENT" not in text
    for client in (front, stranger):
        await client.close()

    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    code, text = await front.cmd("EHLO front.example")
    assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in text.split("\n")
    await front.close()


async def test_anyone_else_is_refused_even_pipelined(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    """A client not listed cannot become another client, not even by sending XCLIENT in one
    write with the commands that would use it: each command is judged as it is read."""
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    stranger = await connect_from(proxy.port, STRANGER)
    await stranger.send(
        b"EHLO stranger.example\r\n"
        b"XCLIENT ADDR=198.51.100.7 LOGIN=alice\r\n"
        b"XFORWARD ADDR=198.51.100.7\r\n"
        b"EHLO stranger.example\r\n"
        b"MAIL FROM:<alice@example.com>\r\n"
    )
    replies = [status(await stranger.reply()) for _ in range(5)]
    assert [code for code, _ in replies] == [250, 550, 550, 250, 550]
    assert [replies[i][1] for i in (1, 2, 4)] == ["5.7.0", "5.7.0", "5.7.1"]
    await stranger.close()
    assert upstream.connections == 0


async def test_the_550_says_insufficient_authorization(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    stranger = await connect_from(proxy.port, STRANGER)
    assert await stranger.cmd("XCLIENT ADDR=198.51.100.7") == (550, "5.7.0 Error: insufficient authorization")
    assert await stranger.cmd("XFORWARD ADDR=198.51.100.7") == (550, "5.7.0 Error: insufficient authorization")
    await stranger.close()


async def test_syntax_errors_and_a_transaction_in_progress(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("EHLO front.example"))[0] == 250
    assert status(await front.cmd("XCLIENT")) == (501, "5.5.4")
    assert status(await front.cmd("XCLIENT ADDR=not-an-address")) == (501, "5.5.4")
    assert status(await front.cmd("XFORWARD NAME=-bad-")) == (501, "5.5.4")
    assert (await front.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    assert await front.cmd("XCLIENT ADDR=198.51.100.7") == (503, "5.5.1 Error: MAIL transaction in progress")
    assert await front.cmd("XFORWARD ADDR=198.51.100.7") == (503, "5.5.1 Error: MAIL transaction in progress")
    assert (await front.cmd("RSET"))[0] == 250
    assert status(await front.cmd("XFORWARD ADDR=198.51.100.7")) == (250, "2.0.0")  # after the transaction
    await front.close()


@pytest.mark.parametrize(
    "listener",
    [{"xclient_hosts": ["0.0.0.0/0"]}, {"xforward_hosts": ["::/0"]}],
)
async def test_hosts_lists_that_cover_the_internet_are_refused(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, listener: dict[str, Any]
) -> None:
    config = {"listeners": [{"name": "front", "address": "127.0.0.1:0", **listener}]}
    with pytest.raises(ConfigError) as caught:
        await proxy_factory(upstream.address, config)
    assert "would let anyone choose the client address" in str(caught.value) + " ".join(
        str(i) for i in caught.value.issues
    )


# ---- XCLIENT: a new session as the original client -------------------------------------------


async def test_xclient_starts_the_session_anew_as_the_client(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("EHLO front.example"))[0] == 250
    code, text = await front.cmd(
        "XCLIENT ADDR=198.51.100.7 NAME=client.example PORT=40001 PROTO=ESMTP HELO=orig.example LOGIN=al+2Bice"
    )
    assert (code, text) == (220, "relay.example.com sendguard ESMTP")  # a new greeting
    assert status(await front.cmd("MAIL FROM:<alice@example.com>")) == (503, "5.5.1")  # EHLO again first
    code, text = await front.cmd("EHLO front.example")
    assert code == 250 and "XCLIENT" not in text  # 198.51.100.7 is not listed for XCLIENT
    assert status(await front.cmd("XCLIENT ADDR=127.0.0.1")) == (550, "5.7.0")  # judged on the new client
    assert (await front.cmd("AUTH PLAIN AGFsaWNlAHg="))[0] == 503  # already authenticated (LOGIN)
    assert (await front.transaction())[0] == 250
    await front.close()
    audit = (await proxy.wait_audit(1))[-1]
    assert (audit["client"], audit["helo"], audit["auth_user"]) == ("198.51.100.7", "orig.example", "al+ice")
    assert audit["forwarded"]["by"] == FRONT
    assert audit["forwarded"]["xclient"]["PORT"] == "40001"
    content = upstream.messages[0].content
    assert received_from(content) == "Received: from orig.example (client.example [198.51.100.7])"
    assert b"with ESMTPA id" in content


async def test_xclient_address_is_judged_for_relay_and_login_may_relay(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    """As Postfix does after XCLIENT: the new address is judged by trusted_networks (the MTA
    in front is trusted itself, its client need not be), and a LOGIN counts as AUTH."""
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("XCLIENT ADDR=203.0.113.9 NAME=[TEMPUNAVAIL]"))[0] == 220
    assert (await front.cmd("EHLO roaming.example"))[0] == 250
    assert status(await front.cmd("MAIL FROM:<alice@example.com>")) == (550, "5.7.1")
    await front.close()

    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("XCLIENT ADDR=[UNAVAILABLE] NAME=[UNAVAILABLE] LOGIN=carol"))[0] == 220
    assert (await front.cmd("EHLO roaming.example"))[0] == 250
    assert (await front.transaction())[0] == 250
    await front.close()
    audit = (await proxy.wait_audit(1))[-1]
    assert (audit["client"], audit["helo"], audit["auth_user"]) == ("unknown", "roaming.example", "carol")
    assert received_from(upstream.messages[0].content) == "Received: from roaming.example (unknown [unknown])"


async def test_xclient_login_unavailable_is_not_authenticated(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("XCLIENT ADDR=203.0.113.9 LOGIN=carol"))[0] == 220
    # a second XCLIENT is judged on 203.0.113.9, which is not listed
    assert status(await front.cmd("XCLIENT LOGIN=[UNAVAILABLE]")) == (550, "5.7.0")
    await front.close()
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("XCLIENT ADDR=203.0.113.9 LOGIN=[UNAVAILABLE]"))[0] == 220
    assert (await front.cmd("EHLO roaming.example"))[0] == 250
    assert status(await front.cmd("MAIL FROM:<alice@example.com>")) == (550, "5.7.1")
    await front.close()


async def test_xclient_per_ip_session_cap_and_rate_limit_follow_the_client(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    changes = front_listener(dns_server, max_sessions_per_ip=1)
    changes["policies"] = [
        {"name": "rate_limit", "limits": [{"key": "client_ip", "name": "per_client", "rates": ["1/h"]}]}
    ]
    proxy = await proxy_factory(upstream.address, changes)
    first = await connect_from(proxy.port, FRONT)
    assert (await first.cmd("XCLIENT ADDR=198.51.100.7"))[0] == 220
    # the front's own count moved to its client: the front may connect again
    same = await connect_from(proxy.port, FRONT)
    assert await same.cmd("XCLIENT ADDR=198.51.100.7") == (
        421,
        "4.7.0 Too many connections from your address; try again later",
    )
    assert await same.reply(timeout=5) == (0, "<EOF>")  # closed, as that client's own connection would be
    await same.close()
    other = await connect_from(proxy.port, FRONT)
    assert (await other.cmd("XCLIENT ADDR=198.51.100.8"))[0] == 220
    for client in (first, other):
        assert (await client.cmd("EHLO front.example"))[0] == 250
    assert (await first.transaction())[0] == 250
    assert status(await first.transaction()) == (451, "4.7.1")  # 198.51.100.7's one message an hour
    assert (await other.transaction())[0] == 250  # another client behind the same front
    for client in (first, other):
        await client.close()
    audit = await proxy.wait_audit(3)
    assert sorted(line["client"] for line in audit) == ["198.51.100.7", "198.51.100.7", "198.51.100.8"]
    limited = [line for line in audit if line["refused"]]
    assert [line["client"] for line in limited] == ["198.51.100.7"]  # refused at RCPT by the rate limit


# ---- XFORWARD: the client of one transaction -------------------------------------------------


async def test_xforward_accumulates_for_one_transaction(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("EHLO front.example"))[0] == 250
    assert (await front.cmd("XFORWARD ADDR=203.0.113.9 HELO=orig.example"))[0] == 250
    assert (await front.cmd("XFORWARD NAME=client.example PROTO=ESMTP IDENT=4Xyz SOURCE=REMOTE"))[0] == 250
    # relayed although 203.0.113.9 is not trusted: the front decided (XFORWARD is not access control)
    assert (await front.transaction())[0] == 250
    assert (await front.transaction())[0] == 250  # the next transaction is the front's own again
    assert (await front.cmd("XFORWARD ADDR=203.0.113.10 HELO=other.example"))[0] == 250
    assert (await front.cmd("RSET"))[0] == 250  # forgotten with the transaction that never began
    assert (await front.transaction())[0] == 250
    await front.close()
    audit = await proxy.wait_audit(3)
    assert [(line["client"], line["helo"]) for line in audit] == [
        ("203.0.113.9", "orig.example"),
        ("127.0.0.1", "front.example"),
        ("127.0.0.1", "front.example"),
    ]
    assert audit[0]["forwarded"] == {
        "by": FRONT,
        "xforward": {
            "ADDR": "203.0.113.9",
            "HELO": "orig.example",
            "NAME": "client.example",
            "PROTO": "ESMTP",
            "IDENT": "4Xyz",
            "SOURCE": "REMOTE",
        },
    }
    assert "forwarded" not in audit[1]
    first, second = (m.content for m in upstream.messages[:2])
    assert received_from(first) == "Received: from orig.example (client.example [203.0.113.9])"
    assert received_from(second) == "Received: from front.example (localhost [127.0.0.1])"


async def test_xforward_client_over_its_session_cap_is_refused_at_mail(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    proxy = await proxy_factory(upstream.address, front_listener(dns_server, max_sessions_per_ip=1))
    first = await connect_from(proxy.port, FRONT)
    assert (await first.cmd("EHLO front.example"))[0] == 250
    assert (await first.cmd("XFORWARD ADDR=203.0.113.9"))[0] == 250
    second = await connect_from(proxy.port, FRONT)
    assert (await second.cmd("EHLO front.example"))[0] == 250
    assert (await second.cmd("XFORWARD ADDR=203.0.113.9"))[0] == 250
    code, text = await second.cmd("MAIL FROM:<alice@example.com>")
    assert (code, text.split(" ")[0]) == (421, "4.7.0")  # the MTA in front passes this on to its client
    assert await second.reply(timeout=5) == (0, "<EOF>")
    await second.close()
    assert (await first.transaction())[0] == 250
    await first.close()
    assert [line["client"] for line in await proxy.wait_audit(1)] == ["203.0.113.9"]


async def test_xclient_auth_lockout_and_plaintext_auth_follow_the_client(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    """A client that AUTHs itself after XCLIENT: the failed-AUTH lockout counts its address,
    not the front's, and AUTH without TLS is allowed only from plaintext_auth_networks."""
    add_user(str(tmp_path / "users"), "alice", "right")
    proxy = await proxy_factory(
        upstream.address,
        front_listener(
            dns_server,
            trusted_networks=[],
            auth="optional",
            max_auth_failures=2,
            plaintext_auth_networks=["198.51.100.0/24"],
        ),
    )

    def plain(password: str) -> str:
        return "AUTH PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()).decode()

    async def as_client(address: str) -> RawClient:
        client = await connect_from(proxy.port, FRONT)
        assert (await client.cmd(f"XCLIENT ADDR={address}"))[0] == 220
        assert (await client.cmd("EHLO client.example"))[0] == 250
        return client

    guesser = await as_client("198.51.100.66")
    assert [(await guesser.cmd(plain("wrong")))[0] for _ in range(2)] == [535, 535]
    assert (await guesser.cmd(plain("right")))[0] == 454  # this client is locked out
    await guesser.close()
    colleague = await as_client("198.51.100.67")
    assert (await colleague.cmd(plain("right")))[0] == 235  # another client of the same front
    assert (await colleague.transaction())[0] == 250
    await colleague.close()
    outsider = await as_client("203.0.113.9")
    assert (await outsider.cmd(plain("right")))[0] == 538  # not in plaintext_auth_networks
    await outsider.close()
    audit = await proxy.wait_audit(1)
    assert [(line["client"], line["auth_user"]) for line in audit] == [("198.51.100.67", "alice")]


async def test_an_unavailable_helo(upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer) -> None:
    """XCLIENT HELO=[UNAVAILABLE]: the EHLO the sender says next (as the client) counts.
    XFORWARD HELO=[UNAVAILABLE]: the client said none; the session's EHLO is the front's own."""
    proxy = await proxy_factory(upstream.address, front_listener(dns_server))
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("XCLIENT ADDR=198.51.100.7 HELO=[UNAVAILABLE]"))[0] == 220
    assert (await front.cmd("EHLO client.example"))[0] == 250
    assert (await front.transaction())[0] == 250
    await front.close()
    front = await connect_from(proxy.port, FRONT)
    assert (await front.cmd("EHLO front.example"))[0] == 250
    assert (await front.cmd("XFORWARD ADDR=198.51.100.8 HELO=[UNAVAILABLE]"))[0] == 250
    assert (await front.transaction())[0] == 250
    await front.close()
    audit = await proxy.wait_audit(2)
    assert [(line["client"], line["helo"]) for line in audit] == [
        ("198.51.100.7", "client.example"),
        ("198.51.100.8", None),
    ]
    # no HELO: the address literal stands for it (RFC 5321 4.4); no PTR name for it in the test's DNS
    assert received_from(upstream.messages[1].content) == "Received: from [198.51.100.8] (unknown [198.51.100.8])"
