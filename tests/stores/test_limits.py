"""The rate-limit store: GCRA buckets, all-or-none reserves and idempotent refunds, the same
table for the memory and the Redis backend; sharing one Redis between stores; Redis down;
the store config; ``sendguard limits show``.

Time is a fake clock handed to both backends (Redis scripts take the caller's time when
given one), so refill is tested without sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import yaml

import policies
from policies.ratelimit import RateLimitPolicy
from proxy.cli.limits import add_limits_parser, show_limits
from proxy.config.settings import Settings, load_config_text
from proxy.schema import Converter
from proxy.stores.limits import (
    NEVER,
    Charge,
    LimitStore,
    LimitStoreConfig,
    LimitStoreError,
    MemoryLimitStore,
    bucket_key,
    open_limit_store,
    parse_bucket_key,
)
from proxy.stores.limits_redis import RedisLimitStore
from tests.services import RedisTarget


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    kind: str
    clock: FakeClock
    target: RedisTarget | None
    stores: list[LimitStore] = field(default_factory=list)

    def store(self, *, clock: Callable[[], float] | str | None = "fake") -> LimitStore:
        """A new store object on this backend (a second one on Redis sees the same buckets)."""
        chosen = self.clock if clock == "fake" else clock
        assert not isinstance(chosen, str)
        if self.kind == "memory":
            made: LimitStore = MemoryLimitStore(chosen or self.clock)
        else:
            assert self.target is not None
            made = RedisLimitStore(self.target.url, key_prefix=self.target.prefix, clock=chosen)
        self.stores.append(made)
        return made


@pytest.fixture(params=["memory", "redis"])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, RedisTarget | None]:
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_target")
    return "memory", None


@pytest.fixture
async def backend(backend_kind: tuple[str, RedisTarget | None]) -> AsyncIterator[Backend]:
    kind, target = backend_kind
    made = Backend(kind, FakeClock(), target)
    yield made
    for store in made.stores:
        await store.close()


def per_minute(count: int, burst: int | None = None, value: str = "alice", cost: int = 1) -> Charge:
    return Charge(bucket_key("user", 60, value), 60 / count, burst or count, cost)


def per_day(count: int, burst: int | None = None, value: str = "alice", cost: int = 1) -> Charge:
    return Charge(bucket_key("user", 86400, value), 86400 / count, burst or count, cost)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- one table, both backends ---------------------------------------------------------------


async def test_burst_then_exact_wait(backend: Backend) -> None:
    store = backend.store()
    granted = [(await store.reserve([per_minute(3)])).granted for _ in range(3)]
    denied = await store.reserve([per_minute(3)])
    assert granted == [True, True, True]
    assert not denied.granted and denied.reservation is None
    assert denied.retry_after == pytest.approx(20.0, abs=0.01)  # 3/min refills one every 20 s


async def test_refill_over_time(backend: Backend) -> None:
    store = backend.store()
    for _ in range(3):
        assert (await store.reserve([per_minute(3)])).granted
    backend.clock.advance(19.9)
    assert not (await store.reserve([per_minute(3)])).granted
    backend.clock.advance(0.1)
    assert (await store.reserve([per_minute(3)])).granted
    assert not (await store.reserve([per_minute(3)])).granted
    backend.clock.advance(60)  # a whole period: the bucket is full again, and no fuller
    results = [(await store.reserve([per_minute(3)])).granted for _ in range(4)]
    assert results == [True, True, True, False]


@pytest.mark.parametrize(
    ("rate", "burst", "expected_grants", "expected_wait"),
    [
        (60, 1, 1, 1.0),  # "60/min burst 1": paced, one a second
        (60, 10, 10, 1.0),
        (10000, None, 10000, 0.006),  # burst defaults to the count
    ],
)
async def test_burst_sets_how_many_pass_at_once(
    backend: Backend, rate: int, burst: int | None, expected_grants: int, expected_wait: float
) -> None:
    store = backend.store()
    charge = per_minute(rate, burst)
    cost = expected_grants if expected_grants > 20 else 1  # big buckets: one large charge, not 10,000 calls
    grants = 0
    while (await store.reserve([Charge(charge.key, charge.interval, charge.burst, cost)])).granted:
        grants += cost
    assert grants == expected_grants
    assert (await store.reserve([charge])).retry_after == pytest.approx(expected_wait, abs=0.002)


async def test_windows_are_all_or_none(backend: Backend) -> None:
    store = backend.store()
    minute, day = per_minute(3), per_day(4)
    for _ in range(3):
        assert (await store.reserve([minute, day])).granted
    blocked = await store.reserve([minute, day])
    assert not blocked.granted
    assert blocked.blocking == (0,)  # the minute window said no, the day window had room
    assert blocked.waits[1] == 0
    before = {s.key: s.tat for s in await store.peek([minute.key, day.key])}
    for _ in range(5):
        await store.reserve([minute, day])
    after = {s.key: s.tat for s in await store.peek([minute.key, day.key])}
    assert after == before  # refused attempts took nothing from either window
    backend.clock.advance(60)
    assert (await store.reserve([minute, day])).granted  # the fourth and last of the day
    blocked = await store.reserve([minute, day])
    assert blocked.blocking == (1,)
    assert blocked.retry_after == pytest.approx(86400 / 4 - 60, abs=0.01)


async def test_cost_above_burst_never_conforms(backend: Backend) -> None:
    store = backend.store()
    result = await store.reserve([per_minute(3, cost=4), per_day(100)])
    assert not result.granted
    assert result.waits[0] == NEVER and result.retry_after == math.inf
    assert (await store.peek([per_day(100).key]))[0].used(864) == 0  # nothing taken from the day either


async def test_refund_returns_exactly_once(backend: Backend) -> None:
    store = backend.store()
    reservations = [(await store.reserve([per_minute(3), per_day(10)])).reservation for _ in range(3)]
    assert all(r is not None for r in reservations)
    assert not (await store.reserve([per_minute(3)])).granted
    first = reservations[0]
    assert first is not None
    assert await store.refund(first) is True
    assert await store.refund(first) is False  # a repeated refund is a no-op
    assert await store.refund(first) is False
    assert (await store.reserve([per_minute(3)])).granted  # exactly one unit came back
    assert not (await store.reserve([per_minute(3)])).granted
    day_state = (await store.peek([per_day(10).key]))[0]
    assert day_state.used(8640) == pytest.approx(2.0)  # the day window got its unit back too


async def test_refund_never_overfills(backend: Backend) -> None:
    store = backend.store()
    taken = (await store.reserve([per_minute(3)])).reservation
    assert taken is not None
    backend.clock.advance(3600)  # long refilled
    assert await store.refund(taken) is True
    assert [(await store.reserve([per_minute(3)])).granted for _ in range(4)] == [True, True, True, False]


async def test_refund_while_busy_is_exact(backend: Backend) -> None:
    store = backend.store()
    first = (await store.reserve([per_minute(3)])).reservation
    for _ in range(2):
        await store.reserve([per_minute(3)])
    backend.clock.advance(10)
    assert first is not None and await store.refund(first)
    # As if the first had never been taken: two units taken 10 s ago, half a unit refilled.
    assert (await store.peek([per_minute(3).key]))[0].used(20) == pytest.approx(1.5)
    assert (await store.reserve([per_minute(3)])).granted
    assert (await store.reserve([per_minute(3)])).retry_after == pytest.approx(10.0, abs=0.01)


async def test_refund_after_the_bucket_refilled_frees_nothing(backend: Backend) -> None:
    store = backend.store()
    early = (await store.reserve([per_minute(3)])).reservation
    backend.clock.advance(30)  # the early unit came back by refilling: the bucket is full
    assert (await store.reserve([per_minute(3)])).granted  # someone else takes a unit
    assert early is not None and await store.refund(early) is True
    # Giving the early unit back again would free the unit the other one holds.
    assert [(await store.reserve([per_minute(3)])).granted for _ in range(3)] == [True, True, False]


async def test_partial_refund_gives_back_part_of_a_charge(backend: Backend) -> None:
    store = backend.store()
    taken = (await store.reserve([per_minute(5, cost=4)])).reservation
    assert taken is not None
    charge = taken.charges[0]
    one = taken.part("one", [Charge(charge.key, charge.interval, charge.burst, 1)])
    assert await store.refund(one) is True
    assert await store.refund(one) is False
    state = (await store.peek([charge.key]))[0]
    assert state.used(charge.interval) == pytest.approx(3.0)


async def test_buckets_lists_what_is_not_full(backend: Backend) -> None:
    store = backend.store()
    await store.reserve([per_minute(10, value="alice"), per_day(100, value="alice")])
    await store.reserve([per_minute(10, value="bob", cost=5)])
    await store.reserve([Charge(bucket_key("client", 60, "2001:db8::1"), 6.0, 10, 2)])
    states = {s.key: s for s in await store.buckets()}
    assert set(states) == {
        per_minute(10, value="alice").key,
        per_day(100, value="alice").key,
        per_minute(10, value="bob").key,
        bucket_key("client", 60, "2001:db8::1"),
    }
    assert states[per_minute(10, value="bob").key].used(6.0) == pytest.approx(5.0)
    assert {s.key for s in await store.buckets("alice")} == {per_minute(10).key, per_day(100).key}
    assert {s.key for s in await store.buckets("2001:db8::1")} == {bucket_key("client", 60, "2001:db8::1")}
    backend.clock.advance(86400)
    assert await store.buckets() == []  # all full again: nothing to show


async def test_a_bucket_is_named_once_per_reserve(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(ValueError, match="once"):
        await store.reserve([per_minute(3), per_minute(3)])


# ---- memory only ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "period", "burst"),
    [(30, 60, 30), (20, 60, 10), (30, 60, 1), (9000, 86400, 1000), (500, 3600, 50)],
)
def test_any_period_holds_at_most_count_plus_burst(count: int, period: int, burst: int) -> None:
    # The documented bound, which is how to size a limit under an upstream's hard cap: a
    # greedy sender taking every unit the moment it is there, for three periods.
    clock = FakeClock(0.0)
    store = MemoryLimitStore(clock)
    charge = Charge(bucket_key("cap", period, "greedy"), period / count, burst, 1)
    grants: list[float] = []
    step = charge.interval / 3
    while clock.now < 3 * period:
        while store.reserve_now([charge]).granted:
            grants.append(clock.now)
        clock.advance(step)
    most, start = 0, 0
    for end, at in enumerate(grants):  # the busiest closed window [at - period, at]
        while grants[start] < at - period:
            start += 1
        most = max(most, end - start + 1)
    assert count + burst - 1 <= most <= count + burst
    assert len(grants) <= 3 * count + burst  # and over the long run, count per period


def test_memory_store_is_exact_across_threads() -> None:
    store = MemoryLimitStore(FakeClock())
    charge = per_day(50)
    granted: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(50):
            result = store.reserve_now([charge])
            with lock:
                granted.append(result.granted)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 400
    assert granted.count(True) == 50


def test_memory_store_forgets_full_buckets() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock, sweep_every=10)
    for i in range(10):
        store.reserve_now([per_minute(10, value=f"user{i}")])
    assert len(store) == 10
    clock.advance(61)
    for i in range(10):
        store.reserve_now([per_minute(10, value=f"other{i}")])
    assert len(store) == 10  # the first ten were full again and swept away


# ---- Redis only -----------------------------------------------------------------------------


async def test_redis_bucket_expires_when_full(redis_target: RedisTarget) -> None:
    import redis.asyncio as redis_asyncio

    store = RedisLimitStore(redis_target.url, key_prefix=redis_target.prefix)  # the server's clock
    try:
        assert (await store.reserve([per_minute(3, cost=2)])).granted
        client = redis_asyncio.Redis.from_url(redis_target.url)
        ttl_ms = await client.pttl(redis_target.prefix + per_minute(3).key)
        await client.aclose()
        assert 39_000 < ttl_ms <= 40_000  # two units of 20 s: full again in 40 s, then gone
    finally:
        await store.close()


async def test_two_stores_on_one_redis_stay_within_one_limit(redis_target: RedisTarget) -> None:
    # Two proxies, one Redis, the server's clock: 200 concurrent attempts at a budget of 50.
    stores = [RedisLimitStore(redis_target.url, key_prefix=redis_target.prefix) for _ in range(2)]
    charges = [per_minute(50), per_day(50)]
    try:
        results = await asyncio.gather(*(stores[i % 2].reserve(charges) for i in range(200)))
        assert sum(r.granted for r in results) == 50
        refunds = await asyncio.gather(
            *(stores[i % 2].refund(r.reservation) for i, r in enumerate(results[:100]) if r.reservation)
        )
        repeats = await asyncio.gather(
            *(stores[(i + 1) % 2].refund(r.reservation) for i, r in enumerate(results[:100]) if r.reservation)
        )
        assert all(refunds) and not any(repeats)  # the other proxy's repeat is a no-op
        again = await asyncio.gather(*(stores[i % 2].reserve(charges) for i in range(100)))
        assert sum(r.granted for r in again) == len(refunds)
    finally:
        for store in stores:
            await store.close()


async def test_more_checks_than_connections_wait_instead_of_failing(redis_target: RedisTarget) -> None:
    store = RedisLimitStore(redis_target.url, key_prefix=redis_target.prefix, max_connections=2)
    try:
        results = await asyncio.gather(*(store.reserve([per_day(1000, value=f"u{i}")]) for i in range(100)))
        assert all(r.granted for r in results)  # none failed open for want of a connection
    finally:
        await store.close()


async def test_redis_down_raises_store_error() -> None:
    store = RedisLimitStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
    try:
        with pytest.raises(LimitStoreError, match="Redis reserve failed"):
            await store.reserve([per_minute(3)])
        taken = (await MemoryLimitStore().reserve([per_minute(3)])).reservation
        assert taken is not None
        with pytest.raises(LimitStoreError, match="refund"):
            await store.refund(taken)
        with pytest.raises(LimitStoreError):
            await store.buckets()
    finally:
        await store.close()


# ---- keys and config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "period", "value"),
    [("user", 60.0, "alice"), ("client", 600.0, "2001:db8::1"), ("domain", 0.5, "b\u00fccher.example")],
)
def test_bucket_key_round_trip(limit: str, period: float, value: str) -> None:
    assert parse_bucket_key(bucket_key(limit, period, value)) == (limit, period, value)


def test_long_values_are_hashed() -> None:
    key = bucket_key("sender", 60, "x" * 5000 + "@example.com")
    assert len(key) < 100 and key.startswith("rl:sender:60:sha256=")


def test_foreign_keys_are_not_buckets() -> None:
    assert parse_bucket_key("rf:abc") is None
    assert parse_bucket_key("rl:user:sixty:alice") is None


def convert_store_config(text: str, environ: dict[str, str] | None = None) -> tuple[LimitStoreConfig, list[str]]:
    conv = Converter("limits.yaml", environ or {})
    node = yaml.compose(text)
    assert node is not None
    config = conv.dataclass(node, LimitStoreConfig, "stores.limits")
    return config, [str(issue) for issue in conv.issues]


def test_store_config_reads_yaml_with_environment() -> None:
    config, issues = convert_store_config(
        "backend: redis\nurl: redis://:${SG_REDIS_PASSWORD}@10.0.0.5:6379/2\nkey_prefix: 'mail1:'\ntimeout: 250ms\n",
        {"SG_REDIS_PASSWORD": "s3cret"},
    )
    assert issues == []
    assert config.url == "redis://:s3cret@10.0.0.5:6379/2"
    assert (config.backend, config.key_prefix, config.timeout) == ("redis", "mail1:", 0.25)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backend: redis\nurl: http://localhost\n", "url must start with redis://"),
        ("backend: memcache\n", "must be one of memory, redis"),
        ("timeout: 0s\n", "timeout must be positive"),
        ("url: redis://${NOT_SET_ANYWHERE}/0\n", "environment variable NOT_SET_ANYWHERE is not set"),
    ],
)
def test_store_config_errors(text: str, message: str) -> None:
    _, issues = convert_store_config(text)
    assert len(issues) == 1 and message in issues[0]


async def test_open_limit_store_builds_the_backend(redis_target: RedisTarget) -> None:
    memory = open_limit_store(LimitStoreConfig())
    assert isinstance(memory, MemoryLimitStore) and not memory.shared
    shared = open_limit_store(LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix))
    try:
        assert isinstance(shared, RedisLimitStore) and shared.shared
        assert (await shared.reserve([per_minute(3)])).granted
    finally:
        await shared.close()


# ---- sendguard limits show ------------------------------------------------------------------


@pytest.fixture
def limit_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A config with a rate_limit entry, registered for the test (the lead registers it for real)."""
    monkeypatch.setitem(policies.REGISTRY, "rate_limit", RateLimitPolicy)
    text = yaml.safe_dump(
        {
            "listeners": [{"name": "local", "address": "127.0.0.1:0"}],
            "policies": [
                {
                    "name": "rate_limit",
                    "limits": [
                        {"key": "auth_user", "rates": ["3/min", "100/day"], "overrides": {"bulk": ["1000/min"]}},
                        {"key": "recipient_domain", "rates": ["50/h"]},
                    ],
                }
            ],
        }
    )
    return load_config_text(text, "limits.yaml")


async def test_limits_show_lists_the_fullest_first(redis_target: RedisTarget, limit_settings: Settings) -> None:
    settings = limit_settings
    config = LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix)
    store = open_limit_store(config)
    try:
        await store.reserve([Charge(bucket_key("auth_user", 60, "alice"), 20, 3, 2)])
        await store.reserve([Charge(bucket_key("auth_user", 86400, "alice"), 864, 100, 2)])
        await store.reserve([Charge(bucket_key("recipient_domain", 3600, "example.org"), 72, 50, 40)])
        await store.reserve([Charge(bucket_key("auth_user", 60, "bulk"), 0.06, 1000, 10)])
    finally:
        await store.close()

    out, err = io.StringIO(), io.StringIO()
    code = await show_limits(settings, None, store_config=config, out=out, err=err)
    assert code == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["LIMIT", "KEY", "RATE", "USED", "AVAILABLE", "FULL", "AGAIN", "IN"]
    assert lines[1].split()[:5] == ["recipient_domain", "example.org", "50/h", "40/50", "10"]
    assert lines[2].split()[:5] == ["auth_user", "alice", "3/min", "2/3", "1"]
    assert lines[-1].split()[:5] == ["auth_user", "bulk", "1000/min", "10/1000", "990"]  # the override's rate

    out = io.StringIO()
    code = await show_limits(settings, "Alice", as_json=True, store_config=config, out=out)
    rows = json.loads(out.getvalue())
    assert code == 0
    assert [(r["limit"], r["rate"], r["available"]) for r in rows] == [
        ("auth_user", "3/min", 1),
        ("auth_user", "100/day", 98),
        ("recipient_domain", "50/h", 50),  # untouched for this key: full
    ]


async def test_limits_show_with_a_memory_store_says_it_cannot_see(limit_settings: Settings) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await show_limits(limit_settings, None, store_config=LimitStoreConfig(), out=out, err=err)
    assert code == 2
    assert out.getvalue() == ""
    assert "in memory" in err.getvalue() and "backend: redis" in err.getvalue()
    assert "auth_user: 3/min, 100/day" in err.getvalue()


async def test_limits_show_with_redis_down_fails_clearly(limit_settings: Settings) -> None:
    config = LimitStoreConfig(backend="redis", url=f"redis://127.0.0.1:{closed_port()}/0")
    err = io.StringIO()
    code = await show_limits(limit_settings, None, store_config=config, out=io.StringIO(), err=err)
    assert code == 3
    assert "cannot read the limit store" in err.getvalue()


def test_limits_parser_accepts_show() -> None:
    parser = argparse.ArgumentParser(prog="sendguard")
    add_limits_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["limits", "show", "--config", "c.yaml", "alice", "--json"])
    assert (args.command, args.limits_command, args.key, args.json, args.top) == ("limits", "show", "alice", True, 20)
