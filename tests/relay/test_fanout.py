"""One copy per recipient (MessageEdit.split_per_recipient / per_recipient): what each copy
shows, and how the copies' outcomes map to the client's single reply without loss or duplicates."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Awaitable, Callable

import pytest

import policies
from policies.base import MessageEdit, Policy, Transaction, Verdict
from tests.conftest import Proxy, eventually, message, submit
from tests.fakes import FakeUpstream, Faults

ProxyFactory = Callable[..., Awaitable[Proxy]]
RECIPIENTS = ["ann@example.org", "ben@example.org", "cat@example.org"]


class SplitEveryMessage(Policy):
    name = "test_split"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        tokens = {r: (("X-Token", f"token-for-{r.split('@')[0]}"),) for r in txn.recipients}
        return Verdict.accept("split", edit=MessageEdit(split_per_recipient=True, per_recipient=tokens))


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.REGISTRY, SplitEveryMessage.name, SplitEveryMessage)


CONTENT = message(to="ann@example.org, Ben <ben@example.org>", extra="Cc: cat@example.org\r\n")


async def send(proxy: Proxy) -> tuple[int, str]:
    return await submit(proxy.port, CONTENT, sender="news@example.com", recipients=RECIPIENTS)


async def test_each_recipient_gets_a_copy_that_shows_only_them(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_split"}]})
    code, text = await send(proxy)
    assert code == 250
    assert text.startswith("2.0.0 Delivered as 3 separate copies, one per recipient [")
    # The copies go out together (upstream.copy_concurrency): in whatever order they finish.
    received_copies = sorted(upstream.messages, key=lambda m: RECIPIENTS.index(m.rcpt_tos[0]))
    assert [m.rcpt_tos for m in received_copies] == [[r] for r in RECIPIENTS]
    for received, recipient in zip(received_copies, RECIPIENTS, strict=True):
        parsed = email.message_from_bytes(received.content, policy=email.policy.default)
        assert parsed.get_all("To") == [recipient]
        assert parsed.get_all("Cc") is None
        assert parsed["X-Token"] == f"token-for-{recipient.split('@')[0]}"
        assert parsed["Subject"] == "Hello"
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["outcome"] == "delivered"
    assert set(audit["copies"]) == set(RECIPIENTS)


async def test_refused_copies_are_reported_to_the_sender(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "550 5.7.1 Ben's box refuses"}))
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_split"}]})
    code, text = await send(proxy)
    assert code == 250
    assert "Delivered as 2 separate copies, one per recipient; 1 refused, reported to the sender" in text
    # The DSN is queued before the 250; the queue's worker sends it at once.
    assert await eventually(lambda: any(m.mail_from == "<>" for m in upstream.messages))
    delivered = [m for m in upstream.messages if m.mail_from != "<>"]
    assert sorted(m.rcpt_tos[0] for m in delivered) == ["ann@example.org", "cat@example.org"]
    bounces = [m for m in upstream.messages if m.mail_from == "<>"]
    assert len(bounces) == 1
    assert bounces[0].rcpt_tos == ["news@example.com"]
    report = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    body = bounces[0].content.decode()
    assert "Final-Recipient: rfc822; ben@example.org" in body
    assert "Diagnostic-Code: smtp; 550 5.7.1 Ben's box refuses" in body


async def test_when_every_copy_is_refused_the_client_keeps_its_message(
    upstream_factory: Callable[..., Awaitable[FakeUpstream]], proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_reply="451 4.3.0 queue full"))
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_split"}]})
    code, text = await send(proxy)
    assert code == 451
    assert text.startswith("4.3.0 queue full [")
    assert upstream.messages == []
