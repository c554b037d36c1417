"""DKIM and the blocklist watch through the running proxy: what leaves sendguard is signed
(each per-recipient copy on its own), and a listing pauses commercial mail only."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

import policies
from policies.base import MessageEdit, Policy, Transaction, Verdict
from proxy.reputation.dkim import generate_private_key, write_private_key
from tests.conftest import Proxy, message, submit
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    server = await DNSServer().start()
    yield server
    await server.stop()


def dkim_keys(tmp_path: Path) -> list[dict[str, Any]]:
    rsa, ed = tmp_path / "rsa.pem", tmp_path / "ed.pem"
    write_private_key(rsa, generate_private_key("rsa-sha256", 2048))
    write_private_key(ed, generate_private_key("ed25519-sha256"))
    return [
        {"domain": "example.com", "selector": "r2026", "key_file": str(rsa), "algorithm": "rsa-sha256"},
        {"domain": "example.com", "selector": "e2026", "key_file": str(ed), "algorithm": "ed25519-sha256"},
    ]


def publish_keys(proxy: Proxy, server: DNSServer) -> None:
    for key in proxy.app.runtime.signer.keys_for("example.com"):
        record = key.dns_record()
        server.set(
            f"{key.config.selector}._domainkey.example.com",
            "TXT",
            [" ".join(f'"{record[i : i + 250]}"' for i in range(0, len(record), 250))],
        )


async def verify_all(content: bytes, server: DNSServer) -> list[bool]:
    resolver = server.resolver()

    async def lookup(name: str) -> bytes | None:
        answer = await resolver.resolve(name.rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    records: dict[str, bytes | None] = {}
    for selector in ("r2026", "e2026"):
        name = f"{selector}._domainkey.example.com."
        records[name] = await lookup(name)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key if key.endswith(".") else key + ".")

    verifier = dkim.DKIM(content)
    count = sum(
        1 for line in content.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if line.lower().startswith(b"dkim-signature:")
    )
    return [bool(verifier.verify(index, dnsfunc=dnsfunc)) for index in range(count)]


async def test_relayed_mail_is_dkim_signed(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream.address, {"dkim": {"keys": dkim_keys(tmp_path)}})
    publish_keys(proxy, dns_server)
    newsletter = message(
        sender="news@example.com",
        extra=(
            "List-Unsubscribe: <https://example.com/u/abc>, <mailto:unsub@example.com>\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ),
    )
    await aiosmtplib.send(
        newsletter,
        sender="news@example.com",
        recipients=["bob@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=20,
    )
    relayed = upstream.messages[0].content
    assert relayed.count(b"DKIM-Signature:") == 2  # RSA and Ed25519
    assert await verify_all(relayed, dns_server) == [True, True]
    unfolded = relayed.replace(b"\r\n ", b"").replace(b"\r\n\t", b"").decode()
    signed_fields = re.search(r"; h=([^;]+);", unfolded)
    assert signed_fields is not None
    names = [name.strip().lower() for name in signed_fields.group(1).split(":")]
    assert {"list-unsubscribe", "list-unsubscribe-post", "from"} <= set(names)
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_dkim_signatures_total", {"result": "signed"}) == 1


def _relayed_shape(head: str, body: bytes) -> bytes:
    return head.replace("\n", "\r\n").encode() + body


#: Messages as clients send them; each must arrive at the upstream with signatures that verify.
RELAYED_SHAPES: dict[str, bytes] = {
    "folded headers": _relayed_shape(
        "From: News\n\t<news@example.com>\nTo: bob@example.org\nSubject: folded\n  over\n\tthree lines\n"
        "List-Unsubscribe: <https://example.com/u/abc>,\n <mailto:unsub@example.com>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n\n",
        b"Hello.\r\n",
    ),
    "trailing whitespace": _relayed_shape(
        "From: news@example.com\nTo: bob@example.org\nSubject: spaced   \n\n",
        b"trailing   \r\n\t \r\nwsp\t\tinside\r\n\r\n\r\n",
    ),
    "empty body": _relayed_shape("From: news@example.com\nTo: bob@example.org\nSubject: nothing\n\n", b""),
    "long lines": _relayed_shape(
        "From: news@example.com\nTo: bob@example.org\nSubject: long\n\n", (b"x" * 990 + b"\r\n") * 4
    ),
    "8-bit": _relayed_shape(
        "From: Zoë <news@example.com>\nTo: bob@example.org\nSubject: café\nContent-Type: text/plain; "
        "charset=utf-8\nContent-Transfer-Encoding: 8bit\nMIME-Version: 1.0\n\n",
        "Größe: 1 €\r\n".encode(),
    ),
    "last line without CRLF, dots": _relayed_shape(
        "From: news@example.com\nTo: bob@example.org\nSubject: dots\n\n", b".dot\r\n..two\r\n.\r\nlast  "
    ),
    "3 MB, many blocks": _relayed_shape(
        "From: news@example.com\nTo: bob@example.org\nSubject: big\n\n",
        b"".join(b"line %d with  two spaces \t\r\n" % i for i in range(100_000)),
    ),
}


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("shape", list(RELAYED_SHAPES))
async def test_relayed_shapes_verify_with_dkimpy_opendkim_and_mail_dkim(
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    dns_server: DNSServer,
    tmp_path: Path,
    shape: str,
    canonicalization: str,
) -> None:
    """The path without copies: the signature fields are put before the header block and the
    body is hashed where it lies; what the upstream receives verifies with three verifiers."""
    from tests.reputation.test_dkim import mail_dkim_verify, opendkim_verify

    settings = {"dkim": {"keys": dkim_keys(tmp_path), "canonicalization": canonicalization}}
    proxy = await proxy_factory(upstream.address, settings)
    publish_keys(proxy, dns_server)
    await aiosmtplib.send(
        RELAYED_SHAPES[shape],
        sender="news@example.com",
        recipients=["bob@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=60,
    )
    relayed = upstream.messages[0].content
    assert await verify_all(relayed, dns_server) == [True, True], shape
    signer = proxy.app.runtime.signer
    assert await opendkim_verify(relayed, signer, tmp_path / "opendkim") == [
        ("r2026", "rsa-sha256", "pass"),
        ("e2026", "ed25519-sha256", "pass"),
    ], shape
    assert (await mail_dkim_verify(relayed, dns_server))[0] == "example.com rsa-sha256 pass", shape


class Personalize(Policy):
    name = "test_personalize"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        fields = {r: (("List-Unsubscribe", f"<https://example.com/u/{r.split('@')[0]}>"),) for r in txn.recipients}
        return Verdict.accept(edit=MessageEdit(split_per_recipient=True, per_recipient=fields))


async def test_each_per_recipient_copy_carries_its_own_valid_signature(
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    dns_server: DNSServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(policies.REGISTRY, Personalize.name, Personalize)
    proxy = await proxy_factory(
        upstream.address, {"dkim": {"keys": dkim_keys(tmp_path)}, "policies": [{"name": "test_personalize"}]}
    )
    publish_keys(proxy, dns_server)
    await aiosmtplib.send(
        message(sender="news@example.com"),
        sender="news@example.com",
        recipients=["ann@example.org", "ben@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=20,
    )
    assert len(upstream.messages) == 2
    for received in upstream.messages:
        assert await verify_all(received.content, dns_server) == [True, True]
    assert (
        upstream.messages[0].content.split(b"DKIM-Signature:")[1]
        != upstream.messages[1].content.split(b"DKIM-Signature:")[1]
    )


async def test_a_blocklist_listing_pauses_commercial_mail_only(
    upstream: FakeUpstream, proxy_factory: ProxyFactory, dns_server: DNSServer
) -> None:
    dns_server.set("2.0.0.127.bl.test", "A", ["127.0.0.2"])  # the list's RFC 5782 test entry
    dns_server.set("10.2.0.192.bl.test", "A", ["127.0.0.4"])  # our sending IP is listed
    proxy = await proxy_factory(
        upstream.address,
        {
            "classes": {"rules": [{"class": "commercial", "headers_present": ["List-Unsubscribe"]}]},
            "dns": {
                "resolver": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": "2s"},
                "sending_ips": ["192.0.2.10"],
                "blocklists": {"interval": "1m", "zones": [{"zone": "bl.test", "pause_commercial": True}]},
            },
        },
    )
    registry = proxy.app.services.metrics.registry
    for _ in range(100):  # the first round runs at start
        if registry.get_sample_value("sendguard_blocklist_pausing_commercial") == 1:
            break
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("sendguard_blocklist_listed", {"zone": "bl.test", "target_kind": "ip"}) == 1
    newsletter = message(extra="List-Unsubscribe: <https://example.com/u/1>\r\n")
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await aiosmtplib.send(
            newsletter,
            sender="news@example.com",
            recipients=["bob@example.org"],
            hostname="127.0.0.1",
            port=proxy.port,
            start_tls=False,
            timeout=10,
        )
    assert caught.value.code == 451
    assert "Commercial mail is paused until" in caught.value.message
    assert "on a DNS blocklist" in caught.value.message
    assert "192.0.2.10" not in caught.value.message  # which address is listed is for the log, not the client
    await aiosmtplib.send(
        message(),
        sender="billing@example.com",
        recipients=["bob@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=10,
    )
    assert len(upstream.messages) == 1  # the transactional one


@pytest.mark.parametrize(
    ("on_error", "permanent", "expected"),
    [("refuse", False, (451, "4.3.0")), ("refuse", True, (550, "5.6.0")), ("send_unsigned", False, (250, "2.0.0"))],
)
async def test_dkim_on_error_through_the_relay(
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    on_error: str,
    permanent: bool,
    expected: tuple[int, str],
) -> None:
    """Issue 15 part 9: a signing failure (injected into sendguard's own signer) follows
    dkim.on_error: refuse (451 when it may pass, 550 when the message cannot be signed) or
    send the message unsigned."""
    from proxy.reputation.dkim import DKIMSignError

    proxy = await proxy_factory(upstream.address, {"dkim": {"keys": dkim_keys(tmp_path), "on_error": on_error}})

    async def broken(*message: object) -> Any:
        raise DKIMSignError("injected", permanent=permanent)

    # The whole-message path (copies, DSNs) and the one that signs a header block and body view.
    monkeypatch.setattr(proxy.app.runtime.signer, "sign_async", broken)
    monkeypatch.setattr(proxy.app.runtime.signer, "sign_fields_async", broken)
    code, text = await submit(proxy.port)
    assert (code, text.split(" ")[0]) == expected
    if code == 250:
        assert b"DKIM-Signature" not in upstream.messages[-1].content
    else:
        assert upstream.messages == []
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_dkim_signatures_total", {"result": "error"}) == 1
