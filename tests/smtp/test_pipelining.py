"""PIPELINING (RFC 2920) through the real proxy: a raw socket writing whole command groups in
one packet, and swaks --pipeline. (Postfix's smtp-source does not pipeline: its manual says
"No SMTP command pipelining support".)"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import Proxy, RawClient, TLSFiles, message, need_program
from tests.fakes import FakeUpstream, Faults

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]


async def replies(client: RawClient, count: int) -> list[str]:
    """The next ``count`` replies, each as "code status" (its first two words)."""
    out = []
    for _ in range(count):
        code, text = await client.reply()
        out.append(f"{code} {text.split(' ')[0]}" if code else "EOF")
    return out


async def test_ehlo_advertises_pipelining(proxy: Proxy) -> None:
    client = await RawClient.connect(proxy.port)
    code, ehlo = await client.cmd("EHLO client.example")
    assert code == 250
    assert "PIPELINING" in ehlo.splitlines()
    await client.close()


def body(subject: str) -> bytes:
    return message(subject=subject) + b".\r\n"


# Each case: the upstream's faults, the bytes written in one packet after EHLO (the whole
# command group), the replies expected in order, and what the upstream must have received.
CASES = [
    pytest.param(
        Faults(),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n",
        ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End"],
        [["bob@example.org", "carol@example.org"]],
        id="all-accepted",
    ),
    pytest.param(
        Faults(rcpt_replies={"dead@example.org": "550 5.1.1 no such user"}),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<dead@example.org>\r\n"
        b"RCPT TO:<carol@example.org>\r\nDATA\r\n",
        ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354 End"],
        [["bob@example.org", "carol@example.org"]],
        id="one-rcpt-refused-in-the-middle",
    ),
    pytest.param(
        Faults(),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<>\r\nRCPT TO:<bob@example.org>\r\n"
        b"NOOP\r\nDATA\r\n",
        ["250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "250 2.0.0", "354 End"],
        [["bob@example.org"]],
        id="syntax-error-duplicate-and-noop",
    ),
    pytest.param(
        Faults(rcpt_replies={"dead@example.org": "550 5.1.1 no such user"}),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<dead@example.org>\r\nDATA\r\n",
        ["250 2.1.0", "550 5.1.1", "503 5.5.1"],  # no valid recipient: DATA refused (RFC 2920 3.1)
        [],
        id="every-rcpt-refused",
    ),
    pytest.param(
        Faults(mail_reply="451 4.3.0 try later"),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
        ["451 4.3.0", "503 5.5.1", "503 5.5.1"],
        [],
        id="mail-refused",
    ),
]


@pytest.mark.parametrize(("faults", "group", "expected", "delivered"), CASES)
async def test_a_pipelined_group_gets_its_replies_in_order(
    upstream_factory: UpstreamFactory,
    proxy_factory: ProxyFactory,
    faults: Faults,
    group: bytes,
    expected: list[str],
    delivered: list[list[str]],
) -> None:
    upstream = await upstream_factory(faults=faults)
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    assert (await client.cmd("EHLO client.example"))[0] == 250
    await client.send(group)
    assert await replies(client, len(expected)) == expected
    if expected[-1].startswith("354"):
        # The message, its final dot and the next commands in one packet as well.
        await client.send(body("pipelined") + b"RSET\r\nQUIT\r\n")
        assert await replies(client, 3) == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    else:
        await client.send(b"RSET\r\nQUIT\r\n")
        assert await replies(client, 2) == ["250 2.0.0", "221 2.0.0"]
    assert await replies(client, 1) == ["EOF"]  # nothing more: no reply lost, doubled or merged
    await client.close()
    assert [m.rcpt_tos for m in upstream.messages] == delivered


async def test_two_whole_transactions_in_one_write(upstream: FakeUpstream, proxy: Proxy) -> None:
    """Everything the client has, at once: two transactions and QUIT (the second MAIL right
    after the first message's final dot). Each message reaches the upstream whole and apart."""
    client = await RawClient.connect(proxy.port)
    assert (await client.cmd("EHLO client.example"))[0] == 250
    first = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" + body("one")
    second = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n" + body("two")
    # Strictly the client must wait for each 354 (RFC 2920 3.1: DATA ends a group); a client
    # that does not must still never get one message's bytes in another.
    await client.send(first + second + b"QUIT\r\n")
    got = await replies(client, 9)
    assert got == [
        "250 2.1.0",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "221 2.0.0",
    ]
    await client.close()
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.org"], ["carol@example.org"]]
    assert b"Subject: one" in upstream.messages[0].content and b"Subject: two" not in upstream.messages[0].content
    assert b"Subject: two" in upstream.messages[1].content


async def test_commands_pipelined_after_starttls_are_thrown_away(
    tls_files: TLSFiles, proxy_factory: ProxyFactory, upstream: FakeUpstream
) -> None:
    """STARTTLS must end a group (RFC 3207 4.2; CVE-2011-0411): plaintext sent after it in the
    same packet was never protected and must not be run as if it came over TLS."""
    proxy = await proxy_factory(
        upstream.address,
        {
            "listeners": [
                {
                    "name": "submission",
                    "address": "127.0.0.1:0",
                    "tls": {"mode": "starttls", "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)},
                }
            ]
        },
    )
    client = await RawClient.connect(proxy.port)
    assert (await client.cmd("EHLO client.example"))[0] == 250
    await client.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    assert (await client.reply())[0] == 220
    context = tls_files.client_context()
    await client.writer.start_tls(context, server_hostname="localhost")
    code, ehlo = await client.cmd("EHLO client.example")
    # Had the injected MAIL run, its 250 would arrive here instead of the EHLO's reply, or
    # the next MAIL would be refused as nested.
    assert code == 250 and "PIPELINING" in ehlo
    assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
    await client.close()
    assert not any("injected" in c for c in upstream.handler.commands)


async def test_swaks_pipelines_through_sendguard(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    swaks = need_program("swaks")
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"dead@example.org": "550 5.1.1 no such user"}))
    proxy = await proxy_factory(upstream.address)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            swaks,
            "--server",
            f"127.0.0.1:{proxy.port}",
            "--pipeline",
            "--from",
            "alice@example.com",
            "--to",
            "bob@example.org,dead@example.org,carol@example.org",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    # swaks writes the group at once and then reads each reply in order.
    assert " -> MAIL FROM:<alice@example.com>\n -> RCPT TO:<bob@example.org>\n -> RCPT TO:<dead@example.org>" in out, (
        out
    )
    replies_seen = [
        line.split()[1] for line in out.splitlines() if line.startswith(("<-", "<**")) and len(line.split()) > 1
    ]
    assert replies_seen[-7:] == ["250", "250", "550", "250", "354", "250", "221"], out
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.org", "carol@example.org"]]
