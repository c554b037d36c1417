"""The bad-input catalogue (reliability anchors section 4): each input gets a clear reply,
never a crash, a hang beyond the documented timeout, or a silent pass. Case ids (B.., C..)
refer to that catalogue."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import Proxy, RawClient
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]
HEAD = b"From: a@example.com\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"


async def transaction(
    port: int, content: bytes, *, sender: str = "a@example.com", recipient: str = "b@example.org"
) -> tuple[int, str]:
    client = await RawClient.connect(port)
    await client.cmd("EHLO client.test")
    code, text = await client.cmd(f"MAIL FROM:<{sender}>")
    if code == 250:
        code, text = await client.cmd(f"RCPT TO:<{recipient}>")
    if code == 250:
        await client.cmd("DATA")
        await client.send(content + b".\r\n")
        code, text = await client.reply()
    await client.close()
    return code, text


async def test_b01_commands_ending_in_bare_lf_are_accepted(proxy: Proxy, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(proxy.port)
    await client.send(b"EHLO lf.test\n")
    assert (await client.reply())[0] == 250
    await client.send(b"MAIL FROM:<a@example.com>\n")
    assert (await client.reply())[0] == 250
    await client.close()


async def test_b03_lf_only_message_never_ends_and_the_idle_timeout_closes_it(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    """Like Postfix's `normalize`: only CRLF.CRLF ends DATA, so an LF-only client waits until
    the idle timeout; nothing is relayed."""
    proxy = await proxy_factory(upstream.address, {"timeouts": {"idle": "1s"}})
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.org>")
    await client.cmd("DATA")
    await client.send(b"Subject: x\n\nbody\n.\n")
    assert (await client.reply(timeout=20))[0] == 421  # the idle timeout, said (421 4.4.2) ...
    assert (await client.reply(timeout=5))[0] == 0  # ... then closed
    await client.close()
    assert upstream.messages == []


async def test_b05_nul_in_the_envelope_is_a_syntax_error(proxy: Proxy) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.send(b"MAIL FROM:<a\x00b@example.com>\r\n")
    assert await client.reply() == (501, "5.1.7 Bad sender address syntax")
    await client.close()


async def test_b09_thousand_pipelined_recipients_hit_the_limit_and_the_session_continues(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address, {"listeners": [{"name": "local", "address": "127.0.0.1:0", "max_recipients": 100}]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.send(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(1000)))
    codes = [(await client.reply())[0] for _ in range(1000)]
    assert codes.count(250) == 100
    assert set(codes[100:]) == {452}
    await client.close()


async def test_b13_source_route_is_relayed_to_the_final_address(proxy: Proxy, upstream: FakeUpstream) -> None:
    code, _ = await transaction(proxy.port, HEAD + b"\r\nbody\r\n", recipient="@relay.example:user@target.example")
    assert code == 250
    assert upstream.messages[0].rcpt_tos == ["user@target.example"]


async def test_b15_unsupported_rcpt_parameters_are_refused(proxy: Proxy) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    code, text = await client.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER")
    assert (code, text.split(" ")[0]) == (555, "5.5.4")
    await client.close()


async def test_b16_utf8_addresses_need_smtputf8_and_are_relayed_with_it(proxy: Proxy, upstream: FakeUpstream) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("MAIL FROM:<jörg@example.com>") == (
        553,
        "5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM",
    )
    assert (await client.cmd("MAIL FROM:<jörg@example.com> SMTPUTF8"))[0] == 250
    assert (await client.cmd("RCPT TO:<müller@bücher.example>"))[0] == 250
    await client.cmd("DATA")
    await client.send("From: jörg@example.com\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nGrüße\r\n.\r\n".encode())
    assert (await client.reply())[0] == 250
    await client.close()
    assert upstream.messages[0].rcpt_tos == ["müller@bücher.example"]
    assert "SMTPUTF8" in upstream.messages[0].mail_options


async def test_b16_upstream_without_smtputf8(upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory) -> None:
    upstream = await upstream_factory(smtputf8=False)
    proxy = await proxy_factory(upstream.address)
    assert (await transaction(proxy.port, HEAD + b"\r\nwarm up\r\n"))[0] == 250  # learns the upstream's EHLO
    client = await RawClient.connect(proxy.port)
    _, ehlo = await client.cmd("EHLO client.test")
    assert "SMTPUTF8" not in ehlo  # not offered what the relay path cannot honour (T8)
    code, text = await client.cmd("MAIL FROM:<jörg@example.com> SMTPUTF8")
    assert (code, text.split(" ")[0]) == (553, "5.6.7")
    await client.close()


async def test_8bit_message_to_an_upstream_without_8bitmime(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(eightbitmime=False)
    proxy = await proxy_factory(upstream.address)
    assert (await transaction(proxy.port, HEAD + b"\r\nwarm up\r\n"))[0] == 250
    client = await RawClient.connect(proxy.port)
    _, ehlo = await client.cmd("EHLO client.test")
    assert "8BITMIME" not in ehlo
    code, text = await client.cmd("MAIL FROM:<a@example.com> BODY=8BITMIME")
    assert (code, text.split(" ")[0]) == (554, "5.6.3")
    await client.close()


@pytest.mark.parametrize(
    ("case", "content", "code", "status"),
    [
        (
            "C01 1000 nested multiparts",
            HEAD
            + b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(1000))
            + b"Content-Type: text/plain\r\n\r\nhi\r\n",
            554,
            "5.6.0",
        ),
        ("C02 multipart without boundary", HEAD + b"Content-Type: multipart/mixed\r\n\r\nno parts\r\n", 250, "2.0.0"),
        (
            "C05 unknown charset",
            HEAD + b"Content-Type: text/plain; charset=x-no-such\r\n\r\n\xe9t\xe9\r\n",
            250,
            "2.0.0",
        ),
        ("C06 broken base64", HEAD + b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64===\r\n", 250, "2.0.0"),
        ("C09 10 MB subject", HEAD + b"Subject: " + b"\r\n x" * 200_000 + b"\r\n\r\nbody\r\n", 552, "5.3.4"),
        (
            "C11 20,000 addresses in To",
            HEAD + b"To: " + b",\r\n ".join(b"r%d@example.org" % i for i in range(20000)) + b"\r\n\r\nbody\r\n",
            552,
            "5.3.4",
        ),
        ("C20 two To fields", HEAD + b"To: first@example.org\r\nTo: second@example.org\r\n\r\nbody\r\n", 550, "5.6.0"),
        ("C25 empty message", b"", 550, "5.6.0"),
        (
            "C28 mail loop",
            HEAD + b"Received: from x by y; Sun, 29 Nov 2026 10:00:00 +0000\r\n" * 51 + b"\r\nb\r\n",
            554,
            "5.4.6",
        ),
    ],
)
async def test_content_catalogue(
    case: str, content: bytes, code: int, status: str, upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {"name": "local", "address": "127.0.0.1:0", "max_message_size": "20MB", "max_line_length": "100KB"}
            ]
        },
    )
    got_code, text = await transaction(proxy.port, content)
    assert (got_code, text.split(" ")[0]) == (code, status), text
    assert len(upstream.messages) == (1 if code == 250 else 0)
