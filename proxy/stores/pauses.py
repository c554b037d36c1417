"""Pauses and event counters shared by every sendguard instance.

When the upstream pushes back ("421 4.7.0 try again later", Gmail's 4.7.28, Microsoft's
5.7.708) or a blocklist lists us, sendguard pauses a class of mail or one sender for a while.
A pause must hold on every instance at once, so it lives in Redis for several instances (a key
with a TTL per pause) and in memory for one. The same store counts events in sliding windows
("5 such replies in 10 minutes") with one atomic Lua call per event. Counts of frequent events
(every recipient a sender domain tried, the bounce and complaint rates' denominator) are kept
in buckets instead (``tally``): a window of a day over a million recipients is then 257 numbers,
not a million timestamps.

Reading the active pauses happens for every transaction, so ``active()`` answers from a
snapshot refreshed at most once a second; a new pause reaches every instance within that.
"""

from __future__ import annotations

import abc
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from proxy.stores.limits_store import LimitStoreConfig

log = logging.getLogger("sendguard.pauses")

__all__ = ("Pause", "PauseStore", "MemoryPauseStore", "RedisPauseStore", "open_pause_store")


@dataclass(frozen=True, slots=True)
class Pause:
    """``scope`` is "class" (value: commercial or transactional), "sender" (value: a domain)
    or "all" (value: "*")."""

    scope: str
    value: str
    until: float  # epoch seconds
    reason: str
    source: str  # the rule or check that paused
    message_class: str | None = None  # scope sender/all: only this class (None: every class)

    def covers(self, message_class: str | None, sender_domains: tuple[str, ...]) -> bool:
        if self.scope == "class":
            return message_class == self.value
        if self.message_class is not None and message_class != self.message_class:
            return False
        return self.scope == "all" or self.value in sender_domains


class PauseStore(abc.ABC):
    refresh_interval = 1.0

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._snapshot: list[Pause] = []
        self._snapshot_at = float("-inf")
        #: Told of every pause set through this store (the webhooks' outbox).
        self.observers: list[Callable[[Pause], Awaitable[None]]] = []

    def now(self) -> float:
        return float(self._clock())

    async def active(self) -> list[Pause]:
        now = self.now()
        if now - self._snapshot_at >= self.refresh_interval:
            self._snapshot = await self._load()
            self._snapshot_at = now
        return [p for p in self._snapshot if p.until > now]

    async def pause(self, pause: Pause) -> None:
        await self._store(pause)
        self._snapshot_at = float("-inf")  # this instance sees its own pause at once
        for observer in self.observers:
            try:
                await observer(pause)
            except Exception:  # the pause holds; telling others must not undo it
                log.exception("an observer of pauses failed")

    async def lift(self, scope: str, value: str, source: str) -> None:
        await self._delete(scope, value, source)
        self._snapshot_at = float("-inf")

    @abc.abstractmethod
    async def hit(self, counter: str, window: float) -> int:
        """Record one event for ``counter``; return how many happened in the last ``window`` seconds."""

    @abc.abstractmethod
    async def count(self, counter: str, window: float) -> int:
        """How many events ``counter`` had in the last ``window`` seconds; records nothing."""

    @abc.abstractmethod
    async def tally(self, counter: str, window: float, events: int = 1) -> None:
        """Count ``events`` events of a frequent kind in ``window``-sized accounting (see
        ``tallied``); constant memory per counter, whatever the rate."""

    @abc.abstractmethod
    async def tallied(self, counter: str, window: float) -> int:
        """How many events ``tally`` counted in the last ``window`` seconds, to within one
        bucket (``bucket_width``) at the window's old end: never fewer."""

    @abc.abstractmethod
    async def forget(self, counter: str) -> int:
        """Delete a counter (an erasure: a counter named after a person); 1 if it was there."""

    @abc.abstractmethod
    async def _load(self) -> list[Pause]: ...

    @abc.abstractmethod
    async def _store(self, pause: Pause) -> None: ...

    @abc.abstractmethod
    async def _delete(self, scope: str, value: str, source: str) -> None: ...

    async def close(self) -> None:
        return None


TALLY_BUCKETS = 256


def bucket_width(window: float) -> float:
    """Width of a tally's buckets: a 256th of its window (a day: 5.6 minutes), at least 1 s."""
    return max(1.0, window / TALLY_BUCKETS)


class MemoryPauseStore(PauseStore):
    refresh_interval = 0.0  # nothing to fetch

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._pauses: dict[tuple[str, str, str], Pause] = {}
        self._events: dict[str, deque[float]] = {}
        self._hits = 0
        #: counter -> (bucket width, buckets in time order, each [start second, events])
        self._tallies: dict[str, tuple[float, deque[list[int]]]] = {}

    async def hit(self, counter: str, window: float) -> int:
        now = self.now()
        self._hits += 1
        if self._hits % 10_000 == 0:  # counters nobody hits any more (a sender gone quiet) go
            for name in [n for n, e in self._events.items() if not e or e[-1] <= now - window]:
                del self._events[name]
        events = self._events.setdefault(counter, deque())
        events.append(now)
        while events and events[0] <= now - window:
            events.popleft()
        return len(events)

    async def count(self, counter: str, window: float) -> int:
        now = self.now()
        return sum(1 for moment in self._events.get(counter, ()) if moment > now - window)

    async def tally(self, counter: str, window: float, events: int = 1) -> None:
        if events <= 0:
            return
        width = bucket_width(window)
        start = int(self.now() // width * width)
        width, buckets = self._tallies.setdefault(counter, (width, deque()))
        if buckets and buckets[-1][0] == start:
            buckets[-1][1] += events
            return
        buckets.append([start, events])
        while buckets and buckets[0][0] + width <= self.now() - window:
            buckets.popleft()

    async def tallied(self, counter: str, window: float) -> int:
        width, buckets = self._tallies.get(counter, (1.0, deque()))
        since = self.now() - window
        return sum(events for start, events in buckets if start + width > since)

    async def forget(self, counter: str) -> int:
        found = self._events.pop(counter, None) is not None
        return 1 if self._tallies.pop(counter, None) is not None or found else 0

    async def _load(self) -> list[Pause]:
        now = self.now()
        for key in [k for k, p in self._pauses.items() if p.until <= now]:
            del self._pauses[key]
        return list(self._pauses.values())

    async def _store(self, pause: Pause) -> None:
        key = (pause.scope, pause.value, pause.source)
        current = self._pauses.get(key)
        if current is None or current.until < pause.until:  # a pause is only ever extended
            self._pauses[key] = pause

    async def _delete(self, scope: str, value: str, source: str) -> None:
        self._pauses.pop((scope, value, source), None)


# KEYS[1] = counter key; ARGV = now_ms, window_ms, member. Sliding window in a sorted set.
_HIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS[1] = tally hash; ARGV = bucket start (s), bucket width (ms), oldest start kept, ttl_ms, events.
# One field per bucket and the field "width" (ms, set by the first tally: a reader with another
# window reads the same buckets); a new bucket drops the fields older than the window.
_TALLY = """
redis.call('HSETNX', KEYS[1], 'width', ARGV[2])
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if n == tonumber(ARGV[5]) then
  local oldest = tonumber(ARGV[3])
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if field ~= 'width' and tonumber(field) < oldest then redis.call('HDEL', KEYS[1], field) end
  end
end
return n
"""
# KEYS[1] = pause key; ARGV = json, ttl_ms, until. Only ever extends an existing pause.
_PAUSE = """
local current = redis.call('GET', KEYS[1])
if current then
  local current_until = cjson.decode(current)['until']
  if current_until >= tonumber(ARGV[3]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisPauseStore(PauseStore):
    def __init__(self, config: LimitStoreConfig, clock: Callable[[], float] | None = None) -> None:
        import redis.asyncio as redis_asyncio

        super().__init__(clock)
        self.prefix = config.key_prefix
        self.redis = redis_asyncio.Redis.from_url(
            config.url, socket_timeout=config.timeout, socket_connect_timeout=config.timeout
        )
        self._hit = self.redis.register_script(_HIT)
        self._pause = self.redis.register_script(_PAUSE)
        self._tally = self.redis.register_script(_TALLY)

    def _key(self, scope: str, value: str, source: str) -> str:
        # One key per source: a backoff rule and a blocklist can pause the same class
        # independently, and lifting one never lifts the other.
        return f"{self.prefix}pause:{scope}:{value}:{source}"

    async def hit(self, counter: str, window: float) -> int:
        now_ms = int(self.now() * 1000)
        member = f"{now_ms}:{secrets.token_hex(4)}"
        count = await self._hit(keys=[f"{self.prefix}events:{counter}"], args=[now_ms, int(window * 1000), member])
        return int(count)

    async def count(self, counter: str, window: float) -> int:
        now_ms = int(self.now() * 1000)
        key = f"{self.prefix}events:{counter}"
        return int(await self.redis.zcount(key, now_ms - int(window * 1000) + 1, "+inf"))

    async def tally(self, counter: str, window: float, events: int = 1) -> None:
        if events <= 0:
            return
        width = bucket_width(window)
        now = self.now()
        start = int(now // width * width)
        oldest = int((now - window - width) // 1) + 1  # a bucket's end must lie inside the window
        ttl_ms = int((window + width) * 1000)
        args = [start, int(width * 1000), oldest, ttl_ms, events]
        await self._tally(keys=[f"{self.prefix}tally:{counter}"], args=args)

    async def tallied(self, counter: str, window: float) -> int:
        stored = await self.redis.hgetall(f"{self.prefix}tally:{counter}")
        fields = {key.decode() if isinstance(key, bytes) else key: int(value) for key, value in stored.items()}
        width = fields.pop("width", 1000) / 1000
        since = self.now() - window
        return sum(events for start, events in fields.items() if int(start) + width > since)

    async def forget(self, counter: str) -> int:
        return int(await self.redis.delete(f"{self.prefix}events:{counter}", f"{self.prefix}tally:{counter}"))

    async def _load(self) -> list[Pause]:
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}pause:*", count=100)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        return [Pause(**json.loads(value)) for value in values if value is not None]

    async def _store(self, pause: Pause) -> None:
        ttl_ms = max(1, int((pause.until - self.now()) * 1000))
        await self._pause(
            keys=[self._key(pause.scope, pause.value, pause.source)],
            args=[json.dumps(asdict(pause)), ttl_ms, pause.until],
        )

    async def _delete(self, scope: str, value: str, source: str) -> None:
        await self.redis.delete(self._key(scope, value, source))

    async def close(self) -> None:
        await self.redis.aclose()


def open_pause_store(config: LimitStoreConfig) -> PauseStore:
    """Pauses live where the rate-limit budgets live: ``stores.state``."""
    if config.backend == "redis":
        return RedisPauseStore(config)
    return MemoryPauseStore()
