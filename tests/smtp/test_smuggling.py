"""SMTP smuggling (CVE-2023-51764 family) through the whole proxy.

sendguard is both sides of the attack: the receiver (B) towards the client and the sender
(A) towards the upstream. For each of the twelve end-of-data sequences of the smuggling
scanners, a message carrying a smuggled second transaction goes in; the promise is that
a deliberately lenient upstream, which ends DATA on any of those sequences, still sees
exactly the one message the client sent (T9, T10), or nothing when it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import Proxy, RawClient
from tests.fakes import LenientUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]

SEQUENCES = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CR.CR": b"\r.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "NUL-before-dot": b"\r\n\x00.\r\n",
    "NUL-after-dot": b"\r\n.\x00\r\n",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
}
SMUGGLED = (
    b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"From: admin@bank.example\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n.\r\n"
)
HEAD = (
    b"From: user@example.com\r\nTo: rcpt@example.org\r\nSubject: one\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nbody one"
)


async def smuggle(port: int, sequence: bytes) -> tuple[tuple[int, str], tuple[int, str]]:
    client = await RawClient.connect(port)
    await client.cmd("EHLO attacker.test")
    assert (await client.cmd("MAIL FROM:<user@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<rcpt@example.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(HEAD + sequence + SMUGGLED)  # one write, like the scanners
    reply = await client.reply()
    after = await client.cmd("NOOP")  # exactly one reply came for the whole payload
    await client.close()
    return reply, after


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_lenient_upstream_sees_exactly_the_one_message(
    name: str, lenient_upstream: LenientUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(lenient_upstream.address)
    (code, text), after = await smuggle(proxy.port, SEQUENCES[name])
    assert after[0] == 250
    mail_lines = [mail for mail, _ in lenient_upstream.accepted]
    assert all(b"admin@bank.example" not in line for line in mail_lines)
    if b"\x00" in SEQUENCES[name]:
        assert (code, text.split(" ")[0]) == (550, "5.6.0")  # NUL is never forwarded
        assert lenient_upstream.accepted == []
        return
    assert code == 250, text
    assert len(lenient_upstream.accepted) == 1
    _, content = lenient_upstream.accepted[0]
    assert b"\r\nFrom: user@example.com\r\n" in content  # (after the Message-ID sendguard added)
    assert b"smuggled body" in content  # the "second message" is just text inside the first


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_wire_to_upstream_has_only_crlf_and_stuffed_dots(
    name: str, lenient_upstream: LenientUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(lenient_upstream.address)
    await smuggle(proxy.port, SEQUENCES[name])
    wire = bytes(lenient_upstream.wire)
    data_start = wire.find(b"DATA\r\n")
    if data_start == -1:
        assert b"\x00" in SEQUENCES[name]
        return
    payload = wire[data_start + len(b"DATA\r\n") :]
    assert re.search(rb"(?<!\r)\n|\r(?!\n)|\x00", payload) is None
    body = payload[: payload.rfind(b"\r\n.\r\n") + 2]
    for line in body.split(b"\r\n"):
        assert not line.startswith(b".") or line.startswith(b".."), line


@pytest.mark.parametrize("name", [n for n, s in SEQUENCES.items() if re.search(rb"(?<!\r)\n|\r(?!\n)", s)])
async def test_reject_mode_refuses_bare_line_endings(
    name: str, lenient_upstream: LenientUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(lenient_upstream.address, {"message": {"bare_newlines": "reject"}})
    (code, text), _ = await smuggle(proxy.port, SEQUENCES[name])
    assert code == 550
    assert text.split(" ")[0] == "5.6.0"
    assert lenient_upstream.accepted == []


# ---- the end of data and what follows it in the same packet ----------------------------------


async def test_commands_pipelined_after_the_dot_are_answered_in_turn(
    lenient_upstream: LenientUpstream, proxy_factory: ProxyFactory
) -> None:
    """The DATA reader reads the stream up to the end of data and no further: a second
    transaction written in the same packet as the first one's final dot (as a pipelining
    client does, RFC 2920) is answered command by command and relayed as its own message."""
    proxy = await proxy_factory(lenient_upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO pipeliner.test")
    assert (await client.cmd("MAIL FROM:<user@example.com>"))[0] == 250
    assert (await client.cmd("RCPT TO:<rcpt@example.org>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    second = HEAD.replace(b"Subject: one", b"Subject: two")
    await client.send(
        HEAD + b"\r\n..stuffed\r\n.\r\nMAIL FROM:<user@example.com>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n"
    )
    replies = [await client.reply() for _ in range(4)]
    assert [code for code, _ in replies] == [250, 250, 250, 354], replies
    await client.send(second + b"\r\n.\r\nQUIT\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 221
    await client.close()
    contents = [content for _, content in lenient_upstream.accepted]
    assert len(contents) == 2
    assert b"Subject: one" in contents[0] and contents[0].endswith(b"\r\n..stuffed")  # stuffed again on the wire
    assert b"Subject: two" in contents[1]


@pytest.mark.parametrize("size", [1, 4096, 70_000])
async def test_a_body_written_a_byte_at_a_time_or_in_big_blocks_arrives_whole(
    size: int, lenient_upstream: LenientUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(lenient_upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO blocks.test")
    await client.cmd("MAIL FROM:<user@example.com>")
    await client.cmd("RCPT TO:<rcpt@example.org>")
    assert (await client.cmd("DATA"))[0] == 354
    # Dot-stuffed by the client, as it must; the lenient upstream records the wire as it came.
    lines = b"".join(b"..line %05d ends with a dot.\r\n" % i for i in range(400))
    payload = HEAD + b"\r\n" + lines + b".\r\n"
    for start in range(0, len(payload), size) if size > 1 else range(0, 200):
        await client.send(payload[start : start + size] if size > 1 else payload[start : start + 1])
    if size == 1:
        await client.send(payload[200:])
    code, text = await client.reply()
    await client.close()
    assert code == 250, text
    _, content = lenient_upstream.accepted[0]
    assert content.endswith(b"\r\n" + lines[:-2])
