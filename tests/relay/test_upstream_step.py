"""A pooled upstream connection out of step (issue 15, part 2): an upstream that sends a line
nobody asked for, in the same write as a reply, must never hand that line to another client
as the reply to its command. The connection is dropped instead of pooled; the reply that was
asked for still counts (the upstream took the message: the client gets its 250)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import Proxy, message, submit
from tests.fakes import FakeUpstream, Faults

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]
ONE_CONNECTION = {"upstream": {"pool": {"max_connections": 1}}}


async def test_an_extra_line_after_the_final_dot_never_reaches_the_next_client(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(extra_line={"data-end": "554 5.0.0 extra stale line"}))
    proxy = await proxy_factory(upstream.address, ONE_CONNECTION)
    for number in range(3):  # one pooled connection: every message after the first would reuse it
        code, text = await submit(proxy.port, message(subject=f"m{number}"), recipients=[f"r{number}@example.org"])
        assert (code, text.split(" ")[0]) == (250, "2.0.0"), (number, code, text)
        assert "stale" not in text
    assert len(upstream.messages) == 3
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_upstream_replies_total", {"stage": "data", "code_class": "error"}) == 3


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
async def test_an_extra_line_after_mail_or_rcpt_ends_the_transaction_with_451(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, stage: str
) -> None:
    upstream = await upstream_factory(faults=Faults(extra_line={stage: "250 2.1.5 stale"}))
    proxy = await proxy_factory(upstream.address, ONE_CONNECTION)
    code, text = await submit(proxy.port, message(), recipients=["bob@example.org", "carol@example.org"])
    # The second command would have read the stale line as its reply: the transaction stops,
    # the client keeps its message (4xx) and sends again.
    assert code == 451, text
    assert text.startswith("4.4.2 ")
    assert upstream.messages == []
    # ... at once: no command after the one with two replies reached the upstream.
    relayed = [c.split(" ")[0] for c in upstream.handler.commands]
    assert relayed == (["MAIL"] if stage == "mail" else ["MAIL", "RCPT"]), upstream.handler.commands
