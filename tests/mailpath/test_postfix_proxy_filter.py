"""sendguard as a real Postfix's before-queue content filter (SMTPD_PROXY_README's layout).

Clients connect to Postfix's public smtpd, which relays each transaction in lockstep to
sendguard (``smtpd_proxy_filter``); sendguard relays to the same Postfix's after-filter smtpd
on another port, which queues the message and relays it on to the fake upstream that stands
for the Internet. Postfix 3.7 tells the filter the original client with XFORWARD (NAME ADDR
PORT HELO IDENT PROTO SOURCE, after its EHLO, before MAIL; it never sends XCLIENT), so the
clients here connect from different loopback addresses: each must be judged as itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import Proxy, dns_section, eventually, message, submit
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream
from tests.postfix import PostfixInstance, free_port, postfix_instance

# The after-filter smtpd of SMTPD_PROXY_README: it trusts the filter's XFORWARD and applies no
# restrictions of its own (the front did).
AFTER_FILTER = [
    "127.0.0.1:{after} inet n - n - - smtpd",
    "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
    "  -o smtpd_client_restrictions=",
    "  -o smtpd_helo_restrictions=",
    "  -o smtpd_sender_restrictions=",
    "  -o smtpd_relay_restrictions=",
    "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
    "  -o smtpd_data_restrictions=",
    "  -o mynetworks=127.0.0.0/8",
    "  -o receive_override_options=no_unknown_recipient_checks",
]


def filter_config(port: int, after: int, dns_server: DNSServer) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "filter",
                "address": f"127.0.0.1:{port}",
                "hostname": "filter.example.test",
                # Postfix relays only for its own clients; its connections come from 127.0.0.1.
                "trusted_networks": ["127.0.0.1/32"],
                "xforward_hosts": ["127.0.0.1/32"],
            }
        ],
        "upstream": {"address": f"127.0.0.1:{after}", "send_xforward": True},
        "policies": [
            {"name": "required_headers"},
            {"name": "consent"},
            {"name": "rate_limit", "limits": [{"key": "client_ip", "name": "per_client", "rates": ["1/h"]}]},
        ],
        "classes": {"rules": [{"class": "commercial", "mail_from": ["news@*"]}]},
        "dns": dns_section(dns_server),
    }


@contextlib.asynccontextmanager
async def postfix_with_filter(upstream: FakeUpstream, options: str) -> AsyncIterator[tuple[PostfixInstance, int]]:
    """A Postfix whose public smtpd hands every transaction to sendguard (``smtpd_proxy_filter``,
    with ``smtpd_proxy_options`` when given) and whose after-filter smtpd relays to ``upstream``;
    yields it and the port sendguard is to listen on (its after-filter smtpd's port is
    ``extra_ports["after"]``)."""
    sendguard_port = free_port()
    front = {"smtpd_proxy_filter": f"127.0.0.1:{sendguard_port}"}
    if options:
        front["smtpd_proxy_options"] = options
    async with postfix_instance(
        relayhost=f"[127.0.0.1]:{upstream.port}", smtpd_options=front, services=AFTER_FILTER, extra_ports=["after"]
    ) as postfix:
        yield postfix, sendguard_port


async def deliveries(postfix: PostfixInstance, upstream: FakeUpstream, count: int) -> None:
    assert await eventually(lambda: len(upstream.messages) >= count, timeout=20), postfix.log()[-4000:]


@pytest.mark.parametrize("options", ["", "speed_adjust"], ids=["lockstep", "speed_adjust"])
async def test_each_client_behind_postfix_is_itself(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, dns_server: DNSServer, options: str
) -> None:
    async with postfix_with_filter(upstream, options) as (postfix, sendguard_port):
        after = postfix.extra_ports["after"]
        proxy = await proxy_factory(upstream.address, filter_config(sendguard_port, after, dns_server))

        # A per-IP limit acts on the original client: A's second message is over its rate
        # limit, B (another client of the same Postfix) still passes.
        assert (await submit(postfix.port, source="127.0.0.2", helo="client-a.example"))[0] == 250
        code, text = await submit(postfix.port, source="127.0.0.2", helo="client-a.example")
        assert (code, text.split(" ")[0]) == (451, "4.7.1"), text
        assert "Rate limit reached" in text  # sendguard's own words, through Postfix
        assert (await submit(postfix.port, source="127.0.0.3", helo="client-b.example"))[0] == 250

        # A consent refusal reaches the original client as a 5xx with sendguard's text.
        code, text = await submit(
            postfix.port,
            message(sender="news@example.com"),
            sender="news@example.com",
            source="127.0.0.4",
            helo="client-c.example",
        )
        assert code == 550 and text.startswith("5.7.1"), text
        assert "consent" in text.lower()

        # A refusal after DATA (no From field) reaches the client too.
        code, text = await submit(
            postfix.port, b"To: bob@example.org\r\nSubject: no from\r\n\r\nbody\r\n", source="127.0.0.5"
        )
        assert code == 550, text
        assert "From" in text

        await deliveries(postfix, upstream, 2)
        await postfix.wait_queue_empty()
        log = postfix.log()

    audit = await proxy.wait_audit(5)
    seen = sorted((line["client"], line["helo"], line["outcome"]) for line in audit)
    assert [(client, helo) for client, helo, _ in seen] == [
        ("127.0.0.2", "client-a.example"),
        ("127.0.0.2", "client-a.example"),
        ("127.0.0.3", "client-b.example"),
        ("127.0.0.4", "client-c.example"),
        ("127.0.0.5", "localhost"),  # aiosmtplib's default EHLO name
    ]
    for line in audit:
        assert line["forwarded"]["by"] == "127.0.0.1"
        assert line["forwarded"]["xforward"]["ADDR"] == line["client"]
        # Postfix sends every attribute it knows of, and says so of those it does not: its
        # queue id (IDENT) is [UNAVAILABLE] to a before-queue filter, there is no queue file yet.
        assert set(line["forwarded"]["xforward"]) == {"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"}
    consent = next(line for line in audit if line["client"] == "127.0.0.4")
    assert any(p["policy"] == "consent" and p["action"] == "reject" for p in consent["policies"])

    # The message as the Internet sees it: sendguard's Received field names the original
    # client (under the after-filter Postfix's, which names its own connection from sendguard).
    assert len(upstream.messages) == 2
    for content in (m.content for m in upstream.messages):
        head = content.partition(b"\r\n\r\n")[0].decode()
        trace = [f for f in re.split(r"\r\n(?=\S)", head) if f.startswith("Received:")]
        assert len(trace) == 3, head  # after-filter Postfix, sendguard, front Postfix
        assert trace[0].startswith("Received: from localhost (localhost [127.0.0.1])"), trace[0]
        assert re.match(r"Received: from client-[ab]\.example \(unknown \[127\.0\.0\.[23]\]\)", trace[1]), trace[1]
        assert "by filter.example.test (sendguard)" in trace[1]
        assert "by postfix.example.test (Postfix)" in trace[2]
    # Told by sendguard's XFORWARD, the after-filter Postfix logs the original client, and
    # sendguard's transaction id as the original queue id.
    for line in audit:
        if line["outcome"] == "delivered":
            assert f"orig_queue_id={line['txn']}, orig_client=unknown[{line['client']}]" in log, log


@pytest.mark.parametrize("options", ["", "speed_adjust"], ids=["lockstep", "speed_adjust"])
async def test_one_recipient_refused_in_each_mode(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, dns_server: DNSServer, options: str
) -> None:
    """In lockstep Postfix relays each RCPT reply, so a recipient sendguard refuses is refused
    alone and the others get the message. With speed_adjust Postfix has said 250 to every
    RCPT before it talks to sendguard: a recipient refused then refuses the whole message with
    that recipient's reply (nothing is lost, but nobody gets it). Postfix's own note:
    "A filter must not selectively reject recipients of a multi-recipient message"."""
    async with postfix_with_filter(upstream, options) as (postfix, sendguard_port):
        config = filter_config(sendguard_port, postfix.extra_ports["after"], dns_server)
        config["listeners"][0]["max_recipients"] = 1  # the second recipient is refused (452 4.5.3)
        await proxy_factory(upstream.address, config)
        recipients = ["bob@example.org", "carol@example.org"]
        if options:
            code, text = await submit(postfix.port, recipients=recipients, source="127.0.0.2")
            assert (code, text.split(" ")[0]) == (452, "4.5.3"), text
            assert postfix.queue_ids() == []
        else:
            refused, _ = await aiosmtplib.send(
                message(), sender="alice@example.com", recipients=recipients, hostname="127.0.0.1", port=postfix.port,
                start_tls=False, timeout=15, source_address=("127.0.0.2", 0),
            )  # fmt: skip
            assert list(refused) == ["carol@example.org"]  # carol's own reply, through Postfix
            assert (refused["carol@example.org"].code, refused["carol@example.org"].message[:5]) == (452, "4.5.3")
            await deliveries(postfix, upstream, 1)
            assert upstream.messages[0].rcpt_tos == ["bob@example.org"]
