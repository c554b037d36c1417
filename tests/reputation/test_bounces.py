"""Hard bounces through the running proxy: dead addresses become suppressions in the consent
store, and a sender whose hard-bounce rate climbs gets its commercial mail paused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import pytest

from proxy.api.erasure import counter_eraser
from proxy.reputation.bounces import address_counter
from proxy.stores.consent import (
    ConsentStoreConfig,
    open_consent_store,
)
from proxy.stores.limits_store import LimitStoreConfig
from proxy.stores.pauses import MemoryPauseStore, PauseStore, RedisPauseStore
from tests.conftest import Proxy, RawClient, message
from tests.fakes import FakeUpstream, Faults
from tests.services import RedisTarget

ProxyFactory = Callable[..., Awaitable[Proxy]]
UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]
DEAD = "550 5.1.1 <{}>: Recipient address rejected: User unknown in virtual mailbox table"
ONE_BOUNCE_SUPPRESSES = {"bounces": {"suppress_after": 1}}


async def test_a_dead_address_is_suppressed_with_the_upstreams_words(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"gone@example.org": DEAD.format("gone@example.org")}))
    proxy = await proxy_factory(upstream.address, ONE_BOUNCE_SUPPRESSES)
    errors, _ = await aiosmtplib.send(
        message(),
        sender="news@example.com",
        recipients=["bob@example.org", "gone@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=10,
    )
    assert errors["gone@example.org"].code == 550
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        history = await store.history("gone@example.org")
        assert [(e.kind, e.method) for e in history] == [("suppressed", "hard_bounce")]
        assert history[0].upstream_reply == DEAD.format("gone@example.org")
        basis = await store.basis("gone@example.org", topic="*", sender="example.com")
        assert not basis.allowed
        assert await store.history("bob@example.org") == []
    finally:
        await store.close()
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_hard_bounces_total") == 1


async def test_a_temporary_refusal_is_not_a_bounce(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"full@example.org": "452 4.2.2 Mailbox full"}))
    proxy = await proxy_factory(upstream.address)
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<news@example.com>")
    assert (await client.cmd("RCPT TO:<full@example.org>"))[0] == 452
    await client.close()
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_hard_bounces_total") == 0


async def test_a_high_hard_bounce_rate_pauses_the_senders_commercial_mail(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    dead = [f"old{i}@example.org" for i in range(3)]
    upstream = await upstream_factory(faults=Faults(rcpt_replies={r: DEAD.format(r) for r in dead}))
    proxy = await proxy_factory(
        upstream.address,
        {
            "bounces": {"rate_threshold": 0.25, "min_recipients": 4, "pause": "1h"},
            "classes": {"rules": [{"class": "commercial", "headers_present": ["List-Unsubscribe"]}]},
        },
    )
    newsletter = message(sender="news@example.com", extra="List-Unsubscribe: <https://example.com/u/1>\r\n")
    refusals = []
    for recipients in (["ok@example.org", *dead], ["ok@example.org"]):
        try:
            await aiosmtplib.send(
                newsletter,
                sender="news@example.com",
                recipients=recipients,
                hostname="127.0.0.1",
                port=proxy.port,
                start_tls=False,
                timeout=10,
            )
        except aiosmtplib.SMTPDataError as error:
            refusals.append((error.code, error.message))
    # The pause starts the moment the rate is crossed, so even the message that crossed it waits.
    assert [code for code, _ in refusals] == [451, 451]
    assert refusals[1][1].startswith("4.7.1 Commercial mail from example.com is paused until ")
    assert "hard-bounced (75.0%, more than 25%); clean the list" in refusals[1][1]
    # transactional mail of the same sender still flows
    await aiosmtplib.send(
        message(sender="news@example.com"),
        sender="news@example.com",
        recipients=["ok@example.org"],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=10,
    )
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_bounce_pauses_total") == 1


async def test_a_transactions_accepted_recipients_count_before_its_hard_bounce_is_judged(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    """The denominator counts a transaction's accepted recipients in one call, at its end; a
    hard bounce within it is judged with those before it counted (1 of 5, not 1 of 1)."""
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"old@example.org": DEAD.format("old@example.org")}))
    proxy = await proxy_factory(upstream.address, {"bounces": {"rate_threshold": 0.1, "min_recipients": 5}})
    pauses = proxy.app.runtime.pauses
    window = proxy.app.runtime.bounces.config.rate_window
    client = await RawClient.connect(proxy.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<news@example.com>")
    for n in range(4):
        assert (await client.cmd(f"RCPT TO:<ok{n}@example.org>"))[0] == 250
    assert await pauses.tallied("bounces:tried:example.com", window) == 0  # waits for the end or a bounce
    assert (await client.cmd("RCPT TO:<old@example.org>"))[0] == 550
    assert await pauses.tallied("bounces:tried:example.com", window) == 5
    assert [p.reason for p in await pauses.active() if p.value == "example.com"] == [
        "1 of the last 5 recipients of example.com hard-bounced (20.0%, more than 10%); clean the list"
    ]
    # Accepted after the bounce, then abandoned (RSET): still tried, counted at the end.
    assert (await client.cmd("RCPT TO:<ok9@example.org>"))[0] == 250
    assert (await client.cmd("RSET"))[0] == 250
    assert await pauses.tallied("bounces:tried:example.com", window) == 6
    await client.close()


async def test_a_suppressed_address_is_never_offered_to_the_upstream_again(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Issue 15 part 8: whatever the class (here transactional), a hard-bounced address is
    refused at RCPT by sendguard itself; the suppression is recorded once."""
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"gone@example.org": DEAD.format("gone@example.org")}))
    proxy = await proxy_factory(upstream.address, ONE_BOUNCE_SUPPRESSES)
    for attempt in range(3):
        client = await RawClient.connect(proxy.port)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<shop@example.com>")
        code, text = await client.cmd("RCPT TO:<gone@example.org>")
        assert (code, text.split(" ")[0]) == (550, "5.1.1"), attempt
        if attempt:
            assert "hard-bounced before" in text and "sendguard consent unsuppress" in text
        await client.cmd("QUIT")
        await client.close()
    offered = [c for c in upstream.handler.commands if c == "RCPT gone@example.org"]
    assert len(offered) == 1  # only the first attempt reached the upstream
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        assert [e.kind for e in await store.history("gone@example.org")] == ["suppressed"]
    finally:
        await store.close()
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_hard_bounces_total") == 1


async def test_a_repeated_hard_bounce_is_recorded_once(tmp_path: Path) -> None:
    from policies.base import Reply, Transaction
    from proxy.reputation.bounces import BounceConfig, Bounces
    from proxy.stores.pauses import MemoryPauseStore

    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        bounces = Bounces(BounceConfig(suppress_after=1), store, MemoryPauseStore())
        txn = Transaction(txn_id="t", listener="local", client_ip="127.0.0.1", mail_from="shop@example.com")
        dead = Reply(550, "5.1.1", "User unknown")
        for _ in range(3):  # e.g. copies of one message, each refused by the upstream
            await bounces.recipient_tried(txn, "gone@example.org", dead)
        assert [e.kind for e in await store.history("gone@example.org")] == ["suppressed"]
        refusal = await bounces.refusal(txn, "gone@example.org")
        assert refusal is not None and refusal.code == 550
        assert await bounces.refusal(txn, "alive@example.org") is None
    finally:
        await store.close()


async def test_two_hard_bounces_a_day_apart_suppress_one_does_not(tmp_path: Path) -> None:
    """Issue 15 part 5: the default is 2 hard bounces over at least a day (as Postal does)."""
    from policies.base import Reply, Transaction
    from proxy.reputation.bounces import BounceConfig, Bounces
    from proxy.stores.pauses import MemoryPauseStore

    clock = [1_000_000.0]
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        bounces = Bounces(BounceConfig(), store, MemoryPauseStore(clock=lambda: clock[0]))
        txn = Transaction(txn_id="t", listener="local", client_ip="127.0.0.1", mail_from="shop@example.com")
        dead = Reply(550, "5.1.1", "User unknown")
        await bounces.recipient_tried(txn, "gone@example.org", dead)
        clock[0] += 3600
        await bounces.recipient_tried(txn, "gone@example.org", dead)  # twice within an hour: not yet
        assert await store.history("gone@example.org") == []
        assert await bounces.refusal(txn, "gone@example.org") is None
        clock[0] += 86400
        await bounces.recipient_tried(txn, "gone@example.org", dead)  # and again a day later
        assert [e.kind for e in await store.history("gone@example.org")] == ["suppressed"]
    finally:
        await store.close()


async def test_a_burst_of_bounces_is_an_upstream_fault_not_dead_addresses(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """Issue 15 part 5: an upstream refusing many addresses at once suppresses nothing; the
    burst is counted and commercial mail paused."""
    dead = {f"user{i}@example.org": DEAD.format(f"user{i}@example.org") for i in range(6)}
    upstream = await upstream_factory(faults=Faults(rcpt_replies=dead))
    proxy = await proxy_factory(
        upstream.address, {"bounces": {"suppress_after": 1, "burst": "3/1m", "burst_pause": "10m"}}
    )
    errors, _ = await aiosmtplib.send(
        message(),
        sender="shop@example.com",
        recipients=["bob@example.org", *dead],
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        timeout=10,
    )
    assert len(errors) == 6
    store = await open_consent_store(ConsentStoreConfig(path=str(tmp_path / "consent.db")))
    try:
        suppressed = [a for a in dead if await store.history(a)]
    finally:
        await store.close()
    assert len(suppressed) == 3  # the first three, before the rate passed the line
    registry = proxy.app.services.metrics.registry
    assert registry.get_sample_value("sendguard_bounce_bursts_total") == 1
    pauses = await proxy.app.runtime.pauses.active()
    assert [(p.scope, p.value, p.source) for p in pauses] == [("class", "commercial", "bounces:burst")]


async def forget_behaves(pauses: PauseStore) -> None:
    """The hard-bounce counter is keyed by a plain hash of the address: an erasure deletes it,
    and only its own."""
    try:
        for address in ("anna@example.nl", "piet@example.org"):
            await pauses.hit(address_counter(address), 3600)
        erase = counter_eraser(pauses)
        assert await erase(["anna@example.nl", "Anna@example.nl"], "erased:x") == {"bounce counters": 1}
        assert await pauses.count(address_counter("anna@example.nl"), 3600) == 0
        assert await pauses.count(address_counter("piet@example.org"), 3600) == 1
        assert await erase(["anna@example.nl"], "erased:x") == {"bounce counters": 0}
    finally:
        await pauses.close()


async def test_an_erasure_forgets_the_bounce_counter_in_memory() -> None:
    await forget_behaves(MemoryPauseStore())


@pytest.mark.redis
async def test_an_erasure_forgets_the_bounce_counter_in_redis(redis_target: RedisTarget) -> None:
    config = LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix)
    await forget_behaves(RedisPauseStore(config))
