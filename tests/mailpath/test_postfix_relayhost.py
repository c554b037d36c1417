"""sendguard in front of a real Postfix: Postfix is sendguard's upstream (the smarthost a
site already runs), and relays on to the fake upstream that stands for the Internet. The
message must reach the end of the path whole, with sendguard's Received field under
Postfix's, and a refusal by sendguard must never reach Postfix."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.conftest import Proxy, eventually, message, submit
from tests.fakes import FakeUpstream
from tests.postfix import postfix_instance


async def test_relayed_through_a_real_postfix(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream
) -> None:
    async with postfix_instance(relayhost=f"[127.0.0.1]:{upstream.port}") as postfix:
        proxy = await proxy_factory(f"127.0.0.1:{postfix.port}")
        code, _ = await submit(proxy.port, message(subject="Through Postfix", body="Line one.\r\n.dot line"))
        assert code == 250
        assert await eventually(lambda: len(upstream.messages) == 1, timeout=20), postfix.log()[-3000:]
        received = upstream.messages[0]
        assert received.mail_from == "alice@example.com"
        assert received.rcpt_tos == ["bob@example.org"]
        head, _, body = received.content.partition(b"\r\n\r\n")
        assert b"..dot line" not in received.content and b".dot line" in body
        trace = [line for line in head.split(b"\r\n") if line.startswith(b"Received:")]
        # Postfix's own hop on top, sendguard's under it (RFC 5321 4.4: each hop prepends)
        assert len(trace) == 2, head
        assert b"by postfix.example.test" in head.split(b"Received:")[1]
        await postfix.wait_queue_empty()
        assert "status=sent" in postfix.log()


async def test_a_refusal_never_reaches_postfix(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream
) -> None:
    async with postfix_instance(relayhost=f"[127.0.0.1]:{upstream.port}") as postfix:
        proxy = await proxy_factory(f"127.0.0.1:{postfix.port}")
        # required_headers refuses a message without From
        code, text = await submit(proxy.port, b"To: bob@example.org\r\nSubject: no from\r\n\r\nbody\r\n")
        assert code == 550, text
        # The queue file Postfix's cleanup opened at MAIL goes when sendguard's RSET reaches it,
        # which may be a moment after the client's 550: wait for it, never a sleep.
        await postfix.wait_queue_empty()
        assert "status=sent" not in postfix.log()
        assert upstream.messages == []
