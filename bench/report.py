"""Compliance report benchmark: seconds and peak memory of ``sendguard report`` on a generated
audit log of 1M lines (a month of commercial and transactional mail: deliveries on opt-in and
soft opt-in, refusals by consent, unsubscribe and the upstream, copies, pauses) with a SQLite
consent store holding the month's opt-outs.

The report runs as the command a user types, in a child process, once on a one-line log (the
cost of starting: Python, the imports, the store) and once on the big log, each for JSON and
HTML; peak memory is the child's maximum resident set (``wait4``). The log is streamed, so
the big run should cost the small run plus what the report keeps: counters and an 8-byte hash
per distinct commercial recipient.

    .venv/bin/python bench/report.py [--lines 1000000] [--recipients 200000] [--quick] [--out FILE]

Prints a table; writes JSON to bench/results/report.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.stores.consent import (  # noqa: E402
    OPTED_IN,
    OPTED_OUT,
    ConsentEvent,
    ConsentStoreConfig,
    open_consent_store,
)

START = datetime(2026, 11, 1, tzinfo=UTC)
SPAN = timedelta(days=30)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _consent(recipient: str, basis: str, at: str, record: int) -> dict[str, Any]:
    allowed = basis in ("opt_in", "soft_opt_in")
    evidence: dict[str, Any] = {
        "basis": basis,
        "allowed": allowed,
        "recipient": recipient,
        "topic": "*",
        "sender": "shop.example",
        "at": at,
    }
    if basis != "none":
        evidence["record"] = {
            "id": record,
            "kind": "opted_in" if basis == "opt_in" else "customer",
            "subject": recipient,
            "topic": "*",
            "sender": "*",
            "method": "double_opt_in" if basis == "opt_in" else "sale",
            "effective_at": "2026-03-01T12:00:00Z",
            "recorded_at": "2026-03-01T12:00:01Z",
            "source": "https://shop.example/signup",
            "confirmed_at": "2026-03-01T12:05:00Z",
        }
    result: dict[str, Any] = {
        "policy": "consent",
        "stage": "rcpt",
        "action": "accept" if allowed else "reject",
        "mode": "enforce",
        "reason": f"{basis}: opt-in on 2026-03-01 (record #{record})",
        "recipient": recipient,
        "evidence": evidence,
    }
    if not allowed:
        result["reply"] = f"550 5.7.1 <{recipient}>: no recorded consent for commercial mail"
    return result


def _address(n: int) -> str:
    return f"person{n}@customer{n % 500}.example"


def generate(path: Path, lines: int, recipients: int, seed: int = 7) -> None:
    """One audit line per transaction, in time order, shaped as relay/transaction.py writes them."""
    rng = random.Random(seed)
    step = SPAN / lines
    with open(path, "w", encoding="utf-8") as out:
        for n in range(lines):
            moment = START + step * n
            at = _stamp(moment)
            rcpt = _address(rng.randrange(recipients))
            roll = rng.random()
            entry: dict[str, Any] = {
                "time": at,
                "txn": f"{n:012x}",
                "listener": "local",
                "client": "10.0.0.5",
                "helo": "app1.shop.example",
                "tls": True,
                "auth_user": "newsletter",
                "sender": "news@shop.example",
                "recipients": [rcpt],
                "refused": {},
                "class": "commercial",
                "class_reason": {"class": "commercial", "source": "detector", "decided_by": "promotion", "score": 6},
                "message_id": f"<{n}@shop.example>",
                "size": 48213,
                "policies": [],
                "upstream_reply": "250 2.0.0 Ok: queued",
                "copies": None,
                "reply": f"250 2.0.0 Ok: queued [{n:012x}]",
                "outcome": "delivered",
                "duration_ms": 41.7,
                "config": "d62828a3731c28d4",
            }
            if roll < 0.25:
                entry.update(
                    {
                        "class": "transactional",
                        "sender": "orders@shop.example",
                        "class_reason": {"class": "transactional", "source": "rule 0", "decided_by": "rule"},
                    }
                )
                entry["policies"] = [
                    {
                        "policy": "required_headers",
                        "stage": "message",
                        "action": "accept",
                        "mode": "enforce",
                        "reason": "",
                    }
                ]
            elif roll < 0.80:
                entry["policies"] = [
                    _consent(rcpt, "opt_in", at, n % 90000),
                    {
                        "policy": "unsubscribe",
                        "stage": "message",
                        "action": "accept",
                        "mode": "enforce",
                        "reason": "link",
                    },
                ]
            elif roll < 0.86:
                entry["policies"] = [_consent(rcpt, "soft_opt_in", at, n % 90000)]
            elif roll < 0.93:
                refusal = _consent(rcpt, "none", at, 0)
                entry.update(
                    {
                        "recipients": [],
                        "refused": {rcpt: refusal["reply"]},
                        "policies": [refusal],
                        "outcome": "abandoned",
                        "upstream_reply": None,
                        "reply": None,
                        "note": "reset",
                    }
                )
            elif roll < 0.96:
                others = [_address(rng.randrange(recipients)) for _ in range(3)]
                entry["recipients"] = [rcpt, *others]
                entry["policies"] = [_consent(r, "opt_in", at, n % 90000) for r in entry["recipients"]]
                entry["copies"] = {r: {"fate": "delivered", "reply": "250 2.0.0 Ok"} for r in entry["recipients"]}
                entry["copies"][others[0]] = {"fate": "refused", "reply": "550 5.1.1 no such user", "reported": True}
            elif roll < 0.99:
                entry["policies"] = [_consent(rcpt, "opt_in", at, n % 90000)]
                entry.update(
                    {
                        "recipients": [],
                        "refused": {rcpt: "550 5.1.1 <x>: no such user"},
                        "outcome": "abandoned",
                        "upstream_reply": None,
                        "reply": None,
                    }
                )
            else:
                entry["policies"] = [
                    {
                        "policy": "pause",
                        "stage": "mail",
                        "action": "tempfail",
                        "mode": "enforce",
                        "reason": "bounces: 31 of the last 500 recipients of shop.example "
                        "hard-bounced (6.2%, more than 5%); clean the list",
                    }
                ]
                entry.update(
                    {
                        "outcome": "tempfailed",
                        "upstream_reply": None,
                        "reply": "451 4.7.1 Commercial mail from shop.example is paused",
                    }
                )
            out.write(json.dumps(entry, separators=(",", ":")) + "\n")


async def fill_store(path: Path, recipients: int, opt_outs: int, seed: int = 8) -> None:
    rng = random.Random(seed)
    store = await open_consent_store(ConsentStoreConfig(path=str(path)))
    try:
        events = []
        for _ in range(opt_outs):
            who = _address(rng.randrange(recipients))
            moment = START + SPAN * rng.random()
            events.append(
                ConsentEvent(
                    OPTED_IN,
                    "address",
                    who,
                    START - timedelta(days=200),
                    "double_opt_in",
                    confirmed_at=START - timedelta(days=200),
                    source="https://shop.example/signup",
                )
            )
            events.append(
                ConsentEvent(
                    OPTED_OUT,
                    "address",
                    who,
                    moment,
                    rng.choice(["one_click", "link", "reply", "complaint"]),
                    recorded_at=moment + timedelta(seconds=rng.randint(1, 600)),
                    id=None,
                )
            )
        await store.import_events(events)
    finally:
        await store.close()


def run_report(config: Path, audit: Path, fmt: str, out: Path) -> dict[str, float]:
    command = [
        sys.executable,
        "-c",
        "import sys; from proxy.cli.main import main; sys.exit(main(sys.argv[1:]))",
        "report",
        "--config",
        str(config),
        "--audit-log",
        str(audit),
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-30",
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    with open(out.with_suffix(".stderr"), "w+b") as errors:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak RSS, not ours
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"report failed: {errors.read().decode()}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--recipients", type=int, default=200_000, help="distinct addresses the lines draw from")
    parser.add_argument("--opt-outs", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="5,000 lines (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "report.json"))
    args = parser.parse_args()
    lines, opt_outs, recipients = (5_000, 100, 2_000) if args.quick else (args.lines, args.opt_outs, args.recipients)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        audit, tiny, store = work / "audit.jsonl", work / "tiny.jsonl", work / "consent.db"
        config = work / "sendguard.yaml"
        config.write_text(
            "listeners: [{name: local, address: '127.0.0.1:2525'}]\n"
            f"stores:\n  consent:\n    path: {store}\naudit:\n  path: {audit}\n"
        )
        started = time.perf_counter()
        generate(audit, lines, recipients)
        generate(tiny, 1, recipients)
        generated = time.perf_counter() - started
        asyncio.run(fill_store(store, recipients, opt_outs))
        size = audit.stat().st_size
        results: dict[str, Any] = {}
        for fmt in ("json", "html"):
            baseline = run_report(config, tiny, fmt, work / f"tiny.{fmt}")
            big = run_report(config, audit, fmt, work / f"report.{fmt}")
            results[fmt] = {
                "seconds": big["seconds"],
                "peak_rss_mb": big["peak_rss_mb"],
                "baseline_seconds": baseline["seconds"],
                "baseline_rss_mb": baseline["peak_rss_mb"],
                "growth_mb": round(big["peak_rss_mb"] - baseline["peak_rss_mb"], 1),
                "lines_per_second": round(lines / big["seconds"]),
                "output_bytes": (work / f"report.{fmt}").stat().st_size,
            }
        summary = json.loads((work / "report.json").read_text())
    report = {
        "bench": "report",
        "quick": args.quick,
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "lines": lines,
        "log_bytes": size,
        "distinct_recipients_pool": recipients,
        "opt_outs": opt_outs,
        "generate_seconds": round(generated, 1),
        "report_figures": {
            "commercial_messages": summary["commercial"]["messages"],
            "distinct_recipients": summary["commercial"]["distinct_recipients"],
            "opt_outs_followed": summary["opt_outs"]["followed_by_a_message"],
            "not_honoured": summary["opt_outs"]["not_honoured"],
        },
        "results": results,
    }
    print(f"{lines:,} lines, {size / 1e6:.0f} MB, {opt_outs:,} opt-outs in the store")
    print(f"{'format':7} {'seconds':>8} {'lines/s':>9} {'peak MB':>8} {'start MB':>9} {'growth MB':>10}")
    for fmt, row in results.items():
        print(
            f"{fmt:7} {row['seconds']:8.1f} {row['lines_per_second']:9,} {row['peak_rss_mb']:8.1f} "
            f"{row['baseline_rss_mb']:9.1f} {row['growth_mb']:10.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
