"""``sendguard limits show [KEY]``: rate-limit budgets as the shared limit store holds them;
``sendguard limits reset KEY``: make every budget of one key value full again.

Without KEY: the buckets closest to their ceiling, fullest first. With KEY (a user name,
sender address, domain, client IP, MX host ...): every configured limit's budget for that
value, including the ones it has not touched lately (those are full).

Only a shared store can be read from outside the proxy: with ``stores.limits.backend:
memory`` the budgets live inside the running sendguard process, and the command says so
instead of printing numbers it cannot know.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from policies.ratelimit import LimitSpec, RateLimitPolicy, RateSpec, human_wait, normalize_domain
from proxy.config.settings import Settings
from proxy.stores.limits import (
    BucketState,
    LimitStore,
    LimitStoreConfig,
    LimitStoreError,
    StoreSettings,
    bucket_key,
    open_limit_store,
    parse_bucket_key,
)

__all__ = ("BudgetRow", "add_limits_parser", "collect_rows", "reset_limits", "run_limits", "show_limits")

EXIT_OK, EXIT_BAD_INPUT, EXIT_STORE_DOWN = 0, 2, 3


def add_limits_parser(subparsers: Any) -> None:
    """Add ``limits show`` to the ``sendguard`` command's sub-parsers."""
    limits = subparsers.add_parser("limits", help="rate-limit budgets in the limit store")
    commands = limits.add_subparsers(dest="limits_command", required=True, metavar="SUBCOMMAND")
    show = commands.add_parser("show", help="budget of one key, or the limits closest to their ceiling")
    show.add_argument("--config", required=True, help="YAML config file (its stores.limits and rate_limit entries)")
    show.add_argument("key", nargs="?", help="a key value: user, sender address, domain, client IP, MX host")
    show.add_argument("--top", type=int, default=20, help="without KEY: how many buckets to list (default 20)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    reset = commands.add_parser("reset", help="make every budget of one key full again (after a false alarm)")
    reset.add_argument("--config", required=True, help="YAML config file (its stores.limits and rate_limit entries)")
    reset.add_argument("key", help="the key value: user, sender address, domain, client IP, MX host")
    reset.add_argument("--limit", help="only this limit (its name), not every configured one")


@dataclass(frozen=True, slots=True)
class BudgetRow:
    limit: str
    key: str
    rate: str | None  # None: the bucket belongs to a limit no longer configured
    used: float  # units taken and not yet refilled
    burst: int | None
    available: int | None
    full_in: float  # seconds until the bucket is full again

    @property
    def fill(self) -> float:
        return self.used / self.burst if self.burst else 0.0


def store_config_of(settings: Settings) -> StoreSettings:
    """The limit store's section: ``stores.limits``, else ``stores.state`` (one Redis section
    for all shared state), else the in-memory default."""
    stores = getattr(settings, "stores", None)
    for name in ("limits", "state"):
        section = getattr(stores, name, None)
        if section is not None and all(hasattr(section, f) for f in ("backend", "url", "key_prefix", "timeout")):
            return section  # type: ignore[no-any-return]
    return LimitStoreConfig()


def configured_limits(settings: Settings) -> dict[str, LimitSpec]:
    limits: dict[str, LimitSpec] = {}
    for entry in settings.policies:
        if issubclass(entry.policy_class, RateLimitPolicy):
            for spec in entry.options.limits:
                limits.setdefault(spec.label, spec)
    return limits


def _row(state: BucketState, limits: dict[str, LimitSpec]) -> BudgetRow | None:
    parsed = parse_bucket_key(state.key)
    if parsed is None:
        return None
    label, period, value = parsed
    spec = limits.get(label)
    rate: RateSpec | None = None
    if spec is not None:
        rate = next((r for r in spec.rates_for(value) if r.period == period), None)
    if rate is None:
        return BudgetRow(label, value, None, 0.0, None, None, state.full_in())
    used = state.used(rate.interval)
    available = max(0, math.floor(rate.burst - used + 1e-9))
    return BudgetRow(label, value, str(rate), used, rate.burst, available, state.full_in())


async def collect_rows(store: LimitStore, limits: dict[str, LimitSpec], key: str | None, top: int) -> list[BudgetRow]:
    """The rows ``limits show`` prints: one key's budgets, or the fullest buckets."""
    if key is None:
        rows = [row for row in (_row(s, limits) for s in await store.buckets()) if row is not None]
        rows.sort(key=lambda r: (r.fill, r.full_in), reverse=True)
        return rows[:top]
    values = list(dict.fromkeys([key.strip().lower(), normalize_domain(key)]))
    rows = []
    for label, spec in limits.items():
        for value in values:
            keys = [bucket_key(label, rate.period, value) for rate in spec.rates_for(value)]
            for state in await store.peek(keys):
                row = _row(state, limits)
                if row is not None:
                    rows.append(row)
    rows.sort(key=lambda r: r.fill, reverse=True)  # the one closest to its ceiling first
    return rows


def _table(rows: list[BudgetRow]) -> str:
    header = ("LIMIT", "KEY", "RATE", "USED", "AVAILABLE", "FULL AGAIN IN")
    lines = [header]
    for row in rows:
        used = f"{math.ceil(row.used - 1e-9)}/{row.burst}" if row.burst else "-"
        lines.append(
            (
                row.limit,
                row.key,
                row.rate or "(not configured)",
                used,
                "-" if row.available is None else str(row.available),
                human_wait(row.full_in) if row.full_in > 0 else "full",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


async def show_limits(
    settings: Settings,
    key: str | None,
    *,
    top: int = 20,
    as_json: bool = False,
    store_config: StoreSettings | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    config = store_config or store_config_of(settings)
    limits = configured_limits(settings)
    if config.backend == "memory":
        print(
            "sendguard: the limit store is in memory (stores.limits.backend: memory): budgets live inside the "
            "running sendguard process and cannot be read from here. Set stores.limits.backend: redis to share "
            "budgets between processes and to inspect them.",
            file=err,
        )
        if limits:
            print("configured limits: " + "; ".join(f"{n}: {', '.join(s.rates)}" for n, s in limits.items()), file=err)
        return EXIT_BAD_INPUT
    store = open_limit_store(config)
    try:
        rows = await collect_rows(store, limits, key, top)
    except LimitStoreError as error:
        print(f"sendguard: cannot read the limit store: {error}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()
    if as_json:
        print(json.dumps([asdict(row) | {"fill": round(row.fill, 4)} for row in rows], indent=2), file=out)
    elif not rows:
        print(
            "no limit has been used recently: every budget is full" if key is None else f"no limit for {key}", file=out
        )
    else:
        print(_table(rows), file=out)
    return EXIT_OK


async def reset_limits(
    settings: Settings,
    key: str,
    *,
    only: str | None = None,
    store_config: StoreSettings | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Delete the buckets of ``key`` (both spellings ``show`` uses) for every configured
    limit, or only ``only``: the next message from that key finds a full budget."""
    config = store_config or store_config_of(settings)
    limits = configured_limits(settings)
    if only is not None:
        if only not in limits:
            print(f"sendguard: no limit named {only!r}; configured: {', '.join(limits) or 'none'}", file=err)
            return EXIT_BAD_INPUT
        limits = {only: limits[only]}
    if config.backend == "memory":
        print(
            "sendguard: the limit store is in memory (stores.limits.backend: memory): budgets live inside the "
            "running sendguard process and cannot be reset from here (a restart empties them).",
            file=err,
        )
        return EXIT_BAD_INPUT
    values = list(dict.fromkeys([key.strip().lower(), normalize_domain(key)]))
    keys = [
        bucket_key(label, rate.period, value)
        for label, spec in limits.items()
        for value in values
        for rate in spec.rates_for(value)
    ]
    store = open_limit_store(config)
    try:
        reset = await store.reset(keys)
    except LimitStoreError as error:
        print(f"sendguard: cannot reach the limit store: {error}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()
    print(f"{key}: {reset} budget(s) made full again ({', '.join(limits)})", file=out)
    return EXIT_OK


def run_limits(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point for ``sendguard limits ...`` once the config is loaded."""
    if args.limits_command == "show":
        return asyncio.run(show_limits(settings, args.key, top=args.top, as_json=args.json))
    if args.limits_command == "reset":
        return asyncio.run(reset_limits(settings, args.key, only=args.limit))
    raise ValueError(f"unknown limits command {args.limits_command!r}")
