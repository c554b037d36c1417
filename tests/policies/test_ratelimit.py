"""rate_limit: budgets per key with several windows, charged at the right stage, refunded for
what is not delivered, 451 4.7.1 with a retry time; MX rollup against the loopback DNS
server; Redis shared by two policies; Redis down; the YAML it reads.

Transactions are built directly, as the proxy builds them; the memory store runs on a fake
clock, so every retry time below is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiosmtplib
import dns.asyncresolver
import pytest
import yaml

import policies
from policies.base import Action, Outcome, Transaction, Verdict
from policies.message import ParsedMessage
from policies.ratelimit import MXRollup, RateLimitPolicy, human_wait, parse_rate_spec
from proxy.config.settings import ConfigError, PolicyEntry, load_config_text
from proxy.relay.pipeline import Pipeline
from proxy.schema import Converter, Duration
from proxy.stores.limits import LimitStore, MemoryLimitStore
from proxy.stores.limits_redis import RedisLimitStore
from tests.conftest import Proxy
from tests.dnsserver import DNSServer
from tests.fakes import FakeUpstream, Faults
from tests.services import RedisTarget
from tests.stores import test_limits
from tests.stores.test_limits import Backend, FakeClock, closed_port

# The same parametrized fixtures as the store tests: every test that takes ``backend`` runs
# on the memory store and on Redis.
backend_kind = test_limits.backend_kind
backend = test_limits.backend

_ids = itertools.count(1)


def options(text: str) -> RateLimitPolicy.Options:
    conv = Converter("policy.yaml", {})
    node = yaml.compose(text)
    assert node is not None
    parsed = conv.dataclass(node, RateLimitPolicy.Options, "policies[0]")
    assert conv.issues == [], [str(i) for i in conv.issues]
    return parsed


def option_errors(text: str) -> list[str]:
    conv = Converter("policy.yaml", {})
    node = yaml.compose(text)
    assert node is not None
    conv.dataclass(node, RateLimitPolicy.Options, "policies[0]")
    return [str(issue) for issue in conv.issues]


def make_policy(text: str, store: LimitStore, **resources: object) -> RateLimitPolicy:
    return RateLimitPolicy(options(text), {"limits": store, **resources})


def new_txn(**fields: object) -> Transaction:
    values: dict[str, object] = {
        "txn_id": f"t{next(_ids)}",
        "listener": "local",
        "client_ip": "192.0.2.7",
        "auth_user": "alice",
        "mail_from": "alice@example.com",
    }
    values.update(fields)
    return Transaction(**values)  # type: ignore[arg-type]


async def offer(policy: RateLimitPolicy, txn: Transaction, recipients: Sequence[str]) -> list[Verdict | None]:
    """RCPT for each recipient, as the proxy does: the accepted ones join the transaction."""
    verdicts = []
    for recipient in recipients:
        verdict = await policy.check_rcpt(txn, recipient)
        if verdict is None or verdict.action is Action.ACCEPT:
            txn.recipients.append(recipient)
        verdicts.append(verdict)
    return verdicts


def accepted(verdicts: Sequence[Verdict | None]) -> int:
    return sum(1 for v in verdicts if v is not None and v.action is Action.ACCEPT)


def delivered(txn: Transaction, *, refused: Sequence[str] = ()) -> Outcome:
    return Outcome(delivered=True, delivered_recipients=tuple(r for r in txn.recipients if r not in refused))


def parsed(sender: str = "news@example.com", to: str = "x@example.org") -> ParsedMessage:
    return ParsedMessage(f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: hi\r\n\r\nhello\r\n".encode())


ALICE_3_PER_MIN = "limits:\n  - {key: auth_user, rates: [3/min]}\n"


# ---- budgets, replies and refunds: both backends --------------------------------------------


async def test_recipients_beyond_the_budget_get_451_with_the_retry_time(backend: Backend) -> None:
    policy = make_policy(ALICE_3_PER_MIN, backend.store())
    txn = new_txn()
    verdicts = await offer(policy, txn, [f"r{i}@example.org" for i in range(5)])
    assert accepted(verdicts) == 3
    refusal = verdicts[3]
    assert refusal is not None and refusal.action is Action.TEMPFAIL and refusal.reply is not None
    assert refusal.reply.line() == "451 4.7.1 Rate limit reached for user alice (3/min); try again in 20s"
    assert refusal.evidence == {"limit": "auth_user", "key": "alice", "rate": "3/min", "retry_after": 20}
    backend.clock.advance(20)
    assert accepted(await offer(policy, new_txn(), ["late@example.org", "later@example.org"])) == 1


async def test_the_binding_window_is_the_one_named(backend: Backend) -> None:
    policy = make_policy("limits:\n  - {key: auth_user, rates: [3/min, 5/day]}\n", backend.store())
    assert accepted(await offer(policy, new_txn(), ["a@x.org", "b@x.org", "c@x.org"])) == 3
    backend.clock.advance(60)
    verdicts = await offer(policy, new_txn(), ["d@x.org", "e@x.org", "f@x.org"])
    assert accepted(verdicts) == 2
    reply = verdicts[2].reply if verdicts[2] else None
    assert reply is not None
    # 5/day refills one unit every 4.8 h; the first five were taken a minute ago.
    assert reply.text == "Rate limit reached for user alice (5/day); try again in 5 h"


async def test_undelivered_recipients_are_refunded(backend: Backend) -> None:
    policy = make_policy(ALICE_3_PER_MIN, backend.store())
    txn = new_txn()
    assert accepted(await offer(policy, txn, ["a@x.org", "refused@x.org", "c@x.org"])) == 3
    await policy.commit(txn, delivered(txn, refused=["refused@x.org"]))  # the upstream refused one
    verdicts = await offer(policy, new_txn(), ["d@x.org", "e@x.org"])
    assert accepted(verdicts) == 1  # exactly the refused recipient's unit came back


async def test_a_failed_or_abandoned_message_is_refunded_once(backend: Backend) -> None:
    policy = make_policy(ALICE_3_PER_MIN, backend.store())
    txn = new_txn()
    await offer(policy, txn, ["a@x.org", "b@x.org", "c@x.org"])
    abandoned = Outcome(delivered=False)
    await policy.commit(txn, abandoned)
    await policy.commit(txn, abandoned)  # a second commit changes nothing
    verdicts = await offer(policy, new_txn(), [f"n{i}@x.org" for i in range(4)])
    assert accepted(verdicts) == 3


async def test_a_recipient_asked_twice_is_charged_once(backend: Backend) -> None:
    policy = make_policy(ALICE_3_PER_MIN, backend.store())
    txn = new_txn()
    assert accepted(await offer(policy, txn, ["a@x.org"])) == 1
    again = await policy.check_rcpt(txn, "A@x.org")  # the pipeline re-asks after DATA
    assert again is not None and again.action is Action.ACCEPT
    assert accepted(await offer(policy, new_txn(), ["b@x.org", "c@x.org", "d@x.org"])) == 2


# ---- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "txn_fields", "who"),
    [
        ("auth_user", {"auth_user": "Alice"}, "user alice"),
        ("mail_from", {"mail_from": "Alice@Example.COM"}, "sender alice@example.com"),
        ("mail_from", {"mail_from": ""}, "sender <>"),
        ("client_ip", {"client_ip": "2001:DB8::7"}, "client 2001:db8::7"),
        ("listener", {"listener": "submission"}, "listener submission"),
        ("global", {}, "this server"),
        ("recipient_domain", {}, "recipient domain example.org"),
    ],
)
async def test_each_key_names_itself_in_the_reply(key: str, txn_fields: dict[str, object], who: str) -> None:
    policy = make_policy(f"limits:\n  - {{key: {key}, rates: ['1/min']}}\n", MemoryLimitStore(FakeClock()))
    verdicts = await offer(policy, new_txn(**txn_fields), ["one@example.org", "two@EXAMPLE.org"])
    assert accepted(verdicts) == 1
    reply = verdicts[1].reply if verdicts[1] else None
    assert reply is not None and reply.line() == f"451 4.7.1 Rate limit reached for {who} (1/min); try again in 60s"


async def test_a_limit_without_a_value_does_not_apply() -> None:
    policy = make_policy(ALICE_3_PER_MIN, MemoryLimitStore(FakeClock()))
    txn = new_txn(auth_user=None)  # a trusted-network client that did not AUTH
    assert [await policy.check_rcpt(txn, f"r{i}@x.org") for i in range(5)] == [None] * 5


async def test_overrides_give_some_values_other_rates() -> None:
    text = "limits:\n  - key: auth_user\n    rates: [2/min]\n    overrides: {Bulk-App: [5/min], monitoring: []}\n"
    policy = make_policy(text, MemoryLimitStore(FakeClock()))
    recipients = [f"r{i}@x.org" for i in range(10)]
    assert accepted(await offer(policy, new_txn(auth_user="alice"), recipients)) == 2
    assert accepted(await offer(policy, new_txn(auth_user="bulk-app"), recipients)) == 5
    assert await offer(policy, new_txn(auth_user="monitoring"), recipients) == [None] * 10  # unlimited


async def test_large_messages_are_never_exempt() -> None:
    policy = make_policy("limits:\n  - {key: global, rates: [100/h]}\n", MemoryLimitStore(FakeClock()))
    verdicts = await offer(policy, new_txn(), [f"r{i}@x.org" for i in range(150)])
    assert accepted(verdicts) == 100  # rspamd skips messages above max_rcpt; here every recipient counts


# ---- per message, per domain, From domain ---------------------------------------------------


async def test_messages_are_counted_at_mail_from() -> None:
    policy = make_policy(
        "limits:\n  - {key: auth_user, rates: [2/min], count: messages}\n", MemoryLimitStore(FakeClock())
    )
    results = []
    for _ in range(3):
        txn = new_txn()
        results.append(await policy.check_mail(txn))
        assert await policy.check_rcpt(txn, "r@x.org") is None  # recipients are not what this limit counts
    assert [v.action if v else None for v in results] == [Action.ACCEPT, Action.ACCEPT, Action.TEMPFAIL]
    assert results[2] is not None and results[2].reply is not None
    assert results[2].reply.text == "Rate limit reached for user alice (2/min); try again in 30s"


async def test_message_charges_come_back_when_the_message_is_not_delivered() -> None:
    policy = make_policy(
        "limits:\n  - {key: auth_user, rates: [1/min], count: messages}\n", MemoryLimitStore(FakeClock())
    )
    first = new_txn()
    assert (await policy.check_mail(first)) == Verdict.accept()
    await policy.commit(first, Outcome(delivered=False, reply=None))
    second = new_txn()
    assert (await policy.check_mail(second)) == Verdict.accept()
    second.recipients.append("r@x.org")
    await policy.commit(second, delivered(second))
    third = await policy.check_mail(new_txn())
    assert third is not None and third.action is Action.TEMPFAIL


async def test_the_microsoft_365_recipe() -> None:
    # Two limits on one key: messages a minute (30 at Microsoft) and recipients a day (10,000).
    text = (
        "limits:\n"
        "  - {key: auth_user, name: m365_messages, count: messages, rates: ['20/min burst 10']}\n"
        "  - {key: auth_user, name: m365_recipients, rates: ['9000/day burst 1000']}\n"
    )
    policy = make_policy(text, MemoryLimitStore(FakeClock()))
    mail_verdicts, recipients_accepted = [], 0
    for _ in range(11):
        txn = new_txn()
        verdict = await policy.check_mail(txn)
        mail_verdicts.append(verdict.action if verdict else None)
        if verdict is not None and verdict.action is Action.ACCEPT:
            recipients_accepted += accepted(await offer(policy, txn, [f"r{i}@x.org" for i in range(150)]))
    assert mail_verdicts == [Action.ACCEPT] * 10 + [Action.TEMPFAIL]  # a burst of 10 messages, then 3 s apart
    assert recipients_accepted == 1000  # a burst of 1,000 recipients, then one every 9.6 s


async def test_recipient_domain_messages_count_once_per_domain() -> None:
    text = "limits:\n  - {key: recipient_domain, rates: [2/h], count: messages}\n"
    policy = make_policy(text, MemoryLimitStore(FakeClock()))
    first = new_txn()
    assert accepted(await offer(policy, first, ["a@x.org", "b@x.org", "c@x.org", "d@y.org"])) == 4
    second = new_txn()
    assert accepted(await offer(policy, second, ["e@x.org", "f@x.org"])) == 2  # x.org's second message
    third = await offer(policy, new_txn(), ["g@x.org", "h@y.org"])
    assert [v.action if v else None for v in third] == [Action.TEMPFAIL, Action.ACCEPT]
    # The upstream refused a@x.org and d@y.org of the first message: it still reached x.org
    # (b and c), so that charge stays; y.org's comes back. The second was never delivered.
    await policy.commit(first, delivered(first, refused=["a@x.org", "d@y.org"]))
    await policy.commit(second, Outcome(delivered=False))
    assert accepted(await offer(policy, new_txn(), ["i@x.org", "j@y.org", "k@z.org"])) == 3


async def test_from_domain_is_charged_after_data() -> None:
    text = "limits:\n  - {key: from_domain, rates: [5/h]}\n"
    policy = make_policy(text, MemoryLimitStore(FakeClock()))
    first = new_txn(mail_from="bounces@mailer.example.net")
    assert await offer(policy, first, ["a@x.org", "b@x.org", "c@x.org"]) == [None, None, None]
    first.message = parsed(sender="News@Example.COM")
    assert await policy.check_message(first) == Verdict.accept()
    second = new_txn()
    await offer(policy, second, ["d@x.org", "e@x.org", "f@x.org"])
    second.message = parsed(sender="news@example.com")
    verdict = await policy.check_message(second)
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.line() == "451 4.7.1 Rate limit reached for From domain example.com (5/h); try again in 12 min"
    # Two of the first message's recipients were not delivered after all: one unit each back.
    await policy.commit(first, delivered(first, refused=["b@x.org", "c@x.org"]))
    assert await policy.check_message(second) == Verdict.accept()  # 1 + 3 of 5


async def test_more_recipients_than_the_burst_is_refused_for_good() -> None:
    policy = make_policy("limits:\n  - {key: from_domain, rates: ['100/h burst 3']}\n", MemoryLimitStore(FakeClock()))
    txn = new_txn()
    await offer(policy, txn, ["a@x.org", "b@x.org", "c@x.org", "d@x.org"])
    txn.message = parsed()
    verdict = await policy.check_message(txn)
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    assert verdict.reply.line() == (
        "550 5.5.3 Message has 4 recipients; the rate limit for From domain example.com (100/h burst 3) "
        "lets at most 3 through at once; send it in smaller batches"
    )


# ---- MX rollup ----------------------------------------------------------------------------------


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    server = await DNSServer(
        {
            ("a.example", "MX"): ["10 mx1.shared.example.", "20 mx2.shared.example."],
            ("b.example", "MX"): ["5 MX1.shared.example."],
            ("c.example", "MX"): ["10 mx.c.example."],
            ("twin.example", "MX"): ["10 mx-b.twin.example.", "10 mx-a.twin.example.", "30 backup.example."],
            ("nomx.example", "A"): ["192.0.2.10"],
            ("nullmx.example", "MX"): ["0 ."],
        },
        ttl=60,
    ).start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("domain", "site"),
    [
        ("a.example", "mx1.shared.example"),
        ("b.example", "mx1.shared.example"),  # another domain, same mail servers
        ("c.example", "mx.c.example"),
        ("twin.example", "mx-a.twin.example,mx-b.twin.example"),  # every most-preferred host, sorted
        ("nomx.example", "nomx.example"),  # no MX: mail goes to the domain itself (RFC 5321 5.1)
        ("missing.example", "missing.example"),  # NXDOMAIN
        ("nullmx.example", "nullmx.example"),  # null MX (RFC 7505)
        ("[192.0.2.1]", "[192.0.2.1]"),  # an address literal is not looked up
    ],
)
async def test_mx_rollup_names_the_receiving_servers(dns_server: DNSServer, domain: str, site: str) -> None:
    rollup = MXRollup(dns_server.resolver())
    assert await rollup.site(domain) == site


async def test_mx_answers_are_cached_for_their_ttl(dns_server: DNSServer) -> None:
    clock = FakeClock()
    rollup = MXRollup(dns_server.resolver(), clock=clock)
    results = await asyncio.gather(*(rollup.site("a.example") for _ in range(20)))
    assert set(results) == {"mx1.shared.example"}
    assert dns_server.queries.count(("a.example", "MX")) == 1  # twenty waiters, one lookup
    clock.advance(59)
    dns_server.set("a.example", "MX", ["10 mx.moved.example."])
    assert await rollup.site("a.example") == "mx1.shared.example"
    clock.advance(2)  # past the 60 s TTL
    assert await rollup.site("a.example") == "mx.moved.example"
    assert dns_server.queries.count(("a.example", "MX")) == 2


async def test_dns_trouble_counts_the_domain_itself() -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = closed_port()  # nobody answers there
    rollup = MXRollup(resolver, lookup_timeout=0.2)
    assert await rollup.site("a.example") == "a.example"


async def test_mx_rollup_shares_one_budget_between_domains(dns_server: DNSServer) -> None:
    text = "limits:\n  - {key: recipient_domain, mx_rollup: true, rates: [2/h]}\n"
    policy = make_policy(text, MemoryLimitStore(FakeClock()), dns=dns_server.resolver())
    verdicts = await offer(policy, new_txn(), ["x@a.example", "y@b.example", "z@b.example", "w@c.example"])
    assert [v.action if v else None for v in verdicts] == [Action.ACCEPT, Action.ACCEPT, Action.TEMPFAIL, Action.ACCEPT]
    reply = verdicts[2].reply if verdicts[2] else None
    assert reply is not None and reply.text == (
        "Rate limit reached for mail server mx1.shared.example (recipient domain b.example) (2/h); try again in 30 min"
    )


# ---- hold ----------------------------------------------------------------------------------------


async def test_hold_waits_for_the_budget_to_come_back() -> None:
    store = MemoryLimitStore(time.monotonic)  # real time: the hold really waits
    policy = make_policy("limits:\n  - {key: auth_user, rates: ['4/s burst 1'], hold: 2s}\n", store)
    verdicts = await offer(policy, new_txn(), ["a@x.org", "b@x.org"])
    assert accepted(verdicts) == 2  # the second waited for its unit (a quarter second) and got it


async def test_hold_shorter_than_the_wait_defers_at_once() -> None:
    store = MemoryLimitStore(time.monotonic)
    policy = make_policy("limits:\n  - {key: auth_user, rates: ['1/min burst 1'], hold: 1s}\n", store)
    verdicts = await offer(policy, new_txn(), ["a@x.org", "b@x.org"])
    assert accepted(verdicts) == 1
    assert verdicts[1] is not None and verdicts[1].action is Action.TEMPFAIL


# ---- store trouble ---------------------------------------------------------------------------


@pytest.mark.parametrize(("on_error", "action"), [("accept", Action.ACCEPT), ("tempfail", Action.TEMPFAIL)])
async def test_store_down_follows_on_error_and_is_counted(on_error: str, action: Action) -> None:
    store = RedisLimitStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
    errors: list[str] = []
    policy = make_policy(
        f"limits:\n  - {{key: auth_user, rates: [3/min], on_error: {on_error}}}\n",
        store,
        metrics_limit_errors=errors.append,
    )
    txn = new_txn(txn_id="abc123")
    try:
        verdict = await policy.check_rcpt(txn, "a@x.org")
        assert verdict is not None and verdict.action is action
        assert "store_error" in verdict.evidence
        if action is Action.TEMPFAIL:
            assert verdict.reply is not None
            assert verdict.reply.line() == "451 4.3.0 Rate limit check could not be completed; try again later (abc123)"
        assert errors == ["reserve"] and policy.store_errors == 1
    finally:
        await store.close()


async def test_lost_refunds_are_counted() -> None:
    working = MemoryLimitStore(FakeClock())
    errors: list[str] = []
    policy = make_policy(ALICE_3_PER_MIN, working, metrics_limit_errors=errors.append)
    txn = new_txn()
    await offer(policy, txn, ["a@x.org", "b@x.org"])
    policy.store = RedisLimitStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)  # the store goes away
    try:
        await policy.commit(txn, Outcome(delivered=False))
    finally:
        await policy.store.close()
    assert errors == ["refund"]  # one count for the commit, not one per lost refund


# ---- two proxies, one Redis -----------------------------------------------------------------


async def test_two_policies_on_one_redis_share_the_budget(redis_target: RedisTarget) -> None:
    stores = [RedisLimitStore(redis_target.url, key_prefix=redis_target.prefix) for _ in range(2)]
    text = "limits:\n  - {key: auth_user, rates: [50/day]}\n"
    pair = [make_policy(text, store) for store in stores]

    async def attempt(i: int) -> tuple[Transaction, bool]:
        txn = new_txn()
        verdict = await pair[i % 2].check_rcpt(txn, f"r{i}@x.org")
        ok = verdict is not None and verdict.action is Action.ACCEPT
        if ok:
            txn.recipients.append(f"r{i}@x.org")
        return txn, ok

    try:
        results = await asyncio.gather(*(attempt(i) for i in range(200)))
        granted = [(i, txn) for i, (txn, ok) in enumerate(results) if ok]
        assert len(granted) == 50
        for n, (i, txn) in enumerate(granted):  # the upstream refused every other one
            outcome = Outcome(delivered=False) if n % 2 else delivered(txn)
            await pair[i % 2].commit(txn, outcome)
        again = await asyncio.gather(*(attempt(i) for i in range(200, 400)))
        assert sum(ok for _, ok in again) == 25
    finally:
        for store in stores:
            await store.close()


# ---- through the pipeline and the proxy ------------------------------------------------------


async def test_class_bound_limits_are_charged_after_data() -> None:
    store = MemoryLimitStore(FakeClock())
    entry = PolicyEntry(
        name="rate_limit",
        id="rate_limit",
        mode="enforce",
        on_error="tempfail",
        classes=("commercial",),
        timeout=Duration(5),
        options=options("limits:\n  - {key: auth_user, rates: [2/min]}\n"),
        policy_class=RateLimitPolicy,
    )
    pipeline = Pipeline((entry,), resources={"limits": store})
    txn = new_txn()
    for recipient in ["a@x.org", "b@x.org", "c@x.org"]:
        assert (await pipeline.check_rcpt(txn, recipient)).accepted  # class unknown: nothing checked yet
        txn.recipients.append(recipient)
    txn.message, txn.message_class = parsed(), "commercial"
    decision = await pipeline.check_message(txn)
    assert decision.action is Action.TEMPFAIL and decision.reply is not None
    assert decision.reply.line() == (
        "451 4.7.1 Rate limit reached for user alice (2/min); try again in 30s (recipients: c@x.org)"
    )
    await pipeline.commit(txn, Outcome(delivered=False))
    assert len(await store.buckets()) == 0  # both charged recipients were given back
    await pipeline.close()


async def test_through_the_proxy_refused_recipients_are_given_back(
    monkeypatch: pytest.MonkeyPatch,
    upstream_factory: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Awaitable[Proxy]],
) -> None:
    monkeypatch.setitem(policies.REGISTRY, "rate_limit", RateLimitPolicy)
    upstream = await upstream_factory(faults=Faults(rcpt_replies={"bad@example.org": "550 5.1.1 No such user"}))
    proxy = await proxy_factory(
        upstream.address,
        {"policies": [{"name": "rate_limit", "limits": [{"key": "client_ip", "rates": ["3/h"]}]}]},
    )

    async def send(recipients: list[str]) -> dict[str, aiosmtplib.SMTPResponse]:
        errors, _ = await aiosmtplib.send(
            b"From: <a@example.com>\r\nTo: <x@example.org>\r\nSubject: hi\r\n\r\nhello\r\n",
            sender="a@example.com",
            recipients=recipients,
            hostname="127.0.0.1",
            port=proxy.port,
            start_tls=False,
            timeout=10,
        )
        return errors

    first = await send(["a@example.org", "bad@example.org", "c@example.org"])
    assert set(first) == {"bad@example.org"}
    second = await send(["d@example.org", "e@example.org"])  # bad's unit came back: room for d
    assert set(second) == {"e@example.org"}
    assert second["e@example.org"].code == 451
    assert second["e@example.org"].message.startswith("4.7.1 Rate limit reached for client 127.0.0.1 (3/h); try again")
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.org", "c@example.org"], ["d@example.org"]]


# ---- configuration -------------------------------------------------------------------------------


def test_the_example_config_reads_well() -> None:
    parsed_options = options(
        """
limits:
  - key: auth_user
    rates: [30/min, 10000/day]
    overrides: {bulk-app: [300/min, "100000/day burst 5000"]}
  - key: recipient_domain
    mx_rollup: true
    rates: [500/h]
    hold: 5s
  - key: global
    rates: [100/s]
    count: messages
    on_error: tempfail
"""
    )
    user, domain, everyone = parsed_options.limits
    assert [(r.count, r.period, r.burst) for r in user.parsed_rates] == [(30, 60, 30), (10000, 86400, 10000)]
    assert [str(r) for r in user.rates_for("bulk-app")] == ["300/min", "100000/day burst 5000"]
    assert user.rates_for("bulk-app")[1].burst == 5000
    assert (domain.mx_rollup, domain.hold, domain.label) == (True, 5.0, "recipient_domain")
    assert (everyone.count, everyone.on_error) == ("messages", "tempfail")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: []\n", "give at least one limit"),
        ("limits:\n  - {key: user, rates: [3/min]}\n", "must be one of auth_user, mail_from"),
        ("limits:\n  - {key: auth_user, rates: [3/mn]}\n", "rates[0]: not a rate: '3/mn'"),
        ("limits:\n  - {key: auth_user, rates: []}\n", "give at least one rate"),
        ("limits:\n  - {key: auth_user, rates: [0/min]}\n", "count of at least 1"),
        ("limits:\n  - {key: auth_user, rates: ['3/min burst 0']}\n", "burst must be at least 1"),
        ("limits:\n  - {key: auth_user, rates: [3/min, 50/m]}\n", "two rates with the same period"),
        (
            "limits:\n  - {key: auth_user, rates: [3/min], mx_rollup: true}\n",
            "mx_rollup applies to key: recipient_domain",
        ),
        ("limits:\n  - {key: auth_user, rates: [3/min], hold: 5m}\n", "hold must be between"),
        ("limits:\n  - {key: auth_user, rates: [3/min], name: 'my limit'}\n", "name 'my limit'"),
        ("limits:\n  - {key: auth_user, rates: [3/min], overrides: {bob: [x]}}\n", "overrides.bob[0]: not a rate"),
        (
            "limits:\n  - {key: global, rates: [3/min]}\n  - {key: global, rates: [9/h]}\n",
            "two limits are called 'global'",
        ),
        ("limits:\n  - {key: auth_user, rates: [3/min], count: rcpts}\n", "must be one of recipients, messages"),
    ],
)
def test_option_errors_say_what_to_fix(text: str, message: str) -> None:
    errors = option_errors(text)
    assert len(errors) == 1 and message in errors[0], errors


def test_the_config_loader_reports_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.REGISTRY, "rate_limit", RateLimitPolicy)
    text = (
        "listeners:\n"
        "  - {name: local, address: '127.0.0.1:0'}\n"
        "policies:\n"
        "  - name: rate_limit\n"
        "    limits:\n"
        "      - key: auth_user\n"
        "        rates: [30/min, 10000/dya]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "sendguard.yaml")
    (issue,) = caught.value.issues
    assert (issue.line, issue.path) == (6, "policies[0].limits[0]")
    assert "rates[1]: not a rate: '10000/dya'" in issue.message


@pytest.mark.parametrize(
    ("text", "count", "period", "burst"),
    [("30/min", 30, 60, 30), ("10000/day burst 1000", 10000, 86400, 1000), ("5 / 10m  BURST 2", 5, 600, 2)],
)
def test_rate_spec(text: str, count: int, period: float, burst: int) -> None:
    spec = parse_rate_spec(text)
    assert (spec.count, spec.period, spec.burst) == (count, period, burst)


@pytest.mark.parametrize(("seconds", "text"), [(0.2, "1s"), (37, "37s"), (119, "119s"), (121, "3 min"), (18000, "5 h")])
def test_retry_times_round_up(seconds: float, text: str) -> None:
    assert human_wait(seconds) == text
