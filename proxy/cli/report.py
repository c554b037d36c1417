"""``sendguard report``: the compliance report for a period, or the evidence pack for one
address (``--address``), from the audit log and the consent store of a config.

The audit log is streamed (with its rotations, oldest first); the consent store is read
page by page (the report) or for one address (the pack). Exit 0 written, 2 bad input or
config, 3 the consent store cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from proxy.cli.consent import load_consent_config
from proxy.config.settings import Settings
from proxy.report.auditlog import AuditFiles
from proxy.report.compliance import ComplianceReport, Period
from proxy.report.evidence import EvidencePack
from proxy.report.redact import Redactor
from proxy.report.render import render
from proxy.stores.consent import (
    ANY,
    ConsentEvent,
    ConsentInputError,
    ConsentStoreError,
    erasure_subject,
    normalize_sender,
    open_consent_store,
    parse_subject,
)
from proxy.stores.consent_events import ERASED_ORIGINAL

__all__ = ("add_report_parser", "build_report", "run_report")

EXIT_OK, EXIT_BAD_INPUT, EXIT_STORE_DOWN = 0, 2, 3


def add_report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="compliance report for a period (--from, --to), or the evidence pack for one address (--address)",
    )
    report.add_argument("--config", required=True, help="YAML config file (its audit log and consent store)")
    report.add_argument("--from", dest="start", help="first day (2026-11-01) or time (ISO 8601, UTC if no zone)")
    report.add_argument("--to", dest="end", help="last day, included (2026-11-30), or time (excluded)")
    report.add_argument("--sender-domain", help="only mail whose envelope sender is of this domain")
    report.add_argument("--address", help="the evidence pack for this address instead of the report")
    report.add_argument("--format", choices=("html", "json", "csv"), default="json", help="output format (json)")
    report.add_argument("--out", help="write to this file (mode 0640: it names people) instead of stdout")
    report.add_argument("--audit-log", help="read this audit log instead of the config's audit.path")


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(build_report(args, settings))


async def build_report(
    args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    audit_path = args.audit_log or settings.audit.path
    if not audit_path:
        print("sendguard: no audit log: the config has audit.path: null and no --audit-log was given", file=err)
        return EXIT_BAD_INPUT
    period: Period | None = None
    try:
        if args.start or args.end:
            if not (args.start and args.end):
                raise ValueError("--from and --to go together")
            period = Period.parse(args.start, args.end)
            if period.end <= period.start:
                raise ValueError("--to is before --from")
        elif not args.address:
            raise ValueError("a report needs --from and --to (or --address for one address's evidence pack)")
        sender = normalize_sender(args.sender_domain) if args.sender_domain else None
        address = parse_subject(args.address).value if args.address else None
    except (ValueError, ConsentInputError) as exc:
        print(f"sendguard: {exc}", file=err)
        return EXIT_BAD_INPUT
    if sender == ANY:
        sender = None
    files = AuditFiles.at(audit_path)
    if not files.files:
        print(f"sendguard: no audit log at {audit_path}", file=err)
        return EXIT_BAD_INPUT
    started = time.monotonic()
    _, rules = load_consent_config(args.config)
    store_config = settings.stores.consent
    where = store_config.path if store_config.backend == "sqlite" else "postgres"
    try:
        store = await open_consent_store(store_config)
    except ConsentStoreError as exc:
        print(f"sendguard: cannot open the consent store: {exc}", file=err)
        return EXIT_STORE_DOWN
    try:
        data: dict[str, Any]
        if address is not None:
            pack = EvidencePack(address, period)
            key = store.erasure_key
            pack.tombstone = erasure_subject(key, address) if key is not None else None
            pack.set_history(await store.history(address), await store.basis(address, ANY, sender or ANY, rules=rules))
            for entry in files:
                pack.add(entry)
            pack.sources = _sources(files, f"{store_config.backend} {where}", started)
            data = pack.as_dict()
            if pack.erased_at is not None and pack.tombstone is not None:
                data = Redactor(key, [pack.tombstone]).scrub(data)
        else:
            assert period is not None
            report = ComplianceReport(
                period, sender, erasure_key=store.erasure_key, dead_statuses=settings.bounces.statuses
            )
            # Only the period's opt-outs and suppressions are kept, and the subjects of the
            # erasures (to keep erased addresses out of it); the store is read page by page.
            kept: list[ConsentEvent] = []
            tombstones: set[str] = set()
            async for event in store.export():
                if event.subject_original == ERASED_ORIGINAL:
                    tombstones.add(event.subject)
                if event.kind in ("opted_out", "suppressed") and event.effective_at in period:
                    kept.append(event)
            report.add_consent_events(kept)
            for entry in files:
                report.add(entry)
            report.sources = _sources(files, f"{store_config.backend} {where}", started)
            data = Redactor(store.erasure_key, tombstones).scrub(report.as_dict())
    except ConsentStoreError as exc:
        print(f"sendguard: cannot read the consent store: {exc}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()
    text = render(data, args.format)
    if args.out:
        _write_private(Path(args.out), text)
        print(f"sendguard: wrote {args.out}", file=err)
    else:
        out.write(text)
    return EXIT_OK


def _sources(files: AuditFiles, store: str, started: float) -> dict[str, Any]:
    return {
        "audit_files": files.describe(),
        "lines_read": files.lines_read,
        "lines_skipped": files.lines_skipped,
        "consent_store": store,
        "seconds": round(time.monotonic() - started, 3),
    }


def _write_private(path: Path, text: str) -> None:
    """The report names people: owner and group may read it (as the audit log), not others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:  # CSV's CRLF as written
        handle.write(text)
