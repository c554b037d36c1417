"""Rate-limit budgets: the store a config names, and the names callers use.

The interface and its data types live in ``limits_store``; the backends in ``limits_memory``
(the embedded default) and ``limits_redis`` (several proxies, one budget), which import only
the interface. This module is the factory: it imports the backends, nothing imports it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from proxy.stores.limits_memory import MemoryLimitStore
from proxy.stores.limits_store import (
    EPSILON,
    NEVER,
    REFUND_MEMORY,
    BucketState,
    Charge,
    LimitStore,
    LimitStoreConfig,
    LimitStoreError,
    Reservation,
    ReserveResult,
    bucket_key,
    gcra,
    new_reservation_id,
    parse_bucket_key,
)

__all__ = (
    "EPSILON",
    "NEVER",
    "REFUND_MEMORY",
    "BucketState",
    "Charge",
    "LimitStore",
    "LimitStoreConfig",
    "LimitStoreError",
    "MemoryLimitStore",
    "Reservation",
    "ReserveResult",
    "StoreSettings",
    "bucket_key",
    "gcra",
    "new_reservation_id",
    "open_limit_store",
    "parse_bucket_key",
)


class StoreSettings(Protocol):
    """What ``open_limit_store`` reads: a ``LimitStoreConfig``, or any section with the same
    fields (``stores.state`` has them too, if one Redis section should serve everything)."""

    @property
    def backend(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def key_prefix(self) -> str: ...
    @property
    def timeout(self) -> float: ...


def open_limit_store(config: StoreSettings, *, clock: Callable[[], float] | None = None) -> LimitStore:
    """Build the store ``config`` names. Redis is imported only when it is used."""
    if config.backend == "redis":
        from proxy.stores.limits_redis import RedisLimitStore

        return RedisLimitStore(
            config.url,
            key_prefix=config.key_prefix,
            timeout=float(config.timeout),
            max_connections=int(getattr(config, "max_connections", 50)),
            clock=clock,
        )
    return MemoryLimitStore(clock or time.monotonic)
