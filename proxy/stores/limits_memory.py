"""The embedded rate-limit store: buckets in this process's memory (see ``limits_store``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from proxy.stores.limits_store import (
    REFUND_MEMORY,
    BucketState,
    Charge,
    LimitStore,
    Reservation,
    ReserveResult,
    gcra,
    new_reservation_id,
    parse_bucket_key,
)

__all__ = ("MemoryLimitStore",)


class MemoryLimitStore(LimitStore):
    """Buckets in a dict, guarded by one lock: the check and the update of a reserve happen
    under it, so concurrent tasks (or threads) can never both take the last unit.

    ``clock`` gives seconds (monotonic by default; tests pass a fake clock).
    """

    backend = "memory"
    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, sweep_every: int = 4096) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (TAT, last seen full)
        self._refunded: dict[str, float] = {}  # reservation id -> forget after
        self._lock = threading.Lock()
        self._operations = 0
        self._min_sweep = self._sweep_every = sweep_every

    def __len__(self) -> int:
        return len(self._buckets)

    def reserve_now(self, charges: Sequence[Charge], *, reservation_id: str | None = None) -> ReserveResult:
        """``reserve`` without the coroutine, for callers (and benchmarks) that are not async."""
        if len({c.key for c in charges}) != len(charges):
            raise ValueError("a reserve names each bucket once")
        with self._lock:
            now = self.clock()
            updates: list[tuple[float, float]] = []
            waits: list[float] = []
            for charge in charges:
                new_tat, full_at, wait = gcra(self._buckets.get(charge.key), now, charge)
                updates.append((new_tat, full_at))
                waits.append(wait)
            granted = all(wait == 0 for wait in waits)
            if granted:
                for charge, update in zip(charges, updates, strict=True):
                    self._buckets[charge.key] = update
            self._maybe_sweep(now)
        if not granted:
            return ReserveResult(False, tuple(waits))
        reservation = Reservation(reservation_id or new_reservation_id(), tuple(charges), now)
        return ReserveResult(True, tuple(waits), reservation)

    async def reserve(self, charges: Sequence[Charge], *, reservation_id: str | None = None) -> ReserveResult:
        return self.reserve_now(charges, reservation_id=reservation_id)

    async def refund(self, reservation: Reservation) -> bool:
        with self._lock:
            now = self.clock()
            if reservation.id in self._refunded:
                return False
            self._refunded[reservation.id] = now + REFUND_MEMORY
            for charge in reservation.charges:
                state = self._buckets.get(charge.key)
                if state is None or state[1] > reservation.at:
                    continue  # full since the reservation: its units came back by refilling
                tat, full_at = state
                new_tat = tat - charge.cost * charge.interval
                if new_tat <= now:
                    del self._buckets[charge.key]
                else:
                    self._buckets[charge.key] = (new_tat, full_at)
            return True

    async def buckets(self, value: str | None = None) -> list[BucketState]:
        with self._lock:
            now = self.clock()
            items = [(key, state[0]) for key, state in self._buckets.items()]
        out = []
        for key, tat in items:
            if tat <= now:
                continue
            if value is not None:
                parsed = parse_bucket_key(key)
                if parsed is None or parsed[2] != value:
                    continue
            out.append(BucketState(key, tat, now))
        return out

    async def reset(self, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(1 for key in keys if self._buckets.pop(key, None) is not None)

    async def peek(self, keys: Sequence[str]) -> list[BucketState]:
        with self._lock:
            now = self.clock()
            return [BucketState(key, max(now, self._buckets.get(key, (now, now))[0]), now) for key in keys]

    def _maybe_sweep(self, now: float) -> None:
        # Amortised O(1): a full pass every few thousand operations drops full buckets and
        # refund ids that can no longer be repeated, so memory follows the active keys.
        self._operations += 1
        if self._operations < self._sweep_every and len(self._buckets) < 4 * self._sweep_every:
            return
        self._operations = 0
        self._buckets = {key: state for key, state in self._buckets.items() if state[0] > now}
        self._refunded = {rid: until for rid, until in self._refunded.items() if until > now}
        self._sweep_every = max(self._min_sweep, len(self._buckets) // 2)
