"""Regressions for what the review of the relay core found: each test reproduces one defect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import policies
from policies.base import MessageEdit, Policy, Transaction, Verdict
from tests.conftest import Proxy, RawClient, TLSFiles, eventually, message, submit
from tests.fakes import FakeUpstream, Faults, ScriptedUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[ScriptedUpstream]]]:
    started: list[ScriptedUpstream] = []

    async def make(**replies: bytes) -> ScriptedUpstream:
        server = await ScriptedUpstream(replies).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


async def test_a_250_to_the_data_command_itself_is_never_passed_on_as_success(
    scripted: Callable[..., Awaitable[ScriptedUpstream]], proxy_factory: ProxyFactory
) -> None:
    upstream = await scripted(DATA=b"250 2.0.0 ok?")
    proxy = await proxy_factory(upstream.address)
    code, text = await submit(proxy.port)
    assert code == 451
    assert text.startswith("4.4.2 ")
    assert upstream.messages == 0


async def test_a_refused_data_command_is_followed_by_rset_before_the_connection_is_reused(
    scripted: Callable[..., Awaitable[ScriptedUpstream]], proxy_factory: ProxyFactory
) -> None:
    upstream = await scripted(DATA=b"554 5.5.1 no valid recipients")
    proxy = await proxy_factory(upstream.address)
    assert (await submit(proxy.port))[0] == 554
    upstream.replies["DATA"] = b"354 go"
    assert (await submit(proxy.port))[0] == 250
    verbs = [c[:4] for c in upstream.commands]
    assert verbs[verbs.index(b"DATA") + 1] == b"RSET"


async def test_an_upstream_reply_in_latin1_reaches_the_client_readably(
    scripted: Callable[..., Awaitable[ScriptedUpstream]], proxy_factory: ProxyFactory
) -> None:
    upstream = await scripted(RCPT=b"550 5.1.1 Empf\xe4nger unbekannt")
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    assert await client.cmd("RCPT TO:<x@example.org>") == (550, "5.1.1 Empf?nger unbekannt")
    upstream.replies["RCPT"] = b"250 2.1.5 ok"
    assert (await client.cmd("RCPT TO:<y@example.org>"))[0] == 250  # the transaction goes on
    await client.close()


async def test_an_address_that_is_not_utf8_is_refused_and_the_transaction_goes_on(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<a@example.com> SMTPUTF8"))[0] == 250
    await client.send(b"RCPT TO:<bad\xff@example.org>\r\n")
    assert (await client.reply())[0] == 501
    assert (await client.cmd("RCPT TO:<good@example.org>"))[0] == 250
    await client.cmd("DATA")
    await client.send(message() + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert upstream.messages[0].rcpt_tos == ["good@example.org"]


async def test_a_message_too_big_frees_its_upstream_connection(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address, {"listeners": [{"name": "local", "address": "127.0.0.1:0", "max_message_size": "2KB"}]}
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.org>")
    await client.cmd("DATA")
    await client.send(message(body="x" * 5000) + b".\r\n")
    assert (await client.reply())[0] == 552
    assert (await client.cmd("MAIL FROM:<a@example.com>"))[0] == 250  # a new transaction, the old one ended
    await client.cmd("QUIT")
    await client.close()
    await asyncio.sleep(0.1)
    runtime = proxy.app.runtime
    assert runtime.in_flight == 0
    assert runtime.upstream.busy == 0  # type: ignore[union-attr]
    outcomes = [line["outcome"] for line in await proxy.wait_audit(2)]
    assert outcomes == ["abandoned", "abandoned"]


class SplitAll(Policy):
    name = "test_split_all"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        return Verdict.accept(edit=MessageEdit(split_per_recipient=True))


async def test_a_dsn_for_a_message_with_an_utf8_subject_is_sent(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(policies.REGISTRY, SplitAll.name, SplitAll)
    upstream = await upstream_factory(faults=Faults(data_replies={"ben@example.org": "550 5.7.1 refused"}))
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_split_all"}]})
    content = "From: news@example.com\r\nTo: ann@example.org\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    code, text = await submit(
        proxy.port, content, sender="news@example.com", recipients=["ann@example.org", "ben@example.org"]
    )
    assert code == 250
    assert "1 refused, reported to the sender" in text
    # The DSN is queued before the 250; the queue's worker sends it at once.
    assert await eventually(lambda: any(m.mail_from == "<>" for m in upstream.messages))
    assert [m.rcpt_tos for m in upstream.messages if m.mail_from == "<>"] == [["news@example.com"]]


async def test_a_reload_with_a_bad_certificate_is_refused_and_tls_keeps_working(
    tls_files: TLSFiles, upstream: FakeUpstream, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    listener = {
        "name": "local",
        "address": "127.0.0.1:0",
        "trusted_networks": ["127.0.0.0/8"],
        "tls": {"mode": "starttls", "cert": str(tls_files.cert_file), "key": str(tls_files.key_file)},
    }
    proxy = await proxy_factory(upstream.address, {"listeners": [listener]})
    other = tls_files.ca.issue_cert("other.test")
    wrong_key = tmp_path / "wrong-key.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    text = proxy.config_path.read_text().replace(str(tls_files.key_file), str(wrong_key))
    proxy.config_path.write_text(text)
    assert not await proxy.app.reload()
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("STARTTLS"))[0] == 220
    await client.writer.start_tls(tls_files.client_context(), server_hostname="localhost")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    await client.close()
