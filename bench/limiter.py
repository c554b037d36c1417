"""Rate limiter cost: microseconds per check and bytes per key, memory store and Redis.

What is measured (each a median of several rounds, after a warm-up):

* ``memory reserve``: ``MemoryLimitStore.reserve_now`` with the two windows users run
  (30/min and 10000/day), spread over many users, so dict lookups are not all cache hits;
* ``memory reserve (async)``: the same through ``await store.reserve``, as the policy calls it;
* ``policy check_rcpt``: ``RateLimitPolicy.check_rcpt`` on the memory store with three limits
  (auth_user 30/min + 10000/day, recipient_domain 500/h, global 100/s): the whole cost a
  recipient adds at RCPT, transaction bookkeeping included;
* ``memory refund``: giving back what a reserve took;
* ``memory per bucket``: bytes per bucket held, measured with tracemalloc over 100,000 buckets;
* ``redis reserve``: one Lua script per check against the Redis at ``SENDGUARD_BENCH_REDIS``
  (default redis://127.0.0.1:6379/0), by one client in sequence (latency) and by N tasks at
  once on one connection pool (throughput); ``redis per bucket`` is Redis's own MEMORY USAGE.

    .venv/bin/python bench/limiter.py            # about half a minute
    .venv/bin/python bench/limiter.py --quick    # a few seconds

The table goes to stdout, the figures to bench/results/limiter.json. Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import secrets
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.base import Transaction  # noqa: E402
from policies.ratelimit import RateLimitPolicy, parse_rate_spec  # noqa: E402
from proxy.schema import Converter  # noqa: E402
from proxy.stores.limits import Charge, MemoryLimitStore, bucket_key  # noqa: E402
from proxy.stores.limits_redis import RedisLimitStore  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REDIS_URL = os.environ.get("SENDGUARD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
WINDOWS = [parse_rate_spec("30/min"), parse_rate_spec("10000/day")]
POLICY_YAML = """
limits:
  - {key: auth_user, rates: [30/min, 10000/day]}
  - {key: recipient_domain, rates: [500/h]}
  - {key: global, rates: [100/s]}
"""


class SteppingClock:
    """A clock that moves 1 ms per reading: budgets refill, so checks keep being granted
    and the numbers measure the common (granted) path rather than refusals."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def user_charges(user: int) -> list[Charge]:
    value = f"user{user}"
    return [Charge(bucket_key("auth_user", r.period, value), r.interval, r.burst, 1) for r in WINDOWS]


def median_rate(samples: list[float]) -> float:
    return statistics.median(samples)


def time_sync(operation: Callable[[int], Any], count: int, rounds: int) -> float:
    """Median microseconds per call of operation(i) over ``rounds`` rounds of ``count`` calls."""
    per_call: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(count):
            operation(i)
        per_call.append((time.perf_counter() - started) / count * 1e6)
    return median_rate(per_call)


async def time_async(operation: Callable[[int], Awaitable[Any]], count: int, rounds: int) -> float:
    per_call: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(count):
            await operation(i)
        per_call.append((time.perf_counter() - started) / count * 1e6)
    return median_rate(per_call)


async def time_concurrent(
    operation: Callable[[int], Awaitable[Any]], tasks: int, per_task: int, rounds: int
) -> tuple[float, float]:
    """(checks per second, mean microseconds per check as one task sees it) with ``tasks`` at once."""
    throughput: list[float] = []
    latency: list[float] = []
    for _ in range(rounds):

        async def worker(offset: int) -> float:
            started = time.perf_counter()
            for i in range(per_task):
                await operation(offset * per_task + i)
            return time.perf_counter() - started

        started = time.perf_counter()
        spent = await asyncio.gather(*(worker(t) for t in range(tasks)))
        elapsed = time.perf_counter() - started
        throughput.append(tasks * per_task / elapsed)
        latency.append(statistics.mean(spent) / per_task * 1e6)
    return median_rate(throughput), median_rate(latency)


def memory_per_bucket(count: int) -> float:
    store = MemoryLimitStore(SteppingClock(), sweep_every=10**9)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for user in range(count):
        store.reserve_now(user_charges(user)[:1])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == count
    return (after - before) / count


def policy_options() -> Any:
    import yaml

    conv = Converter("bench", {})
    node = yaml.compose(POLICY_YAML)
    options = conv.dataclass(node, RateLimitPolicy.Options, "")
    assert not conv.issues, conv.issues
    return options


async def bench_memory(count: int, rounds: int, users: int) -> dict[str, float]:
    store = MemoryLimitStore(SteppingClock())
    charges = [user_charges(u) for u in range(users)]
    out: dict[str, float] = {}
    out["memory reserve"] = time_sync(lambda i: store.reserve_now(charges[i % users]), count, rounds)
    out["memory reserve (async)"] = await time_async(lambda i: store.reserve(charges[i % users]), count, rounds)
    reservations = [store.reserve_now(charges[i % users]).reservation for i in range(count)]

    async def refund(i: int) -> None:
        reservation = reservations[i]
        if reservation is not None:
            await store.refund(reservation)

    out["memory refund"] = await time_async(refund, count, 1)

    policy = RateLimitPolicy(policy_options(), {"limits": MemoryLimitStore(SteppingClock())})
    transactions = [
        Transaction(txn_id=f"b{u}", listener="local", client_ip="127.0.0.1", auth_user=f"user{u}") for u in range(users)
    ]

    async def check(i: int) -> None:
        verdict = await policy.check_rcpt(transactions[i % users], f"r{i}@domain{i % 50}.example")
        assert verdict is not None

    out["policy check_rcpt"] = await time_async(check, count, rounds)
    return out


async def bench_redis(count: int, rounds: int, users: int, concurrency: list[int]) -> dict[str, Any]:
    prefix = f"sgbench:{secrets.token_hex(4)}:"
    store = RedisLimitStore(REDIS_URL, key_prefix=prefix)
    charges = [user_charges(u) for u in range(users)]
    out: dict[str, Any] = {}
    try:
        await store.client.ping()
    except Exception as error:
        await store.close()
        return {"skipped": f"Redis at {REDIS_URL} is not reachable: {error}"}
    try:
        await time_async(lambda i: store.reserve(charges[i % users]), 200, 1)  # warm-up, loads the script
        out["redis reserve, 1 client"] = await time_async(lambda i: store.reserve(charges[i % users]), count, rounds)
        for tasks in concurrency:
            per_task = max(50, count // tasks)
            throughput, latency = await time_concurrent(
                lambda i: store.reserve(charges[i % users]), tasks, per_task, rounds
            )
            out[f"redis reserve, {tasks} concurrent"] = {"checks_per_s": throughput, "us_per_check": latency}
        reservations = [(await store.reserve(charges[i % users])).reservation for i in range(min(count, 2000))]

        async def refund(i: int) -> None:
            reservation = reservations[i]
            if reservation is not None:
                await store.refund(reservation)

        out["redis refund, 1 client"] = await time_async(refund, len(reservations), 1)
        sample = [prefix + c.key for c in charges[0]]
        sizes = [await store.client.memory_usage(key) for key in sample]
        out["redis per bucket"] = statistics.mean(size for size in sizes if size)
    finally:
        keys = [key async for key in store.client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await store.client.delete(*keys[start : start + 1000])
        await store.close()
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"{'measure':<34} {'value':>14}  unit")
    for name, value in results.items():
        if isinstance(value, dict) and "checks_per_s" in value:
            print(f"{name:<34} {value['us_per_check']:>14.1f}  µs per check as a task sees it")
            print(f"{'':<34} {value['checks_per_s']:>14,.0f}  checks per second")
        elif isinstance(value, str):
            print(f"{name:<34} {value}")
        elif "per bucket" in name:
            print(f"{name:<34} {value:>14.0f}  bytes")
        else:
            print(f"{name:<34} {value:>14.2f}  µs per call")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = parser.parse_args()
    count, rounds, buckets = (5_000, 3, 20_000) if args.quick else (50_000, 5, 100_000)
    concurrency = [8, 64] if args.quick else [8, 32, 128]
    results: dict[str, Any] = {}
    results.update(await bench_memory(count, rounds, users=10_000))
    results["memory per bucket"] = memory_per_bucket(buckets)
    redis = await bench_redis(count // 5, rounds, users=10_000, concurrency=concurrency)
    results.update(redis if "skipped" not in redis else {"redis": redis["skipped"]})
    print_table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "limiter",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "calls_per_round": count,
        "rounds": rounds,
        "redis_url": REDIS_URL.split("@")[-1],
        "results": results,
    }
    (RESULTS / "limiter.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS / 'limiter.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
