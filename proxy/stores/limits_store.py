"""The rate-limit store: GCRA buckets with an atomic all-or-none reserve and an idempotent refund.

A bucket is one rate of one limit for one key value (``30/min`` for user alice). Its state
is the *theoretical arrival time* (TAT) of the Generic Cell Rate Algorithm, the algorithm
KumoMTA's throttles and redis-cell use, plus the time it was last seen full:

* a rate ``count/period`` with ``burst`` refills one unit every ``interval = period / count``
  seconds and holds at most ``burst`` units;
* taking ``cost`` units at time ``now`` moves ``TAT = max(TAT, now) + cost * interval``; that
  conforms when ``TAT - now <= burst * interval``, otherwise the caller must wait the excess;
* a bucket whose TAT lies in the past is full, so it can be forgotten (Redis: a TTL that
  ends when the bucket is full again; memory: a periodic sweep).

The second number is for refunds. A refund gives back the units a reservation took, unless
the bucket has been full since that reservation: then those units have already come back
by refilling, and giving them again would let more through than the limit (a recipient
reserved at 9:00 and refunded at 9:05, after the bucket refilled and others took from it,
must not free a unit someone else holds).

Within any one ``period`` a bucket lets through at most ``count + burst`` units (a full
bucket, then one period of refill); over long stretches ``count`` per ``period``.

``reserve`` takes units from several buckets (every window of every limit that applies) in
one atomic step, all or none; ``refund`` gives back what a reservation took, once, however
often it is called.

Two backends share this interface: ``MemoryLimitStore`` in ``proxy.stores.limits_memory``
(one process, the embedded default) and ``RedisLimitStore`` in ``proxy.stores.limits_redis``
(several proxies, one budget); they import this module only. ``proxy.stores.limits`` is the
factory and the names callers use.
"""

from __future__ import annotations

import abc
import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.schema import Duration, doc

__all__ = (
    "NEVER",
    "BucketState",
    "Charge",
    "LimitStore",
    "LimitStoreConfig",
    "LimitStoreError",
    "Reservation",
    "ReserveResult",
    "bucket_key",
    "gcra",
    "parse_bucket_key",
)

#: The wait reported for a charge that can never conform: it costs more than the bucket holds.
NEVER = math.inf
#: Slack for floating-point rounding when a reservation lands exactly on the burst boundary
#: (30 units of 2 s each must fit a 60 s allowance even when 60/7-second intervals add up).
EPSILON = 1e-6
#: How long a refunded reservation id is remembered, so that a repeated refund is a no-op.
REFUND_MEMORY = 2 * 86400.0


class LimitStoreError(Exception):
    """The store could not answer (Redis unreachable, timed out). The caller applies ``on_error``."""


@dataclass(frozen=True, slots=True)
class Charge:
    """Take ``cost`` units from one bucket. ``key`` is the bucket's key without the store prefix."""

    key: str
    interval: float  # seconds per unit: period / count
    burst: int  # units the bucket holds when full
    cost: int

    @property
    def allowance(self) -> float:
        return self.burst * self.interval


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a granted ``reserve`` took; hand it back to ``refund`` to return it.

    ``part`` splits a reservation so that pieces can be refunded separately (one recipient
    of several, or fewer units than were taken); each piece has its own id, so each piece is
    refunded at most once.
    """

    id: str
    charges: tuple[Charge, ...]
    at: float  # the store's time of the reservation

    def part(self, suffix: str, charges: Sequence[Charge]) -> Reservation:
        return Reservation(f"{self.id}/{suffix}", tuple(charges), self.at)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    granted: bool
    #: Per charge, in order: seconds until it would conform (0 when it does now, NEVER when
    #: its cost exceeds the bucket). A denied reserve takes nothing from any bucket.
    waits: tuple[float, ...]
    reservation: Reservation | None = None

    @property
    def retry_after(self) -> float:
        """Seconds until the whole request would conform, assuming nothing else is taken."""
        return max(self.waits, default=0.0)

    @property
    def blocking(self) -> tuple[int, ...]:
        """Indexes of the charges that did not conform."""
        return tuple(i for i, wait in enumerate(self.waits) if wait > 0)


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket as the store holds it: its key and TAT, and the store's time of reading."""

    key: str
    tat: float
    now: float

    def used(self, interval: float) -> float:
        """Units taken and not yet refilled."""
        return max(0.0, self.tat - self.now) / interval

    def full_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, self.tat - self.now)


def gcra(state: tuple[float, float] | None, now: float, charge: Charge) -> tuple[float, float, float]:
    """One GCRA step on a bucket's (TAT, last seen full): (new TAT and last-full if the charge
    is taken, seconds to wait; 0 when it conforms now)."""
    if state is None:  # absent: full, as far as anyone can tell, right now
        base, full_at = now, now
    elif state[0] <= now:  # refilled completely at its TAT
        base, full_at = now, state[0]
    else:
        base, full_at = state
    new_tat = base + charge.cost * charge.interval
    if charge.cost > charge.burst:
        return new_tat, full_at, NEVER
    excess = new_tat - now - charge.allowance
    return new_tat, full_at, (excess if excess > EPSILON else 0.0)


# ---- keys -------------------------------------------------------------------------------------

#: Key values longer than this are hashed, so a hostile envelope cannot make huge keys.
MAX_VALUE_LENGTH = 200


def bucket_key(limit: str, period: float, value: str) -> str:
    """``rl:<limit>:<period seconds>:<value>``; the value comes last, so it may hold ``:``."""
    if len(value) > MAX_VALUE_LENGTH:
        value = "sha256=" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return f"rl:{limit}:{period:g}:{value}"


def parse_bucket_key(key: str) -> tuple[str, float, str] | None:
    """(limit name, period in seconds, value) of a key made by ``bucket_key``, else None."""
    parts = key.split(":", 3)
    if len(parts) != 4 or parts[0] != "rl":
        return None
    try:
        period = float(parts[2])
    except ValueError:
        return None
    return parts[1], period, parts[3]


def new_reservation_id() -> str:
    return secrets.token_hex(8)


# ---- the interface ----------------------------------------------------------------------------


class LimitStore(abc.ABC):
    """Where buckets live. Every method is safe to call from many tasks at once."""

    #: "memory" or "redis"
    backend: str = ""
    #: True when several sendguard processes see the same buckets (so ``limits show`` can
    #: read them from outside the proxy).
    shared: bool = False

    @abc.abstractmethod
    async def reserve(self, charges: Sequence[Charge], *, reservation_id: str | None = None) -> ReserveResult:
        """Take every charge, or none when any of them does not conform; one atomic step."""

    @abc.abstractmethod
    async def refund(self, reservation: Reservation) -> bool:
        """Give back what ``reservation`` took. True when applied, False when it already was."""

    @abc.abstractmethod
    async def buckets(self, value: str | None = None) -> list[BucketState]:
        """Buckets that are not full, optionally only those of one key value."""

    @abc.abstractmethod
    async def peek(self, keys: Sequence[str]) -> list[BucketState]:
        """The state of these buckets; a full (absent) bucket has TAT == now."""

    @abc.abstractmethod
    async def reset(self, keys: Sequence[str]) -> int:
        """Make these buckets full again (``limits reset``); how many were not full."""

    async def close(self) -> None:
        return None


# ---- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitStoreConfig:
    """``stores.limits`` in the YAML: where rate-limit budgets live."""

    backend: Literal["memory", "redis"] = doc(
        "memory: this process only (the default); redis: shared by every sendguard using the same server",
        default="memory",
    )
    url: str = doc(
        "redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS); write ${ENV_NAME} for the password",
        default="redis://127.0.0.1:6379/0",
    )
    key_prefix: str = doc(
        "prefix of every key sendguard writes, so one Redis can serve several setups", default="sendguard:"
    )
    timeout: Duration = doc(
        "time limit per Redis call; keep it well under the policy's timeout so on_error decides", default=Duration(1)
    )
    max_connections: int = doc("Redis connections per sendguard process; more checks at once wait", default=50)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.backend == "redis" and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, not {self.url.split(':')[0]!r}")
