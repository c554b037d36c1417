"""The compliance policies through the running proxy: Bcc advice or a per-recipient split for
mass mail with visible recipients, and unsubscribe and consent refusals with their reasons."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Awaitable, Callable

import aiosmtplib
import pytest

from tests.conftest import Proxy, message
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]
CROWD = [f"person{i}@customer{i}.example" for i in range(12)]
MASS_MAIL = message(to=", ".join(CROWD))


async def test_mass_mail_with_visible_recipients_is_refused_with_bcc_advice(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "visible_recipients", "max_visible": 10}]})
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await aiosmtplib.send(
            MASS_MAIL,
            sender="alice@example.com",
            recipients=CROWD,
            hostname="127.0.0.1",
            port=proxy.port,
            start_tls=False,
            timeout=20,
        )
    assert caught.value.code == 550
    assert caught.value.message.startswith("5.7.1 ")
    assert "12" in caught.value.message and "Bcc" in caught.value.message
    assert upstream.messages == []


async def test_split_remedy_delivers_one_private_copy_each(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(
        upstream.address, {"policies": [{"name": "visible_recipients", "max_visible": 10, "remedy": "split"}]}
    )
    _, reply = await aiosmtplib.send(
        MASS_MAIL,
        sender="alice@example.com",
        recipients=CROWD,
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=30,
    )
    assert reply.startswith("2.0.0 Delivered as 12 separate copies")
    assert len(upstream.messages) == 12
    for received in upstream.messages:
        parsed = email.message_from_bytes(received.content, policy=email.policy.default)
        assert parsed.get_all("To") == received.rcpt_tos  # each sees only themselves


async def test_colleagues_do_not_count(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    colleagues = [f"c{i}@example.com" for i in range(20)]
    proxy = await proxy_factory(
        upstream.address,
        {"policies": [{"name": "visible_recipients", "max_visible": 10, "internal_domains": ["example.com"]}]},
    )
    errors, _ = await aiosmtplib.send(
        message(to=", ".join(colleagues)),
        sender="alice@example.com",
        recipients=colleagues,
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=20,
    )
    assert errors == {}
    assert len(upstream.messages) == 1
