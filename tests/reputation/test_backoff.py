"""Upstream backoff: rules count matching upstream replies and pause a class, a sender or all
mail; the pause holds on every instance sharing Redis; transactional mail keeps flowing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from policies.base import Reply, Transaction
from proxy.reputation.backoff import Backoff, BackoffConfig, BackoffRule, ReplyMatch
from proxy.schema import Rate
from proxy.stores.limits import LimitStoreConfig
from proxy.stores.pauses import MemoryPauseStore, Pause, RedisPauseStore
from tests.conftest import Proxy, message, submit
from tests.fakes import FakeUpstream, Faults
from tests.services import RedisTarget

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]

NEWSLETTER = message(subject="Deals", extra="List-Unsubscribe: <https://example.com/u/1>\r\n")
RECEIPT = message(subject="Your receipt")
THROTTLE_RULE = {
    "name": "upstream-throttle",
    "match": {"code": "4xx", "text": "try again later"},
    "threshold": "2/10m",
    "scope": "class",
    "class": "commercial",
    "duration": "30m",
}
CLASSES = {"rules": [{"class": "commercial", "headers_present": ["List-Unsubscribe"]}]}


async def send(port: int, content: bytes) -> tuple[int, str]:
    return await submit(port, content, sender="news@example.com")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("match", "stage", "reply", "hit"),
    [
        ({"code": "4xx"}, "rcpt", Reply(451, "4.7.0", "try again later"), True),
        ({"code": "4xx"}, "rcpt", Reply(550, "5.7.1", "no"), False),
        ({"code": "421"}, "mail", Reply(421, "4.7.0", "busy"), True),
        ({"code": "421"}, "mail", Reply(451, "4.7.0", "busy"), False),
        ({"status": "5.7.70*"}, "data", Reply(550, "5.7.708", "Service unavailable. Access denied"), True),
        ({"status": "4.7.28"}, "data", Reply(421, "4.7.28", "unusual rate of mail"), True),
        ({"text": "spamhaus"}, "data", Reply(550, "5.7.1", "Blocked using Spamhaus ZEN"), True),
        ({"text": "spamhaus", "stage": "rcpt"}, "data", Reply(550, "5.7.1", "Blocked using Spamhaus"), False),
    ],
)
async def test_rule_matching(match: dict[str, Any], stage: str, reply: Reply, hit: bool) -> None:
    store = MemoryPauseStore()
    rule = BackoffRule(name="r", match=ReplyMatch(**match), threshold=Rate(1, 60))
    await Backoff(BackoffConfig(rules=(rule,)), store).observe(stage, reply, Transaction("t", "l", "127.0.0.1"))
    assert bool(await store.active()) is hit


async def test_threshold_counts_within_the_window_only() -> None:
    clock = Clock()
    store = MemoryPauseStore(clock)
    assert await store.hit("c", 600) == 1
    clock.now += 300
    assert await store.hit("c", 600) == 2
    clock.now += 301  # the first event left the window
    assert await store.hit("c", 600) == 2


async def test_a_pause_is_extended_never_shortened() -> None:
    clock = Clock()
    store = MemoryPauseStore(clock)
    await store.pause(Pause("class", "commercial", clock.now + 600, "long", "a"))
    await store.pause(Pause("class", "commercial", clock.now + 60, "short", "a"))
    assert [p.reason for p in await store.active()] == ["long"]
    clock.now += 601
    assert await store.active() == []


async def test_throttling_upstream_pauses_commercial_mail_and_transactional_keeps_flowing(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_reply="451 4.7.0 Too many messages, try again later"))
    proxy = await proxy_factory(upstream.address, {"classes": CLASSES, "backoff": {"rules": [THROTTLE_RULE]}})
    for _ in range(2):
        assert (await send(proxy.port, NEWSLETTER))[0] == 451  # the upstream's own 451, relayed
    upstream.faults.data_reply = None  # the upstream would accept again, but we hold off
    code, text = await send(proxy.port, NEWSLETTER)
    assert code == 451
    assert text.startswith("4.7.1 Commercial mail is paused until ")
    assert 'because the upstream answered "451 4.7.0 Too many messages, try again later" 2 times within 2/10m' in text
    assert (await send(proxy.port, RECEIPT))[0] == 250  # transactional mail is not held back
    assert [m.content for m in upstream.messages] == [upstream.messages[0].content]
    registry = proxy.app.services.metrics.registry
    assert (
        registry.get_sample_value("sendguard_backoff_pauses_total", {"rule": "upstream-throttle", "scope": "class"})
        == 1
    )
    assert registry.get_sample_value("sendguard_paused_transactions_total", {"scope": "class"}) == 1
    lines = await proxy.wait_audit(5)
    (paused,) = [line for line in lines if line.get("event") == "pause"]  # the pause is on record as it is set
    assert (paused["scope"], paused["value"], paused["source"]) == ("class", "commercial", "backoff:upstream-throttle")
    audit = [line for line in lines if "txn" in line][2]
    assert audit["policies"][-1]["policy"] == "pause"
    assert audit["policies"][-1]["reason"].startswith("backoff:upstream-throttle: the upstream answered")


async def test_a_rule_on_421_sees_and_quotes_the_upstreams_own_reply(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    """Issue 15 part 8: the client gets 451 for an upstream 421, but backoff counts the 421."""
    upstream = await upstream_factory(faults=Faults(data_reply="421 4.7.0 Try again later"))
    rule = {"name": "closing", "match": {"code": "421"}, "threshold": "1/10m", "scope": "all", "duration": "10m"}
    proxy = await proxy_factory(upstream.address, {"backoff": {"rules": [rule]}})
    code, text = await send(proxy.port, RECEIPT)
    assert (code, text.split(" [")[0]) == (451, "4.7.0 Try again later")  # relayed as 451: we are not closing
    upstream.faults.data_reply = None
    code, text = await send(proxy.port, RECEIPT)
    assert code == 451 and " is paused until " in text
    assert 'because the upstream answered "421 4.7.0 Try again later" 1 times within 1/10m' in text


async def test_class_known_from_the_envelope_is_paused_at_mail(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory()
    proxy = await proxy_factory(
        upstream.address, {"classes": {"rules": [{"class": "commercial", "listeners": ["local"]}]}}
    )
    await proxy.app.runtime.pauses.pause(Pause("class", "commercial", 9e9, "a blocklist lists us", "blocklist"))
    code, text = await send(proxy.port, RECEIPT)
    assert code == 451
    assert text.startswith("4.7.1 Commercial mail is paused until ")
    assert upstream.connections == 0  # refused before any upstream work


async def test_sender_scope_pauses_only_that_sender(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_reply="550 5.7.708 Access denied, traffic not accepted"))
    rule = {
        "name": "m365-restricted",
        "match": {"status": "5.7.708"},
        "threshold": "1/h",
        "scope": "sender",
        "duration": "1h",
    }
    proxy = await proxy_factory(upstream.address, {"backoff": {"rules": [rule]}})
    assert (await send(proxy.port, message(sender="news@example.com")))[0] == 550
    upstream.faults.data_reply = None
    code, text = await send(proxy.port, message(sender="news@example.com"))
    assert (code, text.split(" is paused")[0]) == (451, "4.7.1 Mail from example.com")
    other = message(sender="billing@other.example").replace(b"news@example.com", b"billing@other.example")
    try:
        await aiosmtplib.send(
            other,
            sender="billing@other.example",
            recipients=["bob@example.org"],
            hostname="127.0.0.1",
            port=proxy.port,
            start_tls=False,
            timeout=10,
        )
    except aiosmtplib.SMTPException as error:  # pragma: no cover - a failure is reported by the assert
        pytest.fail(f"another sender was held back: {error}")


async def test_a_pause_holds_on_every_instance_sharing_redis(
    redis_target: RedisTarget, upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    upstream = await upstream_factory(faults=Faults(data_reply="421 4.7.0 Try again later"))
    shared = {
        "classes": CLASSES,
        "backoff": {"rules": [THROTTLE_RULE]},
        "stores": {"state": {"backend": "redis", "url": redis_target.url, "key_prefix": redis_target.prefix}},
    }
    first = await proxy_factory(upstream.address, shared)
    second = await proxy_factory(upstream.address, shared)
    assert (await send(first.port, NEWSLETTER))[0] == 451
    assert (await send(second.port, NEWSLETTER))[0] == 451  # the threshold counts across instances
    upstream.faults.data_reply = None
    await asyncio.sleep(1.1)  # instances refresh their view of the pauses once a second
    for proxy in (first, second):
        code, text = await send(proxy.port, NEWSLETTER)
        assert (code, text.split(" is paused")[0]) == (451, "4.7.1 Commercial mail")


async def test_redis_down_lets_mail_flow_and_is_counted(upstream: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy = await proxy_factory(
        upstream.address,
        {"stores": {"state": {"backend": "redis", "url": f"redis://127.0.0.1:{dead}/0", "timeout": "200ms"}}},
    )
    assert (await send(proxy.port, RECEIPT))[0] == 250
    registry = proxy.app.services.metrics.registry
    assert (registry.get_sample_value("sendguard_state_store_errors_total", {"operation": "pauses"}) or 0) >= 1


async def test_redis_store_round_trip(redis_target: RedisTarget) -> None:
    store = RedisPauseStore(LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix))
    try:
        await store.pause(Pause("sender", "example.com", store.now() + 60, "why", "test"))
        assert [(p.scope, p.value) for p in await store.active()] == [("sender", "example.com")]
        assert await store.hit("x", 60) == 1
        assert await store.hit("x", 60) == 2
        await store.lift("sender", "example.com", "test")
        assert await store.active() == []
    finally:
        await store.close()


async def test_two_instances_share_one_rate_limit_through_redis(
    redis_target: RedisTarget, upstream: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    shared = {
        "stores": {"state": {"backend": "redis", "url": redis_target.url, "key_prefix": redis_target.prefix}},
        "policies": [
            {"name": "rate_limit", "limits": [{"key": "mail_from", "count": "messages", "rates": ["3/h burst 3"]}]}
        ],
    }
    first = await proxy_factory(upstream.address, shared)
    second = await proxy_factory(upstream.address, shared)
    replies: list[tuple[int, str]] = []
    for i in range(6):
        proxy = (first, second)[i % 2]
        try:
            await aiosmtplib.send(
                RECEIPT,
                sender="app@example.com",
                recipients=["bob@example.org"],
                hostname="127.0.0.1",
                port=proxy.port,
                start_tls=False,
                timeout=10,
            )
            replies.append((250, ""))
        except aiosmtplib.SMTPSenderRefused as error:
            replies.append((error.code, error.message))
    assert [code for code, _ in replies] == [250, 250, 250, 451, 451, 451]
    assert replies[3][1].startswith("4.7.1 Rate limit reached for sender app@example.com (3/h")
    assert len(upstream.messages) == 3
