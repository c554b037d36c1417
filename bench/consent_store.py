"""Consent store benchmark: import time, lookups per second and p99 lookup latency at 10k, 100k
and 1M contacts, on SQLite and PostgreSQL.

The store is filled in stages (10k, then up to 100k, then up to 1M contacts) and measured after
each stage with the same lookups, so the table shows directly whether a lookup gets slower as the
store grows. A lookup is what the consent policy does per recipient: ``store.basis(address,
topic, sender, rules=...)`` - the address's and its domain's events through the index, then the
rules in Python.

    .venv/bin/python bench/consent_store.py [--contacts N] [--backend sqlite|postgres|both]

Prints a table; writes JSON to bench/results/consent_store.json (figures of a backend not run
this time are kept from the previous file). PostgreSQL: SENDGUARD_TEST_POSTGRES or --dsn (default
postgresql://postgres@127.0.0.1:5432/test); the run uses a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import __version__  # noqa: E402
from proxy.stores.consent import (  # noqa: E402
    ConsentEvent,
    ConsentStore,
    ConsentStoreConfig,
    SoftOptInRules,
    open_consent_store,
)

DEFAULT_DSN = os.environ.get("SENDGUARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = ROOT / "bench" / "results" / "consent_store.json"
DOMAINS = 5000  # contacts are spread over this many domains (200 per domain at 1M)
BASE = datetime(2023, 1, 1, tzinfo=UTC)
RULES = SoftOptInRules(enabled=True, max_age=timedelta(days=730), topics={"newsletter": frozenset({"shoes", "bags"})})


def address(index: int) -> str:
    return f"contact{index}@d{index % DOMAINS}.example"


def contact_events(index: int) -> Iterator[ConsentEvent]:
    """A realistic mix: every contact opted in; 10% also customers, 10% opted out later,
    1% suppressed; every 100th domain has a domain-level (B2B) consent."""
    # A cheap deterministic hash instead of random.Random(index): generating the data must not
    # cost more than importing it.
    mix = (index * 2654435761) % 2**32
    subject = address(index)
    start = BASE + timedelta(minutes=mix % 600_000)
    topic = "newsletter" if (mix >> 8) % 10 < 7 else "*"
    yield ConsentEvent(
        kind="opted_in",
        subject_kind="address",
        subject=subject,
        subject_original=subject,
        effective_at=start,
        method="double_opt_in",
        topic=topic,
        confirmed_at=start + timedelta(minutes=3),
        ip=f"198.51.100.{index % 250 + 1}",
        text_version="v3",
        source="https://shop.example/signup",
    )
    roll = ((mix >> 12) % 1000) / 1000
    if roll < 0.10:
        yield ConsentEvent(
            kind="customer",
            subject_kind="address",
            subject=subject,
            subject_original=subject,
            effective_at=start + timedelta(days=5),
            method="sale",
            sender="shop.example",
            product_category=("shoes", "bags", "cars")[(mix >> 4) % 3],
            objection_offered=True,
            relation=f"order {index}",
        )
    elif roll < 0.20:
        yield ConsentEvent(
            kind="opted_out",
            subject_kind="address",
            subject=subject,
            subject_original=subject,
            effective_at=start + timedelta(days=30),
            method="one_click",
            topic=topic,
        )
    elif roll < 0.21:
        yield ConsentEvent(
            kind="suppressed",
            subject_kind="address",
            subject=subject,
            subject_original=subject,
            effective_at=start + timedelta(days=60),
            method="hard_bounce",
            reason="user unknown",
            upstream_reply="550 5.1.1 user unknown",
        )
    if index < DOMAINS and index % 100 == 0:
        domain = f"d{index}.example"
        yield ConsentEvent(
            kind="opted_in",
            subject_kind="domain",
            subject=domain,
            subject_original=f"@{domain}",
            effective_at=start,
            method="paper",
            source=f"contract {index}",
        )


class Counted:
    """Events of a range of contacts, counting them as they stream into the store."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.events = first, last, 0

    def __iter__(self) -> Iterator[ConsentEvent]:
        for index in range(self.first, self.last):
            for event in contact_events(index):
                self.events += 1
                yield event


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure_lookups(store: ConsentStore, contacts: int, lookups: int, concurrency: int) -> dict[str, Any]:
    rng = random.Random(contacts)
    # 10% of lookups are for addresses the store has never seen (a new recipient).
    targets = [
        address(rng.randrange(contacts)) if rng.random() < 0.9 else f"new{rng.randrange(10**9)}@d7.example"
        for _ in range(lookups)
    ]
    for target in targets[:200]:  # warm caches and the connection pool
        await store.basis(target, "newsletter", "shop.example", rules=RULES)
    latencies: list[float] = []
    allowed = 0
    started = time.perf_counter()
    for target in targets:
        begin = time.perf_counter()
        basis = await store.basis(target, "newsletter", "shop.example", rules=RULES)
        latencies.append(time.perf_counter() - begin)
        allowed += basis.allowed
    sequential = time.perf_counter() - started

    queue = list(targets)

    async def worker() -> None:
        while queue:
            await store.basis(queue.pop(), "newsletter", "shop.example", rules=RULES)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    concurrent = time.perf_counter() - started
    return {
        "lookups": lookups,
        "allowed_fraction": round(allowed / lookups, 3),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "max_ms": round(max(latencies) * 1000, 3),
        "sequential_per_s": round(lookups / sequential),
        "concurrency": concurrency,
        "concurrent_per_s": round(lookups / concurrent),
    }


async def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    stages = [n for n in (10_000, 100_000, 1_000_000) if n < args.contacts] + [args.contacts]
    workdir = Path(tempfile.mkdtemp(prefix="sg-consent-bench-"))
    schema = f"sgbench_{secrets.token_hex(4)}"
    admin = None
    if backend == "sqlite":
        config = ConsentStoreConfig(backend="sqlite", path=str(workdir / "consent.db"), timeout=30)
    else:
        import psycopg

        admin = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        separator = "&" if "?" in args.dsn else "?"
        dsn = f"{args.dsn}{separator}options={quote(f'-csearch_path={schema}')}"
        config = ConsentStoreConfig(backend="postgres", dsn=dsn, timeout=30, pool_min=4, pool_max=args.concurrency)
    store = await open_consent_store(config)
    results: list[dict[str, Any]] = []
    try:
        done = 0
        for target in stages:
            batch = Counted(done, target)
            started = time.perf_counter()
            await store.import_events(batch)
            seconds = time.perf_counter() - started
            if admin is not None:
                await admin.execute(f'ANALYZE "{schema}".consent_events')
            done = target
            lookup = await measure_lookups(store, target, args.lookups, args.concurrency)
            stage = {
                "contacts": target,
                "events_total": await store.count(),
                "imported_events": batch.events,
                "import_seconds": round(seconds, 2),
                "import_events_per_s": round(batch.events / seconds),
                **lookup,
            }
            if backend == "sqlite":
                stage["file_mb"] = directory_mb(workdir)  # database and WAL
            results.append(stage)
            print(f"  {backend} {target:>9,} contacts: {stage}", file=sys.stderr, flush=True)
    finally:
        await store.close()
        if admin is not None:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            version = (await (await admin.execute("SHOW server_version")).fetchone() or ("?",))[0]
            await admin.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"stages": results}
    out["engine_version"] = sqlite3.sqlite_version if backend == "sqlite" else version
    return out


def directory_mb(path: Path) -> float:
    """Size of the SQLite database with its WAL, in MiB."""
    return round(sum(p.stat().st_size for p in path.iterdir()) / 2**20, 1)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'backend':<9} {'contacts':>10} {'events':>10} {'import s':>9} {'import ev/s':>12} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'lookups/s':>10} {'conc. lookups/s':>16}"
    )
    print(header)
    print("-" * len(header))
    for backend, result in report["results"].items():
        for stage in result["stages"]:
            print(
                f"{backend:<9} {stage['contacts']:>10,} {stage['events_total']:>10,} {stage['import_seconds']:>9} "
                f"{stage['import_events_per_s']:>12,} {stage['p50_ms']:>8} {stage['p99_ms']:>8} "
                f"{stage['sequential_per_s']:>10,} {stage['concurrent_per_s']:>16,}"
            )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=1_000_000, help="contacts at the last stage (default 1M)")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--lookups", type=int, default=20_000, help="timed lookups per stage")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent lookups in the throughput run")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL to run against")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    previous: dict[str, Any] = {}
    if args.output.exists():
        try:
            previous = json.loads(args.output.read_text()).get("results", {})
        except (OSError, ValueError):
            previous = {}
    results = {k: v for k, v in previous.items() if k not in backends}
    for backend in backends:
        results[backend] = await run_backend(backend, args)
        results[backend]["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report = {
        "benchmark": "consent_store",
        "machine": machine(),
        "versions": {"sendguard": __version__, "git_commit": git_commit()},
        "parameters": {
            "contacts": args.contacts,
            "lookups": args.lookups,
            "concurrency": args.concurrency,
            "domains": DOMAINS,
            "lookup": "basis(address, 'newsletter', 'shop.example') with soft opt-in rules",
        },
        "results": {k: results[k] for k in ("sqlite", "postgres") if k in results},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
