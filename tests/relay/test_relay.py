"""End to end: a real client -> sendguard -> a real fake upstream, over loopback sockets.

Each test states one promise of the lockstep relay (reliability anchors T1-T7, T11).
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Awaitable, Callable

import aiosmtplib
import pytest

from proxy.relay.rawmsg import remove_headers
from tests.conftest import Proxy, RawClient, message
from tests.fakes import FakeUpstream, Faults

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]


async def send(port: int, sender: str, recipients: list[str], content: bytes) -> tuple[dict[str, tuple[int, str]], str]:
    errors, reply = await aiosmtplib.send(
        content, sender=sender, recipients=recipients, hostname="127.0.0.1", port=port, start_tls=False, timeout=20
    )
    return {k: (v.code, v.message) for k, v in errors.items()}, reply


async def test_message_reaches_upstream_and_client_gets_upstreams_250(proxy: Proxy, upstream: FakeUpstream) -> None:
    errors, reply = await send(proxy.port, "alice@example.com", ["bob@example.org"], message())
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as Q1 [")  # the upstream's words plus our txn id
    assert len(upstream.messages) == 1
    received = upstream.messages[0]
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.org"]
    assert b"Subject: Hello" in received.content
    audit = await proxy.wait_audit(1)
    assert audit[-1]["outcome"] == "delivered"
    assert audit[-1]["recipients"] == ["bob@example.org"]
    assert audit[-1]["upstream_reply"].startswith("250 2.0.0 Ok: queued as Q1")


async def test_each_recipient_gets_the_upstreams_own_answer(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(
        faults=Faults(
            rcpt_replies={
                "typo@example.org": "550 5.1.1 <typo@example.org>: Recipient address rejected: User unknown",
                "full@example.org": "452 4.2.2 Mailbox full",
            }
        )
    )
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    code, text = await client.cmd("RCPT TO:<typo@example.org>")
    assert (code, text) == (550, "5.1.1 <typo@example.org>: Recipient address rejected: User unknown")
    code, text = await client.cmd("RCPT TO:<full@example.org>")
    assert (code, text) == (452, "4.2.2 Mailbox full")
    assert (await client.cmd("RCPT TO:<carol@example.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message() + b".\r\n")
    code, _ = await client.reply()
    assert code == 250
    await client.cmd("QUIT")
    await client.close()
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.org", "carol@example.org"]]


@pytest.mark.parametrize(
    ("data_reply", "expected_code", "expected_status"),
    [
        ("451 4.3.0 Queue file write error", 451, "4.3.0"),
        ("554 5.7.1 Message rejected as spam", 554, "5.7.1"),
        ("552 Message size exceeds limit", 552, "5.0.0"),  # no enhanced code upstream: class default
    ],
)
async def test_upstream_refusal_at_data_is_relayed_never_250(
    upstream_factory: UpstreamFactory,
    proxy_factory: ProxyFactory,
    data_reply: str,
    expected_code: int,
    expected_status: str,
) -> None:
    upstream = await upstream_factory(faults=Faults(data_reply=data_reply))
    proxy = await proxy_factory(upstream.address)
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await send(proxy.port, "alice@example.com", ["bob@example.org"], message())
    assert caught.value.code == expected_code
    assert caught.value.message.startswith(expected_status + " ")
    assert data_reply.split(" ", 2)[-1] in caught.value.message
    audit = await proxy.wait_audit(1)
    assert audit[-1]["outcome"] == ("tempfailed" if expected_code < 500 else "rejected")


async def test_upstream_unreachable_gives_451_without_internal_detail(proxy_factory: ProxyFactory) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    proxy = await proxy_factory(f"127.0.0.1:{dead_port}")
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    code, text = await client.cmd("MAIL FROM:<alice@example.com>")
    assert code == 451
    assert text.startswith("4.4.1 Upstream mail server not reachable; try again later (")
    assert str(dead_port) not in text and "127.0.0.1" not in text and "Error" not in text
    await client.close()


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data-start", "data-end"])
async def test_upstream_dropping_the_connection_gives_451_never_250(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, stage: str
) -> None:
    upstream = await upstream_factory(faults=Faults(drop_at=stage))
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    replies = [await client.cmd("MAIL FROM:<alice@example.com>")]
    if replies[-1][0] == 250:
        replies.append(await client.cmd("RCPT TO:<bob@example.org>"))
    if replies[-1][0] == 250:
        replies.append(await client.cmd("DATA"))
        if replies[-1][0] == 354:
            await client.send(message() + b".\r\n")
            replies.append(await client.reply())
    final_code, final_text = replies[-1]
    assert final_code == 451, replies
    assert final_text.startswith("4.4.2 Connection to the upstream mail server was lost")
    assert all(code != 250 for code, _ in replies[-1:])
    assert upstream.messages == []
    await client.close()


async def test_upstream_hanging_after_the_dot_times_out_with_451(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(hang_at="data-end", hang_seconds=30))
    proxy = await proxy_factory(upstream.address, {"upstream": {"timeouts": {"data": "1s"}}})
    started = asyncio.get_running_loop().time()
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await send(proxy.port, "alice@example.com", ["bob@example.org"], message())
    assert caught.value.code == 451
    assert asyncio.get_running_loop().time() - started < 10


async def test_policy_reject_never_completes_the_upstream_transaction(proxy: Proxy, upstream: FakeUpstream) -> None:
    no_from = b"To: bob@example.org\r\nSubject: anonymous\r\n\r\nwho sent this?\r\n"
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await send(proxy.port, "alice@example.com", ["bob@example.org"], no_from)
    assert caught.value.code == 550
    assert caught.value.message.startswith("5.6.0 Message has no From: header")
    assert upstream.messages == []
    assert "DATA" not in upstream.handler.commands  # RSET instead of a final dot (T7)
    assert upstream.handler.rsets >= 1
    audit = await proxy.wait_audit(1)
    assert audit[-1]["outcome"] == "rejected"
    assert audit[-1]["policies"][0]["policy"] == "required_headers"
    assert audit[-1]["policies"][0]["action"] == "reject"


async def test_missing_date_and_message_id_are_added_not_refused(proxy: Proxy, upstream: FakeUpstream) -> None:
    bare = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: minimal\r\n\r\nbody\r\n"
    errors, _ = await send(proxy.port, "alice@example.com", ["bob@example.org"], bare)
    assert errors == {}
    content = upstream.messages[0].content
    assert content.startswith(b"Received: ")  # our trace field first, then the added fields
    assert remove_headers(content, ["Received"]).startswith(b"Date: ")
    assert b"\r\nMessage-ID: <" in content and b"@example.com>\r\n" in content


async def test_bcc_and_class_header_are_removed_before_relay(proxy: Proxy, upstream: FakeUpstream) -> None:
    content = message(extra="Bcc: secret@example.net\r\nX-Sendguard-Class: transactional\r\n")
    await send(proxy.port, "alice@example.com", ["bob@example.org", "secret@example.net"], content)
    relayed = upstream.messages[0].content
    assert b"secret@example.net" not in relayed
    assert b"X-Sendguard-Class" not in relayed
    assert b"Subject: Hello" in relayed


async def test_untrusted_client_is_refused_relaying_and_upstream_is_never_contacted(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {"name": "local", "address": "127.0.0.1:0", "trusted_networks": ["10.0.0.0/8"], "auth": "none"}
            ]
        },
    )
    for target in (
        "victim@external.example",
        "user%external.example@ourdomain.example",
        "@ourhost.example:user@external.example",
    ):
        client = await RawClient.connect(proxy.port)
        await client.cmd("EHLO attacker.test")
        code, text = await client.cmd("MAIL FROM:<spammer@evil.example>")
        assert (code, text.split(" ")[0]) == (550, "5.7.1")
        code, _ = await client.cmd(f"RCPT TO:<{target}>")
        assert code == 503  # no transaction was opened
        await client.close()
    assert upstream.connections == 0


async def test_smtplib_client_with_null_sender_bounces_are_relayed(proxy: Proxy, upstream: FakeUpstream) -> None:
    def blocking_send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as client:
            return client.sendmail("<>", ["bob@example.org"], message(subject="Undeliverable"))

    refused = await asyncio.to_thread(blocking_send)
    assert refused == {}
    assert upstream.messages[0].mail_from == "<>"


async def test_null_and_malformed_recipients_are_refused(proxy: Proxy, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<alice@example.com>")
    assert await client.cmd("RCPT TO:<>") == (501, "5.1.3 The null address <> cannot receive mail")
    assert (await client.cmd("RCPT TO:<no-domain>"))[0] == 501
    assert (await client.cmd("RCPT TO:<jörg@example.org>"))[0] == 553  # needs SMTPUTF8
    await client.close()


async def test_duplicate_recipients_are_relayed_once(proxy: Proxy, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<alice@example.com>")
    assert (await client.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    assert (await client.cmd("RCPT TO:<BOB@example.org>"))[0] == 250
    # The same mailbox with quotes it does not need (proxy.addresses.address_key)
    assert (await client.cmd('RCPT TO:<"bob"@EXAMPLE.org>'))[0] == 250
    await client.cmd("DATA")
    await client.send(message() + b".\r\n")
    assert (await client.reply())[0] == 250
    assert upstream.messages[0].rcpt_tos == ["bob@example.org"]
    await client.close()


async def test_size_is_advertised_and_enforced_with_552(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(
        upstream.address, {"listeners": [{"name": "local", "address": "127.0.0.1:0", "max_message_size": "2KB"}]}
    )
    client = await RawClient.connect(proxy.port)
    code, ehlo = await client.cmd("EHLO client.test")
    assert "SIZE 2048" in ehlo and "ENHANCEDSTATUSCODES" in ehlo and "CHUNKING" not in ehlo
    code, text = await client.cmd("MAIL FROM:<alice@example.com> SIZE=999999")
    assert (code, text.split(" ")[0]) == (552, "5.3.4")
    assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message(body="x" * 5000) + b".\r\n")
    code, text = await client.reply()
    assert code == 552 and text.startswith("5.3.4 Message too big: the limit is 2 KB")
    assert (await client.cmd("NOOP"))[0] == 250  # the session is still usable
    await client.close()
    assert upstream.messages == []


async def test_recipient_limit_gives_452(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(
        upstream.address, {"listeners": [{"name": "local", "address": "127.0.0.1:0", "max_recipients": 3}]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<alice@example.com>")
    codes = [(await client.cmd(f"RCPT TO:<r{i}@example.org>"))[0] for i in range(5)]
    assert codes == [250, 250, 250, 452, 452]
    await client.close()


async def test_upstream_connections_are_reused_across_transactions(proxy: Proxy, upstream: FakeUpstream) -> None:
    for i in range(5):
        await send(proxy.port, "alice@example.com", ["bob@example.org"], message(subject=f"n{i}"))
    assert len(upstream.messages) == 5
    assert upstream.connections == 1


async def test_pooled_connection_closed_by_the_upstream_is_replaced(proxy: Proxy, upstream: FakeUpstream) -> None:
    await send(proxy.port, "alice@example.com", ["bob@example.org"], message(subject="first"))
    upstream.drop_all()  # the upstream's idle timeout closes every connection it has
    await asyncio.sleep(0.05)
    errors, reply = await send(proxy.port, "alice@example.com", ["bob@example.org"], message(subject="second"))
    assert errors == {} and "queued as Q2" in reply
    assert upstream.connections == 2


async def test_pipelined_transactions_in_one_packet_are_processed_in_order(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    one = message(subject="one")
    two = message(subject="two")
    await client.send(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        + one
        + b".\r\n"
        + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
        + two
        + b".\r\n"
    )
    codes = [(await client.reply())[0] for _ in range(8)]
    assert codes == [250, 250, 354, 250, 250, 250, 354, 250]
    assert [m.rcpt_tos for m in upstream.messages] == [["b@example.org"], ["c@example.org"]]
    await client.close()


async def test_client_disconnect_mid_data_relays_nothing(proxy: Proxy, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<alice@example.com>")
    await client.cmd("RCPT TO:<bob@example.org>")
    await client.cmd("DATA")
    await client.send(b"Subject: half\r\n\r\nhalf a message")
    await client.close()
    audit = await proxy.wait_audit(1)
    assert audit[-1]["outcome"] == "abandoned"
    assert upstream.messages == []


async def test_upstream_replies_without_enhanced_status_get_the_one_for_their_stage(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], proxy_factory: Callable[..., Awaitable[Proxy]]
) -> None:
    """RFC 3463: a success at MAIL is 2.1.0, at RCPT 2.1.5 (issue 15 part 7), not 2.0.0."""
    upstream = await upstream_factory(faults=Faults(mail_reply="250 Ok", rcpt_replies={"bob@example.org": "250 Ok"}))
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("MAIL FROM:<alice@example.com>") == (250, "2.1.0 Ok")
    assert await client.cmd("RCPT TO:<bob@example.org>") == (250, "2.1.5 Ok")
    await client.close()
