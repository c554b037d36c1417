"""sendguard's own Received field (RFC 5321 4.4, RFC 3848), through the real proxy."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from proxy.relay.trace import Hop, client_name, received_field
from proxy.smtp.auth import add_user
from tests.conftest import Proxy, RawClient, TLSFiles, message, submit
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream
from tests.reputation.test_reputation_relay import dkim_keys, publish_keys, verify_all

ProxyFactory = Callable[..., Awaitable[Proxy]]


def header_lines(content: bytes) -> list[bytes]:
    """The header block's fields, each unfolded, in order."""
    head = content.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n(?![ \t])", head)


def unfolded(field: bytes) -> str:
    return re.sub(r"\r\n[ \t]", " ", field.decode("ascii"))


def first_received(content: bytes) -> str:
    fields = [f for f in header_lines(content) if f.lower().startswith(b"received:")]
    assert fields, content[:300]
    return unfolded(fields[0])


async def raw_transaction(port: int, helo: str, recipients: list[str], *, ehlo: bool = True) -> None:
    client = await RawClient.connect(port)
    assert (await client.cmd(f"{'EHLO' if ehlo else 'HELO'} {helo}"))[0] == 250
    assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    for recipient in recipients:
        assert (await client.cmd(f"RCPT TO:<{recipient}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message(to=", ".join(recipients)) + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    await client.cmd("QUIT")
    await client.close()


@pytest.mark.parametrize(
    ("helo", "ehlo", "recipients", "expected"),
    [
        # EHLO, one recipient: Postfix's layout, "for" the one recipient.
        (
            "client.example",
            True,
            ["bob@example.org"],
            r"^Received: from client\.example \(localhost \[127\.0\.0\.1\]\) by \S+ \(sendguard\) with ESMTP "
            r"id (?P<id>[0-9a-f]{12}) for <bob@example\.org>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$",
        ),
        # Two recipients: no "for" (it would show each recipient the other).
        (
            "client.example",
            True,
            ["bob@example.org", "carol@example.org"],
            r"^Received: from client\.example \(localhost \[127\.0\.0\.1\]\) by \S+ \(sendguard\) with ESMTP "
            r"id (?P<id>[0-9a-f]{12}); \w{3}, ",
        ),
        # HELO instead of EHLO: "with SMTP" (RFC 3848).
        (
            "client.example",
            False,
            ["bob@example.org"],
            r"^Received: from client\.example \(localhost \[127\.0\.0\.1\]\) by \S+ \(sendguard\) with SMTP id ",
        ),
        # An address literal is kept as the client gave it.
        (
            "[127.0.0.1]",
            True,
            ["bob@example.org"],
            r"^Received: from \[127\.0\.0\.1\] \(localhost \[127\.0\.0\.1\]\) by ",
        ),
        # A HELO that tries to close the comment, start the date and add a field: made harmless.
        (
            "x);\tBcc:<eve@evil.example>(",
            True,
            ["bob@example.org"],
            r"^Received: from x\?\?\?Bcc:<eve@evil\.example>\? \(localhost \[127\.0\.0\.1\]\) by \S+ \(sendguard\) with ESMTP ",
        ),
    ],
)
async def test_received_field_layout(
    upstream: FakeUpstream, proxy: Proxy, helo: str, ehlo: bool, recipients: list[str], expected: str
) -> None:
    await raw_transaction(proxy.port, helo, recipients, ehlo=ehlo)
    relayed = upstream.messages[0].content
    assert header_lines(relayed)[0].lower().startswith(b"received:")  # on top (RFC 5322 3.6.7)
    field = first_received(relayed)
    match = re.match(expected, field)
    assert match, field
    audit = await proxy.wait_audit(1)
    if "id" in match.groupdict():
        assert match.group("id") == audit[-1]["txn"]
    parsed = email.message_from_bytes(relayed, policy=email.policy.default)
    assert len(parsed.get_all("Received") or []) == 1
    assert parsed.get_all("Bcc") is None  # nothing injected
    assert all(ord(c) < 128 for c in field)


async def test_received_over_tls_with_and_without_the_auth_user(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    add_user(str(tmp_path / "users"), "alice", "correct horse battery staple")
    base: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "trusted_networks": [],
        "auth": "required",
        "plaintext_auth_networks": [],
        "tls": {"mode": "starttls", "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)},
        "hostname": "relay.example.net",
    }
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {"name": "quiet", **base},
                {"name": "named", **base, "received_auth_user": True},
            ]
        },
    )
    for name in ("quiet", "named"):
        await aiosmtplib.send(
            message(),
            sender="alice@example.com",
            recipients=["bob@example.org"],
            hostname="127.0.0.1",
            port=proxy.listener_port(name),
            start_tls=True,
            tls_context=tls_files.client_context(),
            username="alice",
            password="correct horse battery staple",
            timeout=20,
        )
    quiet, named = (first_received(m.content) for m in upstream.messages)
    tls = r"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+/\d+ bits\)\)"
    assert re.search(rf"\[127\.0\.0\.1\]\) {tls} by relay\.example\.net \(sendguard\) with ESMTPSA id ", quiet), quiet
    assert "alice" not in quiet  # smtpd_sasl_authenticated_header is off by default
    assert re.search(rf"{tls} \(Authenticated sender: alice\) by relay\.example\.net ", named), named


async def test_every_copy_gets_the_received_field(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(
        upstream.address, {"policies": [{"name": "visible_recipients", "max_visible": 1, "remedy": "split"}]}
    )
    recipients = ["bob@example.org", "carol@example.org"]
    code, _ = await submit(proxy.port, message(to=", ".join(recipients)), recipients=recipients)
    assert code == 250
    assert len(upstream.messages) == 2
    for copy in upstream.messages:
        lines = header_lines(copy.content)
        assert lines[0].lower().startswith(b"received:")  # above the copy's own To:
        assert sum(1 for line in lines if line.lower().startswith(b"received:")) == 1
        assert " for <" not in first_received(copy.content)  # the transaction had two recipients


async def test_received_is_under_the_dkim_signature(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, {"dkim": {"keys": dkim_keys(tmp_path)}})
    publish_keys(proxy, dns_server)
    assert (await submit(proxy.port, message(sender="news@example.com"), sender="news@example.com"))[0] == 250
    relayed = upstream.messages[0].content
    names = [line.split(b":", 1)[0].lower() for line in header_lines(relayed)]
    assert names[:3] == [b"dkim-signature", b"dkim-signature", b"received"]  # signed after it was added
    assert await verify_all(relayed, dns_server) == [True, True]


@pytest.mark.parametrize(("incoming", "code"), [(48, 250), (49, 250), (50, 554)])
async def test_our_received_counts_toward_max_received(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, incoming: int, code: int
) -> None:
    proxy = await proxy_factory(upstream.address, {"message": {"max_received": 50}})
    hops = "".join(
        f"Received: from hop{i}.example by hop{i + 1}.example; Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        for i in range(incoming)
    )
    got, text = await submit(proxy.port, message(extra=hops))
    assert got == code, text
    if code == 250:  # incoming plus ours: at most the limit (Postfix's hopcount_limit counts its own)
        relayed = upstream.messages[0].content
        assert sum(1 for f in header_lines(relayed) if f.lower().startswith(b"received:")) == incoming + 1
    else:
        assert text.startswith("5.4.6")


@pytest.mark.parametrize(
    ("hop", "recipients", "expected"),
    [
        (Hop("192.0.2.7", None, "mx.example", "relay.test"), ["a@x.example"], "from mx.example (unknown [192.0.2.7])"),
        (
            Hop("2001:db8::1", "h.example", None, "relay.test"),
            ["a@x.example"],
            "from [IPv6:2001:db8::1] (h.example [IPv6:2001:db8::1])",
        ),
        (Hop("::ffff:192.0.2.8", None, "h", "relay.test"), ["a@x.example"], "(unknown [192.0.2.8])"),
        (Hop("192.0.2.7", None, "mx", "relay.test", authenticated=True), ["a@x.example"], "with ESMTPA id"),
        (Hop("192.0.2.7", None, "mx", "relay.test", esmtp=False), ["a@x.example"], "with SMTP id"),
        (Hop("192.0.2.7", None, "h\u00e9llo", "relay.test"), ["a@x.example"], "from h?llo ("),
        (Hop("192.0.2.7", None, "mx", "relay.test"), ["j\u00f6rg@x.example"], "id t1;\r\n\tThu"),  # no mangled "for"
        (
            Hop("192.0.2.7", None, "mx", "relay.test", authenticated=True, auth_user="a) (b;\r\nX: y"),
            ["a@x.example"],
            "(Authenticated sender: a???b???X:?y)",
        ),
    ],
)
def test_received_field_edge_cases(hop: Hop, recipients: list[str], expected: str) -> None:
    field = received_field(hop, "t1", recipients, date="Thu, 03 Dec 2026 18:00:00 +0000")
    assert expected in field.decode("ascii")
    assert field.count(b"\r\n") == field.count(b"\r\n\t") + 1  # one field, folded, never two
    assert b"\n" not in field.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    ("ip", "zone", "expected"),
    [
        ("127.0.0.1", {}, "localhost"),  # loopback: no lookup
        # A PTR whose name points back at the address: believed (forward-confirmed).
        (
            "192.0.2.7",
            {("7.2.0.192.in-addr.arpa", "PTR"): ["mail.client.example."], ("mail.client.example", "A"): ["192.0.2.7"]},
            "mail.client.example",
        ),
        # A PTR anyone could have written, the name not pointing back: unknown.
        (
            "192.0.2.8",
            {("8.2.0.192.in-addr.arpa", "PTR"): ["www.bank.example."], ("www.bank.example", "A"): ["198.51.100.1"]},
            None,
        ),
        ("192.0.2.9", {}, None),  # no PTR
        (
            "2001:db8::5",
            {
                ("5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"): [
                    "v6.client.example."
                ],
                ("v6.client.example", "AAAA"): ["2001:db8::5"],
            },
            "v6.client.example",
        ),
    ],
)
async def test_client_name_is_forward_confirmed(
    dns_server: DNSServer, ip: str, zone: dict[tuple[str, str], list[str]], expected: str | None
) -> None:
    for (name, rdtype), values in zone.items():
        dns_server.set(name, rdtype, values)
    assert await client_name(dns_server.resolver(), ip) == expected
