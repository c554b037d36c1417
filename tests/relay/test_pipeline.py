"""The pipeline's promises, through the running proxy: modes, on_error, timeouts, stages, classes.

The policies here are small real policies written for the test and registered for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

import policies
from policies.base import Policy, Transaction, Verdict
from tests.conftest import Proxy, RawClient, eventually, message, submit
from tests.fakes import FakeUpstream

ProxyFactory = Callable[..., Awaitable[Proxy]]


class Exploding(Policy):
    name = "test_exploding"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        raise RuntimeError("store went away")


class Slow(Policy):
    name = "test_slow"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        await asyncio.sleep(5)
        return Verdict.accept()


class RefuseAll(Policy):
    name = "test_refuse_all"

    async def check_message(self, txn: Transaction) -> Verdict | None:
        return Verdict.reject("test says no", "Refused by the test policy")


class NoVip(Policy):
    """Per recipient: refuses addresses starting with 'vip'."""

    name = "test_no_vip"
    default_classes = ("commercial",)

    @dataclass(frozen=True)
    class Options:
        needs_headers: bool = False

    async def check_rcpt(self, txn: Transaction, recipient: str) -> Verdict | None:
        if self.options.needs_headers and txn.message is None:
            return None  # cannot tell yet: ask again after DATA
        if recipient.startswith("vip"):
            return Verdict.reject("vip", f"<{recipient}>: no consent for commercial mail")
        return Verdict.accept()


TEST_POLICIES = (Exploding, Slow, RefuseAll, NoVip)


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for cls in TEST_POLICIES:
        monkeypatch.setitem(policies.REGISTRY, cls.name, cls)
    return


async def send(port: int, recipients: list[str], content: bytes | None = None) -> tuple[int, str]:
    return await submit(port, content, sender="a@example.com", recipients=recipients)


async def test_on_error_tempfail_gives_451_with_the_txn_id(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_exploding"}]})
    code, text = await send(proxy.port, ["b@example.org"])
    assert code == 451
    audit = (await proxy.wait_audit(1))[-1]
    assert text == f"4.3.0 A policy check could not be completed; try again later ({audit['txn']})"
    assert "store went away" not in text
    assert audit["policies"][0]["error"] is True
    assert upstream.messages == []


async def test_on_error_accept_lets_the_mail_pass(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_exploding", "on_error": "accept"}]})
    assert (await send(proxy.port, ["b@example.org"]))[0] == 250
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_policy_errors_total", {"policy": "test_exploding"}) == 1
    assert len(upstream.messages) == 1


async def test_a_slow_policy_is_cut_at_its_timeout(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_slow", "timeout": "200ms"}]})
    code, text = await send(proxy.port, ["b@example.org"])
    assert (code, text.split(" ")[0]) == (451, "4.3.0")
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["policies"][0]["reason"] == "policy timed out"


async def test_monitor_mode_counts_but_lets_the_mail_pass(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(upstream.address, {"policies": [{"name": "test_refuse_all", "mode": "monitor"}]})
    assert (await send(proxy.port, ["b@example.org"]))[0] == 250
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["outcome"] == "delivered"
    assert audit["policies"][0] == {
        "policy": "test_refuse_all",
        "stage": "message",
        "action": "reject",
        "mode": "monitor",
        "reason": "test says no",
        "reply": "550 5.7.1 Refused by the test policy",
    }
    registry = proxy.app.services.metrics.registry
    assert (
        registry.get_sample_value(
            "sendguard_policy_verdicts_total", {"policy": "test_refuse_all", "action": "reject", "mode": "monitor"}
        )
        == 1
    )


async def test_the_first_refusal_ends_the_stage(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(
        upstream.address, {"policies": [{"name": "test_refuse_all"}, {"name": "test_exploding"}]}
    )
    assert (await send(proxy.port, ["b@example.org"]))[0] == 550
    audit = (await proxy.wait_audit(1))[-1]
    assert [p["policy"] for p in audit["policies"]] == ["test_refuse_all"]


async def test_class_known_from_the_envelope_refuses_recipients_one_by_one(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "classes": {"rules": [{"class": "commercial", "listeners": ["local"]}]},
            "policies": [{"name": "test_no_vip"}],
        },
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<bob@example.org>"))[0] == 250
    assert await client.cmd("RCPT TO:<vip@example.org>") == (
        550,
        "5.7.1 <vip@example.org>: no consent for commercial mail",
    )
    assert (await client.cmd("DATA"))[0] == 354
    await client.send(message() + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert upstream.messages[0].rcpt_tos == ["bob@example.org"]
    assert upstream.handler.commands.count("RCPT vip@example.org") == 0  # never reached the upstream


async def test_class_known_only_from_headers_gives_one_reply_naming_the_recipients(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "classes": {"rules": [{"class": "commercial", "headers_present": ["List-Unsubscribe"]}]},
            "policies": [{"name": "test_no_vip"}],
        },
    )
    newsletter = message(extra="List-Unsubscribe: <https://example.com/u/1>\r\n")
    # All refused: one reply names them; the client keeps its message.
    code, text = await send(proxy.port, ["vip1@example.org", "vip2@example.org"], newsletter)
    assert code == 550
    assert text == (
        "5.7.1 <vip1@example.org>: no consent for commercial mail (recipients: vip1@example.org, vip2@example.org)"
    )
    assert upstream.messages == []
    # Some may have it (issue 14): bob gets it, the others are refused and reported to the
    # sender, not sunk together with him.
    code, text = await send(proxy.port, ["bob@example.org", "vip1@example.org", "vip2@example.org"], newsletter)
    assert code == 250
    assert text.startswith("2.0.0 Delivered to 1 recipient, one copy each; 2 refused, reported to the sender")
    assert [m.rcpt_tos for m in upstream.messages if m.rcpt_tos != ["a@example.com"]] == [["bob@example.org"]]
    # ... and the sender hears which recipients were refused, and why, in a DSN.
    assert await eventually(lambda: any(m.rcpt_tos == ["a@example.com"] for m in upstream.messages))
    dsn = next(m for m in upstream.messages if m.rcpt_tos == ["a@example.com"]).content
    assert b"vip1@example.org" in dsn and b"vip2@example.org" in dsn and b"no consent" in dsn
    upstream.handler.messages.clear()
    # the same message without the marker is transactional: the policy does not apply
    assert (await send(proxy.port, ["vip1@example.org"]))[0] == 250


async def test_a_check_that_needs_the_headers_is_asked_again_after_data(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "classes": {"rules": [{"class": "commercial", "listeners": ["local"]}]},
            "policies": [{"name": "test_no_vip", "needs_headers": True}],
        },
    )
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    assert (await client.cmd("RCPT TO:<vip@example.org>"))[0] == 250  # no answer yet at RCPT time
    await client.cmd("DATA")
    await client.send(message() + b".\r\n")
    code, text = await client.reply()
    assert (code, text) == (
        550,
        "5.7.1 <vip@example.org>: no consent for commercial mail (recipients: vip@example.org)",
    )
    await client.close()


async def test_class_header_commercial_is_believed_transactional_only_from_trusted(
    upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    proxy = await proxy_factory(
        upstream.address,
        {
            "classes": {
                "rules": [{"class": "commercial", "listeners": ["local"]}],
                "header": {"trusted_users": ["orders-app"]},
            },
            "policies": [{"name": "test_no_vip"}],
        },
    )
    claims_transactional = message(extra="X-Sendguard-Class: transactional\r\n")
    assert (await send(proxy.port, ["vip@example.org"], claims_transactional))[0] == 550  # untrusted claim ignored
    audit = (await proxy.wait_audit(1))[-1]
    assert audit["class"] == "commercial"


async def test_an_internal_error_is_451_never_500(
    upstream: FakeUpstream, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(content: bytes, limits: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("proxy.relay.delivery.prepare_message", broken)  # inject a bug in the product's own code
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.com>")
    await client.cmd("RCPT TO:<b@example.org>")
    await client.cmd("DATA")
    await client.send(message() + b".\r\n")
    code, text = await client.reply()
    assert code == 451
    assert text.startswith("4.3.0 Temporary local problem; try again later (")
    assert "ZeroDivisionError" not in text and "bug" not in text
    assert (await client.cmd("NOOP"))[0] == 250
    await client.close()
    assert upstream.messages == []
