"""Rate-limit buckets in Redis, shared by every sendguard that uses the same server and prefix.

Each ``reserve`` is ONE Lua script (``RESERVE``): it reads every bucket, decides, and writes
all of them or none, so two proxies racing for the last unit cannot both get it (Redis runs
a script without interleaving other commands). ``refund`` is one script too (``REFUND``);
it first sets a marker key for the reservation id with ``SET NX``, so a refund repeated by
a retry, a second commit or another process is applied once.

Keys: ``<prefix>rl:<limit>:<period>:<value>`` holds a bucket's TAT and the time it was last
seen full, in milliseconds ("TAT FULL_AT"), and expires when the bucket is full again;
``<prefix>rf:<reservation id>`` marks a refund done.
Time: by default the script reads the Redis server's clock (``TIME``), one clock for every
proxy, so skew between hosts does not matter; a caller may pass its own clock (tests do).
Needs Redis 5 or later (scripts replicated by effects). One primary, not Redis Cluster:
the buckets of one reserve are several keys that a cluster could place on different nodes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.stores.limits_store import (
    NEVER,
    REFUND_MEMORY,
    BucketState,
    Charge,
    LimitStore,
    LimitStoreError,
    Reservation,
    ReserveResult,
    new_reservation_id,
)

__all__ = ("REFUND", "RESERVE", "RedisLimitStore")

log = logging.getLogger("sendguard.limits")

# Both scripts read a bucket as "TAT FULL_AT" (milliseconds); an absent key is a full bucket.
_LOAD = """
local function load(key)
  local value = redis.call('GET', key)
  if not value then return nil, nil end
  local tat, full_at = string.match(value, '^(%S+) (%S+)$')
  return tonumber(tat), tonumber(full_at)
end
local function store(key, tat, full_at, now)
  redis.call('SET', key, string.format('%.3f %.3f', tat, full_at), 'PX', math.max(1, math.ceil(tat - now)))
end
"""

RESERVE = (
    _LOAD
    + """
-- KEYS: the buckets, all distinct.
-- ARGV[1]: now in milliseconds, or '' to use the server's clock.
-- ARGV[2 + 3(i-1) .. 4 + 3(i-1)]: bucket i's interval (ms per unit), burst (units), cost (units).
-- Returns {granted 1|0, now (ms), wait_1 (ms), ...}; a wait of -1 means never (cost > burst).
-- Numbers travel as strings: Redis would truncate a Lua number to an integer.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
else
  now = tonumber(ARGV[1])
end
local granted = 1
local tats = {}
local fulls = {}
local reply = {0, string.format('%.3f', now)}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local tat, full_at = load(KEYS[i])
  if tat == nil then
    tat, full_at = now, now
  elseif tat <= now then
    tat, full_at = now, tat
  end
  local new_tat = tat + cost * interval
  local wait = 0
  if cost > burst then
    wait = -1
  else
    local excess = new_tat - now - burst * interval
    if excess > 0.001 then wait = excess end
  end
  if wait ~= 0 then granted = 0 end
  tats[i] = new_tat
  fulls[i] = full_at
  reply[2 + i] = string.format('%.3f', wait)
end
if granted == 1 then
  for i = 1, #KEYS do store(KEYS[i], tats[i], fulls[i], now) end
end
reply[1] = granted
return reply
"""
)

REFUND = (
    _LOAD
    + """
-- KEYS[1]: the refund marker of the reservation; KEYS[2..]: its buckets.
-- ARGV[1]: now in milliseconds, or ''; ARGV[2]: how long the marker lives (ms);
-- ARGV[3]: when the reservation was made (ms); ARGV[2 + i]: ms to give back to KEYS[i].
-- A bucket seen full since the reservation already got those units back by refilling.
-- Returns 1 when applied, 0 when this reservation was refunded before.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
else
  now = tonumber(ARGV[1])
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 0 end
local at = tonumber(ARGV[3])
for i = 2, #KEYS do
  local tat, full_at = load(KEYS[i])
  if tat ~= nil and full_at <= at then
    local new_tat = tat - tonumber(ARGV[2 + i])
    if new_tat <= now then
      redis.call('DEL', KEYS[i])
    else
      store(KEYS[i], new_tat, full_at, now)
    end
  end
end
return 1
"""
)

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def _glob_escape(text: str) -> str:
    return text.translate(_GLOB_SPECIAL)


class RedisLimitStore(LimitStore):
    """Buckets in Redis; see the module docstring for the key layout and the scripts."""

    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sendguard:",
        timeout: float = 1.0,
        max_connections: int = 50,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.timeout = timeout
        self.clock = clock
        self.max_connections = max_connections
        # At most max_connections calls at once, admitted in arrival order by a semaphore:
        # redis-py's own pool fails at once when full (the check would fail open) and its
        # blocking pool is unfair (some callers starve for seconds under load).
        self._gate = asyncio.Semaphore(max_connections)
        # One quick retry on a dropped connection (Redis restarted, a stale pooled socket);
        # never on a timeout, where the script may have run: retrying could charge twice.
        pool = ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.client: Redis = Redis.from_pool(pool)
        self._reserve = self.client.register_script(RESERVE)
        self._refund = self.client.register_script(REFUND)

    def _now_arg(self) -> str:
        return "" if self.clock is None else f"{self.clock() * 1000:.3f}"

    async def _call(self, what: str, command: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                await self._gate.acquire()
        except TimeoutError:
            raise LimitStoreError(
                f"Redis {what}: all {self.max_connections} connections stayed busy for {self.timeout:g}s"
            ) from None
        try:
            return await command()
        except (RedisError, OSError) as error:
            raise LimitStoreError(f"Redis {what} failed: {type(error).__name__}: {error}") from error
        finally:
            self._gate.release()

    async def reserve(self, charges: Sequence[Charge], *, reservation_id: str | None = None) -> ReserveResult:
        if len({c.key for c in charges}) != len(charges):
            raise ValueError("a reserve names each bucket once")
        if not charges:
            now = await self._server_now()
            return ReserveResult(True, (), Reservation(reservation_id or new_reservation_id(), (), now))
        args: list[str] = [self._now_arg()]
        for charge in charges:
            args += [f"{charge.interval * 1000:.6f}", str(charge.burst), str(charge.cost)]
        keys = [self.prefix + charge.key for charge in charges]
        reply = await self._call("reserve", lambda: self._reserve(keys=keys, args=args))
        waits = tuple(NEVER if float(w) < 0 else float(w) / 1000 for w in reply[2:])
        if int(reply[0]) != 1:
            return ReserveResult(False, waits)
        at = float(reply[1]) / 1000
        return ReserveResult(True, waits, Reservation(reservation_id or new_reservation_id(), tuple(charges), at))

    async def refund(self, reservation: Reservation) -> bool:
        keys = [f"{self.prefix}rf:{reservation.id}"] + [self.prefix + c.key for c in reservation.charges]
        args = [self._now_arg(), str(int(REFUND_MEMORY * 1000)), f"{reservation.at * 1000:.3f}"]
        args += [f"{c.cost * c.interval * 1000:.6f}" for c in reservation.charges]
        applied = await self._call("refund", lambda: self._refund(keys=keys, args=args))
        return int(applied) == 1

    async def _server_now(self) -> float:
        if self.clock is not None:
            return self.clock()
        seconds, micros = await self._call("TIME", self.client.time)
        return float(seconds) + float(micros) / 1e6

    async def peek(self, keys: Sequence[str]) -> list[BucketState]:
        if not keys:
            return []
        now = await self._server_now()
        values = await self._call("MGET", lambda: self.client.mget([self.prefix + key for key in keys]))
        return [
            BucketState(key, max(now, float(value.split()[0]) / 1000) if value is not None else now, now)
            for key, value in zip(keys, values, strict=True)
        ]

    async def reset(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        # An absent key is a full bucket; refunds of reservations made before stay harmless
        # (a refund never lifts a bucket above full).
        deleted = await self._call("DEL", lambda: self.client.delete(*[self.prefix + key for key in keys]))
        return int(deleted)

    async def buckets(self, value: str | None = None) -> list[BucketState]:
        pattern = _glob_escape(self.prefix) + "rl:*"
        if value is not None:
            pattern += ":*:" + _glob_escape(value)
        found: list[str] = []
        cursor = 0
        while True:
            cursor, batch = await self._call(
                "SCAN", functools.partial(self.client.scan, cursor, match=pattern, count=1000)
            )
            found += [key.decode("utf-8", "surrogateescape") for key in batch]
            if cursor == 0:
                break
        states: list[BucketState] = []
        for start in range(0, len(found), 1000):
            chunk = [key[len(self.prefix) :] for key in found[start : start + 1000]]
            states += [state for state in await self.peek(chunk) if state.tat > state.now]
        return states

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError) as error:  # closing a broken connection is not worth a traceback
            log.debug("closing the Redis limit store: %s", error)
