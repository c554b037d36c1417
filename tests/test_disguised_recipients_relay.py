"""Disguised recipient lists through the running proxy (issue 14): addresses written in display
names, encoded-words and comments, ``To :`` with the obsolete space before the colon, and
Resent-To/Resent-Cc are counted as a mail client shows them; the written addresses never
receive mail; a real name with a comma stays one recipient."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import Proxy, RawClient, submit
from tests.fakes import FakeUpstream
from tests.policies.test_recipients import DISGUISES, ONE_RECIPIENT

ProxyFactory = Callable[..., Awaitable[Proxy]]

LIMIT = 2  # every disguise shows at least three addresses


def mail(header_lines: str, subject: str = "Hello") -> bytes:
    return (
        f"From: Alice <alice@example.com>\r\n{header_lines}\r\nSubject: {subject}\r\n"
        f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(header_lines))}@example.com>\r\n"
        "\r\nJust a note.\r\n"
    ).encode()


async def start(proxy_factory: ProxyFactory, upstream: FakeUpstream, **options: object) -> Proxy:
    return await proxy_factory(
        upstream.address,
        {"policies": [{"name": "required_headers"}, {"name": "visible_recipients", "max_visible": LIMIT, **options}]},
    )


async def test_each_disguise_is_refused_with_what_to_fix(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await start(proxy_factory, upstream)
    for field in ("To", "Cc", "Resent-To", "Resent-Cc"):
        for what, value, shown in DISGUISES:
            lines = f"{field}: {value}" if field in ("To", "Cc") else f"To: list@z.example\r\n{field}: {value}"
            if "list@z.example" in lines and "list@z.example" not in value:
                shown += 1  # the To field added beside a Resent-* one
            code, text = await submit(proxy.port, mail(lines, what), recipients=["list@z.example"])
            assert code == 550, (field, what, text)
            assert text.startswith(f"5.7.1 Message shows {shown} external recipients in "), (field, what, text)
            assert "written in display names or comments, which every reader sees: remove them" in text
    assert upstream.messages == []


@pytest.mark.parametrize("value", ONE_RECIPIENT)
async def test_a_real_name_stays_one_recipient(value: str, upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await start(proxy_factory, upstream)  # the name and Cc: two, the limit; a third would refuse
    code, text = await submit(proxy.port, mail(f"To: {value}\r\nCc: k@y.example"), recipients=["j@x.example"])
    assert (code, len(upstream.messages)) == (250, 1), text


async def test_obsolete_space_before_the_colon_is_the_to_field(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    """``To :`` (RFC 5322 4.5.3) is a To field for Postfix and mail clients: counted, and relayed
    as ``To:`` so that the upstream reads exactly the fields the policies judged."""
    proxy = await start(proxy_factory, upstream)
    crowd = ", ".join(f"p{i}@c{i}.example" for i in range(3))
    code, text = await submit(proxy.port, mail(f"X-A: 1\r\nTO : {crowd}"), recipients=["p0@c0.example"])
    assert code == 550 and "Message shows 3 external recipients in To/Cc" in text
    code, text = await submit(
        proxy.port, mail("TO : one@c.example\r\nCc\t: two@d.example"), recipients=["one@c.example"]
    )
    assert code == 250, text
    (received,) = upstream.messages
    assert b"\r\nTO: one@c.example\r\nCc: two@d.example\r\n" in received.content
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "Hello"  # the fields after it are fields, not body text


async def test_obsolete_spacing_is_still_a_duplicate_to(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await start(proxy_factory, upstream, max_visible=10)
    code, text = await submit(proxy.port, mail("To : a@x.example\r\nTo: b@y.example"), recipients=["a@x.example"])
    assert code == 550 and "Header field To: appears more than once" in text, text
    assert upstream.messages == []


async def test_raw_client_obsolete_to_after_a_dot_line(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    """The same through a byte-level client: the obsolete field is the first header line."""
    proxy = await start(proxy_factory, upstream)
    client = await RawClient.connect(proxy.port)
    try:
        assert (await client.cmd("EHLO client.example"))[0] == 250
        assert (await client.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
        assert (await client.cmd("RCPT TO:<a@x.example>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        body = b"To : a@x.example, b@y.example, c@w.example\r\nFrom: alice@example.com\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
        await client.send(body)
        code, text = await client.reply()
        assert code == 550 and "3 external recipients" in text, text
    finally:
        await client.close()


async def test_split_copies_show_only_their_recipient(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    """With remedy: split each copy loses To, Cc, Resent-To and Resent-Cc, with the addresses
    written in their names; and nothing goes to an address that was only written."""
    proxy = await start(proxy_factory, upstream, remedy="split")
    lines = '"a@x.example, b@y.example" <list@z.example>\r\nCc: c@w.example\r\nResent-To: r@v.example'
    envelope = ["list@z.example", "c@w.example"]
    code, text = await submit(proxy.port, mail(f"To: {lines}"), recipients=envelope)
    assert code == 250 and text.startswith("2.0.0 Delivered as 2 separate copies"), text
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == sorted(envelope)
    for received in upstream.messages:
        parsed = email.message_from_bytes(received.content, policy=email.policy.default)
        assert parsed.get_all("To") == received.rcpt_tos
        assert parsed.get_all("Cc") is None and parsed.get_all("Resent-To") is None
        assert b"a@x.example" not in received.content and b"r@v.example" not in received.content
