"""Tallies: the bounce and complaint rates' denominator (every recipient a sender domain tried)
is counted in buckets, so its memory, in the process or in Redis, stays constant however many
recipients a day passes; the count is that of the window to within one bucket, never fewer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from proxy.stores.limits_store import LimitStoreConfig
from proxy.stores.pauses import MemoryPauseStore, PauseStore, RedisPauseStore, bucket_width
from tests.services import RedisTarget

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def tally_behaves(
    make: Callable[[Clock], PauseStore], fields: Callable[[], Awaitable[int]] | None, *, batched: bool = False
) -> None:
    """``batched``: the 40 events of each bucket are one call (a transaction's recipients),
    which must count exactly as 40 calls do."""
    clock = Clock()
    store = make(clock)
    try:
        width = bucket_width(DAY)
        assert width == DAY / 256
        await store.tally("bounces:tried:example.com", DAY, 0)  # nothing to count: nothing counted
        assert await store.tallied("bounces:tried:example.com", DAY) == 0
        # a day and a half of traffic, 40 recipients every bucket's width
        for _ in range(384):
            if batched:
                await store.tally("bounces:tried:example.com", DAY, 40)
            else:
                for _ in range(40):
                    await store.tally("bounces:tried:example.com", DAY)
            clock.now += width
        clock.now -= width  # the last events were counted now
        counted = await store.tallied("bounces:tried:example.com", DAY)
        exact = 40 * 256  # those of the last day
        assert exact <= counted <= exact + 40  # never fewer; at most one bucket more
        assert await store.tallied("bounces:tried:other.example", DAY) == 0
        # a shorter window reads the same buckets
        assert 40 * 32 <= await store.tallied("bounces:tried:example.com", 32 * width) <= 40 * 33
        if fields is not None:  # what Redis holds: at most a window's buckets and one more
            assert await fields() <= 258
        clock.now += 2 * DAY
        assert await store.tallied("bounces:tried:example.com", DAY) == 0
        assert await store.forget("bounces:tried:example.com") in (0, 1)
    finally:
        await store.close()


@pytest.mark.parametrize("batched", [False, True], ids=["one call per event", "one call per batch"])
async def test_a_tally_in_memory_counts_the_window_in_constant_space(batched: bool) -> None:
    stores: list[MemoryPauseStore] = []

    def make(clock: Clock) -> PauseStore:
        stores.append(MemoryPauseStore(clock=clock))
        return stores[0]

    await tally_behaves(make, None, batched=batched)
    assert len(stores[0]._tallies.get("bounces:tried:example.com", ())) <= 257


@pytest.mark.redis
@pytest.mark.parametrize("batched", [False, True], ids=["one call per event", "one call per batch"])
async def test_a_tally_in_redis_counts_the_window_in_constant_space(redis_target: RedisTarget, batched: bool) -> None:
    config = LimitStoreConfig(backend="redis", url=redis_target.url, key_prefix=redis_target.prefix)
    stores: list[RedisPauseStore] = []

    def make(clock: Clock) -> PauseStore:
        stores.append(RedisPauseStore(config, clock=clock))
        return stores[0]

    async def fields() -> int:
        return int(await stores[0].redis.hlen(f"{redis_target.prefix}tally:bounces:tried:example.com"))

    await tally_behaves(make, fields, batched=batched)
